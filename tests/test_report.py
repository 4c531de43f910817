import datetime
import json
import logging
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import jax
import pytest

from nanochat_jax import report

T0 = datetime.datetime(2026, 1, 2, 10, 0, 0)

HEADER = """# nanochat-jax training report

Generated: 2026-01-02 09:59:58

## Environment

### Hardware
- JAX devices: 8x NVIDIA H100 80GB HBM3
- Hourly Rate: $24.00/hour

### Bloat
- Characters: 333,989
- Lines: 8,304
- Files: 44
- Tokens (approx): 83,497
- Dependencies (uv.lock lines): 2,004

Run started: 2026-01-02 10:00:00

---

"""

EXPECTED_SUMMARY = """## Summary

- Characters: 333,989
- Lines: 8,304
- Files: 44
- Tokens (approx): 83,497
- Dependencies (uv.lock lines): 2,004

| Metric          | BASE     | MID      | SFT      | RL       |
|-----------------|----------|----------|----------|----------|
| CORE            | 0.2219   | -        | -        | -        |
| ARC-Challenge   | -        | 0.2875   | 0.2807   | -        |
| ARC-Easy        | -        | 0.3561   | 0.3876   | -        |
| GSM8K           | -        | 0.0250   | 0.0455   | 0.0758   |
| HumanEval       | -        | 0.0671   | 0.0854   | -        |
| MMLU            | -        | 0.3111   | 0.3151   | -        |
| ChatCORE        | -        | 0.0730   | 0.0884   | -        |

Total wall clock time: 3h51m
Estimated cost: $92.60 (at $24.00/hour)
"""


def _chat_eval(source, scores, chatcore):
    return [{"source": source, "task_name": None}, scores, {"ChatCORE metric": chatcore}]


# (title, minutes after T0, items): what the stages log, in nanochat's shapes
SECTIONS = [
    ("Tokenizer training", 5, [{"vocab_size": 65536, "train_time": 61.2}]),
    (
        "Base model evaluation",
        120,
        [{"Model": "base_model (step 21400)", "CORE metric": 0.2219, "hellaswag": 0.2611}],
    ),
    (
        "Chat evaluation mid",
        180,
        _chat_eval(
            "mid",
            {"ARC-Easy": 0.3561, "ARC-Challenge": 0.2875, "MMLU": 0.3111, "GSM8K": 0.025},
            0.073,
        )
        + [{"HumanEval": 0.0671}],
    ),
    (
        "Chat evaluation sft",
        231.5,  # 13:51:30, the end of the clock: RL's later timestamps do not count
        _chat_eval(
            "sft",
            {
                "ARC-Easy": 0.3876,
                "ARC-Challenge": 0.2807,
                "MMLU": 0.3151,
                "GSM8K": 0.0455,
                "HumanEval": 0.0854,
            },
            0.0884,
        ),
    ),
    ("Chat RL", 400, [{"num_epochs": 1}]),
    ("Chat evaluation rl", 420, [{"source": "rl", "task_name": "GSM8K"}, {"GSM8K": 0.0758}]),
]


def _write_sections(base_dir, sections=SECTIONS):
    folder = report.report_dir(base_dir)
    texts = {}
    for title, minutes, items in sections:
        text = report.render_section(title, items, T0 + datetime.timedelta(minutes=minutes))
        (folder / f"{report.slug(title)}.md").write_text(text)
        texts[report.slug(title)] = text
    return texts


