"""Checkpoints with Orbax: parameters, optimizer state, data-iterator state and run metadata.

Layout, like nanochat's (`base_checkpoints/d20/model_000300.pt` ...), one directory per step:

    <base>/base_checkpoints/d20/000300/params/      Orbax pytree (sharded arrays, OCDBT)
                                      /opt_state/   Orbax pytree (optional)
                                      /data_state/  JSON: the data iterator's state (optional)
                                      /meta/        JSON: step, val_bpb, model_config, ...
                                      /checksums/   JSON: the items saved, array fingerprints

Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it when complete, so a killed
save never shows up as a step. It cannot see a damaged file though (a flipped bit in an array
chunk restores silently), hence the fingerprints: restore() recomputes them and a step that does not
read back exactly is skipped for the previous one, with a warning.

Saves are async: save() returns once the arrays are copied to host memory (Orbax does that copy
before returning, so the caller may donate or overwrite them right away); the files are written by
a background thread. Call wait() before reading a just-saved step from another process, and close()
at the end of the run.

A run directory holds one timeline, and save() deletes no step of another one: the steps of another
timeline that would be mixed into the new one are moved aside (one rename each, on the same
filesystem) into

    <base>/superseded_checkpoints/<phase dir>/<tag>/<YYYYmmdd-HHMMSS>/000649/

which is itself a readable run directory (Checkpointer, load_params, read_meta), and is seen
neither by list_model_tags/find_model_tag nor by Orbax's step listing. A step is moved aside when
  - it is >= the step being saved (a fresh run into a used directory: a short experiment saving
    step 2 next to a finished step 649 must not destroy it), or
  - this Checkpointer resumed (restore()) from an earlier step: the later steps are the abandoned
    timeline (often damaged, which is why restore() fell back past them).
To get them back: stop whatever writes to the run directory, then `mv <moved>/000649 <run dir>/`.
Keep-last-N (max_to_keep) deletes only steps of the run's own timeline: those it saved, and those
up to the step it resumed from; earlier steps of another run that stay in the directory are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nanochat_jax.common import get_base_dir, get_logger
from nanochat_jax.sharding import key_name

log = get_logger(__name__)


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    """Orbax warns about read-only managers every time; readers open them on purpose."""
    message = record.getMessage()
    return "read_only=True" not in message and "is read only" not in message


logging.getLogger("absl").addFilter(_not_read_only_notice)

PHASE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
_ARRAY_ITEMS = ("params", "opt_state")
_JSON_ITEMS = ("data_state", "meta", "checksums")
_STEP_DIGITS = 6  # step dirs are 000300 like nanochat's model_000300.pt, and sort by name
_SUPERSEDED = "superseded_checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (damaged or incomplete)."""


class _DamagedStep(Exception):
    """One step cannot be read back exactly; restore() may fall back to an earlier one."""


@dataclasses.dataclass(frozen=True)
class Restored:
    params: Any
    opt_state: Any | None
    data_state: dict | None
    meta: dict
    step: int


def checkpoint_dir(phase: str, model_tag: str, base_dir: str | Path | None = None) -> Path:
    """<base>/base_checkpoints/<model_tag> (or mid_/chatsft_/chatrl_checkpoints)."""
    if phase not in PHASE_DIRS:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASE_DIRS)}")
    if not model_tag or "/" in model_tag or model_tag in (".", ".."):
        raise ValueError(f"bad model_tag {model_tag!r}: expected a directory name like 'd20'")
    base = Path(base_dir) if base_dir is not None else get_base_dir()
    return base / PHASE_DIRS[phase] / model_tag


def superseded_dir(directory: str | Path) -> Path:
    """Where save() moves steps of another timeline out of run `directory`:
    <base>/superseded_checkpoints/<phase dir>/<tag> for <base>/<phase dir>/<tag>, and
    <parent>/superseded_checkpoints/<name> for any other <parent>/<name>."""
    directory = Path(directory).absolute()
    if directory.parent.name in PHASE_DIRS.values():
        return directory.parent.parent / _SUPERSEDED / directory.parent.name / directory.name
    return directory.parent / _SUPERSEDED / directory.name


def list_model_tags(phase: str, base_dir: str | Path | None = None) -> list[str]:
    """Tags of a phase holding at least one finished step (a run that died before its first save
    leaves an empty directory, which must not be picked)."""
    parent = checkpoint_dir(phase, "_", base_dir).parent
    if not parent.is_dir():
        return []
    step_dir = re.compile(rf"\d{{{_STEP_DIGITS}}}")
    return sorted(
        p.name
        for p in parent.iterdir()
        if p.is_dir() and any(s.is_dir() and step_dir.fullmatch(s.name) for s in p.iterdir())
    )


