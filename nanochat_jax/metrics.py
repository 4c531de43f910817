"""Model size, FLOPs per token and MFU, as nanochat computes them."""

from __future__ import annotations

import json
import math
import time
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