@pytest.fixture
def warnings():
    """Warnings the report logger emits (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("nanochat_jax.report")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_section_format_matches_nanochat(tmp_path):
    items = [
        {"depth": 4, "lr": 0.02, "tokens": 11219763200, "small": 9999, "flag": True},
        "free text",
    ]
    path = report.log_section("Base model training", items, base_dir=tmp_path)
    assert path == tmp_path / "report" / "base-model-training.md"
    text = path.read_text()
    assert text.startswith("## Base model training\ntimestamp: ")
    for line in (
        "- depth: 4",
        "- lr: 0.0200",
        "- tokens: 11,219,763,200",
        "- small: 9999",
        "- flag: True",
        "free text",
    ):
        assert line + "\n" in text


def test_render_is_deterministic_given_time():
    now = datetime.datetime(2026, 11, 28, 12, 0, 0)
    text = report.render_section("Tokenizer training", [{"a": 1.5}], now)
    assert text == "## Tokenizer training\ntimestamp: 2026-11-28 12:00:00\n\n- a: 1.5000\n"
    # empty items are skipped, as nanochat's report.log does
    assert report.render_section("Tokenizer training", [{}, None, "", {"a": 1.5}], now) == text


def _project(tmp_path):
    """A tiny non-git project whose bloat is known by hand."""
    root = tmp_path / "project"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("print(1)\n")  # 9 chars, 1 line
    (root / "README.md").write_text("# hi\nthere")  # 10 chars, 2 lines (no final newline)
    (root / "configs.toml").write_text("x = 'é'\n")  # 8 characters (9 bytes), 1 line
    (root / "notes.txt").write_text("not counted\n")
    (root / "report.md").write_text("a copy of an old report\n")
    for skipped in (".venv/lib", "bpe_rust/target/release", "pkg/__pycache__"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "big.py").write_text("x" * 1000)
    (root / ".hidden.py").write_text("x" * 1000)
    (root / "uv.lock").write_text("version = 1\n[[package]]\nname = 'jax'\n")
    return root


def test_reset_header_has_real_environment(tmp_path):
    path = report.reset(base_dir=tmp_path, project_root=_project(tmp_path))
    assert path == tmp_path / "report" / "header.md"
    text = path.read_text()
    assert text.startswith("# nanochat-jax training report\n\nGenerated: ")
    assert text.endswith("\n\n---\n\n")

    def field(name):
        found = re.search(rf"^- {re.escape(name)}: (.*)$", text, re.M)
        assert found, f"no {name!r} line in\n{text}"
        return found.group(1)

    # not a git checkout: still a header, with the fields saying so
    assert field("Branch") == "unknown"
    assert field("Commit") == "unknown (not a git checkout)"
    cores, logical = map(
        int, re.fullmatch(r"(\d+) cores \((\d+) logical\)", field("CPUs")).groups()
    )
    assert logical == os.cpu_count() and 1 <= cores <= logical
    assert 0.5 < float(field("Memory").removesuffix(" GB")) < 100_000
    assert field("JAX devices") == f"{len(jax.devices())}x cpu"
    assert "Hourly Rate" not in text and "CUDA Version" not in text  # nothing rented on a CPU
    assert field("Python") == ".".join(map(str, sys.version_info[:3]))
    assert field("JAX") == jax.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", field("Flax"))
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", field("Orbax"))
    assert field("Characters") == "27"
    assert field("Lines") == "4"
    assert field("Files") == "3"
    assert field("Tokens (approx)") == "6"
    assert field("Dependencies (uv.lock lines)") == "3"
    generated = datetime.datetime.strptime(text.split("\n")[2], "Generated: %Y-%m-%d %H:%M:%S")
    started = re.search(r"^Run started: (.*)$", text, re.M).group(1)
    started = datetime.datetime.strptime(started, "%Y-%m-%d %H:%M:%S")
    now = datetime.datetime.now()
    assert now - datetime.timedelta(minutes=5) < generated <= started <= now


def test_git_info_of_this_checkout():
    root = report.PROJECT_ROOT
    if not (root / ".git").exists():
        pytest.skip("the tests run from an installed copy, not a git checkout")
    branch, commit, message = report._git_lines(root)
    assert re.fullmatch(r"- Branch: \S+", branch)
    assert re.fullmatch(r"- Commit: [0-9a-f]{7,} \((clean|dirty)\)", commit)
    assert message.startswith("- Message: ") and len(message) <= len("- Message: ") + 80


def test_hourly_rates():
    assert report.hourly_rate("gpu", "NVIDIA H100 80GB HBM3", 8) == 24.0
    assert report.hourly_rate("gpu", "NVIDIA H200", 1) == 3.0
    assert report.hourly_rate("gpu", "NVIDIA A100-SXM4-80GB", 2) == pytest.approx(3.58)
    assert report.hourly_rate("gpu", "Tesla V100-SXM2-16GB", 4) == pytest.approx(2.2)
    assert report.hourly_rate("gpu", "NVIDIA L4", 3) == 6.0
    assert report.hourly_rate("cpu", "cpu", 8) is None


class _FakeGpu:
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    def memory_stats(self):
        return {"bytes_limit": 80 * 1024**3, "bytes_in_use": 0}


def test_gpu_hardware_lines(monkeypatch):
    """What a GPU node's header says, from JAX's device objects (none here, so stand-ins)."""
    monkeypatch.setattr(jax, "devices", lambda: [_FakeGpu()] * 8)
    monkeypatch.setattr(jax, "local_devices", lambda: [_FakeGpu()] * 4)  # one of two hosts
    lines = report._accelerator_lines()
    assert lines[0] == "- JAX devices: 8x NVIDIA H100 80GB HBM3"
    assert lines[1] == "- Accelerator Memory: 640.0 GB total"
    assert re.fullmatch(r"- CUDA Version: (\d+\.\d+|unknown)", lines[2])
    assert lines[3] == "- Hourly Rate: $24.00/hour"
    assert len(lines) == 4


def test_reset_removes_old_sections_keeps_unrelated_files(tmp_path):
    folder = report.report_dir(tmp_path)
    for name in (*report.EXPECTED_SECTIONS, "report"):
        (folder / f"{name}.md").write_text("old\n")
    (folder / "header.md").write_text("old header\n")
    (folder / "my-notes.md").write_text("keep me\n")
    (folder / "plot.png").write_bytes(b"\x89PNG")
    report.reset(base_dir=tmp_path, project_root=_project(tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == ["header.md", "my-notes.md", "plot.png"]
    assert (folder / "my-notes.md").read_text() == "keep me\n"
    assert (folder / "header.md").read_text().startswith("# nanochat-jax training report")


def test_generate_reproduces_nanochat_layout(tmp_path, warnings, capsys):
    base, cwd = tmp_path / "base", tmp_path / "cwd"
    cwd.mkdir()
    (report.report_dir(base) / "header.md").write_text(HEADER)
    texts = _write_sections(base)
    (cwd / "report.md").write_text("an older report\n")
    path = report.generate(base_dir=base, copy_to=cwd)
    assert path == base / "report" / "report.md"
    in_order = [
        texts[name] + "\n"
        for name in report.EXPECTED_SECTIONS
        if name in texts  # tokenizer-training first, chat-evaluation-rl last
    ]
    assert path.read_text() == HEADER + "".join(in_order) + EXPECTED_SUMMARY
    assert (cwd / "report.md").read_text() == path.read_text()  # overwritten, like nanochat
    out = capsys.readouterr().out
    assert f"Copied it to {cwd / 'report.md'}" in out
    assert out.endswith(EXPECTED_SUMMARY)  # the summary is shown at the end of the run
    missing = {"tokenizer-evaluation", "base-model-training", "base-model-loss", "midtraining"}
    missing |= {"chat-sft"}
    messages = [r.getMessage() for r in warnings]
    assert sorted(messages) == sorted(
        f"{base / 'report' / name}.md does not exist, skipping" for name in missing
    )


def test_missing_sections_and_header(tmp_path, warnings):
    """generate without reset still works: no environment, no wall clock, a partial table."""
    _write_sections(tmp_path, [SECTIONS[1], SECTIONS[-1]])
    (report.report_dir(tmp_path) / "base-model-sampling.md").write_text("## not ours\n")
    text = report.generate(base_dir=tmp_path).read_text()
    assert text.startswith("# nanochat-jax training report\n\n## Base model evaluation\n")
    assert text.endswith(
        "## Summary\n\n"
        "| Metric          | BASE     | MID      | SFT      | RL       |\n"
        "|-----------------|----------|----------|----------|----------|\n"
        "| CORE            | 0.2219   | -        | -        | -        |\n"
        "| GSM8K           | -        | -        | -        | 0.0758   |\n\n"
    )
    assert "wall clock" not in text
    messages = [r.getMessage() for r in warnings]
    assert any("header.md does not exist" in m and "report reset" in m for m in messages)
    assert any("base-model-sampling.md is not a section" in m for m in messages)
    assert sum("does not exist, skipping" in m for m in messages) == 9
    assert not (tmp_path / "report.md").exists()  # no copy unless asked


def test_wall_clock_math():
    def at(h, m, s=0, day=2):
        return datetime.datetime(2026, 1, day, h, m, s)

    assert report.wall_clock(at(10, 0), at(13, 51, 59)) == "3h51m"
    assert report.wall_clock(at(10, 0), at(10, 0, 59)) == "0h0m"
    assert report.wall_clock(at(23, 30), at(1, 45, day=4)) == "26h15m"

    def summary_end(header_start, last_section):
        header = f"Run started: {header_start}\n\n---\n\n"
        section = report.render_section(
            "Base model training", [], datetime.datetime.fromisoformat(last_section)
        )
        return report.render_report(header, {"base-model-training": section}).splitlines()[-1]

    assert summary_end("2026-01-02 10:00:00", "2026-01-03 11:02:00") == (
        "Total wall clock time: 25h2m"
    )
    # a section older than the header (a stale file): unknown, not a negative time
    assert summary_end("2026-01-02 10:00:00", "2026-01-01 11:00:00") == (
        "Total wall clock time: unknown"
    )
    assert report.render_report(HEADER, {}).endswith("Total wall clock time: unknown\n")


def test_metrics_are_read_by_exact_name():
    text = (
        "## Chat evaluation rl\ntimestamp: 2026-01-02 10:00:00\n\n"
        "- task_name: GSM8K\n"  # a config line, not a score
        "- GSM8K: 0.07575\n"  # rounded like the other cells
        "- HumanEval: n/a\n"
        "- ChatCORE metric: 0.1\n"
        "ARC-Easy: 0.9\n"  # not a list item
        "- GSM8K: 0.08\n"  # the last value wins
    )
    assert report.extract_metrics(text, ["GSM8K", "HumanEval", "ARC-Easy", "CORE"]) == {
        "GSM8K": "0.0800",
        "HumanEval": "n/a",
    }
    assert report.extract_metrics(text, ["ChatCORE"]) == {"ChatCORE": "0.1000"}


def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    # nothing at all to report: one error line, and no report.md anywhere
    assert report.main(["generate"]) == 2
    assert "error: nothing to report in" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
    (tmp_path / "base" / "report" / "chat-sft.md").write_text("## Chat SFT\n\n- a: 1\n")
    assert report.main(["generate", "--no-copy"]) == 0
    assert (tmp_path / "base" / "report" / "report.md").exists()
    assert not (tmp_path / "report.md").exists()
    assert report.main([]) == 0  # generate is the default, and copies into the cwd
    assert (tmp_path / "report.md").read_text() == (
        tmp_path / "base" / "report" / "report.md"
    ).read_text()
    assert f"Copied it to {tmp_path / 'report.md'}" in capsys.readouterr().out
    # reset from the command line: the header, and the XLA settings for looking only
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert report.main(["reset"]) == 0
    assert not (tmp_path / "base" / "report" / "report.md").exists()
    assert (tmp_path / "base" / "report" / "header.md").exists()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "1.0"
    assert "wrote its header to" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        report.main(["regenerate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'regenerate'" in capsys.readouterr().err


def test_cli_bad_subcommand_as_a_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nanochat_jax.report", "rest"],
        capture_output=True,
        text=True,
        cwd=report.PROJECT_ROOT,
        env=dict(os.environ, NANOCHAT_JAX_BASE_DIR=str(tmp_path)),
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid choice: 'rest' (choose from" in result.stderr
    assert "reset" in result.stderr and "generate" in result.stderr
    assert not (tmp_path / "report").exists()


# ---------------------------------------------------------------------------------------------
# plots

SVG = "{http://www.w3.org/2000/svg}"


def _write_jsonl(path, records, extra_lines=()):
    """Lines as MetricsWriter writes them ({"step", "time", **scalars}), plus raw lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": step, "time": 1.0, **values}) for step, values in records]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return path