def find_model_tag(phase: str, base_dir: str | Path | None = None) -> str:
    """The tag to load when none is given: the largest dN, else the newest directory (nanochat)."""
    parent = checkpoint_dir(phase, "_", base_dir).parent
    tags = [parent / tag for tag in list_model_tags(phase, base_dir)]
    if not tags:
        raise FileNotFoundError(f"no checkpoints in {parent}: run the {phase} stage first")
    depths = {int(m.group(1)): p.name for p in tags if (m := re.fullmatch(r"d(\d+)", p.name))}
    if depths:
        return depths[max(depths)]
    return max(tags, key=lambda p: p.stat().st_mtime).name


@dataclasses.dataclass
class _KeepLastOwn:
    """Orbax preservation policy: the last `n` steps of this run's own timeline (`own`, updated by
    the Checkpointer), and every step of another run. Duck-types Orbax's PreservationPolicy."""

    n: int
    own: set[int]

    def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
        del context
        own = sorted(c.step for c in checkpoints if c.step in self.own)
        latest = set(own[len(own) - self.n :])
        return [c.step not in self.own or c.step in latest for c in checkpoints]


class Checkpointer:
    """A thin wrapper over `orbax.checkpoint.CheckpointManager` for one run directory.

    The run's own timeline is the steps this Checkpointer saved plus, once restore() resumed
    from step R, the steps <= R. max_to_keep deletes only the oldest of those; save() moves the
    others out of the way (see the module docstring) instead of deleting them.

    read_only=True is for readers (eval, chat): they never delete or move, and never clean up the
    temporary directory of a save that a training process may still be writing.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int | None = None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be None (keep all) or >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self._read_only = read_only
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        self._own: set[int] = set()
        self._resumed_from: int | None = None  # set by restore(), acted on by the next save()
        self._moves = 0  # makes each multi-host barrier name unique
        keep = None if max_to_keep is None or read_only else _KeepLastOwn(max_to_keep, self._own)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=keep,  # Orbax's own max_to_keep would also delete other runs' steps
            step_format_fixed_length=_STEP_DIGITS,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # leftovers of a killed save
            read_only=read_only,
            create=not read_only,
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in _ARRAY_ITEMS}
        handlers |= {name: ocp.JsonCheckpointHandler() for name in _JSON_ITEMS}
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=tuple(handlers), item_handlers=handlers
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Completed steps, oldest first (a save still in flight is not listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def wait(self) -> None:
        """Block until the async save in flight (if any) is on disk; raises if it failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any = None,
        data_state: dict | None = None,
        meta: dict,
    ) -> None:
        """Start saving `step`; returns once the arrays are on the host (they may then be donated).

        Steps >= `step` already in the directory, and after a restore() of step R the steps > R,
        are first moved to superseded_dir(directory) with a warning saying where: they belong to
        another timeline (a fresh run into a used directory, or the one a resumed run abandoned),
        and leaving them would make the next resume pick them up. Nothing is deleted here.
        """
        if self._read_only:
            raise ValueError(f"this Checkpointer of {self.directory} is read-only; cannot save")
        if "model_config" not in meta:
            raise ValueError(
                "meta must hold 'model_config' (GPTConfig.to_dict()) so it can be loaded"
            )
        if meta.get("step", step) != step:
            raise ValueError(f"meta['step']={meta['step']} but saving step {step}")
        meta = {**meta, "step": step}
        _check_json("meta", meta)
        if data_state is not None:
            _check_json("data_state", data_state)
        resumed_from, self._resumed_from = self._resumed_from, None
        stale = [
            s
            for s in self.all_steps()
            if s >= step or (resumed_from is not None and s > resumed_from)
        ]
        if stale:
            self._move_aside(stale, step, resumed_from)
        self._own.add(step)

        arrays = {"params": params} | ({"opt_state": opt_state} if opt_state is not None else {})
        jsons = {"meta": meta} | ({"data_state": data_state} if data_state is not None else {})
        checksums = {
            "items": sorted(arrays) + sorted(jsons),
            "arrays": {name: _fingerprints(tree) for name, tree in arrays.items()},
        }
        args = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        args |= {
            name: ocp.args.JsonSave(v) for name, v in (jsons | {"checksums": checksums}).items()
        }
        log.info("saving checkpoint step %d to %s", step, self.directory)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(
        self, step: int | None = None, *, params_target: Any, opt_state_target: Any = None
    ) -> Restored:
        """Restore `step` (default: the latest step that reads back intact).

        Targets are pytrees like the saved ones whose leaves are arrays or `jax.ShapeDtypeStruct`s;
        each leaf's sharding says where the restored array goes (a mesh different from the one that
        saved it is fine), leaves without one go to the first local device. A dtype different from
        the saved one is a cast; a different shape or tree is an error. opt_state_target=None skips
        the optimizer state (eval, chat).
        """
        restored = self._first_usable(
            step, lambda s: self._restore_step(s, params_target, opt_state_target)
        )
        if not self._read_only:  # a writer that restores resumes this timeline from that step
            self._resumed_from = restored.step
            self._own.update(s for s in self.all_steps() if s <= restored.step)
        return restored

    def _move_aside(self, steps: list[int], step: int, resumed_from: int | None) -> None:
        """Rename `steps` into a new <time> directory under superseded_dir(), and tell where."""
        self.wait()  # a save in flight may be one of them; Orbax must not write while we move
        self._moves += 1
        if jax.process_index() == 0:  # one host moves, on the filesystem all hosts share
            where = self._rename_steps(steps)
            why = (
                f"this run resumed from step {resumed_from}"
                if resumed_from is not None
                else "this run did not resume from them"
            )
            first = where / f"{steps[0]:0{_STEP_DIGITS}d}"
            log.warning(
                "saving step %d in %s: steps %s are not part of this run's timeline (%s); moved "
                "them, not deleted, to %s. They load from there as they are (e.g. load_params(%r, "
                "...)); to put one back, stop runs writing to the directory, then: mv %s %s/",
                step,
                self.directory,
                steps,
                why,
                where,
                str(where),
                first,
                self.directory,
            )
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(
                f"nanochat_jax_checkpoint_move_aside_{self._moves}_{step}"
            )
        self._manager.reload()  # Orbax caches its step list; it must forget the moved steps
        self._own.difference_update(steps)

    def _rename_steps(self, steps: list[int]) -> Path:
        """Each step directory renamed (atomic) into a fresh directory; returns that directory.
        Falls back to <run dir>/.superseded/ when superseded_dir() cannot be made or is on another
        filesystem (a rename cannot cross filesystems, and a copy is neither atomic nor cheap)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        names = [f"{s:0{_STEP_DIGITS}d}" for s in steps]
        where = None
        try:
            where = _fresh_dir(superseded_dir(self.directory), stamp)
            os.replace(self.directory / names[0], where / names[0])
        except OSError as e:
            log.warning("cannot move checkpoints to %s (%s)", superseded_dir(self.directory), e)
            if where is not None:
                where.rmdir()  # made, but nothing got into it
            where = _fresh_dir(self.directory / ".superseded", stamp)
            os.replace(self.directory / names[0], where / names[0])
        for name in names[1:]:
            os.replace(self.directory / name, where / name)
        return where

    def read_meta(self, step: int | None = None) -> dict:
        """The meta dict of `step` (default: the latest step whose meta reads back)."""
        return self._first_usable(step, lambda s: self._read_json(s)["meta"])

    def _first_usable(self, step: int | None, read: Callable[[int], Any]) -> Any:
        """read(step), or with step=None read(latest) falling back past damaged steps."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"no step {step} in {self.directory}; it has {steps}")
        problems = []
        for candidate in [step] if step is not None else reversed(steps):
            try:
                return read(candidate)
            except _DamagedStep as e:
                if step is not None:
                    raise CheckpointError(
                        f"step {step} in {self.directory} is unusable: {e}"
                    ) from e
                log.warning(
                    "checkpoint step %d in %s is unusable (%s); trying the previous step",
                    candidate,
                    self.directory,
                    e,
                )
                problems.append(f"step {candidate}: {e}")
        raise CheckpointError(f"no usable checkpoint in {self.directory}:\n" + "\n".join(problems))

    def _read_json(self, step: int) -> dict:
        """meta + checksums of a step, or _DamagedStep."""
        names = ("meta", "checksums")
        args = ocp.args.Composite(**{name: ocp.args.JsonRestore() for name in names})
        try:
            restored = self._manager.restore(step, args=args)
            out = {name: restored[name] for name in names}
        except Exception as e:  # Orbax/tensorstore raise many types for a missing or bad file
            raise _DamagedStep(f"cannot read its meta/checksums: {_brief(e)}") from e
        if not isinstance(out["meta"], dict) or not isinstance(out["checksums"], dict):
            raise _DamagedStep("its meta or checksums are missing")
        return out

    def _restore_step(self, step: int, params_target: Any, opt_state_target: Any) -> Restored:
        jsons = self._read_json(step)
        saved_items = set(jsons["checksums"].get("items", []))
        targets = {"params": params_target}
        if opt_state_target is not None:
            if "opt_state" not in saved_items:
                raise ValueError(f"step {step} in {self.directory} was saved without opt_state")
            targets["opt_state"] = opt_state_target
        step_dir = self.directory / f"{step:0{_STEP_DIGITS}d}"
        for name in [*targets, *(saved_items & {"data_state"})]:
            if not (step_dir / name).is_dir():
                raise _DamagedStep(f"its {name} directory is missing")
        try:
            metadata = self._manager.item_metadata(step)
            saved = {name: _flat_metadata(metadata[name]) for name in targets}
        except Exception as e:
            raise _DamagedStep(f"cannot read its array metadata: {_brief(e)}") from e
        for name, target in targets.items():
            _check_matches(name, saved[name], target)

        args = {name: ocp.args.StandardRestore(_abstract(t)) for name, t in targets.items()}
        if "data_state" in saved_items:
            args["data_state"] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
            out = {name: restored[name] for name in args}
        except Exception as e:
            if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
                raise  # out of memory is not damage: every earlier step would fail the same way
            raise _DamagedStep(f"cannot read its arrays: {_brief(e)}") from e
        for name in targets:
            _verify(name, out[name], jsons["checksums"].get("arrays", {}).get(name, {}))
        return Restored(
            params=out["params"],
            opt_state=out.get("opt_state"),
            data_state=out.get("data_state"),
            meta=jsons["meta"],
            step=step,
        )


