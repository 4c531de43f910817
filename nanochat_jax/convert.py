"""Map parameters between nanochat's PyTorch state_dict and our Flax NNX GPT.

nanochat names: `transformer.wte.weight` (V, D), `transformer.h.{i}.attn.c_{q,k,v,proj}.weight`,
`transformer.h.{i}.mlp.c_{fc,proj}.weight`, `lm_head.weight`; Linear weights are torch's (out, in),
the transpose of our (in, out) kernels. nanochat keeps wte in bf16 and everything else in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.config import GPTConfig
from nanochat_jax.model import GPT

_COMPILE_PREFIX = "_orig_mod."  # what torch.compile adds to every key
_BLOCK_LINEARS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _name_map(config: GPTConfig) -> dict[str, tuple]:
    """nanochat key -> our parameter path (as in nnx.state(model, nnx.Param)), nanochat's order."""
    names = {"transformer.wte.weight": ("wte", "embedding")}
    for i in range(config.n_layer):
        for linear in _BLOCK_LINEARS:
            sub, name = linear.split(".")
            names[f"transformer.h.{i}.{linear}.weight"] = ("h", i, sub, name, "kernel")
    names["lm_head.weight"] = ("lm_head", "kernel")
    return names


def _is_transposed(path: tuple) -> bool:
    return path[-1] == "kernel"


def from_nanochat_state_dict(
    state: dict[str, np.ndarray], config: GPTConfig, *, compute_dtype=jnp.float32
) -> GPT:
    """Build a GPT holding exactly the given nanochat weights (cast to fp32)."""
    state = {k.removeprefix(_COMPILE_PREFIX): v for k, v in state.items()}
    names = _name_map(config)
    missing = [k for k in names if k not in state]
    unexpected = sorted(k for k in state if k not in names)
    if missing or unexpected:
        raise ValueError(
            f"nanochat state_dict does not match {config}: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0), compute_dtype=compute_dtype))
    params = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(params))
    for key, path in names.items():
        array = np.asarray(state[key], dtype=np.float32)
        if _is_transposed(path):
            array = array.T
        expected = flat[path].get_value().shape
        if array.shape != tuple(expected):
            torch_shape = expected[::-1] if _is_transposed(path) else expected
            raise ValueError(
                f"{key}: shape {np.shape(state[key])} does not match {tuple(torch_shape)} "
                f"expected for {config}"
            )
        flat[path].set_value(jnp.asarray(array))
    nnx.update(model, params)
    return model


def to_nanochat_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """nanochat-named numpy arrays in torch layout; wte is bf16 (ml_dtypes) as nanochat saves it."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for key, path in _name_map(model.config).items():
        array = np.asarray(jax.device_get(flat[path].get_value()), dtype=np.float32)
        if _is_transposed(path):
            out[key] = np.ascontiguousarray(array.T)
        else:
            out[key] = array.astype(jnp.bfloat16)
    return out