def _polyline_lengths(svg_path):
    root = ET.parse(svg_path).getroot()  # raises on malformed XML
    return [len(line.get("points").split()) for line in root.iter(f"{SVG}polyline")]


def _svg_texts(svg_path):
    return [t.text for t in ET.parse(svg_path).getroot().iter(f"{SVG}text")]


def test_read_metrics_resumed_run_takes_the_new_timeline(tmp_path):
    first = [(0, {"val/bpb": 3.0})] + [(s, {"train/loss": 10.0 - s / 100}) for s in range(151)]
    first += [(100, {"val/bpb": 2.0}), (150, {"val/bpb": 1.9})]
    first.sort(key=lambda r: r[0])  # each key in step order, as one process logs it
    # killed after step 150; resumed from the step-100 checkpoint, killed again at step 120
    resumed = [(100, {"val/bpb": 2.5})] + [(s, {"train/loss": 5.0}) for s in range(100, 121)]
    path = _write_jsonl(
        tmp_path / "metrics.jsonl",
        first + resumed,
        extra_lines=['{"step": 121, "time": 1.0, "train/lo'],  # torn by the kill
    )
    metrics = report.read_metrics(path)
    assert sorted(metrics) == ["train/loss", "val/bpb"]
    assert list(metrics["train/loss"]) == list(range(121))  # the old 121..150 are gone
    assert metrics["train/loss"][99] == pytest.approx(9.01)
    assert all(metrics["train/loss"][s] == 5.0 for s in range(100, 121))
    assert metrics["val/bpb"] == {0: 3.0, 100: 2.5}  # 150 was the abandoned timeline's


