"""Parity of the Flax GPT with PyTorch nanochat (tests/golden, fp32 on CPU) and its KV cache.

Max abs errors measured on CPU (jax 0.10.2, fp32, jitted) against the golden files:
  gpt_tiny_forward:  logits 6.0e-6, loss 0.0,    loss_per_token 3.8e-6, grads 1.9e-7
  gpt_tiny2_forward: logits 6.7e-6, loss 9.5e-7, loss_per_token 4.8e-6, grads 1.9e-7
  gpt_tiny_kvcache:  produced ids identical; prefill/decode logits 5.3e-6
  KV-cached (prefill, chunked prefill, decode) vs full forward: 6.7e-6
  head at some positions / vocab ids vs those of the full forward's logits: 3.8e-6 (fp32: the
    smaller matmul sums its 128 terms in another order; 4 ulp at |logit| ~10), 0.0 (bf16)
  bf16 compute vs nanochat CPU autocast: logits 0.115 / 0.113, loss 5.1e-3 / 5.4e-3
    (two independent bf16 rounding paths; each is ~0.09 from fp32, as the golden README measured)
The golden README measured fp32-vs-fp64 at 5.6e-6 (logits) and 2e-7 (grads), so the fp32
tolerances sit a few times above fp32 rounding noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import from_nanochat_state_dict, to_nanochat_state_dict
from nanochat_jax.model import GPT, KVCache, rotary_cos_sin

GOLDEN = Path(__file__).parent / "golden"
TINY1 = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
TINY2 = GPTConfig(sequence_len=64, vocab_size=512, n_layer=3, n_head=2, n_kv_head=2, n_embd=128)
LOGITS_ATOL = 2e-5
LOSS_ATOL = 5e-6
GRAD_ATOL = 1e-6


def _load_golden(name: str, extra: str | None = None) -> dict[str, np.ndarray]:
    golden = dict(np.load(GOLDEN / f"{name}.npz"))
    if extra:
        golden.update(np.load(GOLDEN / f"{extra}.npz"))
    return golden


def _params(golden: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k.removeprefix("param/"): v for k, v in golden.items() if k.startswith("param/")}


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# Jitted once and shared by the tests: eager op-by-op dispatch is far slower on CPU.
_logits = nnx.jit(lambda model, idx_BT: model(idx_BT))
_loss = nnx.jit(lambda model, idx_BT, targets_BT: model(idx_BT, targets_BT))
_per_token_loss = nnx.jit(
    lambda model, idx_BT, targets_BT: model(idx_BT, targets_BT, loss_reduction="none")
)
_step = nnx.jit(lambda model, idx_BT, cache: model.forward_cached(idx_BT, cache))


@nnx.jit
def _loss_and_grads(model, idx_BT, targets_BT):
    return nnx.value_and_grad(lambda m: m(idx_BT, targets_BT))(model)


@pytest.fixture(scope="module", params=["tiny1", "tiny2"])
def golden_case(request):
    if request.param == "tiny1":
        golden, config = _load_golden("gpt_tiny_forward"), TINY1
    else:
        golden, config = _load_golden("gpt_tiny2_forward", "gpt_tiny2_grads"), TINY2
    model = from_nanochat_state_dict(_params(golden), config)
    idx_BT = jnp.asarray(golden["idx"], jnp.int32)
    targets_BT = jnp.asarray(golden["targets"], jnp.int32)
    return golden, config, model, idx_BT, targets_BT


def test_forward_matches_golden(golden_case):
    golden, _, model, idx_BT, targets_BT = golden_case
    logits_BTV = _logits(model, idx_BT)
    assert logits_BTV.dtype == jnp.float32 and logits_BTV.shape == golden["logits"].shape
    err = _max_err(logits_BTV, golden["logits"])
    assert err < LOGITS_ATOL, f"logits max abs error {err:.2e}"
    err = _max_err(_loss(model, idx_BT, targets_BT), golden["loss"])
    assert err < LOSS_ATOL, f"loss abs error {err:.2e}"
    err = _max_err(_per_token_loss(model, idx_BT, targets_BT), golden["loss_per_token"])
    assert err < LOGITS_ATOL, f"loss_per_token max abs error {err:.2e}"


def test_every_gradient_matches_golden(golden_case):
    golden, config, model, idx_BT, targets_BT = golden_case
    loss, grads = _loss_and_grads(model, idx_BT, targets_BT)
    assert abs(float(loss) - float(golden["loss"])) < LOSS_ATOL
    grad_model = from_nanochat_state_dict(_params(golden), config)
    nnx.update(grad_model, grads)  # reuse the name mapping to read grads in nanochat layout
    grads_torch = to_nanochat_state_dict(grad_model)
    errors = {}
    for name, grad in grads_torch.items():
        expected = golden[f"grad/{name}"]
        if name == "transformer.wte.weight":  # to_nanochat rounds wte to bf16; read it directly
            grad = np.asarray(grads["wte"]["embedding"][...])
        assert grad.shape == expected.shape, name
        errors[name] = _max_err(grad, expected)
    assert len(errors) == 2 + 6 * config.n_layer
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_ATOL, f"max grad error {errors[worst]:.2e} in {worst}"


def test_ignore_index_and_reductions(golden_case):
    golden, _, model, idx_BT, targets_BT = golden_case
    targets_BT = targets_BT.at[0, :5].set(-1).at[1, -3:].set(-1)
    per_token_BT = _per_token_loss(model, idx_BT, targets_BT)
    assert np.all(np.asarray(per_token_BT)[0, :5] == 0) and np.all(per_token_BT[1, -3:] == 0)
    keep = np.asarray(targets_BT) != -1
    np.testing.assert_allclose(per_token_BT[keep], golden["loss_per_token"][keep], atol=LOGITS_ATOL)
    expected = golden["loss_per_token"][keep].mean()
    np.testing.assert_allclose(_loss(model, idx_BT, targets_BT), expected, atol=LOSS_ATOL)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(idx_BT, targets_BT, loss_reduction="sum")


_head = nnx.jit(
    lambda model, idx_BT, pos_BP, vocab_C: model.head(model.hidden_states(idx_BT), pos_BP, vocab_C)
)
HEAD_ATOL = 1e-5  # fp32 reassociation of lm_head's D-term sums (measured 3.8e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_on_some_positions_and_vocab_ids_equals_the_full_logits(golden_case, dtype):
    """hidden_states + head is the forward: all of it exactly, any positions / vocab ids up to
    the order of lm_head's sums (the evals' logits of only what they read)."""
    golden, config, _, idx_BT, _ = golden_case
    model = from_nanochat_state_dict(_params(golden), config, compute_dtype=dtype)
    full_BTV = np.asarray(_logits(model, idx_BT))
    np.testing.assert_array_equal(_head(model, idx_BT, None, None), full_BTV)
    rng = np.random.default_rng(0)
    B, T = idx_BT.shape
    pos_BP = jnp.asarray(rng.integers(0, T, (B, 5)), jnp.int32).at[:, 0].set(T - 1)
    vocab_C = jnp.asarray([7, 3, 3, config.vocab_size - 1, 0], jnp.int32)  # any order, repeats
    at_BPV = np.take_along_axis(full_BTV, np.asarray(pos_BP)[..., None], axis=1)
    some_BPV = _head(model, idx_BT, pos_BP, None)
    assert some_BPV.shape == (B, 5, config.vocab_size) and some_BPV.dtype == jnp.float32
    some_BPC = _head(model, idx_BT, pos_BP, vocab_C)
    assert some_BPC.shape == (B, 5, 5) and some_BPC.dtype == jnp.float32
    np.testing.assert_array_equal(some_BPC[..., 1], some_BPC[..., 2])  # same column, same value
    atol = HEAD_ATOL if dtype == jnp.float32 else 0.0  # bf16: rounded the same (measured)
    np.testing.assert_allclose(some_BPV, at_BPV, rtol=0, atol=atol)
    np.testing.assert_allclose(some_BPC, at_BPV[..., np.asarray(vocab_C)], rtol=0, atol=atol)
    x_BTD = model.hidden_states(idx_BT)
    assert x_BTD.shape == (B, T, config.n_embd)
    with pytest.raises(ValueError, match=r"pos_BP must be \(B, P\)"):
        model.head(x_BTD, pos_BP[:, 0])
    with pytest.raises(ValueError, match=r"vocab_C \(C,\)"):
        model.head(x_BTD, pos_BP, vocab_C[None])


def test_rotary_tables_equal_golden(golden_case):
    golden, config, *_ = golden_case
    cos_PF, sin_PF = rotary_cos_sin(config.rotary_seq_len, config.head_dim)
    assert cos_PF.dtype == ml_dtypes.bfloat16 and cos_PF.shape == (640, config.head_dim // 2)
    np.testing.assert_array_equal(cos_PF.astype(np.float32), golden["rotary_cos"][0, :, 0])
    np.testing.assert_array_equal(sin_PF.astype(np.float32), golden["rotary_sin"][0, :, 0])


def test_bf16_compute_matches_nanochat_autocast(golden_case):
    golden, config, _, idx_BT, targets_BT = golden_case
    model = from_nanochat_state_dict(_params(golden), config, compute_dtype=jnp.bfloat16)
    logits_BTV = _logits(model, idx_BT)
    assert logits_BTV.dtype == jnp.float32
    err = _max_err(logits_BTV, golden["logits_autocast_bf16"])
    assert err < 0.15, f"bf16 logits max abs error {err:.3f} vs nanochat autocast"
    loss = _loss(model, idx_BT, targets_BT)
    assert loss.dtype == jnp.float32
    err = _max_err(loss, golden["loss_autocast_bf16"])
    assert err < 1e-2, f"bf16 loss abs error {err:.2e} vs nanochat autocast"


@pytest.mark.parametrize("chunks", [(32,), (10,) + (1,) * 22, (12, 12, 8)])
def test_kv_cache_matches_full_forward(golden_case, chunks):
    """Prefill, chunked prefill (prefix + causal mask) and decode all equal the full forward."""
    golden, config, model, idx_BT, _ = golden_case
    full_BTV = np.asarray(_logits(model, idx_BT))
    cache = KVCache.init(config, batch_size=2, max_len=40)
    start = 0
    for size in chunks:
        logits_BTV, cache = _step(model, idx_BT[:, start : start + size], cache)
        err = _max_err(logits_BTV, full_BTV[:, start : start + size])
        assert err < LOGITS_ATOL, f"chunk [{start}, {start + size}) max abs error {err:.2e}"
        start += size
        assert int(cache.pos) == start
    assert start == idx_BT.shape[1]


def test_greedy_decode_matches_golden_engine():
    golden = _load_golden("gpt_tiny_kvcache")
    meta = json.loads((GOLDEN / "gpt_tiny_kvcache.json").read_text())
    model = from_nanochat_state_dict(_params(_load_golden("gpt_tiny_forward")), TINY1)
    prompt = jnp.asarray(golden["prompt"], jnp.int32)[None, :]
    num_new = len(golden["produced"])
    cache = KVCache.init(TINY1, batch_size=1, max_len=prompt.shape[1] + num_new)
    logits_BTV, cache = _step(model, prompt, cache)
    steps_logits = [logits_BTV[0, -1]]
    produced = []
    for _ in range(num_new):
        token = int(jnp.argmax(steps_logits[-1]))
        produced.append(token)
        if len(produced) < num_new:
            logits_BTV, cache = _step(model, jnp.asarray([[token]], jnp.int32), cache)
            steps_logits.append(logits_BTV[0, -1])
    assert produced == meta["produced"] == golden["produced"].tolist()
    names = ["logits_prefill_last"] + [f"logits_decode_step{k}" for k in (1, 2, 3)]
    for name, logits_V in zip(names, steps_logits, strict=False):
        err = _max_err(logits_V, golden[name])
        assert err < LOGITS_ATOL, f"{name} max abs error {err:.2e}"


def test_greedy_decode_inside_fori_loop():
    """forward_cached composes with jit + lax.fori_loop (how the engine drives it)."""
    golden = _load_golden("gpt_tiny_kvcache")
    model = from_nanochat_state_dict(_params(_load_golden("gpt_tiny_forward")), TINY1)
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(golden["prompt"], jnp.int32)[None, :]
    num_new = 6

    @jax.jit
    def generate(state, prompt_BT):
        model = nnx.merge(graphdef, state)
        cache = KVCache.init(TINY1, batch_size=1, max_len=prompt_BT.shape[1] + num_new)
        logits_BTV, cache = model.forward_cached(prompt_BT, cache)
        tokens = jnp.zeros((num_new,), jnp.int32).at[0].set(jnp.argmax(logits_BTV[0, -1]))

        def body(i, carry):
            tokens, cache = carry
            logits_BTV, cache = model.forward_cached(tokens[i - 1][None, None], cache)
            return tokens.at[i].set(jnp.argmax(logits_BTV[0, -1])), cache

        tokens, cache = jax.lax.fori_loop(1, num_new, body, (tokens, cache))
        return tokens, cache.pos

    tokens, pos = generate(state, prompt)
    assert tokens.tolist() == golden["produced"][:num_new].tolist()
    assert int(pos) == prompt.shape[1] + num_new - 1


def test_kv_cache_rejects_oversize():
    with pytest.raises(ValueError, match="max_len"):
        KVCache.init(TINY1, batch_size=1, max_len=TINY1.rotary_seq_len + 1)


def test_fresh_init_statistics_match_nanochat():
    stats = json.loads((GOLDEN / "gpt_tiny_forward.json").read_text())["init_stats"]
    model = GPT(TINY1, rngs=nnx.Rngs(0))
    state = to_nanochat_state_dict(model)
    assert list(state) == list(stats)
    for name, expected in stats.items():
        value = np.asarray(state[name], np.float32)
        assert list(value.shape) == expected["shape"], name
        if expected["all_zero"]:
            assert not value.any(), f"{name} must be zero-initialised"
            continue
        # Expected std from nanochat's formula; golden std is one torch sample of it.
        np.testing.assert_allclose(value.std(), expected["std"], rtol=0.03, err_msg=name)
        assert abs(value.mean()) < 5 * expected["std"] / np.sqrt(value.size), name  # 5 sigma
    wte = np.asarray(model.wte.embedding[...])
    assert wte.dtype == np.float32
    np.testing.assert_array_equal(wte.astype(ml_dtypes.bfloat16).astype(np.float32), wte)
    c_k_std = 1 / np.sqrt(128) * np.sqrt(64 / 128)  # fan_out 64 < fan_in 128
    np.testing.assert_allclose(state["transformer.h.0.attn.c_k.weight"].std(), c_k_std, rtol=0.03)


def test_from_depth_shapes():
    config = GPTConfig.from_depth(20, 65536)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (20, 1280, 10, 10)
    assert (config.head_dim, config.sequence_len, config.vocab_size) == (128, 2048, 65536)
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    assert model.wte.embedding.shape == (65536, 1280)
    assert model.lm_head.kernel.shape == (1280, 65536)
    assert len(model.h) == 20
    block = model.h[19]
    assert block.attn.c_q.kernel.shape == (1280, 1280)
    assert block.attn.c_k.kernel.shape == (1280, 1280)
    assert block.mlp.c_fc.kernel.shape == (1280, 5120)
    assert block.mlp.c_proj.kernel.shape == (5120, 1280)
    assert GPTConfig.from_depth(26, 65536).n_head == 13
    assert GPTConfig.from_dict(config.to_dict()) == config


def test_gqa_kernel_shapes():
    model = nnx.eval_shape(lambda: GPT(TINY1, rngs=nnx.Rngs(0)))
    assert model.h[0].attn.c_k.kernel.shape == (128, 2 * 32)
    assert model.h[0].attn.c_v.kernel.shape == (128, 2 * 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=130, n_head=4, n_kv_head=4), "n_embd .* divisible by n_head"),
        (dict(n_embd=128, n_head=4, n_kv_head=3), "n_head .* divisible by n_kv_head"),
        (dict(n_embd=12, n_head=4, n_kv_head=4), "must be even"),
        (dict(n_layer=0), "n_layer must be a positive int"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({"n_layer": 2, "dropout": 0.1})


def test_too_long_sequence_raises():
    config = GPTConfig(sequence_len=2, vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
    model = GPT(config, rngs=nnx.Rngs(0))
    assert _logits(model, jnp.zeros((1, 20), jnp.int32)).shape == (1, 20, 8)
    with pytest.raises(ValueError, match="rotary"):
        _logits(model, jnp.zeros((1, 21), jnp.int32))
    with pytest.raises(ValueError, match="rotary"):
        model.hidden_states(jnp.zeros((1, 21), jnp.int32))


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_changes_no_gradient(remat):
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.integers(0, 64, (2, 16))) for _ in range(2))

    def grads(mode):
        model = GPT(config, rngs=nnx.Rngs(0), remat=mode)
        return jax.tree.leaves(nnx.state(nnx.jit(nnx.grad(lambda m: m(x, y)))(model)))

    for a, b in zip(grads(remat), grads("none"), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="remat must be one of"):
        GPT(config, rngs=nnx.Rngs(0), remat="some")
