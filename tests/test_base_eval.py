"""base_eval end to end on a tiny base run with the demo eval bundle, and base_train's CORE hook."""

from __future__ import annotations

import csv
import io
import shutil

import numpy as np
import pytest

from nanochat_jax.dataset import parquets_iter_batched
from nanochat_jax.demo_data import DemoDataConfig, write_demo_shards
from nanochat_jax.eval_bundle import read_tasks, write_demo_bundle
from nanochat_jax.metrics import read_jsonl
from nanochat_jax.tokenizer import Tokenizer
from scripts import base_eval, base_train

TRAIN_FLAGS = [
    "--depth=1",
    "--max_seq_len=64",
    "--device_batch_size=4",
    "--total_batch_size=256",
    "--num_iterations=4",
    "--eval_every=-1",
    "--sample_every=-1",
    "--save_every=2",
    "--core_metric_every=2",
    "--core_metric_max_per_task=8",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Demo shards, a vocab-512 tokenizer and the demo bundle, then 4 steps of base_train that
    estimate CORE at steps 2 and 4."""
    base = tmp_path_factory.mktemp("base")
    write_demo_shards(DemoDataConfig(num_shards=2, chars_per_shard=100_000), base / "base_data")
    docs = [
        d[:2000] for b in parquets_iter_batched("train", data_dir=base / "base_data") for d in b
    ]
    tokenizer = Tokenizer.train_from_iterator(iter(docs), 512)
    tokenizer.save(base / "tokenizer")
    write_demo_bundle(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
        base_train.main(TRAIN_FLAGS)
    return base


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base_dir))
    return base_dir


def test_base_train_estimates_core(base_dir):
    records = read_jsonl(base_dir / "runs" / "d1" / "base" / "metrics.jsonl")
    core = {r["step"]: r for r in records if "core_metric" in r}
    assert sorted(core) == [2, 4]
    labels = [t.label for t in read_tasks(base_dir / "eval_bundle")]
    for record in core.values():
        centered = [record[f"centered_results/{label}"] for label in labels]
        assert record["core_metric"] == pytest.approx(np.mean(centered))
    report = (base_dir / "report" / "base-model-training.md").read_text()
    assert f"- CORE metric estimate: {core[4]['core_metric']:.4f}" in report


def test_base_eval_writes_csv_and_report(env, capsys):
    base_eval.main(["--max_per_task=16"])
    out = capsys.readouterr().out
    assert "Model: base_model (step 4)" in out and "demo eval bundle" in out
    table = (env / "base_eval" / "base_model_000004.csv").read_text()
    assert table in out
    rows = [[cell.strip() for cell in row] for row in csv.reader(io.StringIO(table))]
    labels = [t.label for t in read_tasks(env / "eval_bundle")]
    assert rows[0] == ["Task", "Accuracy", "Centered"]
    assert [r[0] for r in rows[1:-1]] == labels
    assert rows[-1][:2] == ["CORE", ""]
    centered = [float(r[2]) for r in rows[1:-1]]
    assert float(rows[-1][2]) == pytest.approx(np.mean(centered), abs=1e-6)
    for row in rows[1:-1]:  # accuracies are multiples of 1/16 on 16 examples
        assert float(row[1]) * 16 == pytest.approx(round(float(row[1]) * 16), abs=1e-4)
    report = (env / "report" / "base-model-evaluation.md").read_text()
    assert "## Base model evaluation" in report
    assert "- Model: base_model (step 4)" in report
    assert f"- CORE metric: {float(rows[-1][2]):.4f}" in report
    assert all(f"- {label}: " in report for label in labels)
    assert "- Eval bundle: offline demo" in report


def test_base_eval_of_an_earlier_step_on_two_devices(env):
    """--step picks the checkpoint; a 2-device mesh splits the batches and scores the same."""
    csv_path = env / "base_eval" / "base_model_000002.csv"
    base_eval.main(["--step=2", "--max_per_task=8", "--model_tag=d1"])
    one_device = csv_path.read_text()
    base_eval.main(
        ["--step=2", "--max_per_task=8", "--model_tag=d1", "--mesh=2", "--max_seq_len=64"]
    )
    assert csv_path.read_text() == one_device


def test_missing_bundle_or_checkpoint_is_a_clear_error(tmp_path, monkeypatch, base_dir):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="python -m nanochat_jax.eval_bundle"):
        base_eval.main([])
    write_demo_bundle(tmp_path)
    (tmp_path / "tokenizer").mkdir()
    for f in (base_dir / "tokenizer").iterdir():
        (tmp_path / "tokenizer" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(SystemExit, match="no checkpoints in .*base_checkpoints"):
        base_eval.main([])


def _broken_bundle(base, base_dir):
    """A base dir with the tokenizer and a demo bundle missing one task's data file."""
    shutil.copytree(base_dir / "tokenizer", base / "tokenizer")
    directory = write_demo_bundle(base)
    broken = directory / "eval_data" / read_tasks(directory)[2].dataset_uri
    text = broken.read_text()
    broken.unlink()
    return broken, text


def test_base_eval_checks_the_whole_bundle_first(tmp_path, monkeypatch, base_dir):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    broken, text = _broken_bundle(tmp_path, base_dir)
    # no checkpoint either: the bundle is checked before the model is looked for
    with pytest.raises(SystemExit, match=rf"error: task .* {broken} is missing; delete"):
        base_eval.main([])
    lines = text.splitlines(keepends=True)
    broken.write_text("".join(lines[:2] + ["{" + lines[2]] + lines[3:]))  # line 3 goes bad
    with pytest.raises(SystemExit, match=rf"error: {broken}:3: not valid JSON"):
        base_eval.main([])


class _Started(Exception):
    pass


def test_base_train_decides_about_a_broken_bundle_at_the_start(tmp_path, monkeypatch, base_dir):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    broken, _ = _broken_bundle(tmp_path, base_dir)
    warnings = []
    monkeypatch.setattr(base_train.log, "warning", lambda msg, *a: warnings.append(msg % a))

    def started(*args, **kwargs):
        raise _Started

    monkeypatch.setattr(base_train.stage, "data_loader", started)  # stop before training
    with pytest.raises(_Started):
        base_train.main(TRAIN_FLAGS)
    core = [w for w in warnings if "CORE" in w]
    assert len(core) == 1 and str(broken) in core[0], warnings
    assert core[0].endswith("The CORE metric is skipped in this run.")
    warnings.clear()
    with pytest.raises(_Started):  # no CORE steps asked for: the bundle is not looked at
        base_train.main([*TRAIN_FLAGS, "--core_metric_every=-1"])
    assert not [w for w in warnings if "CORE" in w]