def _loop_records(start, stop, crash, run, eval_every=4):
    """What TrainLoop writes from start_step `start` to steps_total `stop`, in its order (step
    s's val bpb and CORE before step s runs, train metrics one step late), killed while step
    `crash` runs; every value tells the run (`run`) and the step apart."""
    records = []
    for step in range(start, stop + 1):
        if step % eval_every == 0 or step == stop:
            if step > start:
                records.append((step - 1, {"train/loss": run + (step - 1) / 100}))
            records.append((step, {"val/bpb": run + step / 10}))
            if step > 0:
                records.append((step, {"core_metric": run + step / 1000}))
        elif step > start:
            records.append((step - 1, {"train/loss": run + (step - 1) / 100}))
        if step == crash or step == stop:
            return records
    return records


def test_read_metrics_resume_keeps_the_new_values_at_the_resumed_step(tmp_path):
    # eval and CORE every 4 steps, checkpoint at 4, killed while step 6 ran, resumed from 4
    old = _loop_records(0, 10, crash=6, run=10)
    assert old[-3:] == [
        (4, {"core_metric": 10.004}),
        (4, {"train/loss": 10.04}),
        (5, {"train/loss": 10.05}),
    ]
    new = _loop_records(4, 10, crash=None, run=20)
    assert new[:3] == [
        (4, {"val/bpb": 20.4}),
        (4, {"core_metric": 20.004}),
        (4, {"train/loss": 20.04}),
    ]
    metrics = report.read_metrics(_write_jsonl(tmp_path / "metrics.jsonl", old + new))
    assert metrics["val/bpb"] == {0: 10.0, 4: 20.4, 8: 20.8, 10: 21.0}
    assert metrics["core_metric"] == {4: 20.004, 8: 20.008, 10: 20.01}
    loss = metrics["train/loss"]
    assert list(loss) == list(range(10))
    assert [loss[s] for s in range(4)] == [10.0, 10.01, 10.02, 10.03]  # before the checkpoint
    assert all(loss[s] == pytest.approx(20 + s / 100) for s in range(4, 10))  # the new run's


