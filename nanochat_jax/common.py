"""Shared plumbing: the base directory, logging, atomic writes."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

DEFAULT_BASE_DIR = Path.home() / ".cache" / "nanochat_jax"


def get_base_dir() -> Path:
    """Where every artefact of a run lives (data, tokenizer, checkpoints, report).

    Overridden with the NANOCHAT_JAX_BASE_DIR environment variable, like nanochat's
    NANOCHAT_BASE_DIR.
    """
    base = Path(os.environ.get("NANOCHAT_JAX_BASE_DIR", DEFAULT_BASE_DIR)).expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return base


def get_logger(name: str) -> logging.Logger:
    """A logger that prints `time level name: message` once per process."""
    root = logging.getLogger("nanochat_jax")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
        root.propagate = False  # some libraries (orbax) give the root logger a handler too
        root.setLevel(os.environ.get("NANOCHAT_JAX_LOG_LEVEL", "INFO"))
    return root.getChild(name.removeprefix("nanochat_jax."))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


COMPILE_CACHE_ENV = "NANOCHAT_JAX_COMPILE_CACHE"
_COMPILE_CACHE_OFF = ("0", "off", "false", "no")
_COMPILE_CACHE_ON = ("1", "on", "true", "yes")  # the default directory, not a folder named "1"
# Only programs that took this long to compile are written (JAX's default is 1 s). Measured on
# CPU (demo base_eval, depth 3): a cached forward reads back in 10-50 ms where compiling it took
# 0.4-1.3 s, and a small helper (argmax, casts, init) compiles in 10-100 ms, so 0.2 s keeps every
# program worth reading back (each stage's few big ones, and on a GPU, where even small programs
# compile slowly, the larger helpers too) without a file per trivial one.
_CACHE_MIN_COMPILE_TIME_S = 0.2


def enable_compilation_cache(base_dir: str | Path | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache, so a stage run again (or the next stage,
    compiling the same program) loads compiled executables from disk instead of recompiling.

    Call it before the first jit compile of the process: JAX decides at its first compile
    whether this process uses a cache, once; a later call sets the options but has no effect.

    The directory: $NANOCHAT_JAX_COMPILE_CACHE if it names one (relative to the current
    directory; `~` expanded), else `<base_dir>/jax_cache` (default base dir: get_base_dir()),
    also when the variable is `1`, `on`, `true` or `yes`. `0`, `off`, `false` or `no`: this
    function turns nothing on; a cache JAX was given itself (JAX_COMPILATION_CACHE_DIR, or
    jax.config) stays in use all the same, which is logged at info. A directory JAX already has
    is kept (with an info line): JAX opens its cache once per process. Returns the directory in
    use, or None. A directory that cannot be written costs one warning and the run goes on
    without the cache; errors reading or writing entries later are JAX's warnings, never
    exceptions (jax_raise_persistent_cache_errors stays off).

    Sharing: entries are named by a hash of the program, the compile options (on CPU the device
    assignment too), the XLA flags and the jax/jaxlib/backend versions, so stale entries are
    never used, only left behind (delete the directory to reclaim the space). JAX writes an
    entry in place, not through a rename: a process that reads it while another is writing it,
    or one left half-written by a killed run, fails to deserialize, which JAX turns into a
    warning and a fresh compile. Under jax.distributed only process 0 writes. Hosts may share
    the directory (e.g. over NFS): the write probe is a unique temporary file.
    """
    log = get_logger(__name__)
    setting = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if setting.lower() in _COMPILE_CACHE_OFF:
        jax_own = os.environ.get("JAX_COMPILATION_CACHE_DIR")
        if jax_own:
            log.info(
                "%s=%s, but JAX_COMPILATION_CACHE_DIR=%s is JAX's own setting: that cache "
                "stays in use",
                COMPILE_CACHE_ENV,
                setting,
                jax_own,
            )
        return None
    if setting.lower() in _COMPILE_CACHE_ON:
        setting = ""
    import jax  # here, not at the top: tokenizer-only scripts import this module too

    if jax.config.jax_compilation_cache_dir:
        directory = Path(jax.config.jax_compilation_cache_dir)
        log.info("compilation cache: %s (already set in JAX, kept)", directory)
        return directory
    where = setting or f"{base_dir or '<base dir>'}/jax_cache"
    try:
        if "://" in setting:
            raise ValueError("not a local directory")
        if setting:
            directory = Path(setting).expanduser().resolve()
        else:
            directory = (Path(base_dir or get_base_dir()).expanduser() / "jax_cache").resolve()
        where = str(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # mkdir succeeds on a read-only directory, so write something; mkstemp's name is unique
        # even among hosts sharing the directory
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHE_MIN_COMPILE_TIME_S)
        # -1: no size floor, and none of JAX's per-filesystem overrides; compile time decides.
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        jax.config.update("jax_compilation_cache_dir", str(directory))  # last: all or nothing
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: an unknown option
        log.warning("compilation cache off: cannot use %s (%s)", where, e)
        return None
    log.info("compilation cache: %s", directory)
    return directory
