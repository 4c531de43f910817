"""Shared plumbing: the base directory, logging, atomic writes."""

from __future__ import annotations

import logging
import os
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
