"""nanochat's GPT (October 2025) in Flax NNX.

Rotary (no learned positions), QK-norm, parameter-free RMSNorm, relu^2 MLP, untied embedding and
lm_head, no biases, GQA, logit softcap. Shapes: B batch, T query positions, S key positions,
D model dim, N query heads, K kv heads, H head dim, F = H/2 rotary frequencies, V vocab, L layers;
P positions and C vocab ids that an eval reads the logits of (`GPT.head`).
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from nanochat_jax.config import GPTConfig

SOFTCAP = 15.0
ROTARY_BASE = 10000.0


def rms_norm(x: jax.Array) -> jax.Array:
    """torch F.rms_norm(x, (D,)) with eps=None: no weight, computed in fp32.

    torch documents eps=None as finfo(x.dtype).eps, but its kernel uses the epsilon of the fp32
    compute type for bf16 inputs too (measured: 1.19e-7, not 7.8e-3), so fp32 eps always.
    """
    x32 = x.astype(jnp.float32)
    eps = jnp.finfo(jnp.float32).eps
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rotary_cos_sin(num_positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, F) bf16 cos/sin tables for positions 0..P-1, as nanochat's buffers.

    nanochat forms fp32 angles t * inv_freq, takes cos/sin in fp32 and rounds to bf16. We form the
    same fp32 angles and evaluate cos/sin in float64 so the bf16 values do not depend on the
    backend's fp32 trig accuracy (XLA's differs from torch's for large angles).
    """
    channels_F = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # fp32 base**x correctly rounded (what torch's fp32 pow gives here), then an fp32 reciprocal.
    powers_F = np.power(ROTARY_BASE, channels_F.astype(np.float64)).astype(np.float32)
    inv_freq_F = np.float32(1.0) / powers_F
    angles_PF = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq_F[None, :]
    angles_PF = angles_PF.astype(np.float64)
    return np.cos(angles_PF).astype(jnp.bfloat16), np.sin(angles_PF).astype(jnp.bfloat16)


def _apply_rotary(x_BTNH: jax.Array, cos_TF: jax.Array, sin_TF: jax.Array) -> jax.Array:
    # Half-split pairing (not interleaved) and this sign convention, exactly as nanochat.
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    cos, sin = cos_TF[None, :, None, :], sin_TF[None, :, None, :]
    return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1).astype(x_BTNH.dtype)


def _attention_impl(dtype: jnp.dtype) -> str | None:
    """cuDNN flash attention on GPU for bf16/fp16; XLA otherwise (None: JAX's default on CPU).

    NANOCHAT_JAX_ATTENTION=xla forces XLA's attention on GPU (e.g. a cuDNN build that fails).
    """
    if jax.default_backend() != "gpu":
        return None
    forced = os.environ.get("NANOCHAT_JAX_ATTENTION", "auto")
    if forced not in ("auto", "xla"):
        raise ValueError(f"NANOCHAT_JAX_ATTENTION must be auto or xla, got {forced!r}")
    if forced == "xla" or dtype not in (jnp.bfloat16, jnp.float16):
        return "xla"
    return "cudnn"


def _causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array) -> jax.Array:
    """Training / uncached forward: causal attention, GQA handled by dot_product_attention."""
    impl = _attention_impl(q_BTNH.dtype)
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(
                q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation="cudnn"
            )
        except (ValueError, NotImplementedError, RuntimeError):
            impl = "xla"  # a shape cuDNN does not support (checked while tracing)
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=impl)


def _linear_init(key, shape, dtype=jnp.float32):
    # nanochat: std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)); kernel is (in, out).
    fan_in, fan_out = shape
    std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
    return std * jax.random.normal(key, shape, dtype)


def _embedding_init(key, shape, dtype=jnp.float32):
    # nanochat keeps wte in bf16: draw N(0, 1) and round to bf16 values, stored in fp32.
    return jax.random.normal(key, shape, dtype).astype(jnp.bfloat16).astype(dtype)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, dtype, zero: bool = False) -> nnx.Linear:
    init = nnx.initializers.zeros_init() if zero else _linear_init
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, kernel_init=init, rngs=rngs)


