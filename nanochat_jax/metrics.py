"""Model size, FLOPs per token and MFU, as nanochat computes them."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class StepStats:
    loss: float
    loss_smooth: float  # debiased EMA (beta 0.9) of the loss since the run (re)started
    dt: float  # seconds since the previous step
    tokens_per_s: float
    mfu: float  # percent
    total_time_s: float  # training time so far, without the first 10 steps of this process

    def console_line(
        self, step: int, steps_total: int, progress: float, lrm: float, eta_s: float | None = None
    ) -> str:
        """nanochat's per-step line: `step 00042/00500 (8.40%) | loss: ... | mfu: ... | ...`."""
        eta = "" if eta_s is None else f" | eta: {eta_s / 60:.1f}m"
        return (
            f"step {step:05d}/{steps_total:05d} ({100 * progress:.2f}%) | "
            f"loss: {self.loss_smooth:.6f} | lrm: {lrm:.2f} | dt: {self.dt * 1000:.2f}ms | "
            f"tok/sec: {self.tokens_per_s:,.0f} | mfu: {self.mfu:.2f} | "
            f"total time: {self.total_time_s / 60:.2f}m{eta}"
        )

    def scalars(self) -> dict[str, float]:
        """The TensorBoard/JSONL scalars of a training step."""
        return {
            "train/loss": self.loss,
            "train/loss_smooth": self.loss_smooth,
            "train/dt": self.dt,
            "train/tok_per_sec": self.tokens_per_s,
            "train/mfu": self.mfu,
        }


class StepClock:
    """Per-step throughput and smoothed loss, exactly as nanochat's training loops compute them.

    Call `tick(step, loss)` once per finished step; call `restart()` after an evaluation so its
    time is not counted as training time. The first 10 steps after (re)start (compilation,
    warm-up) are left out of `total_time_s`, as nanochat does.
    """

    def __init__(
        self,
        *,
        tokens_per_step: int,
        flops_per_token: float,
        num_devices: int,
        peak_flops_per_device: float,
        start_step: int = 0,
    ):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.num_devices, self.peak_flops = num_devices, peak_flops_per_device
        self.start_step = start_step
        self.total_time_s, self.mfu = 0.0, 0.0
        self._smooth = 0.0
        self._t_last = time.perf_counter()

    def restart(self) -> None:
        self._t_last = time.perf_counter()

    def tick(self, step: int, loss: float) -> StepStats:
        now = time.perf_counter()
        dt, self._t_last = now - self._t_last, now
        self._smooth = 0.9 * self._smooth + 0.1 * loss
        smooth = self._smooth / (1 - 0.9 ** (step - self.start_step + 1))
        tokens_per_s = self.tokens_per_step / dt
        self.mfu = mfu_percent(
            tokens_per_s,
            self.flops_per_token,
            num_devices=self.num_devices,
            peak_flops_per_device=self.peak_flops,
        )
        if step > self.start_step + 10:
            self.total_time_s += dt
        return StepStats(loss, smooth, dt, tokens_per_s, self.mfu, self.total_time_s)

    def eta_s(self, step: int, steps_total: int) -> float:
        """Seconds left after `step`, from the mean time of the timed steps (0 before any)."""
        timed = step - self.start_step - 10
        return (steps_total - step - 1) * self.total_time_s / timed if timed > 0 else 0.0


class MetricsWriter:
    """Training curves for TensorBoard (event files, no TensorFlow needed) and a JSONL log.

    `tensorboard --logdir <log_dir>` shows the scalars and the text samples; `metrics.jsonl`
    holds one `{"step": s, "time": t, ...}` object per `scalars` call for scripts and tests.
    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(self, log_dir: str | Path, *, enabled: bool | None = None):
        self.log_dir = Path(log_dir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._events = None
        self._jsonl = None
        if self.enabled:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._events = EventFileWriter(str(self.log_dir), flush_secs=10)
            # line-buffered: a killed run keeps every step it logged
            path = self.log_dir / "metrics.jsonl"
            self._jsonl = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto import summary_pb2

        now = time.time()
        clean = {tag: float(value) for tag, value in values.items()}
        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in clean.items()]
        )
        self._add_event(step, summary, now)
        self._jsonl.write(json.dumps({"step": step, "time": now, **clean}) + "\n")

    def text(self, step: int, tag: str, text: str) -> None:
        if not self.enabled:
            return
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        )
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[]),
        )
        value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
        self._add_event(step, summary_pb2.Summary(value=[value]), time.time())

    def _add_event(self, step: int, summary, wall_time: float) -> None:
        from tensorboard.compat.proto import event_pb2

        self._events.add_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

    def flush(self) -> None:
        if self.enabled:
            self._events.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._events.close()
            self._jsonl.close()
            self.enabled = False


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
