"""The sharded, jitted train step shared by base, mid, SFT and RL training, and the host loop
of base and mid training.

The model is split once into (graphdef, params, rest) with nnx. The step is a pure function
`step(params, opt_state, rest, inputs_ABT, targets_ABT, *extras_ABT) -> (params, opt_state,
metrics)`, compiled
ahead of time with explicit shardings and donated state, so it can never silently recompile.
Gradients of the A micro-batches are accumulated inside the step with `lax.scan`.

`TrainLoop` runs such a step for a number of steps: it dispatches each step, reads its metrics one
step late (so the host never waits on the device), and evaluates, saves and logs on nanochat's
cadence; the stage script supplies the data, the evaluations and the checkpoint contents.
chat_sft and chat_rl run their own loops on the same parts: `TrainState.apply_step` (both) and
`LateMetrics` (chat_sft: a step per padded length, its own evaluations and line; RL reads each
step's metrics at once, as its next rollouts wait for the new weights anyway).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanochat_jax import sharding
from nanochat_jax.common import get_logger
from nanochat_jax.config import GPTConfig
from nanochat_jax.metrics import MetricsWriter, StepClock, flops_per_token
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
    config: GPTConfig

    def model(self) -> GPT:
        """The GPT with the current parameters (for eval, sampling, checkpoint export). It shares
        their arrays: use it before the next apply_step, which donates (deletes) them."""
        return nnx.merge(self.graphdef, self.params, self.rest)

    def apply_step(self, step_fn: Callable, *batch_ABT: np.ndarray) -> dict[str, jax.Array]:
        """One optimizer step: `step_fn` (from make_train_step) on `batch_ABT`, host arrays of
        this process's rows (A, local B, T), sharded over the mesh. Rebinds params and opt_state;
        the previous arrays are donated to the step, so any `model()` view or other alias of them
        is invalid afterwards. Returns the step's metrics still on the device: dispatch does not
        wait."""
        batch_ABT = [sharding.shard_batch(a, self.mesh, leading_axes=1) for a in batch_ABT]
        self.params, self.opt_state, metrics = step_fn(
            self.params, self.opt_state, self.rest, *batch_ABT
        )
        return metrics


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
    state = TrainState(
        graphdef, params, rest, opt_state, mesh, param_shardings, opt_shardings, config
    )
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


def check_step(metrics: dict, step: int) -> float:
    """A finished step's host metrics: a NaN/inf loss or gradient norm ends the run with one
    error line (every training stage). The loss is of the weights before the step's update, so
    only the gradient norm catches the update that makes them non-finite, before they are saved.
    Returns the loss as a float.
    """
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not math.isfinite(loss):
        raise SystemExit(f"error: loss is {loss} at step {step}; stopping (lower the lrs?)")
    if not math.isfinite(grad_norm):
        raise SystemExit(
            f"error: gradient norm is {grad_norm} at step {step}, so the update made the weights "
            "non-finite; stopping before they are saved (lower the lrs?)"
        )
    return loss


class LateMetrics:
    """Reads a train step's metrics one step late, so the host never waits on the device.

    `push(step, metrics, *extra)` after dispatching a step logs the step before it, which has
    finished by then (or soon: the device already has the next step queued); `flush()` logs the
    held step at once, where the host waits anyway (before an evaluation, a save, the end).
    The callback `on_step(step, metrics, *extra)` receives the metrics on the host (one
    `device_get` per step). A step held when an exception unwinds is not logged: flushing there
    would wait on the device and could mask the original error.
    """

    def __init__(self, on_step: Callable[..., None]):
        self._on_step = on_step
        self._held: tuple | None = None

    def push(self, step: int, metrics: dict, *extra: Any) -> None:
        self.flush()
        self._held = (step, metrics, *extra)

    def flush(self) -> None:
        if self._held is not None:
            (step, metrics, *extra), self._held = self._held, None
            self._on_step(step, jax.device_get(metrics), *extra)


class LoopFlags(Protocol):
    """The flags a stage's TrainLoop follows (base_train and mid_train share nanochat's names)."""

    total_batch_size: int  # tokens per optimizer step
    device_batch_size: int  # rows per micro-batch of one data-parallel rank
    max_seq_len: int
    eval_every: int  # validation bpb every N steps (<= 0: never, but see always_eval_last)
    save_every: int  # also save every N steps after the (re)start (<= 0: only at the end)
    log_every: int  # console line every N steps (and at the last); metrics files get every step
    peak_flops: float  # per device, the MFU denominator


@dataclasses.dataclass
class Periodic:
    """A host-side task run before step `s`, on the model trained for s steps: every `every`
    steps (not at step 0) and at the last step; never when every <= 0 (nanochat's CORE metric
    and samples). `run(step)` prints and writes its own results."""

    every: int
    run: Callable[[int], None]

    def due(self, step: int, last_step: bool) -> bool:
        return self.every > 0 and (last_step or (step > 0 and step % self.every == 0))


@dataclasses.dataclass
class LoopResult:
    val_bpb: float | None  # the last validation bpb (None: never evaluated)
    min_val_bpb: float  # inf: never evaluated
    total_time_s: float  # training time, without the first 10 steps (StepClock)
    mfu: float  # percent, of the last step

    def final_line(self) -> str:
        """The line nanochat prints when training is done."""
        return (
            f"Total training time: {self.total_time_s / 60:.2f}m; "
            f"minimum validation bpb: {self.min_val_bpb:.4f}"
        )


@dataclasses.dataclass
class TrainLoop:
    """nanochat's training loop over steps start_step..steps_total, on the host.

    When made, it compiles the train step (make_train_step) for steps of accum_steps
    (grad_accum_steps of the flags) micro-batches of device_batch_size * world_size rows.

    Before step s (and once more after the last, s = steps_total) it evaluates what is due on the
    model trained for s steps: the validation bpb (every eval_every steps), then each `periodic`
    task, then saves (every save_every steps after the (re)start, and at the end). Then it
    dispatches step s and reads the metrics of step s - 1: the host never waits on the device
    except where it evaluates or saves anyway. Each step's loss, smoothed loss, throughput, MFU,
    lr multiplier and grad norm go to the writer; every log_every-th step also to the console as
    nanochat's step line. A NaN/inf loss ends the run with one error line.
    """

    state: TrainState
    optimizer: optax.GradientTransformation
    flags: LoopFlags
    writer: MetricsWriter
    # (step, m) -> host (inputs_BT, targets_BT) of micro-batch m of that step, m = 0..accum-1
    micro_batch: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    world_size: int  # data-parallel ranks: a micro-batch has device_batch_size * world_size rows
    steps_total: int
    lrm_by_step: Sequence[float]  # each step's lr multiplier, logged (the optimizer has its own)
    start_step: int = 0  # > 0 when resuming: the step of the restored checkpoint
    val_bpb: Callable[[], float] | None = None  # the current model's validation bpb
    always_eval_last: bool = False  # at the last step even when eval_every <= 0 (as mid_train)
    periodic: Sequence[Periodic] = ()
    save: Callable[[int, float | None], None] | None = None  # (step, last val bpb); None: never
    # mid_train: each step's fraction of the data, shown instead of (step + 1) / steps_total and
    # logged as train/progress; its line has no eta, as nanochat's
    progress: Sequence[float] | None = None
    accum_steps: int = dataclasses.field(init=False)  # micro-batches per step, from the flags
    _step_fn: Callable = dataclasses.field(init=False, repr=False)  # the compiled train step

    def __post_init__(self):
        flags = self.flags
        self.accum_steps = grad_accum_steps(
            flags.total_batch_size, flags.device_batch_size, flags.max_seq_len, self.world_size
        )
        self._step_fn = make_train_step(
            self.state,
            self.optimizer,
            accum_steps=self.accum_steps,
            micro_batch_size=flags.device_batch_size * self.world_size,
            sequence_len=flags.max_seq_len,
        )

    def run(self) -> LoopResult:
        flags, state = self.flags, self.state
        clock = StepClock(
            tokens_per_step=flags.total_batch_size,
            flops_per_token=flops_per_token(state.config),
            num_devices=state.mesh.size,
            peak_flops_per_device=flags.peak_flops,
            start_step=self.start_step,
        )
        val, min_val = None, math.inf
        late = LateMetrics(lambda step, metrics: self._log_step(clock, step, metrics))
        for step in range(self.start_step, self.steps_total + 1):
            last_step = step == self.steps_total
            do_eval = self.val_bpb is not None and (
                (last_step and self.always_eval_last)
                or (flags.eval_every > 0 and (last_step or step % flags.eval_every == 0))
            )
            tasks = [task for task in self.periodic if task.due(step, last_step)]
            periodic_save = flags.save_every > 0 and step % flags.save_every == 0
            do_save = self.save is not None and (
                last_step or (periodic_save and step > self.start_step)
            )
            if do_eval or tasks or do_save or last_step:
                late.flush()  # the host is about to wait for the device anyway
            if do_eval:
                val = self.val_bpb()
                min_val = min(min_val, val)
                print(f"step {step:05d} | validation bpb: {val:.4f}", flush=True)
                self.writer.scalars(step, {"val/bpb": val})
            for task in tasks:
                task.run(step)
            if do_eval or tasks:
                clock.restart()  # evaluation time is not training time
            if do_save:
                self.save(step, val)
            if last_step:
                break

            micro = [self.micro_batch(step, m) for m in range(self.accum_steps)]
            inputs, targets = (np.stack([m[i] for m in micro]) for i in (0, 1))
            late.push(step, state.apply_step(self._step_fn, inputs, targets))
        return LoopResult(val, min_val, clock.total_time_s, clock.mfu)

    def _log_step(self, clock: StepClock, step: int, metrics: dict) -> None:
        """Host-side logging of a finished step (called one step late: never blocks the device)."""
        loss = check_step(metrics, step)
        s = clock.tick(step, loss)
        lrm = float(self.lrm_by_step[step])
        total = self.steps_total
        if self.progress is None:
            progress, extra = (step + 1) / total, {}
        else:
            progress = self.progress[step]
            extra = {"train/progress": float(progress)}
        if step % self.flags.log_every == 0 or step == total - 1:
            eta_s = clock.eta_s(step, total) if self.progress is None else None
            print(s.console_line(step, total, progress, lrm, eta_s), flush=True)
        scalars = {**s.scalars(), "train/lrm": lrm, **extra}
        self.writer.scalars(step, {**scalars, "train/grad_norm": float(metrics["grad_norm"])})
