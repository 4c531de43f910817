"""Checkpoints: round trip, keep-last-N, async + donation, damaged steps, remesh, dir layout,
steps of another timeline moved aside (never deleted)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from nanochat_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    checkpoint_dir,
    find_model_tag,
    list_model_tags,
    load_params,
    read_meta,
    superseded_dir,
)

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG = {
    "sequence_len": 16,
    "vocab_size": 64,
    "n_layer": 2,
    "n_head": 2,
    "n_kv_head": 2,
    "n_embd": 16,
}
META = {"val_bpb": 1.25, "model_config": MODEL_CONFIG, "user_config": {"depth": 2}}


def _params(scale: float = 1.0) -> dict:
    """Every dimension divisible by 8, 4 and 2, so any of the test meshes can split it."""
    return {
        "wte": {"embedding": jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16) * scale},
        "h": [{"c_fc": {"kernel": jnp.full((16, 32), i + scale, jnp.float32)}} for i in range(2)],
    }


def _optimizer(params) -> optax.GradientTransformation:
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "adam" if path[0].key == "wte" else "sgd", params
    )
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({"adam": optax.adamw(1e-2), "sgd": sgd}, labels),
    )


def _trained(params):
    """params and optimizer state after two updates, so every moment is non-trivial."""
    tx = _optimizer(params)
    opt_state = tx.init(params)
    for i in range(2):
        grads = jax.tree.map(lambda x, i=i: jnp.sin(x + i), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(tree, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _save_steps(directory, steps, **kwargs) -> dict:
    """Synchronous saves of distinct params per step; returns {step: params on host}."""
    saved = {}
    with Checkpointer(directory, async_save=False, **kwargs) as ckpt:
        for step in steps:
            params = _params(float(step))
            ckpt.save(step, params=params, data_state={"pos": step}, meta=META)
            saved[step] = _host(params)
    return saved


def test_round_trip_params_optax_state_data_state_meta(tmp_path):
    params, opt_state = _trained(_params())
    data_state = {"shard": 3, "row_group": 7, "buffer": [1, 2, 3]}
    with Checkpointer(tmp_path / "d2") as ckpt:  # async by default
        ckpt.save(5, params=params, opt_state=opt_state, data_state=data_state, meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [5] and ckpt.latest_step() == 5
        # concrete targets
        restored = ckpt.restore(params_target=params, opt_state_target=opt_state)
    assert restored.step == 5
    _assert_equal(restored.params, params)
    _assert_equal(restored.opt_state, opt_state)  # same namedtuple types, MaskedNodes included
    assert type(restored.opt_state[1]) is type(opt_state[1])
    assert restored.data_state == data_state
    assert restored.meta == {**META, "step": 5}
    assert read_meta(tmp_path / "d2") == {**META, "step": 5}
    assert (tmp_path / "d2" / "000005" / "params").is_dir()  # nanochat-like 6-digit step names

    # abstract targets, in a fresh Checkpointer (a resumed process); the restored optimizer state
    # drives the next update exactly like the original
    with Checkpointer(tmp_path / "d2") as ckpt:
        restored = ckpt.restore(
            params_target=_abstract(params), opt_state_target=_abstract(opt_state)
        )
    tx = _optimizer(params)
    grads = jax.tree.map(jnp.cos, params)
    _assert_equal(
        tx.update(grads, restored.opt_state, restored.params), tx.update(grads, opt_state, params)
    )
    # params only (eval): no optimizer state read
    with Checkpointer(tmp_path / "d2", read_only=True) as ckpt:
        assert ckpt.restore(params_target=_abstract(params)).opt_state is None


def test_async_save_lets_the_caller_donate_the_arrays_right_away(tmp_path):
    params, opt_state = _trained(_params())
    expected = (_host(params), _host(opt_state))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state, meta=META)
        # what a donated train step does to its inputs, while the background write may run
        for x in jax.tree.leaves((params, opt_state)):
            x.delete()
        ckpt.wait()
        restored = ckpt.restore(
            params_target=_abstract(expected[0]), opt_state_target=_abstract(expected[1])
        )
    _assert_equal(restored.params, expected[0])
    _assert_equal(restored.opt_state, expected[1])


def test_keep_last_n_latest_step_and_superseded_steps(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in (10, 20, 30, 40):
            ckpt.save(step, params=_params(float(step)), meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40] and ckpt.latest_step() == 40
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["000030", "000040"]
    # a run that went back to step 30 and saves step 35 abandons step 40
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(35, params=_params(35.0), meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [30, 35]
        restored = ckpt.restore(params_target=_abstract(_params()))
    assert restored.step == 35
    _assert_equal(restored.params, _host(_params(35.0)))


def _files(step_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(step_dir)): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()
    }


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_fresh_run_moves_a_later_step_aside_instead_of_deleting_it(tmp_path, caplog):
    """`chat_sft --max_iterations=2` into the directory of a finished 650-step SFT."""
    run = checkpoint_dir("sft", "d2", tmp_path)
    finished = _save_steps(run, [649])[649]
    before = _files(run / "000649")
    with Checkpointer(run) as ckpt, caplog.at_level(logging.WARNING):  # a fresh run: no restore
        ckpt.save(1, params=_params(1.0), meta=META)
        ckpt.save(2, params=_params(2.0), meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    assert sorted(p.name for p in run.iterdir()) == ["000001", "000002"]
    [moved] = [p for p in superseded_dir(run).iterdir()]
    assert superseded_dir(run) == tmp_path / "superseded_checkpoints" / "chatsft_checkpoints" / "d2"
    assert [p.name for p in moved.iterdir()] == ["000649"]
    assert _files(moved / "000649") == before  # renamed, byte for byte
    [warning] = _warnings(caplog)
    assert "steps [649]" in warning and "not deleted" in warning and str(moved) in warning
    assert f"mv {moved / '000649'} {run}/" in warning
    # readable where it is, and invisible to the tag/step listings
    restored = load_params(moved, lambda meta: _abstract(_params()))
    assert restored.step == 649 and restored.meta["step"] == 649
    _assert_equal(restored.params, finished)
    assert list_model_tags("sft", tmp_path) == ["d2"] and find_model_tag("sft", tmp_path) == "d2"
    assert read_meta(run)["step"] == 2
    # putting it back as the warning says makes it the latest step again
    (moved / "000649").rename(run / "000649")
    assert read_meta(run)["step"] == 649


def test_fresh_run_never_garbage_collects_another_runs_steps(tmp_path, caplog):
    """keep-last-N counts and deletes only this run's steps; an earlier run's step 5 stays."""
    _save_steps(tmp_path / "run", [5, 50])
    with Checkpointer(tmp_path / "run", max_to_keep=2) as ckpt, caplog.at_level(logging.WARNING):
        for step in (10, 20, 30):
            ckpt.save(step, params=_params(float(step)), meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 20, 30]  # 10 was this run's: deleted by keep-last-2
    [moved] = superseded_dir(tmp_path / "run").iterdir()
    assert superseded_dir(tmp_path / "run") == tmp_path / "superseded_checkpoints" / "run"
    assert [p.name for p in moved.iterdir()] == ["000050"]
    assert any("steps [50]" in w for w in _warnings(caplog))


def test_resume_after_damaged_steps_moves_the_abandoned_timeline_aside(tmp_path, caplog):
    run = tmp_path / "run"
    saved = _save_steps(run, [10, 20, 22, 30])
    _damage_flip_bit(run / "000022")
    _damage_remove_params(run / "000030")
    with Checkpointer(run, max_to_keep=2) as ckpt, caplog.at_level(logging.WARNING):
        restored = ckpt.restore(params_target=_abstract(saved[10]))
        assert restored.step == 20  # fell back past the damaged 30 and 22
        ckpt.save(25, params=_params(25.0), meta=META)  # 22 < 25 is abandoned too
        ckpt.wait()
        # 10 is this run's own timeline (before the step it resumed from): keep-last-2 drops it
        assert ckpt.all_steps() == [20, 25]
        ckpt.save(40, params=_params(40.0), meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [25, 40]
    [moved] = superseded_dir(run).iterdir()
    assert sorted(p.name for p in moved.iterdir()) == ["000022", "000030"]
    moved_warnings = [w for w in _warnings(caplog) if "moved them" in w]
    assert len(moved_warnings) == 1 and "steps [22, 30]" in moved_warnings[0]
    assert "resumed from step 20" in moved_warnings[0]
    with Checkpointer(moved, read_only=True) as reader:
        assert reader.all_steps() == [22, 30]
        assert reader.read_meta(22)["step"] == 22  # damaged arrays, but kept for inspection
    # resuming at the last saved step and saving it again (a finished run resumed) keeps the old
    with Checkpointer(run) as ckpt:
        assert ckpt.restore(params_target=_abstract(saved[10])).step == 40
        ckpt.save(40, params=_params(41.0), meta=META)
        ckpt.wait()
        assert ckpt.all_steps() == [25, 40]
    assert len(list(superseded_dir(run).iterdir())) == 2  # a second, distinct directory
    _assert_equal(load_params(run, lambda m: _abstract(_params())).params, _host(_params(41.0)))


def test_moving_aside_across_filesystems_falls_back_inside_the_run_dir(tmp_path, monkeypatch):
    run = checkpoint_dir("mid", "d2", tmp_path)
    saved = _save_steps(run, [649])
    real_replace = os.replace

    def replace(src, dst):
        if "superseded_checkpoints" in str(dst):
            raise OSError(18, "Invalid cross-device link")  # errno.EXDEV
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(1, params=_params(1.0), meta=META)
        assert ckpt.all_steps() == [1]
    [moved] = (run / ".superseded").iterdir()
    _assert_equal(load_params(moved, lambda m: _abstract(_params())).params, saved[649])
    assert not any(superseded_dir(run).iterdir())  # the directory it could not use is left empty
    assert list_model_tags("mid", tmp_path) == ["d2"]
    with Checkpointer(run, read_only=True) as reader:
        assert reader.all_steps() == [1]


def _damage_flip_bit(step_dir: Path) -> None:
    biggest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=os.path.getsize)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x01
    biggest.write_bytes(bytes(data))


def _damage_truncate(step_dir: Path) -> None:
    for path in (step_dir / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_remove_params(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "params")


def _damage_empty_step_dir(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def _damage_garble_meta(step_dir: Path) -> None:
    for path in (step_dir / "meta").iterdir():
        path.write_text("{not json")


@pytest.mark.parametrize(
    "damage",
    [
        _damage_flip_bit,
        _damage_truncate,
        _damage_remove_params,
        _damage_empty_step_dir,
        _damage_garble_meta,
    ],
    ids=["flipped-bit", "truncated", "missing-params", "empty-step-dir", "garbled-meta"],
)
def test_damaged_latest_step_falls_back_to_previous_with_warning(tmp_path, caplog, damage):
    saved = _save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path / "000003")
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
        restored = ckpt.restore(params_target=_abstract(saved[1]))
    assert restored.step == 2 and restored.data_state == {"pos": 2}
    _assert_equal(restored.params, saved[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3 " in w and "unusable" in w for w in warnings), warnings


def test_every_step_damaged_or_explicit_damaged_step_is_a_clear_error(tmp_path):
    saved = _save_steps(tmp_path, [1, 2])
    _damage_flip_bit(tmp_path / "000002")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"step 2 .* is unusable.*fingerprint"):
            ckpt.restore(2, params_target=_abstract(saved[1]))  # no silent fallback when asked
        with pytest.raises(FileNotFoundError, match="no step 7"):
            ckpt.restore(7, params_target=_abstract(saved[1]))
    _damage_remove_params(tmp_path / "000001")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError) as info:
        ckpt.restore(params_target=_abstract(saved[1]))
    assert "step 2:" in str(info.value) and "step 1: its params directory is missing" in str(
        info.value
    )
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        Checkpointer(tmp_path / "empty").restore(params_target=_abstract(saved[1]))


def test_target_shape_or_tree_mismatch_names_the_parameter(tmp_path, caplog):
    _save_steps(tmp_path, [1])
    wrong = _abstract(_params())
    wrong["h"][1]["c_fc"]["kernel"] = jax.ShapeDtypeStruct((16, 64), jnp.float32)
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
        with pytest.raises(ValueError, match=r"params h\.1\.c_fc\.kernel.*\(16, 32\).*\(16, 64\)"):
            ckpt.restore(params_target=wrong)
        missing = _abstract(_params())
        del missing["wte"]
        with pytest.raises(ValueError, match=r"in checkpoint but not in target \['wte\.embedding'"):
            ckpt.restore(params_target=missing)
        with pytest.raises(ValueError, match="saved without opt_state"):
            ckpt.restore(params_target=_abstract(_params()), opt_state_target={"x": 1})
    # a config mistake is not taken for a damaged checkpoint
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_save_rejects_bad_meta_and_data_state(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="model_config"):
            ckpt.save(1, params=_params(), meta={"step": 1})
        with pytest.raises(ValueError, match="data_state must be a JSON-serializable dict"):
            ckpt.save(1, params=_params(), data_state={"x": object()}, meta=META)
        with pytest.raises(ValueError, match=r"meta\['step'\]=2 but saving step 1"):
            ckpt.save(1, params=_params(), meta={**META, "step": 2})
    with Checkpointer(tmp_path, read_only=True) as reader:
        with pytest.raises(ValueError, match="read-only"):
            reader.save(1, params=_params(), meta=META)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)


def test_incomplete_save_is_not_a_step(tmp_path):
    _save_steps(tmp_path, [1, 2])
    # what a save killed before Orbax's final rename leaves behind
    shutil.copytree(tmp_path / "000002", tmp_path / "000003.orbax-checkpoint-tmp")
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert reader.all_steps() == [1, 2]
    assert (tmp_path / "000003.orbax-checkpoint-tmp").exists()  # readers leave it alone
    with Checkpointer(tmp_path) as writer:
        assert writer.latest_step() == 2
        assert writer.restore(params_target=_abstract(_params())).step == 2
    assert not (tmp_path / "000003.orbax-checkpoint-tmp").exists()  # the trainer cleans it up


def _killed_save_child(directory: str) -> None:
    """Save step 1, start an async save of step 2 and die at once (like SIGKILL)."""
    with Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(1, params=_params(1.0), meta=META)
    ckpt = Checkpointer(directory)
    big = {"w": jnp.ones((2048, 2048), jnp.float32)}  # 16 MB: still being written when we die
    ckpt.save(2, params=big, meta=META)
    os._exit(0)


def test_killed_async_save_never_yields_a_damaged_step(tmp_path):
    code = f"from tests.test_checkpoint import _killed_save_child as f; f({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    with Checkpointer(tmp_path) as ckpt:
        # killed before, during or after writing step 2 (its tmp dir may not even exist yet)
        steps = ckpt.all_steps()
        assert steps in ([1], [1, 2]), steps
        if steps == [1]:
            restored = ckpt.restore(params_target=_abstract(_params()))
            _assert_equal(restored.params, _host(_params(1.0)))
        else:  # the write won the race: then it must be complete
            restored = ckpt.restore(
                params_target={"w": jax.ShapeDtypeStruct((2048, 2048), jnp.float32)}
            )
            assert restored.step == 2 and float(restored.params["w"].sum()) == 2048 * 2048


def test_find_model_tag_and_checkpoint_dir(tmp_path):
    assert checkpoint_dir("base", "d20", tmp_path) == tmp_path / "base_checkpoints" / "d20"
    assert checkpoint_dir("sft", "d8", tmp_path) == tmp_path / "chatsft_checkpoints" / "d8"
    assert checkpoint_dir("rl", "x", tmp_path).parent.name == "chatrl_checkpoints"
    with pytest.raises(ValueError, match="unknown phase 'train'"):
        checkpoint_dir("train", "d20", tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        find_model_tag("mid", tmp_path)
    for tag in ("d8", "d20", "d3", "d100x", "mine"):
        (checkpoint_dir("mid", tag, tmp_path) / "000010").mkdir(parents=True)
    checkpoint_dir("mid", "d50", tmp_path).mkdir()  # a run that died before its first save
    assert list_model_tags("mid", tmp_path) == ["d100x", "d20", "d3", "d8", "mine"]
    assert find_model_tag("mid", tmp_path) == "d20"  # numerically largest, not "d8" nor "d50"
    for tag in ("old", "new"):
        (checkpoint_dir("base", tag, tmp_path) / "000001").mkdir(parents=True)
        time.sleep(0.01)
    os.utime(checkpoint_dir("base", "new", tmp_path))
    assert find_model_tag("base", tmp_path) == "new"  # no dN: most recently modified


def test_load_params_builds_the_target_from_meta_and_skips_a_damaged_step(tmp_path, caplog):
    saved = _save_steps(tmp_path, [100, 200])
    _damage_truncate(tmp_path / "000200")
    seen_meta = []

    def make_target(meta):
        seen_meta.append(meta)
        return _abstract(_params(), SingleDeviceSharding(jax.devices()[0]))

    with caplog.at_level(logging.WARNING):
        restored = load_params(tmp_path, make_target)
    assert restored.step == 100 and restored.opt_state is None
    _assert_equal(restored.params, saved[100])
    assert seen_meta[-1]["model_config"] == MODEL_CONFIG and seen_meta[-1]["step"] == 100
    assert any("step 200 " in r.getMessage() for r in caplog.records)
    assert read_meta(tmp_path, 200)["step"] == 200  # meta of the damaged step is still readable
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_params(tmp_path / "nope", make_target)


def _shard_rows(tree, mesh: Mesh, axis: str):
    """Split dimension 0 of every non-scalar leaf over `axis`; scalars replicated."""
    return jax.tree.map(
        lambda x: NamedSharding(mesh, P(axis) if np.ndim(x) else P()),
        tree,
    )


def _remesh_child(directory: str) -> None:
    """In a process with 4 (or 1) devices: restore the 8-device checkpoint onto a 2x2 mesh split
    along the *columns*, and onto one device; check values and shardings."""
    expected = dict(np.load(Path(directory) / "expected.npz"))
    params, opt_state = _trained(_params())  # only for the tree structure
    n = len(jax.devices())
    targets = []
    if n == 4:
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "tensor"))
        targets.append(lambda x: NamedSharding(mesh, P(None, "tensor") if np.ndim(x) == 2 else P()))
    targets.append(lambda x: SingleDeviceSharding(jax.devices()[-1]))
    for sharding_of in targets:

        def target(x, sharding_of=sharding_of):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x))

        params_target, opt_target = jax.tree.map(target, (params, opt_state))
        with Checkpointer(directory, read_only=True) as ckpt:
            restored = ckpt.restore(params_target=params_target, opt_state_target=opt_target)
        got = _flat_host({"params": restored.params, "opt_state": restored.opt_state})
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        for leaf, want in zip(
            jax.tree.leaves((restored.params, restored.opt_state)),
            jax.tree.leaves((params_target, opt_target)),
            strict=True,
        ):
            assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim), (leaf.sharding, want)
            if isinstance(want.sharding, NamedSharding) and leaf.ndim == 2:
                assert leaf.addressable_shards[0].data.shape == (leaf.shape[0], leaf.shape[1] // 2)
    print(f"remesh-ok devices={n}")


def _flat_host(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def test_save_on_8_devices_restore_on_4_and_on_1(tmp_path):
    assert len(jax.devices()) >= 8, "tests/conftest.py should give 8 fake CPU devices"
    mesh8 = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    params, opt_state = _trained(_params())
    params = jax.device_put(params, _shard_rows(params, mesh8, "fsdp"))
    opt_state = jax.device_put(opt_state, _shard_rows(opt_state, mesh8, "fsdp"))
    assert len(params["wte"]["embedding"].sharding.device_set) == 8
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, params=params, opt_state=opt_state, meta=META)
    np.savez(tmp_path / "expected.npz", **_flat_host({"params": params, "opt_state": opt_state}))

    children = []
    for n in (4, 1):
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        code = f"from tests.test_checkpoint import _remesh_child; _remesh_child({str(tmp_path)!r})"
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for n, child in zip((4, 1), children, strict=True):
        out, err = child.communicate(timeout=180)
        assert child.returncode == 0, err[-3000:]
        assert f"remesh-ok devices={n}" in out


def test_real_gpt_and_optimizer_state_round_trip(tmp_path):
    """The trainer's trees: nnx.to_pure_dict of the GPT's params + make_optimizer's state,
    restored into targets built from meta like eval/chat do."""
    from flax import nnx

    from nanochat_jax.config import GPTConfig
    from nanochat_jax.model import GPT
    from nanochat_jax.optim import OptimConfig, make_optimizer

    config = GPTConfig(**MODEL_CONFIG)

    def abstract_params(model_config: dict):
        model = nnx.eval_shape(lambda: GPT(GPTConfig(**model_config), rngs=nnx.Rngs(0)))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    params = nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(0)), nnx.Param))
    tx = make_optimizer(params, OptimConfig(model_dim=config.n_embd))
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.cos(x) * 0.01, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    meta = {**META, "model_config": config.to_dict()}
    with Checkpointer(checkpoint_dir("base", "d2", tmp_path)) as ckpt:
        ckpt.save(1, params=params, opt_state=opt_state, meta=meta)
        ckpt.wait()
        restored = ckpt.restore(
            params_target=abstract_params(meta["model_config"]),
            opt_state_target=jax.eval_shape(tx.init, params),
        )
    _assert_equal(restored.params, params)
    _assert_equal(restored.opt_state, opt_state)
    tag = find_model_tag("base", tmp_path)
    loaded = load_params(
        checkpoint_dir("base", tag, tmp_path), lambda m: abstract_params(m["model_config"])
    )
    _assert_equal(loaded.params, params)
    assert json.loads(json.dumps(loaded.meta))["model_config"] == config.to_dict()