def test_read_metrics_fresh_rerun_into_an_older_file(tmp_path):
    # an earlier run killed at step 6, then a fresh run from step 0 into the same folder
    old = _loop_records(0, 10, crash=6, run=10)
    new = _loop_records(0, 10, crash=None, run=20)
    metrics = report.read_metrics(_write_jsonl(tmp_path / "metrics.jsonl", old + new))
    assert metrics["val/bpb"] == {0: 20.0, 4: 20.4, 8: 20.8, 10: 21.0}
    assert metrics["core_metric"] == {4: 20.004, 8: 20.008, 10: 20.01}
    assert metrics["train/loss"] == {s: pytest.approx(20 + s / 100) for s in range(10)}
    # the new run killed before its first train loss: only its step-0 bpb is left
    early = report.read_metrics(_write_jsonl(tmp_path / "early.jsonl", old + new[:1]))
    assert early == {"val/bpb": {0: 20.0}}
    # the old run killed before its step-4 eval: nothing goes back in time until the new run's
    # train loss at 0, which must keep the new step-0 bpb
    old = _loop_records(0, 10, crash=3, run=10)
    metrics = report.read_metrics(_write_jsonl(tmp_path / "short.jsonl", old + new[:2]))
    assert metrics == {"val/bpb": {0: 20.0}, "train/loss": {0: 20.0}}


