"""The sharded, jitted train step shared by base, mid, SFT and RL training.

The model is split once into (graphdef, params, rest) with nnx. The step is a pure function
`step(params, opt_state, rest, inputs_ABT, targets_ABT) -> (params, opt_state, metrics)`, compiled
ahead of time with explicit shardings and donated state, so it can never silently recompile.
Gradients of the A micro-batches are accumulated inside the step with `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanochat_jax import sharding
from nanochat_jax.common import get_logger
from nanochat_jax.config import GPTConfig
from nanochat_jax.model import GPT

log = get_logger(__name__)

# XLA flags that help transformer training on NVIDIA GPUs; set before the GPU backend starts.
_GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
)


def configure_gpu_performance() -> None:
    """Append the GPU XLA flags (idempotent). Call before the first JAX computation.

    Also lets JAX take 92% of GPU memory instead of its default 75% (nanochat's batch sizes were
    tuned to fill an 80 GB card), unless the user set XLA_PYTHON_CLIENT_MEM_FRACTION.
    """
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in _GPU_XLA_FLAGS if f.split("=")[0] not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")


def grad_accum_steps(
    total_batch_size: int, device_batch_size: int, sequence_len: int, num_data_devices: int
) -> int:
    """nanochat's rule: tokens per optimizer step / tokens per forward-backward of all devices."""
    sizes = (device_batch_size, sequence_len, num_data_devices)
    if min(sizes) < 1:
        raise ValueError(
            "device_batch_size, max_seq_len and the number of data-parallel devices must be "
            f">= 1, got {device_batch_size}, {sequence_len} and {num_data_devices}"
        )
    tokens_per_fwdbwd = device_batch_size * sequence_len * num_data_devices
    if total_batch_size <= 0 or total_batch_size % tokens_per_fwdbwd:
        raise ValueError(
            f"total_batch_size={total_batch_size} must be a positive multiple of "
            f"device_batch_size*max_seq_len*data-parallel devices = {device_batch_size}*"
            f"{sequence_len}*{num_data_devices} = {tokens_per_fwdbwd}"
        )
    return total_batch_size // tokens_per_fwdbwd


@dataclasses.dataclass
class TrainState:
    """The trained arrays, plus what rebuilds the model around them."""

    graphdef: Any
    params: Any  # nested dict of fp32 arrays: nnx.to_pure_dict of the model's Param state
    rest: Any  # the model's other (constant) nnx state
    opt_state: Any
    mesh: Mesh
    param_shardings: Any
    opt_shardings: Any

    def model(self) -> GPT:
        """The GPT with the current parameters (for eval, sampling, checkpoint export)."""
        return nnx.merge(self.graphdef, self.params, self.rest)


def _split(model: GPT):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def init_train_state(
    config: GPTConfig,
    make_optimizer: Callable[[Any], optax.GradientTransformation],
    mesh: Mesh,
    *,
    seed: int = 0,
    compute_dtype=jnp.float32,
    remat: str = "none",
    load: Callable[[Any, Any], tuple[Any, Any]] | None = None,
) -> tuple[TrainState, optax.GradientTransformation]:
    """Model + optimizer state created directly in their shardings (no full copy on one device).

    `make_optimizer(params)` receives the abstract parameter tree. `load(params_target,
    opt_state_target)`, if given, replaces the fresh initialisation: it receives abstract trees
    (jax.ShapeDtypeStruct with the target shardings) and returns (params, opt_state), e.g. a
    checkpoint restore; opt_state may be None to start the optimizer afresh.
    """

    def make_model():
        return GPT(config, rngs=nnx.Rngs(seed), compute_dtype=compute_dtype, remat=remat)

    def build():
        return _split(make_model())

    graphdef, abstract_params, abstract_rest = _split(nnx.eval_shape(make_model))
    optimizer = make_optimizer(abstract_params)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    param_shardings = sharding.tree_shardings(abstract_params, mesh)
    opt_shardings = sharding.tree_shardings(abstract_opt, mesh)
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_rest)
    rest = jax.jit(lambda: build()[2], out_shardings=replicated)()

    if load is None:

        def init():
            _, fresh, _ = build()
            return fresh, optimizer.init(fresh)

        init = jax.jit(init, out_shardings=(param_shardings, opt_shardings))
        params, opt_state = init()
    else:
        params, opt_state = load(
            sharding.abstract_on_mesh(abstract_params, mesh),
            sharding.abstract_on_mesh(abstract_opt, mesh),
        )
        if opt_state is None:
            opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    state = TrainState(graphdef, params, rest, opt_state, mesh, param_shardings, opt_shardings)
    return state, optimizer


def loss_fn(params, graphdef, rest, inputs_BT, targets_BT):
    return nnx.merge(graphdef, params, rest)(inputs_BT, targets_BT)


def make_train_step(
    state: TrainState,
    optimizer: optax.GradientTransformation,
    *,
    accum_steps: int,
    micro_batch_size: int,
    sequence_len: int,
    loss: Callable = loss_fn,
    extra_dtypes: tuple = (),
):
    """Compile `step(params, opt_state, rest, inputs_ABT, targets_ABT, *extras_ABT)` for these
    exact shapes.

    `loss(params, graphdef, rest, inputs_BT, targets_BT, *extras_BT)` is the loss of one micro-
    batch; `extra_dtypes` gives the dtypes of extra (A, B, T) batch arrays it takes (e.g. RL's
    per-token weights). Gradients are averaged over the A micro-batches. Returns the AOT-compiled
    function: calling it with other shapes raises instead of recompiling. Metrics: `loss` (mean
    over micro-batches) and `grad_norm` (before clipping).
    """
    graphdef = state.graphdef

    def step(params, opt_state, rest, *batch_ABT):
        grad_fn = jax.value_and_grad(loss)

        def micro_step(grads_sum, batch):
            value, grads = grad_fn(params, graphdef, rest, *batch)
            return jax.tree.map(jnp.add, grads_sum, grads), value

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads_sum, losses_A = jax.lax.scan(micro_step, zeros, batch_ABT)
        grads = jax.tree.map(lambda g: g / accum_steps, grads_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = {"loss": jnp.mean(losses_A), "grad_norm": grad_norm}
        return params, opt_state, metrics

    mesh = state.mesh
    batch_shd = sharding.batch_sharding(mesh, leading_axes=1)
    rest_shd = jax.tree.map(lambda _: NamedSharding(mesh, P()), state.rest)
    dtypes = (jnp.int32, jnp.int32, *extra_dtypes)
    jitted = jax.jit(
        step,
        in_shardings=(state.param_shardings, state.opt_shardings, rest_shd)
        + (batch_shd,) * len(dtypes),
        out_shardings=(state.param_shardings, state.opt_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )
    shape = (accum_steps, micro_batch_size, sequence_len)
    batch = [jax.ShapeDtypeStruct(shape, dtype) for dtype in dtypes]
    return jitted.lower(state.params, state.opt_state, state.rest, *batch).compile()
