import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nanochat_jax import sharding


def _fake_params(d=16, vocab=64, n_layer=2):
    """A nested dict with the model's parameter paths and (in, out) kernel shapes."""
    block = {
        "attn": {k: {"kernel": np.zeros((d, d))} for k in ("c_q", "c_k", "c_v", "c_proj")},
        "mlp": {
            "c_fc": {"kernel": np.zeros((d, 4 * d))},
            "c_proj": {"kernel": np.zeros((4 * d, d))},
        },
    }
    return {
        "wte": {"embedding": np.zeros((vocab, d))},
        "h": {i: block for i in range(n_layer)},
        "lm_head": {"kernel": np.zeros((d, vocab))},
    }


def test_parse_mesh_spec():
    assert sharding.parse_mesh_spec("8") == {"data": 8, "fsdp": 1, "tensor": 1}
    assert sharding.parse_mesh_spec(4) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert sharding.parse_mesh_spec("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad in ("gpu=2", "data=x", "data=0", ""):
        with pytest.raises(ValueError, match="--mesh"):
            sharding.parse_mesh_spec(bad)


def test_make_mesh_and_too_many_devices():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    assert mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.data_parallel_size(mesh) == 4
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=64"):
        sharding.make_mesh("64")


def _specs(mesh):
    shardings = sharding.tree_shardings(_fake_params(), mesh)
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {sharding.path_str(path): s.spec for path, s in flat}


def test_data_parallel_replicates_everything():
    specs = _specs(sharding.make_mesh("8"))
    assert all(spec == P(None, None) for spec in specs.values())


def test_fsdp_shards_the_model_dimension_of_every_matrix():
    specs = _specs(sharding.make_mesh("data=2,fsdp=4"))
    assert specs["wte/embedding"] == P(None, "fsdp")
    assert specs["h/0/attn/c_q/kernel"] == P("fsdp", None)
    assert specs["h/1/attn/c_proj/kernel"] == P(None, "fsdp")
    assert specs["h/0/mlp/c_fc/kernel"] == P("fsdp", None)
    assert specs["h/0/mlp/c_proj/kernel"] == P(None, "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", None)


def test_tensor_axis_and_indivisible_dims_stay_replicated():
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    specs = _specs(mesh)
    assert specs["h/0/attn/c_q/kernel"] == P("fsdp", "tensor")
    assert specs["h/0/mlp/c_proj/kernel"] == P("tensor", "fsdp")
    # 6 rows over fsdp=4 does not divide: that dimension is replicated instead of failing
    spec = sharding.partition_spec("wte/embedding", (10, 6), sharding.make_mesh("fsdp=4"))
    assert spec == P(None, None)


def test_optimizer_state_paths_follow_the_same_rules():
    mesh = sharding.make_mesh("fsdp=8")
    # optax states nest the parameter tree under their own keys (mu, nu, inner_state, ...)
    assert sharding.partition_spec("0/mu/h/3/mlp/c_fc/kernel", (16, 64), mesh) == P("fsdp", None)
    assert sharding.partition_spec("1/count", (), mesh) == P()


def test_shard_batch_splits_rows_over_data_axes():
    mesh = sharding.make_mesh("data=2,fsdp=4")
    batch = sharding.shard_batch(np.arange(8 * 3).reshape(8, 3), mesh)
    assert batch.sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch.addressable_shards} == {(1, 3)}
    np.testing.assert_array_equal(np.asarray(batch), np.arange(24).reshape(8, 3))