def test_read_metrics_same_step_repeated_and_odd_lines(tmp_path):
    path = _write_jsonl(
        tmp_path / "metrics.jsonl",
        [(0, {"a": 1.0}), (1, {"a": 2.0}), (1, {"a": 3.0}), (2, {"a": float("nan")})],
        extra_lines=[
            "[1, 2]",
            '{"step": "3", "a": 1.0}',
            '{"step": 4, "a": "high", "b": true, "c": Infinity}',
            "",
        ],
    )
    metrics = report.read_metrics(path)
    assert set(metrics) == {"a", "c"}
    assert list(metrics["a"].items())[:2] == [(0, 1.0), (1, 3.0)]  # the last value wins
    assert math.isnan(metrics["a"][2])  # kept here; the chart leaves it out and says so
    assert metrics["c"] == {4: math.inf}


def test_stage_panels_pick_each_stages_metrics():
    steps = {0: 1.0, 1: 0.5}
    base = report.stage_panels(
        "base", {"train/loss": steps, "train/loss_smooth": steps, "val/bpb": steps, "x": steps}
    )
    assert [p.title for p in base] == ["Training loss", "Validation bits per byte"]
    assert [s.label for s in base[0].series] == ["train loss", "train loss (EMA)"]
    assert base[0].series[0].steps == [0, 1] and base[0].series[0].values == [1.0, 0.5]
    rl = report.stage_panels(
        "rl", {f"eval/pass@{k}": steps for k in (10, 2, 1)} | {"train/reward": steps}
    )
    assert [p.title for p in rl] == ["Mean reward of the rollouts", "GSM8K pass@k (validation)"]
    assert [s.label for s in rl[1].series] == ["pass@1", "pass@2", "pass@10"]
    sft = report.stage_panels(
        "sft", {"val/loss": steps, "val/mmlu_acc": steps, "val/arc_easy_acc": steps}
    )
    assert [[s.label for s in p.series] for p in sft] == [
        ["val loss"],
        ["arc_easy_acc", "mmlu_acc"],
    ]
    assert report.stage_panels("mid", {"train/lrm": steps}) == []
    with pytest.raises(ValueError, match="no plots for phase 'tok'; phases with plots: base, mid"):
        report.stage_panels("tok", {})


def test_collect_plots_missing_empty_nan_and_stale(tmp_path, warnings):
    assert report.collect_plots(tmp_path) == []  # no runs/ at all
    runs = tmp_path / "runs"
    (runs / "d4" / "base").mkdir(parents=True)
    (runs / "d4" / "base" / "metrics.jsonl").write_text("")
    (runs / "d4" / "mid").mkdir()  # a stage dir without its file
    (runs / "d4" / "tok").mkdir()  # not a stage we plot
    _write_jsonl(runs / "d4" / "sft" / "metrics.jsonl", [(0, {"train/lrm": 1.0})])
    nan = [(s, {"train/reward": math.nan if s % 2 else s / 10}) for s in range(6)]
    _write_jsonl(runs / "d4" / "rl" / "metrics.jsonl", nan)
    old = _write_jsonl(runs / "d2" / "base" / "metrics.jsonl", [(0, {"train/loss": 1.0})])
    os.utime(old, (T0.timestamp() - 3600,) * 2)  # an earlier run's file in a reused base dir
    plots = report.collect_plots(tmp_path, since=T0)
    assert [p.name for p in plots] == ["d4-rl.svg"]
    assert plots[0].alt == "Chat RL (d4)"
    svg = tmp_path / "rl.svg"
    svg.write_text(plots[0].svg)
    assert _polyline_lengths(svg) == [3]
    assert "Mean reward of the rollouts (3 non-finite values skipped)" in _svg_texts(svg)
    messages = [r.getMessage() for r in warnings]
    assert any("d4/base/metrics.jsonl has no values to plot" in m for m in messages)
    assert any("d4/sft/metrics.jsonl has no values to plot" in m for m in messages)
    # without a run start, the older run is plotted too; tags sorted, odd characters replaced
    _write_jsonl(runs / "my run" / "mid" / "metrics.jsonl", [(0, {"val/bpb": 2.0})])
    names = [p.name for p in report.collect_plots(tmp_path, max_points=10)]
    assert names == ["d2-base.svg", "d4-rl.svg", "my_run-mid.svg"]


