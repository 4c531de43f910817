"""Model size, FLOPs per token and MFU, as nanochat computes them."""

from __future__ import annotations

import math

import jax
from flax import nnx

from nanochat_jax.config import GPTConfig

# H100 SXM dense bf16 peak, nanochat's MFU denominator.
H100_BF16_PEAK_FLOPS = 989e12


def param_count(model: nnx.Module) -> int:
    """Number of trainable scalars (works on an abstract `nnx.eval_shape` model too)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(math.prod(leaf.shape) for leaf in leaves)


def _param_count(config: GPTConfig) -> int:
    d, hd, V = config.n_embd, config.head_dim, config.vocab_size
    attn = d * config.n_head * hd + 2 * d * config.n_kv_head * hd + d * d
    return 2 * V * d + config.n_layer * (attn + 8 * d * d)


def flops_per_token(config: GPTConfig) -> int:
    """nanochat's estimate_flops: 6 * (params - embedding) + 12 * L * H * hd * T.

    The matmul weights cost 6 FLOPs per token (forward + backward); the embedding is a lookup.
    The second term is attention's QK^T and AV at the full context length T (PaLM appendix B).
    """
    matmul_params = _param_count(config) - config.vocab_size * config.n_embd
    attention = 12 * config.n_layer * config.n_head * config.head_dim * config.sequence_len
    return 6 * matmul_params + attention


def mfu_percent(
    tokens_per_s: float,
    flops_per_token: int,
    *,
    num_devices: int = 1,
    peak_flops_per_device: float = H100_BF16_PEAK_FLOPS,
) -> float:
    """Model FLOPs utilisation in percent, as base_train logs it: achieved / (peak * devices)."""
    if num_devices < 1 or peak_flops_per_device <= 0:
        raise ValueError(
            f"need num_devices >= 1 and peak_flops_per_device > 0, got {num_devices} and "
            f"{peak_flops_per_device}"
        )
    return 100.0 * tokens_per_s * flops_per_token / (peak_flops_per_device * num_devices)
