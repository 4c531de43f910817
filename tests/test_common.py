"""common.enable_compilation_cache: a second process reads what the first compiled; off, or an
unusable directory, leaves nothing on disk and never stops the run.

The cache is global JAX state, once per process: the tests that turn it on do so in child
processes (fresh JAX), never in the pytest process.

Measured on CPU (2 shared cores, jax 0.10.2): `bench.bench_train --depth 4` compiles 3.6 s of
programs cold and reads them back in 0.3 s; `scripts.base_eval` on the demo (depth 3) 3.0-4.0 s
cold, 0.1 s of reads warm. EnginePool replicas on 8 fake CPU devices each miss in one process (the
CPU cache key holds the device assignment) and all hit in the next.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax

from nanochat_jax import common

ROOT = Path(__file__).resolve().parents[1]
HITS = "/jax/compilation_cache/cache_hits"

# A child process: turn the cache on as a stage does, compile and run one small program.
_CHILD = f"""
import json
import jax, jax.numpy as jnp
from nanochat_jax.common import enable_compilation_cache
directory = enable_compilation_cache()
if directory is not None:  # cache even this tiny program (the threshold is for real stages)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
y = jax.jit(lambda x: jnp.cumsum(jnp.sin(x)) * 3.0)(jnp.arange(16.0))
print(json.dumps({{
    "directory": None if directory is None else str(directory),
    "jax_dir": jax.config.jax_compilation_cache_dir,
    "hits": events.count({HITS!r}),
    "y": y.tolist(),
}}))
"""


def _child(
    base: Path, cache: str | None = None, cwd: Path = ROOT, jax_dir: Path | None = None
) -> tuple[dict, str]:
    """(the child's report, its stderr); `jax_dir`: JAX's own JAX_COMPILATION_CACHE_DIR."""
    env = dict(os.environ, NANOCHAT_JAX_BASE_DIR=str(base), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop(common.COMPILE_CACHE_ENV, None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if cache is not None:
        env[common.COMPILE_CACHE_ENV] = cache
    if jax_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax_dir)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith("-cache"))


def test_second_process_reads_what_the_first_compiled(tmp_path):
    first, _ = _child(tmp_path)
    directory = tmp_path / "jax_cache"  # the default: <base dir>/jax_cache
    assert first["directory"] == first["jax_dir"] == str(directory)
    assert first["hits"] == 0
    written = _entries(directory)
    assert written, "the first process wrote no entry"
    assert not [p for p in directory.iterdir() if p.name.startswith(".probe")]
    second, _ = _child(tmp_path)
    assert second["hits"] >= 1
    assert second["y"] == first["y"]
    assert _entries(directory) == written  # read, not recompiled and written again


def test_an_explicit_directory(tmp_path):
    report, _ = _child(tmp_path / "base", str(tmp_path / "elsewhere"))
    assert report["directory"] == str(tmp_path / "elsewhere")
    assert _entries(tmp_path / "elsewhere")
    assert not (tmp_path / "base" / "jax_cache").exists()


def test_on_means_the_default_directory_and_relative_paths_resolve(tmp_path):
    report, _ = _child(tmp_path, "On")
    assert report["directory"] == report["jax_dir"] == str(tmp_path / "jax_cache")
    assert _entries(tmp_path / "jax_cache")
    assert not (ROOT / "On").exists() and not (tmp_path / "On").exists()
    work = tmp_path / "work"
    work.mkdir()
    report, _ = _child(tmp_path, "sub/../rel_cache", cwd=work)
    assert report["directory"] == report["jax_dir"] == str(work / "rel_cache")  # absolute
    assert _entries(work / "rel_cache")


def test_a_directory_jax_already_has_is_kept(tmp_path):
    report, stderr = _child(tmp_path, jax_dir=tmp_path / "jax_own")
    assert report["directory"] == report["jax_dir"] == str(tmp_path / "jax_own")
    assert "already set in JAX, kept" in stderr
    assert not (tmp_path / "jax_cache").exists()


def test_off_leaves_jax_own_setting_and_says_so(tmp_path, monkeypatch):
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("nanochat_jax")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(handler)
    monkeypatch.setenv(common.COMPILE_CACHE_ENV, "off")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_own"))
    try:
        assert common.enable_compilation_cache(tmp_path) is None
    finally:
        logger.removeHandler(handler)
    [record] = records
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert f"JAX_COMPILATION_CACHE_DIR={tmp_path / 'jax_own'}" in message
    assert "stays in use" in message
    assert list(tmp_path.iterdir()) == []


def test_off_writes_nothing(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    for off in ("0", "off", "OFF"):
        monkeypatch.setenv(common.COMPILE_CACHE_ENV, off)
        assert common.enable_compilation_cache() is None
        assert common.enable_compilation_cache(tmp_path / "other") is None
    assert not (tmp_path / "jax_cache").exists() and not (tmp_path / "other").exists()
    assert jax.config.jax_compilation_cache_dir == before


def test_an_unusable_directory_warns_once_and_the_run_goes_on(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    report, stderr = _child(tmp_path, str(blocker / "cache"))
    assert report["directory"] is None and report["jax_dir"] is None
    assert report["y"][0] == 0.0 and len(report["y"]) == 16  # the program still ran
    warnings = [line for line in stderr.splitlines() if "compilation cache off" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], stderr
    assert str(blocker / "cache") in warnings[0]
    assert not (tmp_path / "jax_cache").exists()


def test_a_remote_url_is_refused_with_a_warning(tmp_path, monkeypatch):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("nanochat_jax")
    logger.addHandler(handler)
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(common.COMPILE_CACHE_ENV, "gs://bucket/cache")
    before = jax.config.jax_compilation_cache_dir
    try:
        assert common.enable_compilation_cache() is None
    finally:
        logger.removeHandler(handler)
    [record] = records
    assert record.levelno == logging.WARNING
    assert "gs://bucket/cache (not a local directory)" in record.getMessage()
    assert jax.config.jax_compilation_cache_dir == before
    assert list(tmp_path.iterdir()) == []
