"""Talk to a model in the terminal (nanochat's scripts/chat_cli.py).

    python -m scripts.chat_cli                      # the latest SFT model, interactive
    python -m scripts.chat_cli -i base -p "hello"   # one answer from the base model, then exit

Interactive mode keeps the whole conversation as tokens, in nanochat's layout:
<|bos|>, then per turn <|user_start|> text <|user_end|> <|assistant_start|> reply
<|assistant_end|>. Type `clear` to start over, `quit` or `exit` (or Ctrl-D / Ctrl-C) to leave.
Replies are streamed token by token; a character whose UTF-8 bytes span several tokens is printed
once all of its bytes have arrived.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from nanochat_jax import checkpoint, stage
from nanochat_jax.chat import stream_reply
from nanochat_jax.common import enable_compilation_cache, get_logger
from nanochat_jax.engine import Engine
from nanochat_jax.model import GPT
from nanochat_jax.tokenizer import Tokenizer, get_tokenizer

log = get_logger("chat_cli")

# Without -i, the most trained model that exists, in this order.
AUTO_SOURCE_ORDER = ("sft", "rl", "mid", "base")

# The script that writes each phase's checkpoints, for "no model" messages.
PHASE_SCRIPTS = {
    "base": "scripts.base_train",
    "mid": "scripts.mid_train",
    "sft": "scripts.chat_sft",
    "rl": "scripts.chat_rl",
}


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a checkpoint, shared with chat_web (nanochat's names)."""
    parser.add_argument(
        "-i",
        "--source",
        default=None,
        choices=list(PHASE_SCRIPTS),
        help="model phase to load (default: the most trained that exists: sft, rl, mid, base)",
    )
    parser.add_argument(
        "-g", "--model-tag", default=None, help="model tag, e.g. d20 (default: largest)"
    )
    parser.add_argument(
        "-s", "--step", type=int, default=None, help="step to load (default: latest)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="compute dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16",
    )


def load_chat_model(args: argparse.Namespace) -> tuple[GPT, Tokenizer, dict]:
    """(model, tokenizer, meta) for the checkpoint the flags name; SystemExit with a clear
    message (which phases do exist, which script makes the missing one) when there is none."""
    phases_present = [p for p in PHASE_SCRIPTS if checkpoint.list_model_tags(p)]
    if args.source is None:
        if not phases_present:
            raise SystemExit(
                "error: no trained model yet; run `python run_speedrun.py` (the CPU demo) or "
                "`python -m scripts.base_train`"
            )
        args.source = next(p for p in AUTO_SOURCE_ORDER if p in phases_present)
        log.info("no -i given: chatting with the %s model", args.source)
    if args.source not in phases_present:
        hint = f"train one with `python -m {PHASE_SCRIPTS[args.source]}`"
        if phases_present:
            others = " or ".join(f"`-i {p}`" for p in phases_present)
            hint += f", or chat with a model that exists: {others}"
        where = checkpoint.checkpoint_dir(args.source, "_").parent
        raise SystemExit(f"error: no {args.source} checkpoint in {where}; {hint}")
    if args.model_tag is not None and args.model_tag not in checkpoint.list_model_tags(args.source):
        raise SystemExit(
            f"error: no {args.source} model tagged {args.model_tag!r}; "
            f"available: {', '.join(checkpoint.list_model_tags(args.source))}"
        )
    enable_compilation_cache()  # no stage.setup_devices here (no mesh): cache prefill/decode
    try:
        tokenizer = get_tokenizer()
        model, meta = stage.load_model(
            args.source,
            model_tag=args.model_tag,
            step=args.step,
            compute_dtype=stage.compute_dtype(args.dtype),
        )
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    if model.config.vocab_size != tokenizer.get_vocab_size():
        raise SystemExit(
            f"error: the model's vocab_size ({model.config.vocab_size}) differs from the "
            f"tokenizer's ({tokenizer.get_vocab_size()}): they come from different runs"
        )
    return model, tokenizer, meta


class Chat:
    """A conversation with the model, kept as tokens in nanochat's chat layout."""

    def __init__(
        self, engine: Engine, tokenizer: Tokenizer, *, temperature: float, top_k, max_tokens: int
    ):
        self.engine, self.tokenizer = engine, tokenizer
        self.temperature, self.top_k, self.max_tokens = temperature, top_k, max_tokens
        special = tokenizer.encode_special
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start = special("<|assistant_start|>")
        self.assistant_end = special("<|assistant_end|>")
        self.bos = tokenizer.get_bos_token_id()
        self.context_len = engine.config.sequence_len
        self.tokens: list[int] = []
        self.clear()

    def clear(self) -> None:
        self.tokens = [self.bos]

    def reply(self, text: str, seed: int) -> Iterator[str]:
        """Streams the assistant's answer to `text` as printable pieces; the turn is added to the
        history once the answer is complete. ValueError if the conversation no longer fits."""
        prompt = [
            *self.tokens,
            self.user_start,
            *self.tokenizer.encode(text),
            self.user_end,
            self.assistant_start,
        ]
        if len(prompt) >= self.context_len:
            raise ValueError(
                f"the conversation is {len(prompt)} tokens but the model's context is "
                f"{self.context_len}; type 'clear' to start a new one"
            )
        answer: list[int] = []
        for token, piece in stream_reply(
            self.engine,
            self.tokenizer,
            prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=seed,
        ):
            answer.append(token)
            if piece:
                yield piece
        self.tokens = [*prompt, *answer, self.assistant_end]


def _print_reply(chat: Chat, text: str, seed: int) -> None:
    for piece in chat.reply(text, seed):
        print(piece, end="", flush=True)
    print()


def _interactive(chat: Chat) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print("nanochat-jax chat. Type 'clear' to start over, 'quit' or 'exit' to leave.")
    seed = 0
    while True:
        try:
            text = input("\nUser: ").strip()
        except EOFError:
            print()
            return
        if text in ("quit", "exit"):
            return
        if text == "clear":
            chat.clear()
            print("(conversation cleared)")
            continue
        if not text:
            continue
        print("\nAssistant: ", end="", flush=True)
        seed += 1  # a new sample each turn, reproducible per session
        try:
            _print_reply(chat, text, seed)
        except ValueError as e:
            print(f"({e})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument("-p", "--prompt", default="", help="answer this one prompt, then exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest reply, in tokens")
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be >= 1, got {args.max_tokens}")

    model, tokenizer, _ = load_chat_model(args)
    chat = Chat(
        Engine(model, tokenizer),
        tokenizer,
        temperature=args.temperature,
        top_k=args.top_k or None,
        max_tokens=args.max_tokens,
    )
    try:
        if args.prompt:
            _print_reply(chat, args.prompt, seed=42)
        else:
            _interactive(chat)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
