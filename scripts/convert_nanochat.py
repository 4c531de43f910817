r"""Move model weights between PyTorch nanochat and nanochat-jax.

nanochat -> ours (an Orbax checkpoint step that our eval and chat scripts load):
    python -m scripts.convert_nanochat --from $NC/d20/model_021400.pt \
        --to ~/.cache/nanochat_jax/base_checkpoints/d20  [--meta $NC/d20/meta_021400.json]
ours -> nanochat (writes model_XXXXXX.pt and meta_XXXXXX.json into --to):
    python -m scripts.convert_nanochat --reverse --to $NC/d20 \
        --from ~/.cache/nanochat_jax/base_checkpoints/d20  [--step 21400]
(NC = ~/.cache/nanochat/base_checkpoints, nanochat's layout.)

Only the model weights move (nanochat's optim_*.pt is not converted). Reading and writing .pt
files needs PyTorch: `uv sync --extra torch`.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import numpy as np
from flax import nnx

from nanochat_jax.checkpoint import Checkpointer
from nanochat_jax.common import atomic_write_bytes, atomic_write_text, get_logger
from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import from_nanochat_state_dict, to_nanochat_state_dict
from nanochat_jax.stage import load_model_dir

log = get_logger(__name__)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise SystemExit(
            "converting nanochat checkpoints needs PyTorch to read/write .pt files; install it "
            "with `uv sync --extra torch` (or `pip install torch`)"
        ) from e
    return torch


def _default_meta_path(model_path: Path) -> Path:
    match = re.fullmatch(r"model_(\d+)\.pt", model_path.name)
    if not match:
        raise SystemExit(f"cannot guess the meta file for {model_path}: pass --meta")
    return model_path.with_name(f"meta_{match.group(1)}.json")


def nanochat_to_ours(model_path: Path, meta_path: Path | None, out_dir: Path) -> int:
    """Convert nanochat's model_XXXXXX.pt (+ meta json) into a checkpoint step in out_dir."""
    torch = _torch()
    meta_path = meta_path or _default_meta_path(model_path)
    meta = json.loads(Path(meta_path).read_text())
    if "model_config" not in meta:
        raise SystemExit(f"{meta_path} has no 'model_config': is it a nanochat meta_*.json?")
    config = GPTConfig.from_dict(meta["model_config"])
    tensors = torch.load(model_path, map_location="cpu", weights_only=True)
    state = {name: t.detach().float().numpy() for name, t in tensors.items()}  # bf16 wte: exact
    model = from_nanochat_state_dict(state, config)
    step = int(meta.get("step", 0))
    meta = {**meta, "step": step, "model_config": config.to_dict()}
    with Checkpointer(out_dir, async_save=False) as ckpt:
        if any(s >= step for s in ckpt.all_steps()):
            # Checkpointer.save would move steps >= step aside (superseded_checkpoints); a convert
            # must not displace a checkpoint.
            raise SystemExit(f"{out_dir} already has steps {ckpt.all_steps()}; use another --to")
        ckpt.save(step, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)), meta=meta)
    log.info("wrote step %d of %s (%s) to %s", step, model_path, config, out_dir)
    return step


def ours_to_nanochat(ckpt_dir: Path, out_dir: Path, step: int | None = None) -> Path:
    """Write a checkpoint step as nanochat's model_XXXXXX.pt + meta_XXXXXX.json in out_dir."""
    torch = _torch()
    model, meta = load_model_dir(ckpt_dir, step=step)
    tensors = {}
    for name, array in to_nanochat_state_dict(model).items():
        tensor = torch.from_numpy(np.asarray(array, np.float32))
        # nanochat keeps wte in bf16 (to_nanochat_state_dict already rounded it).
        tensors[name] = tensor.to(torch.bfloat16) if array.dtype != np.float32 else tensor
    step = meta["step"]
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    model_path = Path(out_dir) / f"model_{step:06d}.pt"
    atomic_write_bytes(model_path, buffer.getvalue())
    atomic_write_text(Path(out_dir) / f"meta_{step:06d}.json", json.dumps(meta, indent=2))
    log.info("wrote %s (%s)", model_path, model.config)
    return model_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from",
        dest="src",
        type=Path,
        required=True,
        help="nanochat model_XXXXXX.pt, or with --reverse our checkpoint dir",
    )
    parser.add_argument(
        "--meta", type=Path, default=None, help="nanochat meta_XXXXXX.json (default: beside --from)"
    )
    parser.add_argument(
        "--to",
        dest="dst",
        type=Path,
        required=True,
        help="our checkpoint dir, or with --reverse a directory for the .pt",
    )
    parser.add_argument("--reverse", action="store_true", help="ours -> nanochat")
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        help="with --reverse: the step to export (default: latest)",
    )
    args = parser.parse_args(argv)
    if not args.src.exists():
        parser.error(f"--from {args.src} does not exist")
    if args.reverse:
        if args.meta is not None:
            parser.error("--meta is for nanochat -> ours; with --reverse the meta is in --from")
        ours_to_nanochat(args.src, args.dst, args.step)
    else:
        if args.step is not None:
            parser.error("--step is for --reverse; the nanochat step comes from the meta file")
        nanochat_to_ours(args.src, args.meta, args.dst)


if __name__ == "__main__":
    main()
