"""What the stage scripts share: command-line plumbing, device set-up, model loading, samples."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nanochat_jax import checkpoint, sharding
from nanochat_jax.common import enable_compilation_cache, get_base_dir, get_logger
from nanochat_jax.config import GPTConfig
from nanochat_jax.model import GPT, REMAT_POLICIES

log = get_logger(__name__)

# the optimizer flags every training stage shares (nanochat's names)
_OPTIM_FLAGS = ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "init_lr_frac")

# base_train / base_loss greedy-sample these every sample_every steps (nanochat's 7 prompts).
SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)


def setup_devices(mesh_spec: str) -> jax.sharding.Mesh:
    """Multi-host start-up, GPU performance flags, the mesh, then the persistent compilation
    cache (common.enable_compilation_cache: <base dir>/jax_cache). Call before any JAX work."""
    sharding.maybe_initialize_distributed()
    if os.environ.get("JAX_PLATFORMS", "") != "cpu":
        from nanochat_jax.train import configure_gpu_performance

        configure_gpu_performance()
    try:
        mesh = sharding.make_mesh(mesh_spec)
    except ValueError as e:  # a bad --mesh: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
    enable_compilation_cache()  # after the mesh check: a bad --mesh leaves nothing on disk
    log.info("mesh %s on %d %s device(s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)
    return mesh


def compute_dtype(name: str):
    """'auto' = bf16 on GPU/TPU, fp32 on CPU (exact parity tests, and CPUs are slow at bf16)."""
    if name == "auto":
        return jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return jnp.dtype(name)


def add_dataclass_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One --flag per dataclass field, with nanochat's names and defaults.

    Bools take --flag=1/0 like nanochat's configurator, and a bare --flag means 1.
    """
    for field in dataclasses.fields(config_cls):
        default = field.default
        kind = type(default)
        if kind is bool:
            parser.add_argument(
                f"--{field.name}",
                type=lambda v: bool(int(v)),
                nargs="?",
                const=True,
                default=default,
            )
        else:
            parser.add_argument(f"--{field.name}", type=kind, default=default)


def parse_config(config_cls: type, argv: list[str] | None, description: str):
    parser = argparse.ArgumentParser(description=description)
    add_dataclass_flags(parser, config_cls)
    return config_cls(**vars(parser.parse_args(argv)))


def data_loader(tokenizer, mesh: jax.sharding.Mesh, batch_size: int, seq_len: int, split: str):
    """nanochat's loader for this process's ranks: one rank per data-parallel slot of the mesh,
    so its (local rows, T) batches are exactly what nanochat's GPUs would see."""
    from nanochat_jax.dataloader import tokenizing_data_loader  # grain: only where data is read

    dp = sharding.data_parallel_size(mesh)
    ranks = local_ranks(dp, mesh)
    return tokenizing_data_loader(tokenizer, batch_size, seq_len, split, ranks=ranks, world_size=dp)


def sharded_batches(batches, mesh: jax.sharding.Mesh):
    """(inputs, targets) host batches -> the same, as global arrays split over the mesh."""
    return (tuple(sharding.shard_batch(a, mesh) for a in batch) for batch in batches)


def load_model(
    phase: str,
    *,
    model_tag: str | None = None,
    step: int | None = None,
    compute_dtype=jnp.float32,
    base_dir: str | Path | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[GPT, dict[str, Any]]:
    """The GPT a stage (base|mid|sft|rl) saved, latest step unless `step`: (model, meta).

    With a mesh, the parameters are restored straight into their shardings on it (so batches
    sharded over the mesh can meet them); without, onto the first device.
    """
    tag = model_tag or checkpoint.find_model_tag(phase, base_dir)
    directory = checkpoint.checkpoint_dir(phase, tag, base_dir)
    model, meta = load_model_dir(directory, step=step, compute_dtype=compute_dtype, mesh=mesh)
    log.info("loaded %s model %s step %d", phase, tag, meta["step"])
    return model, meta


def load_model_dir(
    directory: str | Path,
    *,
    step: int | None = None,
    compute_dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[GPT, dict[str, Any]]:
    """load_model for a checkpoint directory: the latest step that reads back intact (or `step`)."""

    def target(meta: dict) -> Any:
        config = GPTConfig.from_dict(meta["model_config"])
        abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
        params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
        return params if mesh is None else sharding.abstract_on_mesh(params, mesh)

    restored = checkpoint.load_params(directory, target, step=step)
    config = GPTConfig.from_dict(restored.meta["model_config"])
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0), compute_dtype=compute_dtype))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(params, restored.params)
    return nnx.merge(graphdef, params, rest), {**restored.meta, "step": restored.step}


