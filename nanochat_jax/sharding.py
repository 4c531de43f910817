"""One device mesh with named axes, and one table that says how each parameter is laid out on it.

Axes: `data` (pure data parallel, parameters replicated, like nanochat's DDP), `fsdp` (batch split
too, and parameters + optimizer state sharded ZeRO-3 style, for depths that do not fit), and an
optional `tensor` axis (Megatron-style split of heads / MLP width / vocab).

Parameters carry *logical* axis names (by path, in `_LOGICAL_AXES`); `_LOGICAL_TO_MESH` maps those
to mesh axes. A dimension whose size the mesh axis does not divide stays replicated.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanochat_jax.common import get_logger

log = get_logger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every non-tensor axis

# parameter path (regex, searched) -> logical axis name of each dimension. Kernels are (in, out).
_LOGICAL_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"wte/embedding$", ("vocab", "embed")),
    (r"attn/c_[qkv]/kernel$", ("embed", "heads")),
    (r"attn/c_proj/kernel$", ("heads", "embed")),
    (r"mlp/c_fc/kernel$", ("embed", "mlp")),
    (r"mlp/c_proj/kernel$", ("mlp", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
)

# logical axis -> mesh axis (None = replicated). `embed` is the dimension every matrix has, so
# sharding it over `fsdp` spreads every parameter (and its Adam/Muon state) over that axis.
_LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"}


def parse_mesh_spec(spec: str | int) -> dict[str, int]:
    """'8' -> {'data': 8, 'fsdp': 1, 'tensor': 1}; 'data=4,fsdp=2' -> {'data': 4, 'fsdp': 2, ..}"""
    text = str(spec).strip()
    sizes = dict.fromkeys(MESH_AXES, 1)
    if text.isdigit():
        sizes["data"] = int(text)
    else:
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in sizes or not value.strip().isdigit():
                raise ValueError(
                    f"bad --mesh {spec!r}: use a device count like 8, or axes like "
                    f"data=4,fsdp=2 (axes: {', '.join(MESH_AXES)})"
                )
            sizes[name] = int(value)
    if any(size < 1 for size in sizes.values()):
        raise ValueError(f"bad --mesh {spec!r}: every axis needs at least 1 device")
    return sizes


def make_mesh(spec: str | int = "1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over the first prod(axis sizes) devices, axes in MESH_AXES order."""
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(sizes.values())
    if needed > len(devices):
        raise ValueError(
            f"--mesh {spec!r} needs {needed} devices but only {len(devices)} are visible "
            f"({devices[0].platform}). On CPU, fake more with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
        )
    grid = np.array(devices[:needed]).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def key_name(key) -> object:
    """The name in one pytree path entry (DictKey.key, GetAttrKey.name, SequenceKey.idx)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def path_str(path: tuple) -> str:
    """A pytree key path as 'h/0/attn/c_q/kernel' (nnx's trailing `.value` dropped)."""
    return "/".join(str(name) for name in map(key_name, path) if name != "value")


def logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter (or optimizer-state leaf) at `path`."""
    for pattern, axes in _LOGICAL_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one leaf: its logical axes mapped onto the mesh, if they divide."""
    spec = []
    for dim, axis in zip(shape, logical_axes(path, len(shape)), strict=True):
        mesh_axis = _LOGICAL_TO_MESH.get(axis) if axis else None
        size = mesh.shape[mesh_axis] if mesh_axis else 1
        if size > 1 and dim % size != 0:
            log.warning("%s: dim %d not divisible by %s=%d, replicated", path, dim, mesh_axis, size)
            size = 1
        spec.append(mesh_axis if size > 1 else None)
    return P(*spec)


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every leaf of a parameter or optimizer-state tree (by path rules)."""

    def one(path, leaf):
        return NamedSharding(mesh, partition_spec(path_str(path), np.shape(leaf), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def abstract_on_mesh(tree, mesh: Mesh):
    """jax.ShapeDtypeStructs of a tree's leaves carrying their rule shardings: restore targets."""
    return jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=s),
        tree,
        tree_shardings(tree, mesh),
    )


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """(..., B, ...) arrays with `leading_axes` axes before B (e.g. 1 for stacked micro-batches
    (A, B, T)): rows split over the data-parallel axes."""
    return NamedSharding(mesh, P(*(None,) * leading_axes, BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(array: np.ndarray, mesh: Mesh, leading_axes: int = 0) -> jax.Array:
    """Place this process's rows of a batch on the mesh (one process: the whole batch)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh, leading_axes), array)


def maybe_initialize_distributed() -> None:
    """Multi-host: connect the processes when launched that way (coordinator env vars set).

    Must run before anything touches a device. Single host: a no-op. Afterwards jax.devices()
    spans all hosts, each process feeds its own rows (`shard_batch`) and the same code runs.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()
