"""Decode tokens/s of the jitted KV-cache Engine vs a naive full-recompute loop, same model.

    uv run python -m bench.bench_engine [--depth 4] [--vocab 8192] [--tokens 256] [--batch 1 8]
                                        [--torch-nanochat PATH]

Model: GPTConfig.from_depth(depth) with random weights (nanochat's init zeroes lm_head, which
would make every logit 0). Prompt: 16 random ids; every run generates exactly --tokens tokens
(special ids lie outside the vocab, so nothing stops early), temperature 1.0, top_k 50.

* engine, one call: `Engine.generate_batch` (prefill + the whole decode loop in one jitted call).
* engine, streamed: `Engine.generate` with stream_chunk 1 (one jitted call per token, the next
  dispatched before the current one is read) and with stream_chunk 8.
* naive: a Python loop that forwards the whole sequence every step (no cache), jitted once per
  16-token length bucket (the sequence is right-padded; causal attention makes padding harmless),
  compilation done before timing; sampling jitted in the same call.
* tool round trip: a scripted table-lookup "model" that calls the calculator every 8th token
  (`<|python_start|>1+2<|python_end|>` -> forced `<|output_start|>3<|output_end|>`); the extra
  time per call vs the same token stream with the tool ids unreachable, in decode steps of the
  GPT above at the first --batch.
* --torch-nanochat PATH: nanochat's own Engine (PyTorch, from a nanochat checkout at PATH) on the
  same weights, when torch is installed.

Compile time is excluded everywhere (a warm-up call first); each figure is the best of --repeats.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.config import GPTConfig
from nanochat_jax.engine import Engine, sample_next_token
from nanochat_jax.model import GPT
from nanochat_jax.tokenizer import SPECIAL_TOKENS as SPECIAL_NAMES

PROMPT_LEN = 16
NAIVE_BUCKET = 16
TEMPERATURE, TOP_K = 1.0, 50


class _StubTokenizer:
    """Token ids only: specials at the given ids, text decoded as digits (the calculator sees
    random digit strings and mostly refuses them)."""

    def __init__(self, special_ids: dict[str, int]):
        self.special_ids = special_ids

    def encode_special(self, name: str) -> int:
        return self.special_ids[name]

    def get_bos_token_id(self) -> int:
        return self.special_ids["<|bos|>"]

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 10 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(str(i % 10) for i in ids)


def _unreachable_specials(vocab_size: int) -> _StubTokenizer:
    return _StubTokenizer({name: vocab_size + i for i, name in enumerate(SPECIAL_NAMES)})


def _random_model(config: GPTConfig, dtype) -> GPT:
    model = GPT(config, rngs=nnx.Rngs(0), compute_dtype=dtype)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    scaled = [
        0.5 * jax.random.normal(k, x.shape) / np.sqrt(x.shape[0])
        for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, scaled))
    return model


def _best_time(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _naive_loop(model: GPT, prompt: list[int], batch: int, tokens: int):
    """run(compile_only=False) -> (B, W) ids; forwards the whole padded prefix every step."""
    total = len(prompt) + tokens
    width = -(-total // NAIVE_BUCKET) * NAIVE_BUCKET

    @nnx.jit(static_argnames="bucket")
    def step(model, ids_BW, t, key, bucket):
        logits_BTV = model(ids_BW[:, :bucket])
        logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, t - 1, axis=1, keepdims=False)
        step_key = jax.random.fold_in(key, t)
        return ids_BW.at[:, t].set(sample_next_token(logits_BV, step_key, TEMPERATURE, TOP_K))

    def run(compile_only: bool = False):
        ids = np.zeros((batch, width), np.int32)
        ids[:, : len(prompt)] = prompt
        ids_BW, key = jnp.asarray(ids), jax.random.PRNGKey(0)
        for t in range(len(prompt), total):
            if compile_only and t % NAIVE_BUCKET:
                continue  # one call per bucket compiles them all
            bucket = -(-(t + 1) // NAIVE_BUCKET) * NAIVE_BUCKET
            ids_BW = step(model, ids_BW, jnp.int32(t), key, bucket=bucket)
        return jax.block_until_ready(ids_BW)

    return run


def _engine_rows(engine: Engine, prompt, batch, tokens, repeats) -> dict[str, float]:
    kw = dict(max_tokens=tokens, temperature=TEMPERATURE, top_k=TOP_K, seed=0)
    out = {}
    out["engine, one call"] = _best_time(
        lambda: engine.generate_batch(prompt, batch, **kw), repeats
    )
    for chunk in (1, 8):
        engine.stream_chunk = chunk
        out[f"engine, streamed (chunk {chunk})"] = _best_time(
            lambda: sum(1 for _ in engine.generate(prompt, batch, **kw)), repeats
        )
    engine.stream_chunk = 1
    return out


class _Scripted(nnx.Module):
    """A "model" whose next token is a fixed function of the current one (a table lookup), so
    the engine's own cost is all that is timed."""

    def __init__(self, successor: dict[int, int], vocab_size: int):
        self.config = GPTConfig(
            sequence_len=512, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2
        )
        table = np.full((vocab_size, vocab_size), -30.0, np.float32)
        for token, nxt in successor.items():
            table[token, nxt] = 30.0
        self.table = nnx.Param(jnp.asarray(table))

    def forward_cached(self, idx_BT, cache):
        return self.table[...][idx_BT], cache.replace(pos=cache.pos + idx_BT.shape[1])