class Sampler:
    """Greedy continuations of SAMPLE_PROMPTS (each prefixed with <|bos|>), as nanochat prints
    them during training. One Engine serves every call: the model's current weights are swapped
    in, so its prefill/decode compile once per run, not once per sample step.

    The engine holds copies of the weights (set_params copies), never the model's own arrays: a
    donating train step deletes those after the call.
    """

    def __init__(self, tokenizer, max_tokens: int = 16):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.engine = None

    def __call__(self, model: GPT) -> list[str]:
        from nanochat_jax.engine import Engine

        if self.engine is None:
            self.engine = Engine(model, self.tokenizer)
        self.engine.set_params(model)
        bos = self.tokenizer.get_bos_token_id()
        texts = []
        for prompt in SAMPLE_PROMPTS:
            tokens = self.tokenizer.encode(prompt, prepend=bos)
            results, _ = self.engine.generate_batch(
                tokens, num_samples=1, max_tokens=self.max_tokens, temperature=0
            )
            texts.append(self.tokenizer.decode(results[0]))
        return texts


def sample_completions(model: GPT, tokenizer, max_tokens: int = 16) -> list[str]:
    """One-off Sampler call (base_loss samples once)."""
    return Sampler(tokenizer, max_tokens)(model)


def source_checkpoint(
    phase: str, model_tag: str | None = None, step: int | None = None
) -> tuple[str, Path, dict[str, Any]]:
    """(tag, directory, meta) of the checkpoint a stage starts from: the largest dN of `phase`
    unless `model_tag`, its latest readable step unless `step`. Restore that exact step with
    `checkpoint.load_params(directory, ..., step=meta["step"])`."""
    tag = model_tag or checkpoint.find_model_tag(phase)
    directory = checkpoint.checkpoint_dir(phase, tag)
    return tag, directory, checkpoint.read_meta(directory, step)


def local_ranks(world_size: int, mesh: jax.sharding.Mesh) -> range:
    """The nanochat DDP ranks (of `world_size`) whose rows this process feeds.

    Rows are laid out rank after rank and split evenly over the mesh's data-parallel devices,
    so world_size must be a multiple of their number (each device then holds world_size/dp
    ranks' rows: a smaller machine can replay a bigger one's data order exactly).
    """
    dp = sharding.data_parallel_size(mesh)
    if world_size < 1 or world_size % dp:
        raise ValueError(
            f"world_size {world_size} must be a positive multiple of the mesh's {dp} "
            "data-parallel devices"
        )
    local = world_size // jax.process_count()
    return range(jax.process_index() * local, (jax.process_index() + 1) * local)


@dataclasses.dataclass(frozen=True)
class SourceModel:
    """The checkpoint a stage starts from (see load_source)."""

    tag: str
    directory: Path
    config: GPTConfig
    meta: dict[str, Any]  # meta["step"] is the step read

    def load(self, params_target: Any, opt_target: Any) -> tuple[Any, None]:
        """`train.init_train_state`'s load: this exact step's parameters in the target
        shardings, and a fresh optimizer."""
        del opt_target
        restored = checkpoint.load_params(
            self.directory, lambda meta: params_target, step=self.meta["step"]
        )
        return restored.params, None


def load_source(phase: str, model_tag: str | None, step: int | None, tokenizer: Any) -> SourceModel:
    """source_checkpoint, checked against the tokenizer the stage renders its data with.

    A model trained with another tokenizer would see ids past its embedding table (NaN losses)
    or the wrong tokens: ValueError naming both vocab sizes, instead of a failure later on.
    """
    tag, directory, meta = source_checkpoint(phase, model_tag, step)
    config = GPTConfig.from_dict(meta["model_config"])
    vocab = tokenizer.get_vocab_size()
    if config.vocab_size != vocab:
        raise ValueError(
            f"the tokenizer in {get_base_dir() / 'tokenizer'} has {vocab} tokens, but {phase} "
            f"model {tag} step {meta['step']} in {directory} has vocab_size {config.vocab_size}: "
            "they come from different runs (retrain the tokenizer or the model)"
        )
    return SourceModel(tag, Path(directory), config, meta)


def check_flags(
    cfg: Any, *, positive: Sequence[str] = (), non_negative: Sequence[str] = ()
) -> None:
    """A stage's flags, before any work: exit with one `error:` line for the first bad one.

    `positive` name numeric flags that must be >= 1, `non_negative` ones that must be finite and
    >= 0. Where the flags have them, the lrs, weight_decay and init_lr_frac must be finite and
    >= 0, and `dtype` and `remat` must name a known choice.
    """
    for name in positive:
        if getattr(cfg, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {getattr(cfg, name)}")
    for name in (*(n for n in _OPTIM_FLAGS if hasattr(cfg, n)), *non_negative):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise SystemExit(f"error: --{name} must be a finite number >= 0, got {value}")
    dtype = getattr(cfg, "dtype", "auto")
    if dtype not in ("auto", "float32", "bfloat16"):
        raise SystemExit(f"error: --dtype must be auto, float32 or bfloat16, got {dtype!r}")
    remat = getattr(cfg, "remat", "none")
    if remat not in REMAT_POLICIES:
        raise SystemExit(f"error: --remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
