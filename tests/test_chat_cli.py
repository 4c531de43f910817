"""chat_cli: one-shot and piped multi-turn sessions against a tiny random model saved as a real
base checkpoint, nanochat's token layout, UTF-8-safe streaming, clear errors for missing models.

`make_tiny_base` is also used by the chat_web tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import chat, checkpoint
from nanochat_jax.config import GPTConfig
from nanochat_jax.engine import Engine
from nanochat_jax.model import GPT
from nanochat_jax.tokenizer import Tokenizer
from scripts import chat_cli

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 12

_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today? "
    "I am fine, thank you! Café, naïve, résumé. 日本語のテキスト。 Numbers: 12, 345, 6789. "
)


def make_tiny_base(
    base_dir: Path, *, seed: int = 0, sequence_len: int = 64
) -> tuple[GPT, Tokenizer]:
    """A trained ~300-token tokenizer in <base>/tokenizer and a random 1-layer GPT saved as
    base_checkpoints/d1 step 0 (weights drawn at a useful scale: nanochat zero-inits lm_head,
    which would make every greedy reply the same token)."""
    tokenizer = Tokenizer.train_from_iterator(iter([_TEXT * 20, _TEXT.upper() * 5]), 320)
    tokenizer.save(base_dir / "tokenizer")
    config = GPTConfig(
        sequence_len=sequence_len,
        vocab_size=tokenizer.get_vocab_size(),
        n_layer=1,
        n_head=2,
        n_kv_head=2,
        n_embd=32,
    )
    model = GPT(config, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda x: np.asarray(rng.normal(0.0, 0.5, x.shape), np.float32), nnx.to_pure_dict(params)
    )
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state, rest)
    directory = checkpoint.checkpoint_dir("base", "d1", base_dir)
    with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(0, params=params, meta={"model_config": config.to_dict(), "step": 0})
    return model, tokenizer


def greedy_reply(engine: Engine, tokenizer: Tokenizer, prompt: list[int], max_tokens: int) -> str:
    """What the CLI must print for `prompt` at temperature 0 (tokens up to the stop token,
    decoded the streaming way)."""
    results, _ = engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0)
    return "".join(
        piece
        for _, piece in chat.stream_text(iter(results[0][len(prompt) :]), tokenizer.decode_bytes)
    )


def user_turn(tokenizer: Tokenizer, text: str) -> list[int]:
    special = tokenizer.encode_special
    return [
        special("<|user_start|>"),
        *tokenizer.encode(text),
        special("<|user_end|>"),
        special("<|assistant_start|>"),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("chat_base")
    model, tokenizer = make_tiny_base(base)
    return base, Engine(model, tokenizer), tokenizer


@pytest.fixture
def base_env(tiny, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tiny[0]))
    return tiny


def test_one_shot_prompt_prints_the_greedy_reply(base_env, capsys):
    _, engine, tokenizer = base_env
    bos = tokenizer.get_bos_token_id()
    expected = greedy_reply(engine, tokenizer, [bos, *user_turn(tokenizer, "hello")], MAX_TOKENS)
    assert expected.strip(), "the tiny model should say something"
    argv = ["-i", "base", "-p", "hello", "-t", "0", "--max-tokens", str(MAX_TOKENS)]
    assert chat_cli.main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_piped_session_with_clear_and_quit(base_env):
    """A real process reading a pipe: two turns, `clear`, a fresh turn, `quit`."""
    base, engine, tokenizer = base_env
    bos = tokenizer.get_bos_token_id()
    first = [bos, *user_turn(tokenizer, "hello")]
    reply1 = greedy_reply(engine, tokenizer, first, MAX_TOKENS)
    history = first + _reply_tokens(engine, tokenizer, first)
    second = history + user_turn(tokenizer, "how are you")
    reply2 = greedy_reply(engine, tokenizer, second, MAX_TOKENS)
    reply3 = greedy_reply(engine, tokenizer, [bos, *user_turn(tokenizer, "fox")], MAX_TOKENS)
    env = os.environ | {"NANOCHAT_JAX_BASE_DIR": str(base), "PYTHONIOENCODING": "utf-8"}
    cmd = [sys.executable, "-m", "scripts.chat_cli", "-i", "base", "-t", "0"]
    proc = subprocess.run(
        [*cmd, "--max-tokens", str(MAX_TOKENS)],
        input="hello\nhow are you\n\nclear\nfox\nquit\nnever read\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in proc.stderr
    turns = out.split("Assistant: ")[1:]
    assert [t.split("\n\nUser:")[0].removesuffix("\n") for t in turns] == [reply1, reply2, reply3]
    assert "(conversation cleared)" in turns[1]
    assert out.count("User: ") == 6  # hello, how are you, (empty), clear, fox, quit


def test_eof_ends_the_session_cleanly(base_env, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _Lines([]))
    assert chat_cli.main(["-i", "base", "--max-tokens", "4"]) == 0
    assert "User: " in capsys.readouterr().out


def test_ctrl_c_ends_the_session_cleanly(base_env, monkeypatch, capsys):
    def interrupt(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupt)
    assert chat_cli.main(["-i", "base"]) == 0


def _reply_tokens(engine, tokenizer, prompt) -> list[int]:
    results, _ = engine.generate_batch(prompt, max_tokens=MAX_TOKENS, temperature=0)
    return [*results[0][len(prompt) :], tokenizer.encode_special("<|assistant_end|>")]


class _Lines:
    """A stdin that returns the given lines, then EOF."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)

    def readline(self) -> str:
        return self.lines.pop(0) + "\n" if self.lines else ""


