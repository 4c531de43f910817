"""nanochat's optimizer set-up as Optax: Muon for block matrices, AdamW for wte and lm_head.

Layout note: our kernels are (in, out), the transpose of torch's (out, in) `nn.Linear.weight`.
Muon's aspect scale and Newton-Schulz orientation are defined on torch's layout, so the Muon
transformation works on `kernel.T` to round in bf16 exactly where nanochat rounds.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nanochat_jax.sharding import key_name

# Quintic Newton-Schulz coefficients from nanochat's muon.py (tuned to push singular values
# into roughly [0.5, 1.5] fast, not to converge exactly).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)
# The Adam lrs were tuned at model_dim 768 and are scaled by (model_dim / 768) ** -0.5.
_LR_REFERENCE_DIM = 768
GROUPS = ("embedding", "unembedding", "muon")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """nanochat's `setup_optimizers` defaults plus base_train's grad clip."""

    model_dim: int
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.8, 0.95)
    adam_eps: float = 1e-10
    muon_momentum: float = 0.95  # used when no momentum schedule is given (SFT, RL)
    ns_steps: int = 5
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        if self.model_dim <= 0:
            raise ValueError(f"model_dim must be > 0, got {self.model_dim}")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two values in [0, 1), got {self.adam_betas}")
        if self.adam_eps < 0:
            raise ValueError(f"adam_eps must be >= 0, got {self.adam_eps}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {self.ns_steps}")

    @property
    def adam_lr_scale(self) -> float:
        return (self.model_dim / _LR_REFERENCE_DIM) ** -0.5

    @classmethod
    def from_flags(cls, flags: object, model_dim: int, **overrides: object) -> OptimConfig:
        """From a stage's flags (nanochat's names embedding_lr, unembedding_lr, matrix_lr,
        weight_decay), plus overrides, e.g. grad_clip=0.0 for the stages that do not clip."""
        names = ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay")
        return cls(model_dim=model_dim, **{n: getattr(flags, n) for n in names}, **overrides)


# ----------------------------------------------------------------------------- Muon


def newton_schulz(G: jax.Array, steps: int = 5) -> jax.Array:
    """nanochat's `zeropower_via_newtonschulz5` on a torch-layout (rows, cols) matrix.

    Everything runs in bf16, the Frobenius normalisation included; the result stays bf16.
    A tall matrix is transposed first so that `X @ X.T` is the small Gram matrix.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix (ndim >= 2), got shape {G.shape}")
    a, b, c = _NS_COEFFS
    X = G.astype(jnp.bfloat16)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    # torch reduces a bf16 norm with fp32 accumulation and rounds the result to bf16.
    sq_sum = jnp.sum(jnp.square(X.astype(jnp.float32)), axis=(-2, -1), keepdims=True)
    X = X / (jnp.sqrt(sq_sum).astype(jnp.bfloat16) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        # fp32 coefficients: a weak-typed Python float would be rounded to bf16 first, which
        # changes the polynomial; torch applies scalars in fp32 and rounds each result to bf16.
        B = (b * A.astype(jnp.float32) + c * (A @ A).astype(jnp.float32)).astype(jnp.bfloat16)
        X = (a * X.astype(jnp.float32) + (B @ X).astype(jnp.float32)).astype(jnp.bfloat16)
    return X.mT if tall else X


def orthogonalize_kernel(g: jax.Array, ns_steps: int = 5) -> jax.Array:
    """Muon's update direction for (..., in, out) kernels, dtype of g: aspect scale * NS5.

    torch's weight is `kernel.T` (out, in): orthogonalise that so bf16 rounds in nanochat's
    orientation, and scale by sqrt(max(1, rows/cols)) of that (out, in) shape. Leading axes
    are a batch of independent kernels (one batched matmul per NS step for all of them).
    """
    if g.ndim < 2:
        raise ValueError(f"Muon only takes kernels (ndim >= 2), got shape {g.shape}")
    d_in, d_out = g.shape[-2:]
    aspect = max(1.0, d_out / d_in) ** 0.5
    return newton_schulz(g.mT, ns_steps).mT.astype(g.dtype) * aspect


def _orthogonalize_tree(tree: optax.Updates, ns_steps: int) -> optax.Updates:
    """`orthogonalize_kernel` on every leaf, batched: one stacked NS per (shape, dtype) group.

    At depth 20 the 120 block matrices come in 4 shapes, so this runs 4 batched NS chains
    instead of 120 chains of tiny matmuls (kernel-launch bound on GPU). Same math per matrix.
    """
    leaves, treedef = jax.tree.flatten(tree)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, leaf in enumerate(leaves):
        groups[(leaf.shape, leaf.dtype)].append(i)
    out = list(leaves)
    for idx in groups.values():
        stacked = orthogonalize_kernel(jnp.stack([leaves[i] for i in idx]), ns_steps)
        for i, leaf in zip(idx, jnp.unstack(stacked), strict=True):
            out[i] = leaf
    return jax.tree.unflatten(treedef, out)


class MuonState(NamedTuple):
    momentum_buffer: optax.Updates


def scale_by_muon(
    momentum: float | jax.Array, ns_steps: int = 5, nesterov: bool = True
) -> optax.GradientTransformation:
    """Muon's direction for (in, out) kernels: momentum, Nesterov, NS5, aspect scale (no lr)."""

    def init_fn(params: optax.Params) -> MuonState:
        return MuonState(jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        # torch: buf.lerp_(g, 1 - momentum)
        buf = jax.tree.map(
            lambda g, b: b + (1 - momentum) * (g - b), updates, state.momentum_buffer
        )
        if nesterov:  # torch: g.lerp_(buf, momentum)
            updates = jax.tree.map(lambda g, b: g + momentum * (b - g), updates, buf)
        else:
            updates = buf
        return _orthogonalize_tree(updates, ns_steps), MuonState(buf)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | jax.Array = 0.95,
    ns_steps: int = 5,
    nesterov: bool = True,
) -> optax.GradientTransformation:
    """nanochat's Muon: p -= lr * sqrt(max(1, rows/cols)) * NS5(nesterov momentum of g)."""
    return optax.chain(
        scale_by_muon(momentum, ns_steps, nesterov), optax.scale_by_learning_rate(learning_rate)
    )


# ----------------------------------------------------------------------------- set-up


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch's `clip_grad_norm_`: scale by min(1, max_norm / (norm + 1e-6))."""

    def update_fn(updates, state, params=None):
        del params
        coef = jnp.minimum(max_norm / (optax.tree.norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: (g * coef).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _label(path, _leaf) -> str:
    top = key_name(path[0]) if path else None
    label = {"wte": "embedding", "lm_head": "unembedding", "h": "muon"}.get(top)
    if label is None:
        raise ValueError(
            f"parameter {jax.tree_util.keystr(path)} has no optimizer group: "
            "expected it under 'wte', 'lm_head' or 'h'"
        )
    return label


def param_labels(params) -> object:
    """'embedding' for wte, 'unembedding' for lm_head, 'muon' for everything under h.

    Works on `nnx.state(model, nnx.Param)` (labels replace each Param, a prefix of the State
    tree, which `optax.partition` accepts) and on a plain nested dict of the same paths.
    """

    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree_util.tree_map_with_path(_label, params, is_leaf=is_variable)


def make_optimizer(
    params,
    cfg: OptimConfig,
    lr_schedule: optax.Schedule | None = None,
    momentum_schedule: optax.Schedule | None = None,
) -> optax.GradientTransformation:
    """Clip, then AdamW (wte, lm_head) and Muon (blocks); `lr_schedule` multiplies every lr.

    Without schedules the lr multiplier is 1 and the Muon momentum is `cfg.muon_momentum`.
    State: (clip, partition); the lr/momentum last used by each group sit in
    `state[1].inner_states[group].inner_state.hyperparams`.
    """
    lrm = lr_schedule if lr_schedule is not None else (lambda step: 1.0)
    momentum = momentum_schedule if momentum_schedule is not None else cfg.muon_momentum
    inject = {"hyperparam_dtype": jnp.float32}

    def adamw(base_lr: float) -> optax.GradientTransformation:
        # optax's denominator sqrt(v_hat) + eps equals torch.optim.AdamW's sqrt(v)/sqrt(bc2) + eps.
        return optax.inject_hyperparams(optax.adamw, **inject)(
            learning_rate=lambda step: base_lr * lrm(step),
            b1=cfg.adam_betas[0],
            b2=cfg.adam_betas[1],
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )

    transforms = {
        "embedding": adamw(cfg.embedding_lr * cfg.adam_lr_scale),
        "unembedding": adamw(cfg.unembedding_lr * cfg.adam_lr_scale),
        "muon": optax.inject_hyperparams(muon, static_args=("ns_steps",), **inject)(
            learning_rate=lambda step: cfg.matrix_lr * lrm(step),
            momentum=momentum,
            ns_steps=cfg.ns_steps,
        ),
    }
    # identity keeps the state layout (clip, partition) the same with and without clipping.
    clip = clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, optax.partition(transforms, param_labels(params)))


# ----------------------------------------------------------------------------- schedules


def lr_multiplier_schedule(
    num_iterations: int,
    warmup_ratio: float = 0.0,
    warmdown_ratio: float = 0.2,
    final_lr_frac: float = 0.0,
) -> optax.Schedule:
    """base_train's `get_lr_multiplier`: linear warmup, flat, linear warmdown to final_lr_frac."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    for name, value in (("warmup_ratio", warmup_ratio), ("warmdown_ratio", warmdown_ratio)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if warmup_ratio + warmdown_ratio > 1:
        raise ValueError(
            f"warmup_ratio + warmdown_ratio must be <= 1, got {warmup_ratio} + {warmdown_ratio}"
        )
    if not 0 <= final_lr_frac <= 1:
        raise ValueError(f"final_lr_frac must be in [0, 1], got {final_lr_frac}")
    # Python's round (banker's rounding), as nanochat computes these on the host.
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)

    def schedule(step):
        it = jnp.asarray(step)
        warmup = (it + 1) / max(warmup_iters, 1)
        progress = (num_iterations - it) / max(warmdown_iters, 1)
        warmdown = progress * 1.0 + (1 - progress) * final_lr_frac
        flat_or_down = jnp.where(it <= num_iterations - warmdown_iters, 1.0, warmdown)
        return jnp.where(it < warmup_iters, warmup, flat_or_down)

    return schedule


def muon_momentum_schedule(
    warmup_steps: int = 300, start: float = 0.85, end: float = 0.95
) -> optax.Schedule:
    """base_train's `get_muon_momentum`: linear from `start` to `end` over `warmup_steps`."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not (0 <= start < 1 and 0 <= end < 1):
        raise ValueError(f"momentum start/end must be in [0, 1), got {start}, {end}")

    def schedule(step):
        if warmup_steps == 0:
            return jnp.asarray(end)
        frac = jnp.minimum(jnp.asarray(step) / warmup_steps, 1)
        return (1 - frac) * start + frac * end

    return schedule


def linear_decay_schedule(num_iterations: int, init_frac: float = 1.0) -> optax.Schedule:
    """SFT/RL lr multiplier: init_frac * (1 - step / num_iterations)."""
    if num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
    return lambda step: init_frac * (1 - jnp.asarray(step) / num_iterations)


def progress_lr_multiplier(progress: np.ndarray | float) -> np.ndarray:
    """mid_train's lr multiplier from data progress in [0, 1]: 1 until 0.8, then linear to 0.

    Progress is a property of the data, not of the step count an optax schedule sees, so it is
    computed on the host (numpy, float64) for every step before training; mid_train hands that
    table to the optimizer as a schedule indexed by step.
    """
    progress = np.asarray(progress, dtype=np.float64)
    return np.where(progress < 0.8, 1.0, 1 - (progress - 0.8) / 0.2)
