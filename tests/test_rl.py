"""rl: seeds, schedules, padding/masking, advantages and per-token weights against nanochat's
formula, the weighted loss's gradient through the shared train step against a direct
implementation of nanochat's objective (1 and 2 data-parallel devices), pass@k, and
Engine.set_params.

Measured (CPU, fp32): gradients of the weighted loss vs nanochat's objective agree to ~1e-7
relative (max abs error / max abs gradient), on 1 and on 2 devices.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nanochat_jax import rl, sharding, train
from nanochat_jax.config import GPTConfig
from nanochat_jax.engine import Engine, EnginePool
from nanochat_jax.model import GPT
from tests.test_engine import StubTokenizer

CONFIG = GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
PAD = 60  # plays <|assistant_end|>
ROOT = Path(__file__).resolve().parents[1]


# ---- seeds and schedules ---------------------------------------------------------------------


def test_rollout_seed_is_nanochats_and_the_same_in_every_process():
    assert rl.rollout_seed(3, 17, 1) == hash((3, 17, 1)) & 0x7FFFFFFF
    # the formula in fresh interpreters with other hash seeds (no jax import: fast)
    code = "print(hash((3, 17, 1)) & 0x7FFFFFFF, hash((0, 0, 0)) & 0x7FFFFFFF)"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ | {"PYTHONHASHSEED": seed},
            cwd=ROOT,
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {f"{rl.rollout_seed(3, 17, 1)} {rl.rollout_seed(0, 0, 0)}\n"}
    assert (
        len({rl.rollout_seed(s, e, k) for s in range(5) for e in range(5) for k in range(3)}) == 75
    )


def test_example_schedule_cycles_each_ranks_stride():
    sched = rl.example_schedule(num_examples=7, num_steps=3, examples_per_rank=2, world_size=2)
    assert sched.shape == (3, 2, 2)
    assert sched[:, 0].ravel().tolist() == [0, 2, 4, 6, 0, 2]
    assert sched[:, 1].ravel().tolist() == [1, 3, 5, 1, 3, 5]
    with pytest.raises(ValueError, match="rank 1 of 2 has no rows among 1"):
        rl.example_schedule(num_examples=1, num_steps=1, examples_per_rank=1, world_size=2)


# ---- padding, advantages, weights ----------------------------------------------------------


def _rollout(rng, num_samples, prefix=5, max_new=9, reward_p=0.5, idx=0) -> rl.Rollout:
    """Random samples: prompt (mask 0), then sampled tokens (mask 1) with a forced run (mask 0).
    The first sample is the longest, so all questions pad to one length (fewer compilations)."""
    seqs, masks = [], []
    prompt = rng.integers(0, 50, prefix).tolist()
    for i in range(num_samples):
        n = max_new if i == 0 else int(rng.integers(0, max_new + 1))
        mask = [0] * prefix + [1] * n
        if n > 4:
            mask[prefix + 2 : prefix + 4] = [0, 0]  # tool output
        seqs.append(prompt + rng.integers(0, 50, n).tolist())
        masks.append(mask)
    rewards = (rng.random(num_samples) < reward_p).astype(np.float32)
    return rl.Rollout(idx, prefix, seqs, masks, rewards)


def _nanochat_batch(rollout: rl.Rollout):
    """nanochat's get_batch: pad to the longest sample only, shift, mask, advantages."""
    longest = max(len(s) for s in rollout.sequences)
    ids = np.array([s + [PAD] * (longest - len(s)) for s in rollout.sequences])
    mask = np.array([m + [0] * (longest - len(m)) for m in rollout.masks])
    targets = ids[:, 1:].copy()
    targets[mask[:, 1:] == 0] = -1
    return ids[:, :-1], targets, rollout.rewards - rollout.rewards.mean()


def test_pad_rollout_matches_nanochat_then_pads_with_ignored_positions():
    rollout = _rollout(np.random.default_rng(0), 6)
    inputs, targets = rl.pad_rollout(rollout, PAD, seq_len=20)
    ref_inputs, ref_targets, _ = _nanochat_batch(rollout)
    T = ref_inputs.shape[1]
    assert inputs.shape == targets.shape == (6, 20) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, :T], ref_inputs)
    np.testing.assert_array_equal(targets[:, :T], ref_targets)
    # beyond nanochat's length: one more real input (the longest sample's last token, which
    # predicts nothing), then padding; nothing there is a target
    assert (inputs[:, T + 1 :] == PAD).all() and (targets[:, T:] == -1).all()
    # prompt tokens and forced tool output are never targets
    assert (targets[:, : rollout.prefix_length - 1] == -1).all()
    with pytest.raises(ValueError, match="exceeds seq_len"):
        rl.pad_rollout(rollout, PAD, seq_len=T - 1)


