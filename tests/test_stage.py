"""stage helpers: the training-time sampler compiles once and always samples the current weights."""

from __future__ import annotations

import pytest

from nanochat_jax import stage
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
