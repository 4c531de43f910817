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


def test_metrics_writer_tensorboard_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nanochat_jax.metrics import MetricsWriter, read_jsonl

    writer = MetricsWriter(tmp_path, enabled=True)
    writer.scalars(1, {"train/loss": 3.5, "train/mfu": 41.0})
    writer.scalars(2, {"train/loss": 3.25})
    writer.text(2, "samples", "The capital of France is Paris")
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.5), (2, 3.25)]
    assert events.Tensors("samples")[0].tensor_proto.string_val == [
        b"The capital of France is Paris"
    ]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 3.5), (2, 3.25)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # a run killed mid-write
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2


def test_step_clock_matches_nanochat_formulas(monkeypatch):
    from nanochat_jax import metrics

    times = iter([100.0, 101.0, 103.0] + [103.0 + 2 * i for i in range(1, 20)] + [500.0, 502.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(times))
    clock = metrics.StepClock(
        tokens_per_step=1000,
        flops_per_token=6e6,
        num_devices=2,
        peak_flops_per_device=1e12,
        start_step=5,
    )
    s = clock.tick(5, 2.0)
    assert (s.dt, s.tokens_per_s) == (1.0, 1000.0)
    assert s.loss_smooth == pytest.approx(2.0)  # the debiased EMA of one step is that loss
    assert s.mfu == pytest.approx(100 * 1000 * 6e6 / 2e12)
    s = clock.tick(6, 1.0)
    assert s.loss_smooth == pytest.approx((0.9 * 0.2 + 0.1) / (1 - 0.81))
    assert s.dt == 2.0 and s.total_time_s == 0.0  # the first 10 steps are not timed
    for step in range(7, 26):
        s = clock.tick(step, 1.0)
    assert s.total_time_s == 2.0 * (25 - 15)  # steps 16..25
    assert clock.eta_s(25, 100) == pytest.approx(74 * 2.0)
    assert clock.eta_s(12, 100) == 0.0
    clock.restart()  # an evaluation ran: its 398 s are not a step's time
    assert clock.tick(26, 1.0).dt == 2.0


def test_console_line_is_nanochats_format():
    from nanochat_jax.metrics import StepStats

    s = StepStats(2.5, 2.25, 0.125, 65536.0, 41.234, 90.0)
    assert s.console_line(41, 500, 42 / 500, 1.0, eta_s=600.0) == (
        "step 00041/00500 (8.40%) | loss: 2.250000 | lrm: 1.00 | dt: 125.00ms | "
        "tok/sec: 65,536 | mfu: 41.23 | total time: 1.50m | eta: 10.0m"
    )
    assert s.console_line(41, 500, 0.5, 0.25).endswith("| lrm: 0.25 | dt: 125.00ms | "
        "tok/sec: 65,536 | mfu: 41.23 | total time: 1.50m")  # fmt: skip
