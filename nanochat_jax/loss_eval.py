"""Bits per byte: the tokenizer-independent loss nanochat reports (spec 8.1).

Per-token losses in nats are summed over targets that stand for real text (token_bytes > 0; the
BOS and other special tokens count 0 bytes, ignored targets (-1) count nothing) and divided by
ln(2) times the number of UTF-8 bytes those targets encode.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.model import GPT


@nnx.jit
def _nats_and_bytes(model: GPT, inputs_BT, targets_BT, token_bytes_V):
    loss_BT = model(inputs_BT, targets_BT, loss_reduction="none")
    bytes_BT = jnp.where(targets_BT >= 0, token_bytes_V[jnp.maximum(targets_BT, 0)], 0)
    counted_BT = bytes_BT > 0
    return jnp.sum(jnp.where(counted_BT, loss_BT, 0.0)), jnp.sum(bytes_BT)


def evaluate_bpb(
    model: GPT, batches: Iterable[tuple], steps: int, token_bytes: np.ndarray | jax.Array
) -> float:
    """bpb over the first `steps` (inputs, targets) batches; inf when no byte was counted.

    Batches may be numpy or (sharded) device arrays; the sums are global either way.
    """
    token_bytes_V = jnp.asarray(token_bytes, dtype=jnp.int32)
    total_nats, total_bytes = 0.0, 0
    batch_iter = iter(batches)
    for _ in range(steps):
        inputs_BT, targets_BT = next(batch_iter)
        nats, num_bytes = _nats_and_bytes(model, inputs_BT, targets_BT, token_bytes_V)
        total_nats += float(nats)
        total_bytes += int(num_bytes)
    if total_bytes == 0:
        return float("inf")
    return total_nats / (math.log(2) * total_bytes)


def unigram_bpb(
    train_batches: Iterable[tuple],
    val_batches: Iterable[tuple],
    steps: int,
    token_bytes: np.ndarray,
) -> float:
    """The bpb of the best context-free model: token frequencies counted on `steps` train
    batches (add-one smoothed), scored on `steps` val batches with evaluate_bpb's byte rules.

    A trained model that has learnt anything beyond word frequencies must beat it.
    """
    token_bytes = np.asarray(token_bytes)
    counts = np.ones(len(token_bytes), dtype=np.float64)
    train_iter, val_iter = iter(train_batches), iter(val_batches)
    for _ in range(steps):
        _, targets = next(train_iter)
        targets = np.asarray(targets).ravel()
        np.add.at(counts, targets[targets >= 0], 1)
    log2_probs = np.log2(counts / counts.sum())
    total_bits, total_bytes = 0.0, 0
    for _ in range(steps):
        _, targets = next(val_iter)
        targets = np.asarray(targets).ravel()
        targets = targets[targets >= 0]
        num_bytes = token_bytes[targets]
        total_bits -= log2_probs[targets][num_bytes > 0].sum()
        total_bytes += int(num_bytes.sum())
    return total_bits / total_bytes if total_bytes else float("inf")
