"""The runner: stage order, flags, skipping finished stages, stopping at the first failure."""

import argparse
import sys
from pathlib import Path

import pytest

import run_speedrun


def _args(tmp_path, **kw):
    defaults = dict(
        preset="test", mesh="1", stages="", base_dir=str(tmp_path), force=False, resume=False
    )
    return argparse.Namespace(**{**defaults, **kw})


def _preset(*stages):
    return {"env": {"JAX_PLATFORMS": "cpu"}, "stage": list(stages)}


DATA = {
    "name": "data",
    "module": "nanochat_jax.demo_data",
    "args": {"num-shards": 2, "chars-per-shard": 20000},
    "outputs": ["base_data/shard_00001.parquet"],
}


def test_every_preset_parses_and_names_real_modules():
    for path in sorted(run_speedrun.CONFIG_DIR.glob("*.toml")):
        preset = run_speedrun.load_preset(path.stem)
        names = [s["name"] for s in preset["stage"]]
        assert len(names) == len(set(names)), path
        for stage in preset["stage"]:
            assert run_speedrun._module_exists(stage["module"]), (path, stage["module"])


def test_unknown_preset_and_stage_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown preset 'nope'; known presets: .*demo"):
        run_speedrun.load_preset("nope")
    with pytest.raises(SystemExit, match="unknown stage"):
        run_speedrun.run_stages(_preset(DATA), Path(sys.executable), _args(tmp_path, stages="x"))


def test_flags():
    assert run_speedrun._flags({"depth": 4, "resume": True, "off": False}) == [
        "--depth=4",
        "--resume",
    ]


def test_runs_then_skips_finished_stages(tmp_path, capsys):
    run_speedrun.run_stages(_preset(DATA), Path(sys.executable), _args(tmp_path))
    assert (tmp_path / "base_data" / "shard_00001.parquet").exists()
    assert "stage data: done" in capsys.readouterr().out
    run_speedrun.run_stages(_preset(DATA), Path(sys.executable), _args(tmp_path))
    assert "stage data: outputs exist, skipping" in capsys.readouterr().out


def test_positional_argv_reach_the_module(tmp_path, capsys):
    reset = {
        "name": "report_reset",
        "module": "nanochat_jax.report",
        "argv": ["reset"],
        "outputs": ["report/header.md"],
    }
    run_speedrun.run_stages(_preset(reset), Path(sys.executable), _args(tmp_path))
    assert "stage report_reset: -m nanochat_jax.report reset" in capsys.readouterr().out
    assert "Run started:" in (tmp_path / "report" / "header.md").read_text()


def test_background_stage_runs_alongside_and_is_waited_for(tmp_path, capsys):
    # the background stage sleeps, then writes a file; the next stage must not wait for it,
    # the one that names it in wait_for must
    slow = {"name": "slow", "module": "nanochat_jax.report", "argv": ["reset"], "background": True}
    after = dict(DATA, name="after")  # runs while slow is still going
    needs = {
        "name": "needs",
        "module": "nanochat_jax.report",
        "argv": ["generate", "--no-copy"],
        "wait_for": ["slow"],
    }
    run_speedrun.run_stages(_preset(slow, after, needs), Path(sys.executable), _args(tmp_path))
    out = capsys.readouterr().out
    assert out.index("stage slow (in the background)") < out.index("stage after: -m")
    assert out.index("stage slow: done") < out.index("stage needs: -m")
    assert (tmp_path / "report" / "report.md").exists()  # generate found reset's header

    bad = dict(slow, name="bad", argv=["nope"])
    with pytest.raises(SystemExit, match="stage 'bad' failed with exit code 2"):
        run_speedrun.run_stages(_preset(bad, after), Path(sys.executable), _args(tmp_path))


def test_presets_wait_for_background_stages_they_start():
    for path in sorted(run_speedrun.CONFIG_DIR.glob("*.toml")):
        stages = run_speedrun.load_preset(path.stem)["stage"]
        started = set()
        for stage in stages:
            assert set(stage.get("wait_for", [])) <= started, (path.name, stage["name"])
            if stage.get("background"):
                started.add(stage["name"])


def test_stops_at_the_first_failure(tmp_path):
    bad = {"name": "tok_train", "module": "scripts.tok_train", "args": {"vocab_size": 10}}
    after = dict(DATA, name="after")
    with pytest.raises(SystemExit, match="stage 'tok_train' failed with exit code"):
        run_speedrun.run_stages(_preset(bad, after), Path(sys.executable), _args(tmp_path))
    assert not (tmp_path / "base_data").exists() or not list((tmp_path / "base_data").iterdir())


def test_runner_flags_parse_in_the_stage_scripts():
    """What the runner passes (`--resume`, `--depth=4`) is what the stage scripts accept."""
    import dataclasses

    from nanochat_jax import stage
    from scripts.base_train import BaseTrainConfig

    flags = run_speedrun._flags({"depth": 4, "resume": True}) + ["--mesh=data=2,fsdp=4"]
    cfg = stage.parse_config(BaseTrainConfig, flags, "test")
    assert (cfg.depth, cfg.resume, cfg.mesh) == (4, True, "data=2,fsdp=4")
    assert stage.parse_config(BaseTrainConfig, ["--resume=0"], "test").resume is False
    assert dataclasses.asdict(stage.parse_config(BaseTrainConfig, [], "test"))["resume"] is False
