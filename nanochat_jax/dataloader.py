"""Pretraining batches as a Grain pipeline, in nanochat's exact token order, resumable.

    (file, row group) for rank r of W: row groups r, r+W, ... of every file of the split
      -> documents (one row group, ~1024 of them)
      -> tokens: encode(docs, prepend=<|bos|>) in sub-batches of 128 docs; every document starts
         with BOS, no EOS, no padding, documents run across window boundaries
      -> one token stream per rank, cut into consecutive non-overlapping windows of B*T+1 tokens
      -> inputs = window[:-1], targets = window[1:], (B, T) int32 each (numpy; the trainer puts
         them on devices)

Reading and tokenising happen ahead of time in Grain's prefetch threads (the tokenizer releases
the GIL and runs its own threads). The iterator's `get_state()` is a small JSON-able dict (per
rank: the Grain state of the row-group stream at the first row group still in use, and how many of
its tokens were consumed); `set_state()` continues with exactly the batches that would have come.

One process can serve several of nanochat's ranks (`ranks=range(8), world_size=8`): the batch is
then the 8 ranks' (B, T) batches stacked, i.e. (8B, T), rows r*B:(r+1)*B from rank r, which is
exactly what nanochat's 8 GPUs would see.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import grain
import numpy as np
import pyarrow.parquet as pq

from nanochat_jax.dataset import get_data_dir, split_files

STATE_VERSION = 1


class TokenizerLike(Protocol):
    def encode(
        self, text: list[str], prepend: int | None = None, num_threads: int | None = None
    ) -> list[list[int]]: ...

    def get_bos_token_id(self) -> int: ...


class _ReadAndTokenize:
    """(path, row group) -> the row group's token stream: [BOS] + encode(doc) for each doc."""

    def __init__(self, tokenizer: TokenizerLike, num_threads: int, batch_size: int):
        self._tokenizer = tokenizer
        self._bos = tokenizer.get_bos_token_id()
        self._num_threads = num_threads
        self._batch_size = batch_size

    def __call__(self, entry: tuple[str, int]) -> np.ndarray:
        path, rg_index = entry
        with pq.ParquetFile(path) as parquet_file:
            docs = parquet_file.read_row_group(rg_index, columns=["text"]).column("text")
        docs = docs.to_pylist()
        token_lists: list[list[int]] = []
        for i in range(0, len(docs), self._batch_size):
            token_lists += self._tokenizer.encode(
                docs[i : i + self._batch_size], prepend=self._bos, num_threads=self._num_threads
            )
        count = sum(map(len, token_lists))
        return np.fromiter(itertools.chain.from_iterable(token_lists), np.int32, count)


class _WindowIterator(grain.DatasetIterator):
    """Cuts the concatenated token chunks of its parent into windows of `window` tokens."""

    def __init__(self, parent: grain.DatasetIterator, window: int):
        super().__init__(parent)
        self._window = window
        # chunks not yet fully consumed, each with the parent's state from just before it
        self._chunks: deque[tuple[dict[str, Any], np.ndarray]] = deque()
        self._offset = 0  # tokens of the first chunk already handed out
        self._available = 0  # tokens buffered = sum of chunk lengths - offset

    def __next__(self) -> np.ndarray:
        while self._available < self._window:
            state = self._parent.get_state()
            tokens = next(self._parent)
            self._chunks.append((state, tokens))
            self._available += len(tokens)
        window = np.empty(self._window, np.int32)
        filled = 0
        while filled < self._window:
            tokens = self._chunks[0][1]
            take = min(len(tokens) - self._offset, self._window - filled)
            window[filled : filled + take] = tokens[self._offset : self._offset + take]
            filled += take
            self._offset += take
            if self._offset == len(tokens):
                self._chunks.popleft()
                self._offset = 0
        self._available -= self._window
        return window

    def get_state(self) -> dict[str, Any]:
        parent = self._chunks[0][0] if self._chunks else self._parent.get_state()
        return {"parent": dict(parent), "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._chunks.clear()
        self._offset = state["offset"]
        self._available = -self._offset  # skipped once the first chunk arrives


class _WindowIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, window: int):
        super().__init__(parent)
        self._window = window

    def __iter__(self) -> _WindowIterator:
        return _WindowIterator(self._parent.__iter__(), self._window)