def test_advantages_and_pass_weights_follow_the_formula():
    np.testing.assert_allclose(rl.advantages([1, 0, 0, 1, 1]), [0.4, -0.6, -0.6, 0.4, 0.4])
    rng = np.random.default_rng(1)
    targets = np.where(rng.random((4, 7)) < 0.4, -1, rng.integers(0, 50, (4, 7)))
    adv = rng.normal(size=4).astype(np.float32)
    w = rl.pass_weights(targets, adv, world_size=3)
    expected = np.zeros((4, 7))
    nv = (targets >= 0).sum()
    for b in range(4):
        for t in range(7):
            if targets[b, t] >= 0:
                expected[b, t] = adv[b] / (nv * 3)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    # a pass with nothing to train: weights 0, no division by zero (nanochat clamps to 1)
    assert (rl.pass_weights(np.full((2, 3), -1), np.ones(2), 1) == 0).all()


def test_pack_step_layout():
    rng = np.random.default_rng(2)
    rollouts = [[_rollout(rng, 4, idx=10 * r + e) for e in range(3)] for r in range(2)]
    inputs, targets, weights = rl.pack_step(rollouts, device_batch_size=2, seq_len=16, pad_id=PAD)
    assert inputs.shape == targets.shape == weights.shape == (6, 4, 16)  # A = 3 examples x 2 passes
    for r in range(2):
        for e in range(3):
            x, y = rl.pad_rollout(rollouts[r][e], PAD, 16)
            for p in range(2):
                a, rows = e * 2 + p, slice(2 * r, 2 * r + 2)
                np.testing.assert_array_equal(inputs[a, rows], x[2 * p : 2 * p + 2])
                np.testing.assert_array_equal(targets[a, rows], y[2 * p : 2 * p + 2])
    with pytest.raises(ValueError, match="multiple of device_batch_size"):
        rl.pack_step(rollouts, device_batch_size=3, seq_len=16, pad_id=PAD)


def test_train_seq_len_buckets():
    assert rl.train_seq_len(300, sequence_len=2048, max_len=20480) == 320
    assert rl.train_seq_len(257, sequence_len=2048, max_len=20480) == 256
    assert rl.train_seq_len(200, sequence_len=160, max_len=1280) == 199  # past sequence_len: exact
    assert rl.train_seq_len(140, sequence_len=160, max_len=1280) == 160  # capped
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        rl.train_seq_len(2000, sequence_len=128, max_len=1280)


# ---- gradient equivalence ------------------------------------------------------------------


