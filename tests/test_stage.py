"""stage helpers: the training-time sampler compiles once and always samples the current weights."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import optim, sharding, stage, train
from tests.test_chat_cli import make_tiny_base


def test_sampler_reuses_one_engine_and_follows_the_weights(tmp_path):
    model_a, tokenizer = make_tiny_base(tmp_path / "a", seed=0)
    model_b, _ = make_tiny_base(tmp_path / "b", seed=1)  # same tokenizer text: same vocab
    sampler = stage.Sampler(tokenizer, max_tokens=6)
    first = sampler(model_a)
    compiled = sampler.engine.num_compilations
    second = sampler(model_b)
    assert sampler.engine.num_compilations == compiled  # new weights, no new compilation
    assert second == stage.sample_completions(model_b, tokenizer, max_tokens=6)
    assert first == stage.sample_completions(model_a, tokenizer, max_tokens=6)
    assert first != second
    assert all(text.startswith("<|bos|>") for text in first)
    assert len(first) == len(stage.SAMPLE_PROMPTS)


@pytest.mark.parametrize("spec", ["foo", "16", "data=2,fsdp=9"])
def test_bad_mesh_is_one_error_line(spec):
    with pytest.raises(SystemExit) as e:
        stage.setup_devices(spec)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


def test_setup_devices_turns_the_compilation_cache_on_after_the_mesh(monkeypatch):
    calls = []
    monkeypatch.setattr(stage, "enable_compilation_cache", lambda: calls.append(1))
    with pytest.raises(SystemExit):
        stage.setup_devices("16")  # a bad --mesh: nothing written anywhere
    assert calls == []
    assert stage.setup_devices("1").size == 1
    assert calls == [1]


def test_sampler_survives_a_donating_train_step(tmp_path):
    """Training hands the sampler state.model(), whose arrays the next (donating) train step
    deletes: the sampler must keep working and sample the new weights."""
    model, tokenizer = make_tiny_base(tmp_path, seed=0)
    mesh = sharding.make_mesh("1")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt_cfg = optim.OptimConfig(model_dim=model.config.n_embd, matrix_lr=1.0, embedding_lr=5.0)
    state, optimizer = train.init_train_state(
        model.config,
        lambda p: optim.make_optimizer(p, opt_cfg),
        mesh,
        load=lambda params_target, _: (jax.device_put(params, _shardings(params_target)), None),
    )
    step = train.make_train_step(
        state, optimizer, accum_steps=1, micro_batch_size=2, sequence_len=8
    )
    sampler = stage.Sampler(tokenizer, max_tokens=6)
    first = sampler(state.model())
    old_params = state.params
    tokens = np.arange(2 * 9, dtype=np.int32).reshape(1, 2, 9) % model.config.vocab_size
    for _ in range(3):
        state.params, state.opt_state, _ = step(
            state.params, state.opt_state, state.rest, tokens[..., :-1], tokens[..., 1:]
        )
    assert jax.tree.leaves(old_params)[0].is_deleted()  # the step did donate them
    second = sampler(state.model())
    assert second == stage.sample_completions(state.model(), tokenizer, max_tokens=6)
    assert second != first


def _shardings(abstract):
    return jax.tree.map(lambda x: x.sharding, abstract)


class _Vocab:
    def __init__(self, size: int):
        self.size = size

    def get_vocab_size(self) -> int:
        return self.size


def test_load_source_checks_the_vocab_and_restores_the_step(tmp_path, monkeypatch):
    model, tokenizer = make_tiny_base(tmp_path)
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    source = stage.load_source("base", None, None, tokenizer)
    assert (source.tag, source.meta["step"], source.config) == ("d1", 0, model.config)
    mesh = sharding.make_mesh("1")
    state, _ = train.init_train_state(
        model.config,
        lambda p: optim.make_optimizer(p, optim.OptimConfig(model_dim=model.config.n_embd)),
        mesh,
        load=source.load,
    )
    np.testing.assert_array_equal(
        state.params["h"][0]["mlp"]["c_fc"]["kernel"], model.h[0].mlp.c_fc.kernel[...]
    )
    with pytest.raises(ValueError) as info:
        stage.load_source("base", "d1", 0, _Vocab(512))
    message = str(info.value)
    assert "has 512 tokens, but base model d1 step 0" in message
    assert f"vocab_size {tokenizer.get_vocab_size()}" in message
    assert str(tmp_path / "tokenizer") in message


@dataclasses.dataclass
class _Flags:
    device_batch_size: int = 4
    matrix_lr: float = 0.02
    init_lr_frac: float = 1.0
    temperature: float = 1.0
    dtype: str = "auto"
    remat: str = "none"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device_batch_size": 0}, "--device_batch_size must be >= 1, got 0"),
        ({"matrix_lr": -0.1}, "--matrix_lr must be a finite number >= 0, got -0.1"),
        ({"init_lr_frac": float("nan")}, "--init_lr_frac must be a finite number >= 0"),
        ({"temperature": float("inf")}, "--temperature must be a finite number >= 0"),
        ({"dtype": "fp16"}, "--dtype must be auto, float32 or bfloat16, got 'fp16'"),
        ({"remat": "bogus"}, "--remat must be one of ['dots', 'full', 'none'], got 'bogus'"),
    ],
)
def test_check_flags(change, message):
    stage.check_flags(_Flags(), positive=["device_batch_size"], non_negative=["temperature"])
    with pytest.raises(SystemExit) as info:
        stage.check_flags(
            _Flags(**change), positive=["device_batch_size"], non_negative=["temperature"]
        )
    assert str(info.value).startswith(f"error: {message}") and "\n" not in str(info.value)
