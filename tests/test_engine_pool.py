"""EnginePool: one Engine replica per (fake CPU) device gives a single Engine's answers, problem
for problem (greedy, sampled, with tool calls, from a model sharded over a mesh), traces each
shape once and compiles it once per device, swaps weights without recompiling, and `imap`
keeps input order, overlaps items and hands errors back.

The 8 devices are conftest's fake CPU devices; they share the machine's cores, so these tests
check correctness and compile counts, not speed (measured: nanochat_jax/engine.py docstring).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import sharding
from nanochat_jax.config import GPTConfig
from nanochat_jax.engine import Engine, EnginePool
from nanochat_jax.model import GPT
from tests.test_engine import (
    ASSISTANT_END,
    ASSISTANT_START,
    BOS,
    CHARS,
    FIRST_SPECIAL,
    OUT_END,
    OUT_START,
    PY_END,
    PY_START,
    Bigram,
    StubTokenizer,
    _ids,
    _table,
)

CONFIG = GPTConfig(sequence_len=64, vocab_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
TOKENIZER = StubTokenizer(CONFIG.vocab_size)  # specials outside the vocab: no stops, no tools


def random_gpt(seed: int) -> GPT:
    """Weights at a useful scale (nanochat zero-inits lm_head: every greedy token would be 0)."""
    model = GPT(CONFIG, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(
        state,
        jax.tree.map(
            lambda x: np.asarray(rng.normal(0.0, 0.5, x.shape), np.float32),
            nnx.to_pure_dict(state),
        ),
    )
    nnx.update(model, state)
    return model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts of 5..15 tokens: one prompt bucket (16), one cache bucket (32) at 12 new tokens."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CONFIG.vocab_size, int(k)).tolist() for k in rng.integers(5, 16, n)]


def sampled(engine: Engine, prompt: list[int]) -> list[int]:
    # seed = the prompt's length: problems differ, and the answer cannot depend on the replica.
    # One row: the shapes of `greedy`, so no new compilation (the temperature is a value).
    return engine.generate_batch(prompt, max_tokens=12, temperature=1.0, seed=len(prompt))[0][0]


def greedy(engine: Engine, prompt: list[int]) -> list[int]:
    return engine.generate_batch(prompt, max_tokens=12, temperature=0.0)[0][0]


def placements(engine: Engine) -> set[frozenset]:
    return {frozenset(leaf.devices()) for leaf in jax.tree.leaves(engine._params)}


@contextlib.contextmanager
def logged_compiles(caplog) -> Iterator[None]:
    """jax_log_compiles on in every thread (`jax.log_compiles()` is thread-local: the pool's
    worker threads would not see it)."""
    caplog.clear()
    before = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            yield
    finally:
        jax.config.update("jax_log_compiles", before)


def xla_compiles(caplog, name: str) -> int:
    return sum(f"Finished XLA compilation of jit({name})" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def model() -> GPT:
    return random_gpt(0)


@pytest.fixture(scope="module")
def single(model) -> Engine:
    """One Engine on the default device; the tests that use it leave its weights as they were."""
    return Engine(model, TOKENIZER)


@pytest.fixture(scope="module")
def reference(single) -> dict[str, list]:
    """The single Engine's answers to the 16 prompts."""
    return {
        "greedy": [greedy(single, p) for p in prompts(16)],
        "sampled": [sampled(single, p) for p in prompts(16)],
    }


@pytest.fixture(scope="module")
def pool(model) -> EnginePool:
    """Over all 8 devices; the tests that use it leave its weights as they found them."""
    return EnginePool(model, TOKENIZER)


def on_every_replica(pool: EnginePool, fn):
    """fn, made to wait until every replica holds an item: with len(pool) items, each replica
    then runs exactly one."""
    barrier = threading.Barrier(len(pool))

    def run(engine: Engine, prompt: list[int]):
        barrier.wait(timeout=60)
        return fn(engine, prompt)

    return run


def test_pool_answers_like_one_engine_and_compiles_once_per_device(pool, reference, caplog):
    assert len(pool) == len(jax.local_devices()) == 8
    for engine, device in zip(pool.engines, pool.devices, strict=True):
        assert placements(engine) == {frozenset({device})}
    with logged_compiles(caplog):
        answers = pool.map(on_every_replica(pool, greedy), [prompts(16)[0]] * 8)
    assert answers == [reference["greedy"][0]] * 8
    # one trace per function, shared by the replicas; one XLA compilation per device
    assert pool.num_compilations == 2
    assert xla_compiles(caplog, "_prefill_impl") == xla_compiles(caplog, "_decode_impl") == 8
    with logged_compiles(caplog):
        for _ in range(2):  # problem order and replica assignment vary from run to run
            assert pool.map(greedy, prompts(16)) == reference["greedy"]
            assert pool.map(sampled, prompts(16)) == reference["sampled"]
    assert pool.num_compilations == 2
    assert xla_compiles(caplog, "_prefill_impl") == xla_compiles(caplog, "_decode_impl") == 0


