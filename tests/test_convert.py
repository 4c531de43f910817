from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from nanochat_jax.checkpoint import read_meta
from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import from_nanochat_state_dict, to_nanochat_state_dict
from scripts import convert_nanochat

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "gpt_tiny_forward": GPTConfig(64, 512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128),
    "gpt_tiny2_forward": GPTConfig(64, 512, n_layer=3, n_head=2, n_kv_head=2, n_embd=128),
}


def _golden_params(name: str) -> dict[str, np.ndarray]:
    golden = np.load(GOLDEN / f"{name}.npz")
    return {k.removeprefix("param/"): golden[k] for k in golden.files if k.startswith("param/")}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_exact(name):
    state = _golden_params(name)
    model = from_nanochat_state_dict(state, CASES[name])
    back = to_nanochat_state_dict(model)
    assert list(back) == list(state)  # nanochat's names, in nanochat's order
    for key, value in state.items():
        assert back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key].astype(np.float32), value, err_msg=key)
    assert back["transformer.wte.weight"].dtype == ml_dtypes.bfloat16  # as nanochat saves it
    assert back["lm_head.weight"].dtype == np.float32
    # torch (out, in) -> our (in, out) kernel
    np.testing.assert_array_equal(
        model.h[1].attn.c_k.kernel[...], state["transformer.h.1.attn.c_k.weight"].T
    )


def test_compiled_prefix_is_stripped():
    state = _golden_params("gpt_tiny_forward")
    prefixed = {f"_orig_mod.{k}": v for k, v in state.items()}
    model = from_nanochat_state_dict(prefixed, CASES["gpt_tiny_forward"])
    np.testing.assert_array_equal(model.lm_head.kernel[...], state["lm_head.weight"].T)


def test_bf16_wte_input_is_accepted():
    state = _golden_params("gpt_tiny_forward")
    wte = state["transformer.wte.weight"]
    state["transformer.wte.weight"] = wte.astype(ml_dtypes.bfloat16)  # lossless: bf16 values
    model = from_nanochat_state_dict(state, CASES["gpt_tiny_forward"])
    assert model.wte.embedding[...].dtype == np.float32
    np.testing.assert_array_equal(model.wte.embedding[...], wte)


def test_missing_and_unexpected_keys_are_named():
    state = _golden_params("gpt_tiny_forward")
    del state["transformer.h.1.mlp.c_fc.weight"]
    state["transformer.h.2.attn.c_q.weight"] = np.zeros((128, 128), np.float32)
    with pytest.raises(ValueError) as info:
        from_nanochat_state_dict(state, CASES["gpt_tiny_forward"])
    assert "missing keys ['transformer.h.1.mlp.c_fc.weight']" in str(info.value)
    assert "unexpected keys ['transformer.h.2.attn.c_q.weight']" in str(info.value)


def test_shape_mismatch_is_named():
    state = _golden_params("gpt_tiny_forward")
    state["transformer.h.0.attn.c_k.weight"] = np.zeros((128, 128), np.float32)
    with pytest.raises(ValueError, match=r"c_k.weight: shape \(128, 128\) .* \(64, 128\)"):
        from_nanochat_state_dict(state, CASES["gpt_tiny_forward"])


def _write_nanochat_checkpoint(torch, directory: Path, step: int) -> tuple[dict, dict]:
    """model_XXXXXX.pt + meta_XXXXXX.json as nanochat's base_train writes them."""
    config = CASES["gpt_tiny_forward"]
    tensors = {k: torch.from_numpy(v) for k, v in _golden_params("gpt_tiny_forward").items()}
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"].to(torch.bfloat16)
    meta = {
        "step": step,
        "val_bpb": 1.25,
        "model_config": config.to_dict(),
        "user_config": {"depth": 2, "run": "dummy"},
        "device_batch_size": 2,
        "max_seq_len": 64,
    }
    directory.mkdir(parents=True)
    torch.save(tensors, directory / f"model_{step:06d}.pt")
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    return tensors, meta


def test_script_round_trip_through_pt_files(tmp_path):
    torch = pytest.importorskip(
        "torch", reason="PyTorch not installed (uv sync --extra torch): .pt round trip not run"
    )
    tensors, meta = _write_nanochat_checkpoint(torch, tmp_path / "nanochat", step=7)
    ours = tmp_path / "ours" / "d2"
    convert_nanochat.main(
        ["--from", str(tmp_path / "nanochat" / "model_000007.pt"), "--to", str(ours)]
    )
    assert read_meta(ours)["model_config"] == meta["model_config"]
    with pytest.raises(SystemExit, match="already has steps"):
        convert_nanochat.main(
            ["--from", str(tmp_path / "nanochat" / "model_000007.pt"), "--to", str(ours)]
        )

    convert_nanochat.main(["--reverse", "--from", str(ours), "--to", str(tmp_path / "back")])
    back = torch.load(tmp_path / "back" / "model_000007.pt", map_location="cpu", weights_only=True)
    assert list(back) == list(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "back" / "meta_000007.json").read_text()) == meta

    # a damaged latest step is skipped (with a warning), like every other reader of checkpoints
    _write_nanochat_checkpoint(torch, tmp_path / "nanochat9", step=9)
    convert_nanochat.main(
        ["--from", str(tmp_path / "nanochat9" / "model_000009.pt"), "--to", str(ours)]
    )
    for path in (ours / "000009" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    convert_nanochat.main(["--reverse", "--from", str(ours), "--to", str(tmp_path / "back9")])
    assert sorted(p.name for p in (tmp_path / "back9").iterdir()) == [
        "meta_000007.json",
        "model_000007.pt",
    ]


def test_script_without_torch_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    (tmp_path / "model_000001.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="uv sync --extra torch"):
        convert_nanochat.main(["--from", str(tmp_path / "model_000001.pt"), "--to", str(tmp_path)])