def _grad_catcher() -> optax.GradientTransformation:
    """An 'optimizer' that leaves the params alone and keeps the step's gradients as its state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda updates, state, params=None: (jax.tree.map(jnp.zeros_like, updates), updates),
    )


def _random_params(seed=0):
    model = GPT(CONFIG, rngs=nnx.Rngs(seed))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), pure)


def _nanochat_grads(params, graphdef, rest, rollouts, device_batch_size):
    """chat_rl's backward passes, literally: per rank, sum over examples and passes of the
    gradient of -sum(logp * adv) / (num_valid * num_passes * examples_per_rank); DDP averages."""

    def pass_loss(params, x, y, a, num_passes_times_examples):
        logp = -nnx.merge(graphdef, params, rest)(x, y, loss_reduction="none")
        num_valid = jnp.maximum((y >= 0).sum(), 1)
        return -jnp.sum(logp * a[:, None]) / (num_valid * num_passes_times_examples)

    pass_grad = jax.jit(jax.grad(pass_loss))
    W, E = len(rollouts), len(rollouts[0])
    total = jax.tree.map(jnp.zeros_like, params)
    for r in range(W):
        for e in range(E):
            inputs, targets, adv = _nanochat_batch(rollouts[r][e])
            P = inputs.shape[0] // device_batch_size
            for p in range(P):
                rows = slice(p * device_batch_size, (p + 1) * device_batch_size)
                g = pass_grad(params, inputs[rows], targets[rows], adv[rows], P * E)
                total = jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda t: t / W, total)


@pytest.mark.parametrize("world_size", [1, 2])
def test_weighted_loss_gradient_equals_nanochats_objective(world_size):
    rng = np.random.default_rng(3)
    dbs, seq_len = 2, 16
    rollouts = [[_rollout(rng, 4, idx=e) for e in range(2)] for _ in range(world_size)]
    rollouts[0][1] = _rollout(rng, 4, max_new=0)  # nothing generated: a pass with 0 targets
    mesh = sharding.make_mesh(str(world_size))
    params0 = _random_params()

    def load(params_target, _):
        return jax.tree.map(
            lambda x, t: jax.device_put(x, t.sharding), params0, params_target
        ), None

    state, optimizer = train.init_train_state(CONFIG, lambda p: _grad_catcher(), mesh, load=load)
    batch = rl.pack_step(rollouts, dbs, seq_len, PAD)
    step = train.make_train_step(
        state,
        optimizer,
        accum_steps=batch[0].shape[0],
        micro_batch_size=dbs * world_size,
        sequence_len=seq_len,
        loss=rl.pg_loss,
        extra_dtypes=(jnp.float32,),
    )
    batch = [sharding.shard_batch(a, mesh, leading_axes=1) for a in batch]
    _, grads, _ = step(state.params, state.opt_state, state.rest, *batch)
    expected = _nanochat_grads(params0, state.graphdef, state.rest, rollouts, dbs)
    flat_got = jax.tree_util.tree_leaves(jax.device_get(grads))
    flat_exp = jax.tree_util.tree_leaves(expected)
    scale = max(float(np.abs(g).max()) for g in flat_exp)
    assert scale > 1e-4  # the check means something
    for got, exp in zip(flat_got, flat_exp, strict=True):
        np.testing.assert_allclose(got, exp, atol=1e-5 * scale, rtol=1e-4)


# ---- rollouts and pass@k with a scripted engine ----------------------------------------------


class _ScriptedEngine:
    """Records generate_batch calls; samples are a function of the seed."""

    def __init__(self):
        self.calls = []

    def generate_batch(self, tokens, num_samples, *, max_tokens, temperature, top_k, seed=42):
        self.calls.append((num_samples, max_tokens, temperature, top_k, seed))
        rng = np.random.default_rng(seed)
        seqs = [list(tokens) + rng.integers(0, 10, 3).tolist() for _ in range(num_samples)]
        return seqs, [[0] * len(tokens) + [1, 1, 1] for _ in range(num_samples)]


class _DigitTask:
    """Questions i; a completion is right iff its first digit equals i % 10."""

    def __init__(self, n=5):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": str(i % 10)},
            ]
        }

    def evaluate(self, conversation, response):
        return response[:1] == conversation["messages"][1]["content"]

    def reward(self, conversation, response):
        return float(self.evaluate(conversation, response))


class _DigitTokenizer:
    def render_for_completion(self, conversation):
        return [11, 12, int(conversation["messages"][0]["content"][1:]) + 20]

    def decode(self, ids):
        return "".join(str(i) for i in ids)


def test_generate_rollout_calls_and_rewards():
    engine, task, tok = _ScriptedEngine(), _DigitTask(), _DigitTokenizer()
    kw = dict(num_samples=6, device_batch_size=2, max_new_tokens=7, temperature=1.0, top_k=50)
    a = rl.generate_rollout(engine, tok, task, 3, step=4, **kw)
    assert [c[4] for c in engine.calls] == [rl.rollout_seed(4, 3, k) for k in range(3)]
    assert {c[:4] for c in engine.calls} == {(2, 7, 1.0, 50)}
    assert a.prefix_length == 3 and len(a.sequences) == 6 and a.num_generated_tokens == 18
    expected = [float(s[3] == 3) for s in a.sequences]
    np.testing.assert_array_equal(a.rewards, expected)
    b = rl.generate_rollout(engine, tok, task, 3, step=4, **kw)
    assert a.sequences == b.sequences  # deterministic
    c = rl.generate_rollout(engine, tok, task, 3, step=5, **kw)
    assert a.sequences != c.sequences
    with pytest.raises(ValueError, match="multiple of device_batch_size"):
        rl.generate_rollout(engine, tok, task, 3, step=4, **(kw | {"num_samples": 5}))


def test_pass_at_k():
    outcomes = [[False, True, False], [False, False, False], [True, True, False], [False] * 2 + [1]]
    np.testing.assert_allclose(rl.pass_at_k(outcomes), [1 / 4, 2 / 4, 3 / 4])
    with pytest.raises(ValueError, match="pass_at_k needs"):
        rl.pass_at_k([])
    with pytest.raises(ValueError, match="pass_at_k needs"):
        rl.pass_at_k([[True], [True, False]])
    engine, task = _ScriptedEngine(), _DigitTask(n=30)
    got = rl.evaluate_pass_at_k(
        engine, _DigitTokenizer(), task, max_examples=20, num_samples=4, max_new_tokens=3,
        temperature=1.0, top_k=50,
    )  # fmt: skip
    assert len(engine.calls) == 20 and {c[4] for c in engine.calls} == {42}  # nanochat's default
    outcomes = []
    for i in range(20):
        seqs, _ = engine.generate_batch([11, 12, i + 20], 4, max_tokens=3, temperature=1, top_k=50)
        outcomes.append([s[3] == i % 10 for s in seqs])
    np.testing.assert_allclose(got, rl.pass_at_k(outcomes))


class _OddTask(_DigitTask):
    """A completion is right iff its first decoded character is an odd digit: a random model
    solves about half, so pass@k is neither 0 nor 1."""

    def evaluate(self, conversation, response):
        return response[:1] in tuple("13579")


class _GPTDigitTokenizer(_DigitTokenizer, StubTokenizer):
    pass


def test_pass_at_k_on_an_engine_pool_equals_one_engine():
    """The pool spreads problems over 3 devices (more problems than replicas, claimed as they
    free up) and gives one engine's pass@k exactly: each problem seeds its own sampling."""
    model = GPT(CONFIG, rngs=nnx.Rngs(0))
    graph_state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(graph_state, _random_params(3))
    nnx.update(model, graph_state)
    tok, task = _GPTDigitTokenizer(CONFIG.vocab_size - 9), _OddTask(n=9)
    kw = dict(max_examples=7, num_samples=4, max_new_tokens=5, temperature=1.0, top_k=50)
    single = rl.evaluate_pass_at_k(Engine(model, tok), tok, task, **kw)
    pool = EnginePool(model, tok, devices=jax.local_devices()[:3])
    assert len(pool) == 3
    got = rl.evaluate_pass_at_k(pool, tok, task, **kw)
    np.testing.assert_array_equal(got, single)
    assert 0 < single[0] < 1  # a real mix of right and wrong answers
    squares = [i * i for i in range(10)]  # input order, with a pool or with one engine
    assert rl.engine_map(pool, lambda e, i: i * i, range(10)) == squares
    assert rl.engine_map(Engine(model, tok), lambda e, i: i * i, range(10)) == squares


