"""Conversation data for midtraining and SFT (nanochat's mid_data_generator, sft_data_generator).

Both keep nanochat's DDP layout: rank r of W reads conversations r, r+W, r+2W, ... of a task
mixture (any object with `len()` and `[i]` -> conversation dict), wrapping around at the end. One
process may play several ranks; their rows are stacked rank after rank, so a global batch is
exactly what nanochat's W GPUs would hold side by side.

Midtraining trains on every token of the rendered conversations (the mask is ignored), cut into
non-overlapping windows of B*T+1 tokens like pretraining, for one epoch. Its lr depends on how far
through the data the run is, which an ahead-of-time compiled step cannot see; so the train mixture
is rendered once up front (`render_all`: ~9M tokens/s and ~30 us per conversation on one CPU
core, so about a minute for nanochat's ~570K-row mixture), which fixes the number of steps and
the lr of every step before training starts (`MidTrainData`). SFT keeps conversations
apart: one row each, padded per micro-batch (`collate_sft`), only assistant tokens supervised.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from nanochat_jax import optim
from nanochat_jax.common import get_logger

log = get_logger(__name__)

MAX_TOKENS = 2048  # render_conversation's truncation in nanochat's mid and SFT scripts


class Conversations(Protocol):
    """What the pipelines need of a task or mixture."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def _check_world(num_rows: int, world_size: int, ranks: Sequence[int], what: str) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if any(not 0 <= r < world_size for r in ranks):
        raise ValueError(f"ranks {list(ranks)} must lie in [0, {world_size})")
    # nanochat's rank r would read row r first; a rank past the end has nothing to read
    if num_rows < world_size:
        raise ValueError(
            f"the {what} has {num_rows} conversations, fewer than the {world_size} ranks reading "
            "it; use more data or fewer ranks"
        )


def rank_cursor(
    num_rows: int, rank: int, world_size: int, *, restart_each_epoch: bool = False
) -> Iterator[int]:
    """The row indices nanochat's rank `rank` of `world_size` reads, forever.

    Its cursor starts at rank and advances by world_size. Past the end, midtraining's cursor
    wraps by subtracting num_rows (so it reads (rank + j*W) mod N: each epoch starts elsewhere),
    while SFT's and RL's loops restart at rank (`restart_each_epoch`: range(rank, N, W) again).
    """
    if not 0 <= rank < world_size or rank >= num_rows:
        raise ValueError(f"rank {rank} of {world_size} has no rows among {num_rows}")
    if restart_each_epoch:
        return itertools.cycle(range(rank, num_rows, world_size))
    if world_size > num_rows:  # the cursor would wrap past the end again
        raise ValueError(f"{world_size} ranks wrap a cursor over only {num_rows} rows")

    def cursor() -> Iterator[int]:
        index = rank
        while True:
            yield index
            index += world_size
            if index >= num_rows:
                index -= num_rows

    return cursor()


def _cursor_rows(num_rows: int, rank: int, world_size: int, count: int) -> np.ndarray:
    """The first `count` rows of rank `rank`'s midtraining cursor, as an array."""
    cursor = rank_cursor(num_rows, rank, world_size)
    return np.fromiter(itertools.islice(cursor, count), np.int64, count)


# ----------------------------------------------------------------------------- midtraining


