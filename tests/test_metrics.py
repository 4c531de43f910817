from __future__ import annotations

import pytest
from flax import nnx

from nanochat_jax.config import GPTConfig
from nanochat_jax.metrics import H100_BF16_PEAK_FLOPS, flops_per_token, mfu_percent, param_count
from nanochat_jax.model import GPT


def _abstract_model(config: GPTConfig) -> GPT:
    return nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))


def test_d20_numbers_from_nanochat():
    config = GPTConfig.from_depth(20, 65536)
    assert param_count(_abstract_model(config)) == 560_988_160
    # 6 * 477,102,080 + 12 * 20 * 10 * 128 * 2048, as nanochat's estimate_flops prints.
    assert flops_per_token(config) == 3_491_758_080


def test_d26_d32_param_counts():
    assert param_count(_abstract_model(GPTConfig.from_depth(26, 65536))) == 1_081_999_360
    config = GPTConfig.from_depth(32, 65536)
    assert param_count(_abstract_model(config)) == 1_879_048_192
    assert flops_per_token(config) == 12_079_595_520  # 1.207960e10 in run1000.sh's log


def test_flops_formula_counts_the_real_model_with_gqa():
    config = GPTConfig(
        sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128
    )
    params = param_count(GPT(config, rngs=nnx.Rngs(0)))
    assert params == 2 * 512 * 128 + 2 * (128 * 128 * 2 + 2 * 128 * 64 + 8 * 128 * 128)
    assert flops_per_token(config) == 6 * (params - 512 * 128) + 12 * 2 * 4 * 32 * 64


def test_mfu_percent():
    flops = flops_per_token(GPTConfig.from_depth(20, 65536))
    half_peak_tokens_per_s = 0.5 * 8 * H100_BF16_PEAK_FLOPS / flops
    assert mfu_percent(half_peak_tokens_per_s, flops, num_devices=8) == pytest.approx(50.0)
    assert mfu_percent(1000.0, 1e9, peak_flops_per_device=1e13) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="num_devices"):
        mfu_percent(1.0, 1, num_devices=0)