def test_history_uses_nanochats_token_layout(tiny):
    _, engine, tokenizer = tiny
    chat = chat_cli.Chat(engine, tokenizer, temperature=0.0, top_k=None, max_tokens=MAX_TOKENS)
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    assert chat.tokens == [bos]
    reply = "".join(chat.reply("hello", seed=1))
    first = [bos, *user_turn(tokenizer, "hello")]
    assert reply == greedy_reply(engine, tokenizer, first, MAX_TOKENS)
    assert chat.tokens == first + _reply_tokens(engine, tokenizer, first)
    assert chat.tokens[-1] == end
    before = list(chat.tokens)
    "".join(chat.reply("and you?", seed=2))
    assert chat.tokens[: len(before)] == before
    assert chat.tokens[len(before) : len(before) + 1] == [
        tokenizer.encode_special("<|user_start|>")
    ]
    chat.clear()
    assert chat.tokens == [bos]


def test_conversation_longer_than_the_context_is_refused(tiny):
    _, engine, tokenizer = tiny
    chat = chat_cli.Chat(engine, tokenizer, temperature=0.0, top_k=None, max_tokens=MAX_TOKENS)
    with pytest.raises(ValueError, match="type 'clear'"):
        list(chat.reply("the quick brown fox " * 20, seed=1))
    assert chat.tokens == [tokenizer.get_bos_token_id()]  # nothing half-added


def test_stream_text_holds_back_split_characters():
    data = "aé日😀b".encode()
    pieces = [bytes([b]) for b in data]  # one token per byte: every multi-byte char is split
    out = list(chat.stream_text(iter(range(len(pieces))), lambda ids: pieces[ids[0]]))
    texts = [text for _, text in out]
    assert "".join(texts) == "aé日😀b"
    assert "\ufffd" not in "".join(texts)
    assert [t for t in texts if t] == ["a", "é", "日", "😀", "b"]


def test_missing_phase_says_which_exist_and_how_to_make_it(base_env, capsys):
    with pytest.raises(SystemExit) as e:
        chat_cli.main(["-i", "sft", "-p", "hi"])  # this base dir has only a base model
    message = str(e.value)
    assert "no sft checkpoint" in message
    assert "python -m scripts.chat_sft" in message
    assert "`-i base`" in message


def test_missing_model_tag_lists_the_available_ones(base_env):
    with pytest.raises(SystemExit, match=r"no base model tagged 'd9'; available: d1"):
        chat_cli.main(["-i", "base", "-g", "d9", "-p", "hi"])


def test_bad_flags_are_refused(base_env, capsys):
    for argv in (["-t", "-1"], ["-k", "-2"], ["--max-tokens", "0"], ["-i", "pretrain"]):
        with pytest.raises(SystemExit) as e:
            chat_cli.main(argv)
        assert e.value.code == 2


def test_without_source_the_most_trained_model_is_used(base_env, capsys):
    _, engine, tokenizer = base_env
    bos = tokenizer.get_bos_token_id()
    expected = greedy_reply(engine, tokenizer, [bos, *user_turn(tokenizer, "hello")], MAX_TOKENS)
    assert chat_cli.main(["-p", "hello", "-t", "0", "--max-tokens", str(MAX_TOKENS)]) == 0
    assert capsys.readouterr().out == expected + "\n"  # only a base model exists here


def test_no_model_at_all_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="no trained model yet; run `python run_speedrun.py`"):
        chat_cli.main(["-p", "hi"])
