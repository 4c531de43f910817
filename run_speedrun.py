#!/usr/bin/env python3
"""The speedrun: every stage of nanochat-jax, in order, each as its own process.

    python run_speedrun.py                      # offline CPU demo, end to end
    python run_speedrun.py --preset d20 --mesh 8 --gpu

Standard library only: it makes the uv environment first (installing uv with pip if missing),
then runs `python -m <stage module> <preset flags>` inside it. A stage is skipped when the files
it produces already exist (`--force` redoes it), and the run stops at the first failing stage.
Presets live in configs/<name>.toml: per stage `module`, optional `argv` (positional arguments),
`args` (flags), `outputs` (files under the base dir that mark it done), `mesh`, `resumable`,
`background` (start it and go on, like nanochat's `dataset -n 240 &`) and `wait_for` (names of
background stages that must finish first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIG_DIR = ROOT / "configs"
DEFAULT_BASE_DIR = Path.home() / ".cache" / "nanochat_jax"


def _say(msg: str) -> None:
    print(f"[speedrun {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _uv_command() -> list[str]:
    """How to call uv: on PATH, or as a module of this Python; pip-installed when missing.

    Where pip may not install into this Python (PEP 668 system Pythons), uv goes into a small
    private venv instead.
    """
    private_uv = DEFAULT_BASE_DIR / "uv-venv" / "bin" / "uv"
    if shutil.which("uv"):
        return ["uv"]
    if private_uv.exists():
        return [str(private_uv)]
    if subprocess.run([sys.executable, "-m", "uv", "--version"], capture_output=True).returncode:
        _say("uv not found; installing it with pip")
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "uv"]
        if subprocess.run(pip).returncode and subprocess.run(pip + ["--user"]).returncode:
            venv = private_uv.parents[1]
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "uv"], check=True)
            return [str(private_uv)]
    return [sys.executable, "-m", "uv"]


def ensure_env(gpu: bool = False, extras: tuple[str, ...] = ()) -> Path:
    """Create or refresh .venv with `uv sync` (also builds bpe_rust); return its python."""
    # --inexact: keep packages of other extras (e.g. torch for the tests) that are installed
    cmd = _uv_command() + ["sync", "--frozen", "--inexact"]
    for extra in ("gpu",) * gpu + tuple(extras):
        cmd += ["--extra", extra]
    _say("preparing the environment: " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(
            "error: `uv sync` failed (see above). It needs Python 3.11+, a Rust toolchain "
            "(https://rustup.rs) to build bpe_rust, and access to PyPI and crates.io."
        )
    return ROOT / ".venv" / "bin" / "python"


def load_preset(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        sys.exit(f"error: unknown preset {name!r}; known presets: {', '.join(known)}")
    with open(path, "rb") as f:
        return tomllib.load(f)


def _flags(args: dict) -> list[str]:
    """{"depth": 4, "resume": True} -> ["--depth=4", "--resume"]"""
    out = []
    for key, value in args.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not False:
            out.append(f"--{key}={value}")
    return out


def _module_exists(module: str) -> bool:
    return (ROOT / (module.replace(".", "/") + ".py")).exists()


def run_stages(preset: dict, python: Path, args: argparse.Namespace) -> None:
    base_dir = Path(args.base_dir).expanduser().resolve()
    env = dict(os.environ, NANOCHAT_JAX_BASE_DIR=str(base_dir), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in preset.get("env", {}).items()})
    wanted = set(args.stages.split(",")) if args.stages else None
    stages = preset["stage"]
    if wanted:
        unknown = wanted - {s["name"] for s in stages}
        if unknown:
            sys.exit(
                f"error: unknown stage(s) {', '.join(sorted(unknown))}; this preset has: "
                + ", ".join(s["name"] for s in stages)
            )
    _say(f"preset {args.preset}: base dir {base_dir}")
    background: dict[str, tuple[subprocess.Popen, float]] = {}  # name -> (process, start)
    try:
        for stage in stages:
            name, module = stage["name"], stage["module"]
            if wanted and name not in wanted:
                continue
            for other in stage.get("wait_for", []):
                if other in background:
                    _wait_background(other, *background.pop(other))
            if not _module_exists(module):
                _say(f"stage {name}: {module} is not built yet, skipping")
                continue
            outputs = [base_dir / p for p in stage.get("outputs", [])]
            if outputs and all(p.exists() for p in outputs) and not args.force:
                _say(f"stage {name}: outputs exist, skipping (--force to redo)")
                continue
            cmd = [str(python), "-m", module, *stage.get("argv", [])]
            cmd += _flags(stage.get("args", {}))
            if stage.get("mesh", False):
                cmd.append(f"--mesh={args.mesh}")
            if stage.get("resumable", False) and args.resume:
                cmd.append("--resume")
            if stage.get("background", False):
                _say(f"stage {name} (in the background): {' '.join(cmd[1:])}")
                background[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env), time.time())
                continue
            _say(f"stage {name}: {' '.join(cmd[1:])}")
            t0 = time.time()
            result = subprocess.run(cmd, cwd=ROOT, env=env)
            _check_result(name, result.returncode, t0)
        for name in list(background):
            _wait_background(name, *background.pop(name))
    finally:  # a failed stage or Ctrl-C: do not leave downloads running behind the user's back
        for process, _ in background.values():
            process.terminate()
    _say(f"all stages done; the report is in {base_dir / 'report'}")


def _check_result(name: str, returncode: int, t0: float) -> None:
    if returncode != 0:
        sys.exit(
            f"error: stage {name!r} failed with exit code {returncode} after "
            f"{time.time() - t0:.0f}s. Fix the problem above and rerun; finished stages "
            "are skipped (add --resume to continue training from its last checkpoint)."
        )
    _say(f"stage {name}: done in {time.time() - t0:.0f}s")


def _wait_background(name: str, process: subprocess.Popen, t0: float) -> None:
    if process.poll() is None:
        _say(f"waiting for the background stage {name}")
    _check_result(name, process.wait(), t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="configs/<preset>.toml (default: demo)")
    parser.add_argument("--mesh", default="1", help="devices: N, or axes like data=4,fsdp=2")
    parser.add_argument("--stages", default="", help="comma-separated subset of stages to run")
    parser.add_argument("--base-dir", default=os.environ.get("NANOCHAT_JAX_BASE_DIR"))
    parser.add_argument("--gpu", action="store_true", help="install jax[cuda12] (the gpu extra)")
    parser.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    parser.add_argument("--resume", action="store_true", help="resume training stages")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset)
    if args.base_dir is None:
        args.base_dir = str(DEFAULT_BASE_DIR)
    python = ensure_env(gpu=args.gpu)
    run_stages(preset, python, args)


if __name__ == "__main__":
    main()
