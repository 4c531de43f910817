"""The Grain pipeline yields nanochat's exact token stream, strides ranks, resumes exactly."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax import dataset
from nanochat_jax.dataloader import tokenizing_data_loader

B, T = 2, 16


class ByteTokenizer:
    """Stand-in for the BPE tokenizer: UTF-8 bytes are the ids, BOS is 256."""

    def get_bos_token_id(self) -> int:
        return 256

    def encode(self, text, prepend=None, append=None, num_threads=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = list(text.encode("utf-8"))
        return ([prepend] if prepend is not None else []) + ids + ([append] if append else [])


@pytest.fixture
def data_dir(tmp_path):
    """3 shards of 5 row groups of 4 documents (the last row group has 3)."""
    rng = random.Random(0)
    for f in range(3):
        docs = [
            f"f{f}d{d} " + "".join(rng.choice("abcdéfg ") for _ in range(rng.randrange(5, 60)))
            for d in range(19)
        ]
        pq.write_table(
            pa.table({"text": docs}), tmp_path / f"shard_{f:05d}.parquet", row_group_size=4
        )
    return tmp_path


def _reference_windows(data_dir, split, rank, world_size, count, window=B * T + 1):
    """nanochat's loop, written plainly: every epoch, every row group of the rank, sub-batches
    of 128 docs, [BOS] + tokens per doc, concatenated, cut into windows."""
    tok = ByteTokenizer()

    def stream():
        while True:
            for docs in dataset.parquets_iter_batched(split, rank, world_size, data_dir):
                for i in range(0, len(docs), 128):
                    for ids in tok.encode(docs[i : i + 128], prepend=256):
                        yield from ids

    tokens = stream()
    return [np.fromiter(itertools.islice(tokens, window), np.int32, window) for _ in range(count)]


def _take(loader, count):
    return [next(loader) for _ in range(count)]


def _loader(data_dir, split="train", **kwargs):
    kwargs = {"read_threads": 2, "prefetch_row_groups": 3, **kwargs}
    return tokenizing_data_loader(ByteTokenizer(), B, T, split, data_dir=data_dir, **kwargs)


def test_token_stream_is_nanochats(data_dir):
    # ~2 files * 19 docs * ~40 tokens = ~1500 tokens/epoch: 150 windows of 33 span 3+ epochs
    batches = _take(_loader(data_dir), 150)
    expected = _reference_windows(data_dir, "train", 0, 1, 150)
    for (inputs_BT, targets_BT), window in zip(batches, expected, strict=True):
        assert inputs_BT.dtype == np.int32 and targets_BT.dtype == np.int32
        assert inputs_BT.shape == targets_BT.shape == (B, T)
        np.testing.assert_array_equal(inputs_BT.reshape(-1), window[:-1])
        np.testing.assert_array_equal(targets_BT.reshape(-1), window[1:])
    assert batches[0][0][0, 0] == 256  # the stream starts with a document's BOS


def test_ranks_read_disjoint_row_groups_covering_all(data_dir):
    files = dataset.split_files("train", data_dir)
    seen = [
        [docs for docs in dataset.parquets_iter_batched("train", r, 2, data_dir)] for r in (0, 1)
    ]
    rank0 = {d for group in seen[0] for d in group}
    rank1 = {d for group in seen[1] for d in group}
    everything = {d for f in files for d in pq.read_table(f).column("text").to_pylist()}
    assert not rank0 & rank1 and rank0 | rank1 == everything
    # one process serving both ranks stacks their batches: rows [0:B] rank 0, [B:2B] rank 1
    batches = _take(_loader(data_dir, ranks=[0, 1], world_size=2), 40)
    for r in (0, 1):
        expected = _reference_windows(data_dir, "train", r, 2, 40)
        for (inputs_BT, targets_BT), window in zip(batches, expected, strict=True):
            assert inputs_BT.shape == (2 * B, T)
            np.testing.assert_array_equal(inputs_BT[r * B : (r + 1) * B].reshape(-1), window[:-1])
            np.testing.assert_array_equal(targets_BT[r * B : (r + 1) * B].reshape(-1), window[1:])


@pytest.mark.parametrize("k", [0, 1, 3, 7, 50])
def test_state_round_trip_resumes_exactly(data_dir, k):
    kwargs = {"ranks": [1, 0], "world_size": 2}
    uninterrupted = _loader(data_dir, **kwargs)
    _take(uninterrupted, k)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = _take(uninterrupted, 20)

    resumed = _loader(data_dir, **kwargs)
    _take(resumed, 2)  # a used iterator must forget what it buffered
    resumed.set_state(state)
    for (x, y), (x_ref, y_ref) in zip(_take(resumed, 20), expected, strict=True):
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    assert resumed.get_state() == uninterrupted.get_state()


def test_state_from_another_pipeline_is_refused(data_dir):
    state = _loader(data_dir).get_state()
    with pytest.raises(ValueError, match="seq_len"):
        tokenizing_data_loader(ByteTokenizer(), B, T + 1, "train", data_dir=data_dir).set_state(
            state
        )
    (data_dir / "shard_00003.parquet").write_bytes((data_dir / "shard_00000.parquet").read_bytes())
    with pytest.raises(ValueError, match="files"):
        _loader(data_dir).set_state(state)


def test_val_reads_only_the_last_file(data_dir):
    val_docs = pq.read_table(data_dir / "shard_00002.parquet").column("text").to_pylist()
    (inputs_BT, _), *_ = batches = _take(_loader(data_dir, "val", num_epochs=1), 10)
    # a window is inputs + the last target (which the next window does not repeat)
    stream = np.concatenate([np.append(x.reshape(-1), y[-1, -1]) for x, y in batches]).tolist()
    docs = [
        bytes(d).decode() for k, d in itertools.groupby(stream, key=lambda t: t == 256) if not k
    ]
    assert docs[:-1] == val_docs[: len(docs) - 1]  # the last one is cut by the window


def test_finite_epochs_stop(data_dir):
    total = sum(
        len(d.encode()) + 1
        for docs in dataset.parquets_iter_batched("val", 0, 1, data_dir)
        for d in docs
    )
    batches = list(_loader(data_dir, "val", num_epochs=2))
    assert len(batches) == (2 * total) // (B * T + 1)


def test_clear_errors(tmp_path, data_dir):
    with pytest.raises(
        FileNotFoundError, match=r"nanochat_jax\.dataset -n .*nanochat_jax\.demo_data"
    ):
        _loader(tmp_path / "empty")
    with pytest.raises(ValueError, match="gets no row groups"):
        _loader(data_dir, ranks=[9], world_size=10)
    with pytest.raises(ValueError, match="ranks"):
        _loader(data_dir, ranks=[2], world_size=2)
    with pytest.raises(ValueError, match="split"):
        _loader(data_dir, "test")