# ---- Engine.set_params ---------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [None, jnp.bfloat16])
def test_engine_set_params_swaps_weights_without_recompiling(compute_dtype, caplog):
    tok = StubTokenizer(CONFIG.vocab_size - 9)
    engine = Engine(GPT(CONFIG, rngs=nnx.Rngs(0)), tok, compute_dtype=compute_dtype)
    kw = dict(num_samples=2, max_tokens=6, temperature=0.0)
    before, _ = engine.generate_batch([1, 2, 3], **kw)
    compiled = engine.num_compilations

    params_a, params_b = _random_params(1), _random_params(2)
    model_a = GPT(CONFIG, rngs=nnx.Rngs(0))
    nnx.replace_by_pure_dict(graph_state := nnx.state(model_a, nnx.Param), params_a)
    nnx.update(model_a, graph_state)
    fresh = Engine(model_a, tok, compute_dtype=compute_dtype)
    expected_a, _ = fresh.generate_batch([1, 2, 3], **kw)

    engine.set_params(model_a)  # a model
    got_a, _ = engine.generate_batch([1, 2, 3], **kw)
    mesh = sharding.make_mesh("2")  # committed, sharded arrays in: still no recompilation
    on_mesh = jax.tree.map(
        lambda x, s: jax.device_put(x, s), params_b, sharding.tree_shardings(params_b, mesh)
    )
    engine.set_params(on_mesh)  # a pure dict, like TrainState.params
    jax.tree.map(lambda x: x.delete(), on_mesh)  # the caller may donate its arrays afterwards
    caplog.clear()
    with jax.log_compiles():  # jit would also recompile, without retracing, for new placements
        got_b, _ = engine.generate_batch([1, 2, 3], **kw)
    assert engine.num_compilations == compiled
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert got_a == expected_a and got_a != before and got_b != got_a
    want = jnp.dtype(compute_dtype or jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(engine._params)} == {want}


def test_engine_set_params_rejects_other_shapes_and_trees():
    engine = Engine(GPT(CONFIG, rngs=nnx.Rngs(0)), StubTokenizer(CONFIG.vocab_size - 9))
    params = _random_params()
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"][:, :5]
    with pytest.raises(ValueError, match=r"\['lm_head'\]\['kernel'\] has shape"):
        engine.set_params(params)
    params = _random_params()
    del params["wte"]
    with pytest.raises(ValueError, match=r"missing \[\"\['wte'\]\['embedding'\]\"\]"):
        engine.set_params(params)