@struct.dataclass
class KVCache:
    """Fixed-size functional KV cache: `pos` positions of every layer are filled."""

    k: jax.Array  # (L, B, K, S, H): per head, positions contiguous for the decode matmuls
    v: jax.Array  # (L, B, K, S, H)
    pos: jax.Array  # int32 scalar

    @classmethod
    def init(cls, config: GPTConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
        if not 1 <= max_len <= config.rotary_seq_len:
            raise ValueError(
                f"KV cache max_len must be in [1, {config.rotary_seq_len}] (10 * sequence_len, "
                f"nanochat's rotary table size), got {max_len}"
            )
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype):
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, hd
        self.c_q = _linear(d, config.n_head * hd, rngs, dtype)
        self.c_k = _linear(d, config.n_kv_head * hd, rngs, dtype)
        self.c_v = _linear(d, config.n_kv_head * hd, rngs, dtype)
        self.c_proj = _linear(d, d, rngs, dtype, zero=True)

    def __call__(self, x_BTD, cos_TF, sin_TF, kv=None):
        B, T, D = x_BTD.shape
        q_BTNH = self.c_q(x_BTD).reshape(B, T, self.n_head, self.head_dim)
        k_BTKH = self.c_k(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        v_BTKH = self.c_v(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        # Rotary first, then QK-norm (nanochat's order).
        q_BTNH = rms_norm(_apply_rotary(q_BTNH, cos_TF, sin_TF))
        k_BTKH = rms_norm(_apply_rotary(k_BTKH, cos_TF, sin_TF))
        if kv is None:
            y_BTNH = _causal_attention(q_BTNH, k_BTKH, v_BTKH)
        else:
            y_BTNH, kv = self._cached_attention(q_BTNH, k_BTKH, v_BTKH, *kv)
        return self.c_proj(y_BTNH.reshape(B, T, D)), kv

    def _cached_attention(self, q_BTNH, k_BTKH, v_BTKH, k_LBKSH, v_LBKSH, pos, layer):
        """Write the T new positions of this layer into the (donated) stacked cache at `pos`,
        then attend over it: each query sees every key at or before its own position (prefix +
        causal), which covers prefill, chunked prefill and decode. Writing first and reading the
        layer back from the updated array lets XLA update the cache in place; the einsums over
        kv-head groups avoid materialising repeated K/V for GQA."""
        B, T, N, H = q_BTNH.shape
        start = (layer, 0, 0, pos, 0)
        new_k = k_BTKH.swapaxes(1, 2).astype(k_LBKSH.dtype)[None]
        new_v = v_BTKH.swapaxes(1, 2).astype(v_LBKSH.dtype)[None]
        k_LBKSH = jax.lax.dynamic_update_slice(k_LBKSH, new_k, start)
        v_LBKSH = jax.lax.dynamic_update_slice(v_LBKSH, new_v, start)
        k_BKSH = k_LBKSH[layer].astype(q_BTNH.dtype)
        v_BKSH = v_LBKSH[layer].astype(q_BTNH.dtype)
        K, S = k_BKSH.shape[1], k_BKSH.shape[2]
        q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
        scores_BKGTS = jnp.einsum(
            "btkgh,bksh->bkgts", q_BTKGH, k_BKSH, preferred_element_type=jnp.float32
        ) / math.sqrt(H)
        mask_TS = jnp.arange(S)[None, :] <= pos + jnp.arange(T)[:, None]
        scores_BKGTS = jnp.where(mask_TS, scores_BKGTS, -jnp.inf)
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSH.dtype)
        y_BTKGH = jnp.einsum("bkgts,bksh->btkgh", probs_BKGTS, v_BKSH)
        return y_BTKGH.reshape(B, T, N, H), (k_LBKSH, v_LBKSH)


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype):
        self.c_fc = _linear(config.n_embd, 4 * config.n_embd, rngs, dtype)
        self.c_proj = _linear(4 * config.n_embd, config.n_embd, rngs, dtype, zero=True)

    def __call__(self, x_BTD):
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x_BTD))))


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype):
        self.attn = CausalSelfAttention(config, rngs=rngs, dtype=dtype)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype)

    def __call__(self, x_BTD, cos_TF, sin_TF, kv=None):
        y_BTD, kv = self.attn(rms_norm(x_BTD), cos_TF, sin_TF, kv)
        x_BTD = x_BTD + y_BTD
        return x_BTD + self.mlp(rms_norm(x_BTD)), kv