def test_collect_plots_odd_values_and_a_failing_chart(tmp_path, warnings, monkeypatch):
    runs = tmp_path / "runs"
    odd = [(0, {"train/loss": 1.0}), (1, {"train/loss": 1.0000000000000002})]
    odd += [(0, {"val/bpb": -1.7e308}), (1, {"val/bpb": 1.7e308})]
    _write_jsonl(runs / "a" / "base" / "metrics.jsonl", odd)
    _write_jsonl(runs / "b" / "base" / "metrics.jsonl", [(0, {"train/loss": 2.0})])
    _write_jsonl(runs / "c" / "base" / "metrics.jsonl", [(0, {"train/loss": 3.0})])
    assert [p.name for p in report.collect_plots(tmp_path)] == [
        "a-base.svg",
        "b-base.svg",
        "c-base.svg",
    ]
    render = report.render_svg

    def fail_for_b(title, panels, **kwargs):
        if "(b)" in title:
            raise OverflowError("math range error")
        return render(title, panels, **kwargs)

    monkeypatch.setattr(report, "render_svg", fail_for_b)
    assert [p.name for p in report.collect_plots(tmp_path)] == ["a-base.svg", "c-base.svg"]
    messages = [r.getMessage() for r in warnings]
    assert any(
        "b/base/metrics.jsonl (OverflowError: math range error), not plotted" in m for m in messages
    )


def test_generate_writes_plots_and_links_them(tmp_path, capsys):
    """A MetricsWriter's real file, downsampled; report.md links that resolve in both copies."""
    from nanochat_jax.metrics import MetricsWriter

    base, cwd = tmp_path / "base", tmp_path / "cwd"
    cwd.mkdir()
    folder = report.report_dir(base)
    (folder / "header.md").write_text(HEADER)
    _write_sections(base)
    writer = MetricsWriter(base / "runs" / "d20" / "base", enabled=True)
    for step in range(5000):
        writer.scalars(step, {"train/loss": 10 / (1 + step), "train/mfu": 40.0})
        if step % 1000 == 0:
            writer.scalars(step, {"val/bpb": 2 - step / 5000})
    writer.close()
    _write_jsonl(
        base / "runs" / "d20" / "rl" / "metrics.jsonl",
        [(s, {"train/reward": s / 10, "eval/pass@1": 0.1, "eval/pass@2": 0.2}) for s in range(3)],
    )
    (folder / "plots").mkdir()
    (folder / "plots" / "d12-base.svg").write_text("<svg/>")  # an older run's chart
    (folder / "plots" / "notes.txt").write_text("keep me")
    out = report.generate(base_dir=base, copy_to=cwd)
    assert sorted(p.name for p in (folder / "plots").iterdir()) == [
        "d20-base.svg",
        "d20-rl.svg",
        "notes.txt",
    ]
    text = out.read_text()
    assert text.index("## Chat evaluation rl") < text.index("## Plots") < text.index("## Summary")
    assert text.endswith(EXPECTED_SUMMARY)
    assert "![Base model training (d20)](plots/d20-base.svg)\n" in text
    assert "![Chat RL (d20)](plots/d20-rl.svg)\n" in text
    copy = (cwd / "report.md").read_text()
    assert copy == text.replace("](plots/", "](report_plots/")
    for md in (out, cwd / "report.md"):
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())
        assert len(links) == 2
        for link in links:
            target = md.parent / link
            assert target.is_file(), f"{md} links {link}, which does not exist"
            assert target.read_text() == (folder / "plots" / target.name).read_text()
    chart = folder / "plots" / "d20-base.svg"
    # train loss (5000 points -> 2000), MFU likewise; val bpb has 5 points
    assert _polyline_lengths(chart) == [2000, 5, 2000]
    texts = _svg_texts(chart)
    for label in ("Base model training (d20)", "loss (nats)", "bpb", "MFU (%)", "step", "val bpb"):
        assert label in texts
    assert "4,000" in texts  # x ticks up to the last step
    assert "and 2 plots to plots/" in capsys.readouterr().out
