"""Engine: golden greedy parity, KV-cached logits, buckets, sampling, stops, tool use, calculator.

Measured on CPU (jax 0.10.2, fp32), tiny model 1: produced ids identical to nanochat's Engine;
cached logits vs golden: prefill 4.3e-6, decode steps 1-3 3.8e-6 / 4.5e-6 / 3.8e-6; cached vs our
full forward over all 20 steps 5.3e-6 (the golden README saw 5.4e-6 in PyTorch), so 1e-4 holds.
Engines are module fixtures: each compiles once per shape and the tests reuse them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import from_nanochat_state_dict
from nanochat_jax.engine import Engine, length_bucket, sample_next_token, use_calculator
from nanochat_jax.model import KVCache
from nanochat_jax.tokenizer import SPECIAL_TOKENS as SPECIAL_NAMES

GOLDEN = Path(__file__).parent / "golden"
TINY1 = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
LOGITS_ATOL = 1e-4


class StubTokenizer:
    """Specials at `first_special`..+8 (bos first); text is one token per character of `chars`."""

    def __init__(self, first_special: int, chars: str = ""):
        self.specials = {name: first_special + i for i, name in enumerate(SPECIAL_NAMES)}
        self.char_ids = {c: i for i, c in enumerate(chars)}
        self.chars = chars

    def encode_special(self, name: str) -> int:
        return self.specials[name]

    def get_bos_token_id(self) -> int:
        return self.specials["<|bos|>"]

    def encode(self, text: str) -> list[int]:
        return [self.char_ids[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else "?" for i in ids)


class Recording(nnx.Module):
    """Wraps a model and reports (pos, T, logits) of every forward_cached call to the host."""

    def __init__(self, inner: nnx.Module, record):
        self.inner, self.config, self.record = inner, inner.config, record

    def forward_cached(self, idx_BT, cache):
        logits_BTV, new_cache = self.inner.forward_cached(idx_BT, cache)
        jax.debug.callback(self.record, cache.pos, logits_BTV, ordered=True)
        return logits_BTV, new_cache


class Bigram(nnx.Module):
    """A scripted "model": the logits of the next token are a row of a table indexed by the
    current token. Lets tests drive the engine through exact token sequences."""

    def __init__(self, table_VV: np.ndarray):
        V = table_VV.shape[0]
        self.config = GPTConfig(sequence_len=64, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1,
                                n_embd=2)  # fmt: skip
        self.table = nnx.Param(jnp.asarray(table_VV, jnp.float32))

    def forward_cached(self, idx_BT, cache):
        return self.table[...][idx_BT], cache.replace(pos=cache.pos + idx_BT.shape[1])


def _golden():
    golden = dict(np.load(GOLDEN / "gpt_tiny_kvcache.npz"))
    meta = json.loads((GOLDEN / "gpt_tiny_kvcache.json").read_text())
    return golden, meta


@pytest.fixture(scope="module")
def tiny_model():
    state = np.load(GOLDEN / "gpt_tiny_forward.npz")
    params = {k.removeprefix("param/"): state[k] for k in state.files if k.startswith("param/")}
    return from_nanochat_state_dict(params, TINY1)


@pytest.fixture(scope="module")
def engine(tiny_model):
    # The golden stub tokenizer: specials 512..520 lie outside the vocab, so no stops, no tools.
    return Engine(tiny_model, StubTokenizer(512))


def _recording_engine(model, prefill_chunk):
    calls = []
    record = lambda pos, logits: calls.append((int(pos), np.asarray(logits)))  # noqa: E731
    return Engine(Recording(model, record), StubTokenizer(512), prefill_chunk=prefill_chunk), calls


_full_forward = nnx.jit(lambda model, idx_BT: model(idx_BT))


def _full_logits(model, ids) -> np.ndarray:
    """(T, V) uncached logits; row t is what the model predicts after ids[: t + 1] (causal)."""
    return np.asarray(_full_forward(model, jnp.asarray([ids], jnp.int32)))[0]


# ---- greedy parity and KV-cached logits ------------------------------------------------------


def test_greedy_matches_golden_nanochat_engine(engine):
    golden, meta = _golden()
    prompt = meta["prompt"]
    columns = list(engine.generate(prompt, num_samples=1, max_tokens=20, temperature=0.0))
    assert [c[0][0] for c in columns] == meta["produced"]
    assert [c[1][0] for c in columns] == meta["token_masks"]
    results, masks = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)
    assert results[0] == prompt + meta["produced"]
    assert masks[0] == [0] * len(prompt) + [1] * 20


def test_cached_logits_match_golden_and_full_forward(tiny_model):
    golden, meta = _golden()
    prompt, produced = meta["prompt"], meta["produced"]
    eng, calls = _recording_engine(tiny_model, prefill_chunk=512)
    results, _ = eng.generate_batch(prompt, max_tokens=20, temperature=0.0)
    assert results[0][len(prompt) :] == produced
    jax.effects_barrier()
    # One padded prefill (16 positions) at pos 0, then 19 single-token decodes.
    assert [pos for pos, _ in calls] == [0] + list(range(10, 29))
    assert calls[0][1].shape == (1, 16, TINY1.vocab_size)
    prefill_V = calls[0][1][0, len(prompt) - 1]
    np.testing.assert_allclose(prefill_V, golden["logits_prefill_last"], atol=LOGITS_ATOL)
    for k in (1, 2, 3):
        np.testing.assert_allclose(
            calls[k][1][0, 0], golden[f"logits_decode_step{k}"], atol=LOGITS_ATOL
        )
    full_TV = _full_logits(tiny_model, prompt + produced)
    worst = 0.0
    for k, (_, logits) in enumerate(calls):
        step_V = prefill_V if k == 0 else logits[0, 0]
        worst = max(worst, float(np.max(np.abs(step_V - full_TV[len(prompt) - 1 + k]))))
    assert worst < LOGITS_ATOL, f"cached vs full forward: max abs diff {worst:.2e}"


def test_chunked_prefill_equals_one_shot(tiny_model):
    prompt = np.random.default_rng(0).integers(0, 512, 37).tolist()  # bucket 64
    firsts = {}
    for chunk in (8, 512):
        eng, calls = _recording_engine(tiny_model, prefill_chunk=chunk)
        results, _ = eng.generate_batch(prompt, max_tokens=6, temperature=0.0)
        jax.effects_barrier()
        prefill = [c for c in calls if c[1].shape[1] > 1]
        assert [c[0] for c in prefill] == ([0, 8, 16, 24, 32] if chunk == 8 else [0])
        last = prefill[-1][1][0, (len(prompt) - 1) % prefill[-1][1].shape[1]]
        firsts[chunk] = (results[0], last)
    assert firsts[8][0] == firsts[512][0]
    np.testing.assert_allclose(firsts[8][1], firsts[512][1], atol=1e-5)
    np.testing.assert_allclose(
        firsts[512][1], _full_logits(tiny_model, prompt)[-1], atol=LOGITS_ATOL
    )


def test_generate_streams_while_decoding(tiny_model):
    eng, calls = _recording_engine(tiny_model, prefill_chunk=512)
    forwards_seen = [len(calls) for _ in eng.generate(list(range(1, 11)), max_tokens=40)]
    assert len(forwards_seen) == 40
    # Column k is handed out while at most one speculative step beyond it has run (prefill + k
    # decodes + 1), not after the whole 40-step loop.
    assert all(seen <= k + 2 for k, seen in enumerate(forwards_seen)), forwards_seen


# ---- buckets, sampling -----------------------------------------------------------------------


def test_prompts_in_one_bucket_reuse_the_compiled_code(tiny_model):
    engine = Engine(tiny_model, StubTokenizer(512))  # fresh: counts only this test's compiles
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 512, n).tolist() for n in (10, 9, 12, 15, 11, 20)]
    engine.generate_batch(prompts[0], max_tokens=10, temperature=0.0)
    assert engine.num_compilations == 2  # prefill and decode
    for prompt in prompts[1:4]:  # prompt bucket 16, cache bucket 32 (n + 10 <= 32)
        results, _ = engine.generate_batch(prompt, max_tokens=10, temperature=0.0)
        assert len(results[0]) == len(prompt) + 10
    assert len(list(engine.generate(prompts[4], max_tokens=12, temperature=0.0))) == 12
    assert engine.num_compilations == 2
    engine.generate_batch(prompts[5], max_tokens=10, temperature=0.0)  # prompt bucket 32
    assert engine.num_compilations == 3, "a new prompt bucket compiles only the prefill"
    engine.generate_batch(prompts[0], max_tokens=30, temperature=0.0)  # cache bucket 64
    assert engine.num_compilations == 5


def test_length_bucket():
    lengths = (1, 15, 16, 17, 33, 64, 65, 400, 640, 700)
    assert [length_bucket(n, 640) for n in lengths] == [16, 16, 16, 32, 64, 64, 128, 512, 640, 640]
    assert length_bucket(5, 8) == 8  # the cap wins over the minimum (a tiny model's limit)


def test_sampling_is_reproducible_and_rows_differ(engine):
    prompt = list(range(1, 11))
    kw = dict(max_tokens=12, temperature=1.0, top_k=50)
    a, masks = engine.generate_batch(prompt, num_samples=4, seed=7, **kw)
    b, _ = engine.generate_batch(prompt, num_samples=4, seed=7, **kw)
    c, _ = engine.generate_batch(prompt, num_samples=4, seed=8, **kw)
    assert a == b and a != c
    assert len({tuple(row) for row in a}) == 4, "rows should differ"
    # nanochat's quirk: the first sampled token is shared by every row.
    assert len({row[len(prompt)] for row in a}) == 1
    assert all(m == [0] * 10 + [1] * 12 for m in masks)
    # Streaming gives the very same tokens as the one-call batch for a seed.
    streamed = list(engine.generate(prompt, num_samples=4, seed=7, **kw))
    assert [[col[0][r] for col in streamed] for r in range(4)] == [row[10:] for row in a]


def test_independent_first_token(tiny_model):
    eng = Engine(tiny_model, StubTokenizer(512), broadcast_first_token=False)
    rows, _ = eng.generate_batch(list(range(1, 11)), num_samples=8, max_tokens=1, seed=3)
    assert len({row[-1] for row in rows}) > 1


def test_top_k_1_equals_greedy(engine):
    prompt = [5, 6, 7, 8]
    greedy, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=10, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=10, temperature=1.3,
                                    top_k=1, seed=11)  # fmt: skip
    assert top1 == greedy


def test_sample_next_token_respects_top_k():
    logits_BV = jnp.tile(jnp.arange(10.0), (4000, 1))
    ids = np.asarray(sample_next_token(logits_BV, jax.random.PRNGKey(0), 1.0, top_k=3))
    assert set(ids.tolist()) == {7, 8, 9}
    expected = np.exp([0.0, 1.0, 2.0]) / np.exp([0.0, 1.0, 2.0]).sum()
    np.testing.assert_allclose(np.bincount(ids, minlength=10)[7:] / 4000, expected, atol=0.03)
    assert np.asarray(sample_next_token(logits_BV[:2], jax.random.PRNGKey(0), 0.0)).tolist() == [
        9,
        9,
    ]


def test_bad_arguments_are_clear_errors(engine):
    with pytest.raises(ValueError, match="token id"):
        engine.generate_batch([1, 512])
    with pytest.raises(ValueError, match="temperature"):
        engine.generate_batch([1], temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        engine.generate_batch([1], top_k=0)
    with pytest.raises(ValueError, match="maximum length 640"):
        engine.generate_batch([1] * 600, max_tokens=100)
    with pytest.raises(ValueError, match="unknown arguments"):
        engine.generate_batch([1], temprature=0.5)


def test_bf16_compute(tiny_model):
    eng = Engine(tiny_model, StubTokenizer(512), compute_dtype=jnp.bfloat16)
    assert eng.compute_dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(eng._params))
    _, meta = _golden()
    results, _ = eng.generate_batch(meta["prompt"], max_tokens=3, temperature=0.0)
    assert results[0][10] == meta["produced"][0]  # its logit margin is far above bf16 noise
    assert KVCache.init(TINY1, 1, 16, eng.compute_dtype).k.dtype == jnp.bfloat16


# ---- stops and tool use (scripted bigram model) ----------------------------------------------

CHARS = "0123456789+-*/(). "
FIRST_SPECIAL = 20
V = 32
BOS, _, _, ASSISTANT_START, ASSISTANT_END, PY_START, PY_END, OUT_START, OUT_END = range(20, 29)


def _table(successors: dict[int, int], default: int) -> np.ndarray:
    table = np.full((V, V), -30.0, np.float32)
    for token in range(V):
        table[token, successors.get(token, default)] = 30.0
    return table


def _ids(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


@pytest.fixture(scope="module")
def tool_engine():
    # assistant_start -> python_start 2 + 3 python_end -> (anything) ; output_end -> assistant_end
    two, plus, three, seven = _ids("2+37")
    script = {ASSISTANT_START: PY_START, PY_START: two, two: plus, plus: three, three: PY_END,
              PY_END: seven, OUT_END: ASSISTANT_END}  # fmt: skip
    return Engine(Bigram(_table(script, default=seven)), StubTokenizer(FIRST_SPECIAL, CHARS))


def test_tool_call_forces_calculator_output(tool_engine):
    prompt = [BOS, 21, *_ids("1+1"), 22, ASSISTANT_START]
    expected = [PY_START, *_ids("2+3"), PY_END, OUT_START, *_ids("5"), OUT_END]
    columns = list(tool_engine.generate(prompt, num_samples=2, max_tokens=30, temperature=0.0))
    assert [c[0][0] for c in columns] == expected + [ASSISTANT_END]
    assert [c[1][0] for c in columns] == [1] * 5 + [0] * 3 + [1]
    assert all(c[0][0] == c[0][1] for c in columns)
    results, masks = tool_engine.generate_batch(prompt, num_samples=2, max_tokens=30,
                                                temperature=0.0)  # fmt: skip
    assert results == [prompt + expected] * 2
    assert masks == [[0] * len(prompt) + [1] * 5 + [0] * 3] * 2


def test_refused_expression_forces_nothing():
    two, star, seven = _ids("2*7")
    script = {ASSISTANT_START: PY_START, PY_START: two, two: star, PY_END: seven}
    table = _table(script, default=PY_END)  # "2*" is refused: no output, plain sampling goes on
    eng = Engine(Bigram(table), StubTokenizer(FIRST_SPECIAL, CHARS))
    (row,), (mask,) = eng.generate_batch([ASSISTANT_START], max_tokens=8, temperature=0.0)
    assert row[1:] == [PY_START, two, star, PY_END, seven, PY_END, seven, PY_END]
    assert mask == [0] + [1] * 8


def test_rows_stop_at_their_own_terminal_token():
    # From every token: "1" or <|assistant_end|> with equal odds; <|bos|> also stops.
    table = np.full((V, V), -30.0, np.float32)
    table[:, _ids("1")[0]] = table[:, ASSISTANT_END] = 0.0
    eng = Engine(Bigram(table), StubTokenizer(FIRST_SPECIAL, CHARS), broadcast_first_token=False)
    prompt = [ASSISTANT_START]
    results, masks = eng.generate_batch(prompt, num_samples=8, max_tokens=40, seed=5)
    lengths = [len(r) - 1 for r in results]
    assert len(set(lengths)) > 1 and all(
        r[1:] == _ids("1") * n for r, n in zip(results, lengths, strict=True)
    )
    assert [len(m) for m in masks] == [len(r) for r in results]
    stream = list(eng.generate(prompt, num_samples=8, max_tokens=40, seed=5))
    assert len(stream) == max(lengths) + 1  # ends with the column where the last row stopped
    for row, n in enumerate(lengths):
        assert stream[n][0][row] == ASSISTANT_END
    bos_table = np.full((V, V), -30.0, np.float32)
    bos_table[:, BOS] = 30.0
    bos_eng = Engine(Bigram(bos_table), StubTokenizer(FIRST_SPECIAL, CHARS))
    assert len(list(bos_eng.generate(prompt, max_tokens=10, temperature=0.0))) == 1


# ---- calculator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("2+3", 5),
        ("1,000 * 3", 3000),
        ("10/4", 2.5),
        ("4/2", 2.0),
        ("7 // 2", 3),
        ("7 % 3", 1),
        ("-(2 + 3) * +4", -20),
        ("0.1 + 0.2", 0.1 + 0.2),
        ("'strawberry'.count('r')", 3),
        ('"hello world".count("o")', 2),
    ],
)
def test_calculator_values(expr, value):
    result = use_calculator(expr)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "__import__('os').count('a')",
        "'a'.__class__",
        "'a'.count.__self__.count('a')",
        "().__class__.__bases__[0]",
        "9**9**9",
        "2**10",
        "'a'*10**9",
        "'a'*1000",
        "9" * 5000,
        "1" + "0" * 40,
        "10" + "*1000000000" * 5,
        "(" * 100 + "1" + ")" * 100,
        "-" * 900 + "1",
        "lambda: 1",
        "x + 1",
        "'abc'.count(x)",
        "'abc'.upper()",
        "'abc'.count('a', 1)",
        "1/0",
        "5 % 0",
        "1e400",
        "2(3)",
        "",
        "[1] * 10",
        "open('x').count('a')",
    ],
)
def test_calculator_refuses_hostile_input_quickly(expr):
    start = time.perf_counter()
    assert use_calculator(expr) is None
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(
    "expr",
    [
        "'direction'.count('d')",  # "dir"
        "'medieval'.count('e')",  # "eval"
        "'profile'.count('f')",  # "file"
        "'Reopened'.count('e')",  # "open", case-insensitive
        "'snake__case'.count('a')",  # "__"
        "'inputs'.count('t')",  # "input"
        "'strawberry'.count('DIR')",  # in the counted letters too
    ],
)
def test_calculator_refuses_nanochats_dangerous_substrings(expr):
    # nanochat parity (engine.use_calculator since 8892470): the substring test runs on the whole
    # lowercased expression, quoted word included.
    assert use_calculator(expr) is None


def test_calculator_counts_words_near_the_dangerous_ones():
    assert use_calculator("'dim'.count('d')") == 1  # "di" alone is fine
    assert use_calculator("'snake_case'.count('a')") == 2  # a single "_" is fine
    assert use_calculator("'evaluate'.count('e')") is None  # "eval"
    assert use_calculator("'valuate'.count('a')") == 2