# Activation checkpointing of each block during training: "none" keeps every activation, "dots"
# keeps only matmul outputs (recomputes norms, rotary, relu^2), "full" recomputes the whole block.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class GPT(nnx.Module):
    def __init__(
        self,
        config: GPTConfig,
        *,
        rngs: nnx.Rngs,
        compute_dtype=jnp.float32,
        remat: str = "none",
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        self.config = config
        self.remat = remat
        d, V = config.n_embd, config.vocab_size
        self.wte = nnx.Embed(V, d, dtype=compute_dtype, embedding_init=_embedding_init, rngs=rngs)
        self.h = nnx.List(
            [Block(config, rngs=rngs, dtype=compute_dtype) for _ in range(config.n_layer)]
        )
        self.lm_head = _linear(d, V, rngs, compute_dtype, zero=True)

    def _trunk(self, idx_BT, cos_TF, sin_TF, cache=None):
        """Embedding, blocks, final norm -> (x_BTD, cache): everything before lm_head."""
        x_BTD = rms_norm(self.wte(idx_BT))
        run_block = Block.__call__
        if self.remat != "none" and cache is None:
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[self.remat])
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache.k, cache.v, cache.pos, i)
            x_BTD, kv = run_block(block, x_BTD, cos_TF, sin_TF, kv)
            if cache is not None:
                cache = cache.replace(k=kv[0], v=kv[1])
        if cache is not None:
            cache = cache.replace(pos=cache.pos + idx_BT.shape[1])
        return rms_norm(x_BTD), cache

    def hidden_states(self, idx_BT) -> jax.Array:
        """(B, T, D) final-norm hidden states: the forward without lm_head. An eval that reads
        only some logits applies `head` to those positions (and vocab columns) alone."""
        T = idx_BT.shape[1]
        if T > self.config.rotary_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds the rotary table ({self.config.rotary_seq_len})"
            )
        cos_TF, sin_TF = rotary_cos_sin(T, self.config.head_dim)
        return self._trunk(idx_BT, cos_TF, sin_TF)[0]

    def head(self, x_BTD, pos_BP=None, vocab_C=None) -> jax.Array:
        """lm_head, softcap, fp32: (B, P, C) logits at positions pos_BP of each row (ints < T;
        default all T) for the vocab ids vocab_C (ints < V; default all V). Each logit is the dot
        product of the same values as in the full (B, T, V) logits; a matmul of another shape
        may sum its D terms in another order (fp32 on CPU: a few ulp). Out-of-range ids give
        NaN (jnp's gather fill), as they cannot raise inside jit."""
        if (pos_BP is not None and pos_BP.ndim != 2) or (vocab_C is not None and vocab_C.ndim != 1):
            raise ValueError("head: pos_BP must be (B, P) and vocab_C (C,) integer arrays")
        x_BPD = x_BTD if pos_BP is None else jnp.take_along_axis(x_BTD, pos_BP[..., None], axis=1)
        lm_head = self.lm_head
        if vocab_C is None:
            logits_BPC = lm_head(x_BPD)
        else:  # nnx.Linear's own steps, on the chosen kernel columns
            kernel_DC = jnp.take(lm_head.kernel[...], vocab_C, axis=1)
            x_BPD, kernel_DC, _ = lm_head.promote_dtype(
                (x_BPD, kernel_DC, None), dtype=lm_head.dtype
            )
            dims = (((2,), (0,)), ((), ()))
            logits_BPC = lm_head.dot_general(x_BPD, kernel_DC, dims, precision=lm_head.precision)
        # nanochat applies the softcap in the autocast dtype, then casts the logits to fp32.
        return (SOFTCAP * jnp.tanh(logits_BPC / SOFTCAP)).astype(jnp.float32)

    def __call__(self, idx_BT, targets_BT=None, *, loss_reduction: str = "mean"):
        logits_BTV = self.head(self.hidden_states(idx_BT))
        if targets_BT is None:
            return logits_BTV
        return cross_entropy(logits_BTV, targets_BT, loss_reduction)

    def forward_cached(self, idx_BT, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run T new tokens at positions pos..pos+T-1 against the cache -> (fp32 logits, cache).

        Static shapes, so it jits once per T; the caller keeps pos + T <= max_len (inside jit an
        overflowing write cannot raise and would be clamped).
        """
        T, S = idx_BT.shape[1], cache.k.shape[3]
        if T > S:
            raise ValueError(f"{T} new tokens do not fit a KV cache of length {S}")
        cos_SF, sin_SF = rotary_cos_sin(S, self.config.head_dim)
        cos_TF = jax.lax.dynamic_slice_in_dim(jnp.asarray(cos_SF), cache.pos, T)
        sin_TF = jax.lax.dynamic_slice_in_dim(jnp.asarray(sin_SF), cache.pos, T)
        x_BTD, cache = self._trunk(idx_BT, cos_TF, sin_TF, cache)
        return self.head(x_BTD), cache


def cross_entropy(logits_BTV, targets_BT, loss_reduction: str = "mean") -> jax.Array:
    """fp32 cross entropy with ignore_index=-1 (torch semantics: mean over counted targets)."""
    if loss_reduction not in ("mean", "none"):
        raise ValueError(f"loss_reduction must be 'mean' or 'none', got {loss_reduction!r}")
    valid_BT = targets_BT != -1
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    safe_BT = jnp.where(valid_BT, targets_BT, 0)
    nll_BT = -jnp.take_along_axis(logp_BTV, safe_BT[..., None], axis=-1)[..., 0]
    nll_BT = jnp.where(valid_BT, nll_BT, 0.0)
    if loss_reduction == "none":
        return nll_BT
    return nll_BT.sum() / valid_BT.sum()
