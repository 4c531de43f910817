"""base_train end to end on demo data: it learns, logs, and a SIGKILLed run resumes exactly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanochat_jax.dataset import parquets_iter_batched
from nanochat_jax.demo_data import DemoDataConfig, write_demo_shards
from nanochat_jax.metrics import read_jsonl
from nanochat_jax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--depth=1",
    "--max_seq_len=64",
    "--device_batch_size=4",
    "--total_batch_size=512",
    "--num_iterations=12",
    "--eval_every=6",
    "--eval_tokens=512",
    "--sample_every=-1",
    "--save_every=4",
    "--log_every=1",
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Demo shards + a vocab-512 tokenizer, as the first stages of the demo would leave them."""
    base = tmp_path_factory.mktemp("base")
    write_demo_shards(DemoDataConfig(num_shards=2, chars_per_shard=300_000), base / "base_data")
    docs = [
        d[:2000]
        for batch in parquets_iter_batched("train", data_dir=base / "base_data")
        for d in batch
    ]
    tokenizer = Tokenizer.train_from_iterator(iter(docs), 512)
    tokenizer.save(base / "tokenizer")
    np.save(base / "tokenizer" / "token_bytes.npy", tokenizer.token_bytes())
    return base


def _start(base: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, NANOCHAT_JAX_BASE_DIR=str(base), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, like a laptop
    cmd = [sys.executable, "-m", "scripts.base_train", *FLAGS, *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _losses(base: Path) -> dict[int, float]:
    """step -> train loss, the last record of each step winning (a resumed run redoes steps)."""
    records = read_jsonl(base / "runs" / "d1" / "base" / "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _copy_inputs(src: Path, dst: Path) -> Path:
    for sub in ("base_data", "tokenizer"):
        (dst / sub).mkdir(parents=True)
        for f in (src / sub).iterdir():
            (dst / sub / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def reference(base_dir, tmp_path_factory):
    """One uninterrupted run."""
    base = _copy_inputs(base_dir, tmp_path_factory.mktemp("reference"))
    proc = _start(base)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return base


def test_train_learns_and_writes_report(reference):
    base = reference
    losses = _losses(base)
    assert sorted(losses) == list(range(12))
    assert np.mean([losses[s] for s in range(6, 12)]) < losses[0] - 0.2, losses
    bpbs = [r["val/bpb"] for r in read_jsonl(base / "runs/d1/base/metrics.jsonl") if "val/bpb" in r]
    assert len(bpbs) == 3 and bpbs[-1] < bpbs[0]
    report = (base / "report" / "base-model-training.md").read_text()
    assert "## Base model training" in report and "- Calculated number of iterations: 12" in report
    assert list((base / "runs/d1/base").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (base / "base_checkpoints/d1").iterdir()) == ["000008", "000012"]


def test_sigkill_and_resume_gives_the_same_losses(base_dir, reference, tmp_path):
    base = _copy_inputs(base_dir, tmp_path / "killed")
    proc = _start(base)
    deadline = time.time() + 300
    saved = base / "base_checkpoints" / "d1" / "000004"  # renamed into place once complete
    while time.time() < deadline and (_last_step(base) < 6 or not saved.is_dir()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: mid-run, after the step-4 save
    proc.communicate()
    killed_at = max(_losses(base))
    assert 6 <= killed_at < 11

    proc = _start(base, "--resume=1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resumed from step" in out, out
    expected, got = _losses(reference), _losses(base)
    assert sorted(got) == list(range(12))
    for step in range(12):
        assert got[step] == expected[step], (step, got[step], expected[step])


def _last_step(base: Path) -> int:
    if not (base / "runs" / "d1" / "base" / "metrics.jsonl").exists():
        return -1
    return max(_losses(base), default=-1)


def test_resume_with_other_flags_is_refused(reference):
    proc = _start(reference, "--resume=1", "--num_iterations=20")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "another model or number of iterations" in out


def test_every_step_is_logged_without_evals(base_dir, tmp_path):
    base = _copy_inputs(base_dir, tmp_path / "noeval")
    proc = _start(base, "--num_iterations=3", "--eval_every=-1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert sorted(_losses(base)) == [0, 1, 2]  # the last step's metrics are read one step late
