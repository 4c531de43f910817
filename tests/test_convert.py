from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import from_nanochat_state_dict, to_nanochat_state_dict

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "gpt_tiny_forward": GPTConfig(64, 512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128),
    "gpt_tiny2_forward": GPTConfig(64, 512, n_layer=3, n_head=2, n_kv_head=2, n_embd=128),
}


def _golden_params(name: str) -> dict[str, np.ndarray]:
    golden = np.load(GOLDEN / f"{name}.npz")
    return {k.removeprefix("param/"): golden[k] for k in golden.files if k.startswith("param/")}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_exact(name):
    state = _golden_params(name)
    model = from_nanochat_state_dict(state, CASES[name])
    back = to_nanochat_state_dict(model)
    assert list(back) == list(state)  # nanochat's names, in nanochat's order
    for key, value in state.items():
        assert back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key].astype(np.float32), value, err_msg=key)
    assert back["transformer.wte.weight"].dtype == ml_dtypes.bfloat16  # as nanochat saves it
    assert back["lm_head.weight"].dtype == np.float32
    # torch (out, in) -> our (in, out) kernel
    np.testing.assert_array_equal(
        model.h[1].attn.c_k.kernel[...], state["transformer.h.1.attn.c_k.weight"].T
    )


def test_compiled_prefix_is_stripped():
    state = _golden_params("gpt_tiny_forward")
    prefixed = {f"_orig_mod.{k}": v for k, v in state.items()}
    model = from_nanochat_state_dict(prefixed, CASES["gpt_tiny_forward"])
    np.testing.assert_array_equal(model.lm_head.kernel[...], state["lm_head.weight"].T)


def test_bf16_wte_input_is_accepted():
    state = _golden_params("gpt_tiny_forward")
    wte = state["transformer.wte.weight"]
    state["transformer.wte.weight"] = wte.astype(ml_dtypes.bfloat16)  # lossless: bf16 values
    model = from_nanochat_state_dict(state, CASES["gpt_tiny_forward"])
    assert model.wte.embedding[...].dtype == np.float32
    np.testing.assert_array_equal(model.wte.embedding[...], wte)


def test_missing_and_unexpected_keys_are_named():
    state = _golden_params("gpt_tiny_forward")
    del state["transformer.h.1.mlp.c_fc.weight"]
    state["transformer.h.2.attn.c_q.weight"] = np.zeros((128, 128), np.float32)
    with pytest.raises(ValueError) as info:
        from_nanochat_state_dict(state, CASES["gpt_tiny_forward"])
    assert "missing keys ['transformer.h.1.mlp.c_fc.weight']" in str(info.value)
    assert "unexpected keys ['transformer.h.2.attn.c_q.weight']" in str(info.value)


def test_shape_mismatch_is_named():
    state = _golden_params("gpt_tiny_forward")
    state["transformer.h.0.attn.c_k.weight"] = np.zeros((128, 128), np.float32)
    with pytest.raises(ValueError, match=r"c_k.weight: shape \(128, 128\) .* \(64, 128\)"):
        from_nanochat_state_dict(state, CASES["gpt_tiny_forward"])