def test_pool_of_a_model_sharded_over_a_mesh(model, reference):
    mesh = sharding.make_mesh("data=2,fsdp=2")
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, jax.device_put(pure, sharding.tree_shardings(pure, mesh)))
    sharded = nnx.merge(graphdef, state)
    kernel = sharded.h[0].mlp.c_fc.kernel[...]
    assert len(kernel.sharding.device_set) == 4 and not kernel.sharding.is_fully_replicated
    on_two = EnginePool(sharded, TOKENIZER, devices=jax.local_devices()[5:7])
    assert on_two.devices == jax.local_devices()[5:7]
    assert on_two.map(greedy, prompts(16)) == reference["greedy"]


def test_set_params_updates_every_replica_without_recompiling(pool, single, model, reference):
    six = prompts(16)[:6]
    assert pool.map(greedy, six) == reference["greedy"][:6]
    compiled = pool.num_compilations
    other = random_gpt(1)
    pool.set_params(other)
    single.set_params(other)
    expected = [greedy(single, p) for p in six]
    single.set_params(model)
    assert expected != reference["greedy"][:6]
    assert pool.map(greedy, six) == expected
    assert pool.num_compilations == compiled
    # the pure-dict form (TrainState.params), sharded over a mesh as a train step leaves it
    mesh = sharding.make_mesh("4")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    pool.set_params(jax.device_put(params, sharding.tree_shardings(params, mesh)))
    assert pool.map(greedy, six) == reference["greedy"][:6]
    assert pool.num_compilations == compiled
    for engine, device in zip(pool.engines, pool.devices, strict=True):
        assert placements(engine) == {frozenset({device})}


def test_tool_calls_on_replicas():
    two, plus, three, seven = _ids("2+37")
    script = {ASSISTANT_START: PY_START, PY_START: two, two: plus, plus: three, three: PY_END,
              PY_END: seven, OUT_END: ASSISTANT_END}  # fmt: skip
    tokenizer = StubTokenizer(FIRST_SPECIAL, CHARS)
    pool = EnginePool(Bigram(_table(script, default=seven)), tokenizer, devices=jax.devices()[:2])
    prompt = [BOS, *_ids("1+1"), ASSISTANT_START]
    expected = [PY_START, *_ids("2+3"), PY_END, OUT_START, *_ids("5"), OUT_END]

    def run(engine: Engine, num_samples: int):
        return engine.generate_batch(prompt, num_samples=num_samples, max_tokens=30, temperature=0)

    outputs = pool.map(run, [1, 2, 3, 2])
    for n, (results, masks) in zip([1, 2, 3, 2], outputs, strict=True):
        assert results == [prompt + expected] * n
        assert masks == [[0] * len(prompt) + [1] * 5 + [0] * 3] * n


def test_imap_order_overlap_errors_and_early_close():
    pool = EnginePool(Bigram(np.zeros((8, 8), np.float32)), StubTokenizer(8))
    seen: list[str] = []
    lock = threading.Lock()

    def slow(engine: Engine, i: int) -> int:
        time.sleep(0.3 if i % 3 == 0 else 0.05)  # uneven items: later ones overtake
        with lock:
            seen.append(threading.current_thread().name)
        return i * i

    start = time.perf_counter()
    assert pool.map(slow, range(16)) == [i * i for i in range(16)]
    assert time.perf_counter() - start < 16 * 0.05 + 6 * 0.3  # less than one after another
    assert len(set(seen)) > 1  # several replicas took items
    assert pool.map(slow, []) == []
    assert pool.map(slow, [3]) == [9]  # fewer items than replicas

    def failing(engine: Engine, i: int) -> int:
        if i == 5:
            raise RuntimeError("problem 5 broke")
        return i

    results = pool.imap(failing, range(40))
    assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="problem 5 broke"):
        next(results)
    # closing early waits for the items in progress, and nothing runs afterwards
    calls: list[int] = []

    def counted(engine: Engine, i: int) -> int:
        calls.append(i)
        time.sleep(0.02)
        return i

    results = pool.imap(counted, range(100))
    assert next(results) == 0
    results.close()
    done = len(calls)
    time.sleep(0.1)
    assert len(calls) == done < 100


def test_bad_devices():
    bigram = Bigram(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="devices must be distinct and at least one"):
        EnginePool(bigram, StubTokenizer(8), devices=[])
    with pytest.raises(ValueError, match="devices must be distinct"):
        EnginePool(bigram, StubTokenizer(8), devices=[jax.devices()[0]] * 2)