def read_meta(directory: str | Path, step: int | None = None) -> dict:
    """meta of `step` (default latest) in a run directory, without touching the arrays."""
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.read_meta(step)


def load_params(
    directory: str | Path,
    make_params_target: Callable[[dict], Any],
    *,
    step: int | None = None,
) -> Restored:
    """Params only (eval, chat): `make_params_target(meta)` builds the target from the saved meta,
    typically `nnx.state(nnx.eval_shape(lambda: GPT(GPTConfig.from_dict(meta["model_config"]),
    rngs=nnx.Rngs(0))), nnx.Param)` with shardings attached. Falls back past damaged steps."""
    with Checkpointer(directory, read_only=True) as ckpt:

        def read(s: int) -> Restored:
            target = make_params_target(ckpt._read_json(s)["meta"])
            return ckpt._restore_step(s, target, None)

        return ckpt._first_usable(step, read)


def _fresh_dir(root: Path, stamp: str) -> Path:
    """root/stamp, or root/stamp-2, -3, ... if that exists already (two moves in one second)."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"too many directories named {stamp}-* in {root}")


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a JSON-serializable dict: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")


def _brief(e: Exception) -> str:
    """Tensorstore errors embed a page-long spec; the first line says what went wrong."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _path_str(path: tuple) -> str:
    """'h.0.attn.c_q.kernel.value': one spelling for a target's keys and Orbax metadata's keys
    (which turn namedtuple fields into dict keys and tuples into lists)."""
    return ".".join(str(key_name(key)) for key in path)