@dataclasses.dataclass(frozen=True)
class Rendered:
    """Every conversation's ids, concatenated in dataset order: row i is
    tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray
    offsets: np.ndarray  # (N + 1,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def render_all(
    tokenizer, dataset: Conversations, max_tokens: int = MAX_TOKENS, log_every_s: float = 10.0
) -> Rendered:
    """render_conversation(row)[0] of every row (ids only; the mask is not needed mid-training)."""
    num_rows = len(dataset)
    dtype = np.min_scalar_type(tokenizer.get_vocab_size() - 1)  # uint16 for nanochat's 65536
    chunks, lengths = [], np.zeros(num_rows, dtype=np.int64)
    t0 = t_log = time.perf_counter()
    chunk: list[int] = []
    for i in range(num_rows):
        ids, _ = tokenizer.render_conversation(dataset[i], max_tokens=max_tokens)
        chunk.extend(ids)
        lengths[i] = len(ids)
        if len(chunk) >= 1 << 20 or i == num_rows - 1:
            chunks.append(np.asarray(chunk, dtype=dtype))
            chunk = []
        if time.perf_counter() - t_log > log_every_s:
            t_log = time.perf_counter()
            log.info("rendered %d/%d conversations (%.0fs)", i + 1, num_rows, t_log - t0)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return Rendered(tokens, offsets)


class MidTrainData:
    """nanochat's mid_data_generator("train") for `ranks`, computed ahead from the rendered data.

    Each rank cuts its own token stream (its rows, in cursor order) into windows of B*T+1 tokens;
    micro-batch k is window k of every rank. A rank's cursor wraps while it fills the window that
    reads its last row of the epoch, which sets nanochat's last_step: after the optimizer step
    that fetched that window (as its next-batch prefetch), the run stops. So with A micro-batches
    per step the run has ceil(k* / A) steps, k* the first window during which any rank wraps; the
    windows of that last step may run into the next epoch, as nanochat's do.

    The lr multiplier of step s uses rank 0's `approx_progress` = cursor / N after its prefetch of
    window (s+1)*A, kept monotone (nanochat: each rank used its own; the difference is tiny).
    `max_steps` > 0 caps the run (nanochat's later num_iterations); the progress of step s is
    then (s + 1) / max_steps when that is larger.
    """

    def __init__(
        self,
        rendered: Rendered,
        *,
        batch_size: int,
        seq_len: int,
        world_size: int,
        ranks: Sequence[int],
        accum_steps: int,
        max_steps: int = -1,
    ):
        num_rows = len(rendered)
        _check_world(num_rows, world_size, ranks, "train mixture")
        if min(batch_size, seq_len, accum_steps) < 1:
            raise ValueError(
                f"batch_size, seq_len and accum_steps must be >= 1, got {batch_size}, {seq_len}, "
                f"{accum_steps}"
            )
        self.batch_size, self.seq_len = batch_size, seq_len
        self.window = batch_size * seq_len + 1
        self.ranks = list(ranks)
        self._rendered = rendered
        self._num_rows, self._world = num_rows, world_size
        lengths = rendered.lengths

        # The window during which rank r reads its last row of the epoch: the first k with
        # (k+1)*window > tokens of its other rows (the fill loop stops once it has enough).
        wrap_window = []
        for rank in range(world_size):
            rows = _cursor_rows(
                num_rows, rank, world_size, math.ceil((num_rows - rank) / world_size)
            )
            wrap_window.append(int(lengths[rows[:-1]].sum()) // self.window)
        first_wrap = min(wrap_window)
        if first_wrap == 0:
            raise ValueError(
                f"the train mixture is too small: a rank's share ({int(lengths.sum())} tokens "
                f"over {world_size} ranks) does not fill one window of batch_size*max_seq_len+1 "
                f"= {self.window} tokens"
            )
        self.epoch_steps = math.ceil(first_wrap / accum_steps)
        self.num_steps = min(self.epoch_steps, max_steps) if max_steps > 0 else self.epoch_steps
        self.accum_steps = accum_steps
        num_windows = self.num_steps * accum_steps + 1  # +1: the last step's prefetch

        self._streams = {}  # rank -> (row order, cumulative lengths) covering num_windows
        for rank in sorted({0, *self.ranks}):
            count = math.ceil(num_rows / world_size) + 1
            while True:
                rows = _cursor_rows(num_rows, rank, world_size, count)
                cum = np.concatenate([[0], np.cumsum(lengths[rows])])
                if cum[-1] >= num_windows * self.window:
                    break
                count *= 2
            self._streams[rank] = (rows, cum)

        # rank 0's cursor after filling window k: rows read = first m with cum[m] >= (k+1)*window
        rows0, cum0 = self._streams[0]
        ends = (np.arange(num_windows) + 1) * self.window
        rows_read = np.searchsorted(cum0, ends, side="left")
        approx = ((rows_read * world_size) % num_rows) / num_rows
        monotone = np.maximum.accumulate(approx)
        steps = np.arange(self.num_steps)
        self.progress = monotone[(steps + 1) * accum_steps]
        if max_steps > 0:
            self.progress = np.maximum(self.progress, (steps + 1) / max_steps)

    def lr_multipliers(self) -> np.ndarray:
        """nanochat's get_lr_multiplier(progress) of every step (optim.progress_lr_multiplier)."""
        return optim.progress_lr_multiplier(self.progress)

    def micro_batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (len(ranks) * B, T) int32: window k of each local rank."""
        positions = k * self.window + np.arange(self.window)
        windows = []
        for rank in self.ranks:
            rows, cum = self._streams[rank]
            if positions[-1] >= cum[-1]:
                raise IndexError(f"window {k} is past the {self.num_steps} steps of this run")
            j = np.searchsorted(cum, positions, side="right") - 1
            windows.append(
                self._rendered.tokens[self._rendered.offsets[rows[j]] + positions - cum[j]]
            )
        return _inputs_targets(np.stack(windows), self.batch_size, self.seq_len)


def _inputs_targets(windows_RN: np.ndarray, batch_size: int, seq_len: int):
    """Windows of B*T+1 tokens -> inputs = w[:-1], targets = w[1:], each (R*B, T) int32."""
    num = len(windows_RN) * batch_size
    inputs = windows_RN[:, :-1].astype(np.int32).reshape(num, seq_len)
    targets = windows_RN[:, 1:].astype(np.int32).reshape(num, seq_len)
    return inputs, targets


def mid_val_batches(
    tokenizer,
    dataset: Conversations,
    *,
    batch_size: int,
    seq_len: int,
    world_size: int,
    ranks: Sequence[int],
    max_tokens: int = MAX_TOKENS,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """nanochat's mid_data_generator("val") for `ranks`, rendered lazily: (R*B, T) int32 pairs."""
    _check_world(len(dataset), world_size, ranks, "val mixture")  # now, not at the first next()
    window = batch_size * seq_len + 1

    def windows(rank: int) -> Iterator[np.ndarray]:
        buffer: list[int] = []
        for i in rank_cursor(len(dataset), rank, world_size):
            buffer.extend(tokenizer.render_conversation(dataset[i], max_tokens=max_tokens)[0])
            while len(buffer) >= window:
                yield np.asarray(buffer[:window], dtype=np.int64)
                del buffer[:window]

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        streams = [windows(r) for r in ranks]
        while True:
            yield _inputs_targets(np.stack([next(s) for s in streams]), batch_size, seq_len)

    return batches()


# ----------------------------------------------------------------------------- SFT


def sft_micro_batches(
    tokenizer,
    dataset: Conversations,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    max_tokens: int = MAX_TOKENS,
) -> Iterator[list[tuple[list[int], list[int]]]]:
    """nanochat's sft_data_generator for one rank, before collation: lists of `batch_size`
    (ids, mask) pairs of rows rank, rank+W, ..., epoch after epoch (a partial batch at the end
    of an epoch is completed from the next one)."""
    _check_world(len(dataset), world_size, [rank], "dataset")  # now, not at the first next()

    def batches() -> Iterator[list[tuple[list[int], list[int]]]]:
        batch = []
        for i in rank_cursor(len(dataset), rank, world_size, restart_each_epoch=True):
            batch.append(tokenizer.render_conversation(dataset[i], max_tokens=max_tokens))
            if len(batch) == batch_size:
                yield batch
                batch = []

    return batches()


def collate_sft(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, ncols: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """nanochat's collate_and_yield: (inputs, targets), each (len(rows), ncols) int32.

    ncols defaults to the longest row's length - 1; a larger ncols (a length bucket) only adds
    padding, which no loss sees. Row i: inputs[:n-1] = ids[:-1], the rest <|assistant_end|>
    (pad_id); targets[:n-1] = ids[1:] where mask[1:] is 1, else -1 (ignored), the rest -1.
    """
    longest = max((len(ids) for ids, _ in rows), default=1) - 1
    ncols = longest if ncols is None else ncols
    if ncols < longest:
        raise ValueError(f"ncols={ncols} is shorter than the longest row ({longest} columns)")
    inputs = np.full((len(rows), ncols), pad_id, dtype=np.int32)
    targets = np.full((len(rows), ncols), -1, dtype=np.int32)
    for i, (ids, mask) in enumerate(rows):
        if len(ids) != len(mask):
            raise ValueError(f"row {i}: {len(ids)} ids but {len(mask)} mask values")
        ids_arr, mask_arr = np.asarray(ids, dtype=np.int32), np.asarray(mask)
        n = len(ids_arr)
        inputs[i, : n - 1] = ids_arr[:-1]
        targets[i, : n - 1] = np.where(mask_arr[1:] == 1, ids_arr[1:], -1)
    return inputs, targets


def length_buckets(max_len: int, min_len: int = 64) -> list[int]:
    """Padded lengths a compiled SFT step exists for: powers of two from min_len, capped by
    max_len (at most half of every row is padding, and few shapes get compiled)."""
    if max_len < 1 or min_len < 1:
        raise ValueError(f"max_len and min_len must be >= 1, got {max_len}, {min_len}")
    buckets, length = [], min_len
    while length < max_len:
        buckets.append(length)
        length *= 2
    return [*buckets, max_len]


def bucket_for(ncols: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ncols columns."""
    for length in buckets:
        if length >= ncols:
            return length
    raise ValueError(f"{ncols} columns exceed the largest length bucket {buckets[-1]}")