class _CharTokenizer(_StubTokenizer):
    def __init__(self, special_ids: dict[str, int], chars: str):
        super().__init__(special_ids)
        self.chars = chars

    def encode(self, text: str) -> list[int]:
        return [self.chars.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def _tool_round_trip(step_ms: float, tokens: int, repeats: int) -> str:
    """Per tool call: the extra time of a scripted stream that calls the calculator every 8th
    step, vs the very same token stream with the tool ids unreachable."""
    chars = "0123456789+-*/. "
    vocab = len(chars) + len(SPECIAL_NAMES)
    ids = {name: len(chars) + i for i, name in enumerate(SPECIAL_NAMES)}
    c = chars.index
    # python_start 1 + 2 python_end output_start 3 output_end, again and again
    cycle = [ids["<|python_start|>"], c("1"), c("+"), c("2"), ids["<|python_end|>"]]
    cycle += [ids["<|output_start|>"], c("3"), ids["<|output_end|>"]]
    successor = {a: b for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)}
    successor[ids["<|assistant_start|>"]] = cycle[0]
    model = _Scripted(successor, vocab)
    quiet_ids = dict(ids, **{"<|python_start|>": vocab, "<|python_end|>": vocab + 1})
    tools = Engine(model, _CharTokenizer(ids, chars))
    quiet = Engine(model, _CharTokenizer(quiet_ids, chars))
    prompt, kw = [ids["<|assistant_start|>"]], dict(max_tokens=tokens, temperature=0.0)
    (with_tools,), (mask,) = tools.generate_batch(prompt, **kw)
    assert with_tools == quiet.generate_batch(prompt, **kw)[0][0], "streams should be equal"
    calls = with_tools.count(ids["<|python_end|>"])
    assert mask.count(0) == len(prompt) + 3 * calls, "each call should force 3 tokens"
    t_tools = _best_time(lambda: tools.generate_batch(prompt, **kw), repeats)
    t_quiet = _best_time(lambda: quiet.generate_batch(prompt, **kw), repeats)
    per_call_ms = 1e3 * (t_tools - t_quiet) / calls
    return (
        f"tool round trip: {calls} calculator calls in {tokens} steps: {1e3 * t_quiet:.1f} ms "
        f"without, {1e3 * t_tools:.1f} ms with -> {per_call_ms:.2f} ms per call "
        f"= {per_call_ms / step_ms:.2f} decode steps of the batch-1 model ({step_ms:.2f} ms/step)"
    )


def _time_torch_nanochat(path: str, config: dict, weights: dict, prompt, batch, tokens, repeats):
    """(label, seconds) of nanochat's Engine.generate_batch, or (why it was skipped, None).
    Runs in a child process, so that torch and XLA do not compete for the same cores."""
    try:
        import torch
    except ImportError:
        return "nanochat (PyTorch): skipped, torch is not installed (uv sync --extra torch)", None
    if not (Path(path) / "nanochat" / "engine.py").exists():
        return f"nanochat (PyTorch): skipped, no nanochat/engine.py under {path}", None
    sys.path.insert(0, str(Path(path).resolve()))
    from nanochat.engine import Engine as TorchEngine
    from nanochat.gpt import GPT as TorchGPT
    from nanochat.gpt import GPTConfig as TorchConfig

    torch_model = TorchGPT(TorchConfig(**config))
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    # nanochat keeps wte in bf16, which only works under autocast: compare in fp32 throughout.
    torch_model.transformer.wte.to(torch.float32)
    torch_model.eval()
    engine = TorchEngine(torch_model, _unreachable_specials(config["vocab_size"]))
    kw = dict(max_tokens=tokens, temperature=TEMPERATURE, top_k=TOP_K, seed=0)
    seconds = _best_time(lambda: engine.generate_batch(prompt, batch, **kw), repeats)
    return f"nanochat Engine (torch {torch.__version__})", seconds


def _torch_nanochat(path: str, model: GPT, prompt, batch, tokens, repeats):
    from nanochat_jax.convert import to_nanochat_state_dict

    weights = {k: np.asarray(v, np.float32) for k, v in to_nanochat_state_dict(model).items()}
    args = (path, model.config.to_dict(), weights, prompt, batch, tokens, repeats)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_time_torch_nanochat, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--no-tool", action="store_true", help="skip the tool round-trip run")
    parser.add_argument("--torch-nanochat", metavar="PATH", help="a nanochat checkout")
    args = parser.parse_args()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    dtype = jnp.dtype(args.dtype)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=512)
    model = _random_model(config, dtype)
    prompt = np.random.default_rng(0).integers(0, args.vocab, PROMPT_LEN).tolist()
    engine = Engine(model, _unreachable_specials(args.vocab), compute_dtype=dtype)
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), {args.dtype}, "
        f"depth {args.depth} (d={config.n_embd}), vocab {args.vocab}, prompt {PROMPT_LEN}, "
        f"{args.tokens} tokens, temperature {TEMPERATURE}, top_k {TOP_K}"
    )
    step_ms = {}
    for batch in args.batch:
        times = _engine_rows(engine, prompt, batch, args.tokens, args.repeats)
        step_ms[batch] = 1e3 * times["engine, one call"] / args.tokens
        naive = _naive_loop(model, prompt, batch, args.tokens)
        naive(compile_only=True)
        times["naive full recompute"] = _best_time(naive, 1, warm_up=False)
        if args.torch_nanochat:
            label, seconds = _torch_nanochat(
                args.torch_nanochat, model, prompt, batch, args.tokens, args.repeats
            )
            if seconds is None:
                print(label)
            else:
                times[label] = seconds
        base = times["naive full recompute"]
        print(f"batch {batch}:")
        for name, seconds in times.items():
            rate = batch * args.tokens / seconds
            print(f"  {name:38s} {seconds:8.3f} s  {rate:9.0f} tok/s  {base / seconds:6.1f}x naive")
    if not args.no_tool:
        print(_tool_round_trip(step_ms[args.batch[0]], args.tokens, args.repeats))


if __name__ == "__main__":
    main()