class _BatchIterator(grain.DatasetIterator):
    """Stacks one (B, T) batch from each rank's window stream."""

    def __init__(self, parents: list[grain.DatasetIterator], meta: dict[str, Any]):
        super().__init__(parents)
        self._meta = meta
        self._batch_size = meta["batch_size"]
        self._seq_len = meta["seq_len"]

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        windows = [next(parent) for parent in self._parents]
        shape = (self._batch_size, self._seq_len)
        inputs_BT = np.concatenate([w[:-1].reshape(shape) for w in windows])
        targets_BT = np.concatenate([w[1:].reshape(shape) for w in windows])
        return inputs_BT, targets_BT

    def get_state(self) -> dict[str, Any]:
        return {**self._meta, "ranks_state": [parent.get_state() for parent in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        different = {
            key: (state.get(key), value)
            for key, value in self._meta.items()
            if state.get(key) != value
        }
        if different:
            raise ValueError(
                "data-loader state was saved for another pipeline; (saved, now) per field: "
                f"{different}. Resume with the same shards, split, batch size, sequence length "
                "and ranks."
            )
        for parent, parent_state in zip(self._parents, state["ranks_state"], strict=True):
            parent.set_state(parent_state)


class _BatchIterDataset(grain.IterDataset):
    def __init__(self, parents: list[grain.IterDataset], meta: dict[str, Any]):
        super().__init__(parents)
        self._meta = meta

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator([parent.__iter__() for parent in self._parents], self._meta)


def _rank_row_groups(
    files: list[Path], num_row_groups: list[int], rank: int, world_size: int
) -> list[tuple[str, int]]:
    return [
        (str(path), rg)
        for path, count in zip(files, num_row_groups, strict=True)
        for rg in range(rank, count, world_size)
    ]


def tokenizing_data_loader(
    tokenizer: TokenizerLike,
    batch_size: int,
    seq_len: int,
    split: str,
    *,
    ranks: Sequence[int] = (0,),
    world_size: int = 1,
    data_dir: str | Path | None = None,
    num_epochs: int | None = None,
    tokenizer_threads: int = 4,
    tokenizer_batch_size: int = 128,
    read_threads: int = 2,
    prefetch_row_groups: int = 4,
) -> grain.DatasetIterator:
    """An iterator of (inputs_BT, targets_BT) int32 numpy batches, B = len(ranks) * batch_size.

    nanochat's `tokenizing_distributed_data_loader(B, T, split)` for each rank in `ranks` (of
    `world_size`), stacked. Infinite (re-epochs over the split) unless `num_epochs` is given.
    `get_state()` -> JSON-serialisable dict; `set_state(state)` resumes exactly.
    read_threads row groups are read and tokenised at once, up to prefetch_row_groups ahead.
    """
    ranks = list(ranks)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if not ranks or world_size < 1 or any(not 0 <= r < world_size for r in ranks):
        raise ValueError(f"ranks must be a non-empty list within [0, {world_size}), got {ranks}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must be distinct, got {ranks}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    if tokenizer_threads < 1 or tokenizer_batch_size < 1:
        raise ValueError("tokenizer_threads and tokenizer_batch_size must be >= 1")
    files = split_files(split, data_dir)
    num_row_groups = []
    for path in files:
        with pq.ParquetFile(path) as parquet_file:
            num_row_groups.append(parquet_file.num_row_groups)
    read_options = grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=prefetch_row_groups
    )
    tokenize = _ReadAndTokenize(tokenizer, tokenizer_threads, tokenizer_batch_size)
    streams = []
    for rank in ranks:
        entries = _rank_row_groups(files, num_row_groups, rank, world_size)
        if not entries:
            raise ValueError(
                f"rank {rank} of {world_size} gets no row groups: the {split} split of "
                f"{get_data_dir(data_dir)} has only {sum(num_row_groups)} row groups in "
                f"{len(files)} files. Use fewer ranks or more/larger shards."
            )
        chunks = grain.MapDataset.source(entries).repeat(num_epochs).map(tokenize)
        streams.append(
            _WindowIterDataset(chunks.to_iter_dataset(read_options), batch_size * seq_len + 1)
        )
    meta = {
        "version": STATE_VERSION,
        "split": split,
        "files": [path.name for path in files],
        "batch_size": batch_size,
        "seq_len": seq_len,
        "ranks": ranks,
        "world_size": world_size,
    }
    return iter(_BatchIterDataset(streams, meta))