def _flat(tree: Any) -> dict[str, Any]:
    return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _flat_metadata(item_metadata: Any) -> dict[str, Any]:
    # orbax 0.12 wraps the tree in TreeMetadata(.tree); older versions return the tree itself
    return _flat(getattr(item_metadata, "tree", item_metadata))


def _check_matches(name: str, saved: dict[str, Any], target: Any) -> None:
    """A clear error naming the parameter, before Orbax's deep one."""
    wanted = _flat(target)
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise ValueError(
            f"{name} target does not match the checkpoint: not in checkpoint {missing[:5]}, "
            f"in checkpoint but not in target {extra[:5]}"
        )
    for path, leaf in wanted.items():
        if _is_array(leaf) and tuple(leaf.shape) != tuple(saved[path].shape):
            raise ValueError(
                f"{name} {path}: checkpoint has shape {tuple(saved[path].shape)} but the target "
                f"wants {tuple(leaf.shape)} (a different model config?)"
            )


def _abstract(tree: Any) -> Any:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x: Any) -> Any:
        if not _is_array(x):
            return x
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32 position-weighted sum of the raw bits: exact (integer arithmetic mod 2^32), so it
    does not depend on the sharding or reduction order, and elementwise so it never gathers."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index, stride = jnp.zeros(bits.shape, jnp.uint32), 1
    for dim in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * np.uint32(stride)
        stride = stride * bits.shape[dim] % 2**32
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


_fingerprint_jit = jax.jit(_fingerprint)


def _fingerprints(tree: Any) -> dict[str, list]:
    """{path: [dtype, fingerprint]} of every array leaf. One jit call per leaf, because leaves may
    live on different device sets (a mesh, one device) that a single jitted call cannot mix."""
    leaves = {k: x for k, x in _flat(tree).items() if isinstance(x, jax.Array | np.ndarray)}
    values = jax.device_get({k: _fingerprint_jit(x) for k, x in leaves.items()})
    return {k: [str(leaves[k].dtype), int(values[k])] for k in leaves}


def _verify(name: str, restored: Any, saved: dict[str, list]) -> None:
    # a leaf restored with another dtype (a cast the caller asked for) cannot be compared
    current = _fingerprints(restored)
    for path, (dtype, value) in saved.items():
        if path in current and current[path][0] == dtype and current[path][1] != value:
            raise _DamagedStep(f"{name} {path} does not match its fingerprint (damaged file)")
