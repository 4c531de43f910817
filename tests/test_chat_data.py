"""chat_data against direct transcriptions of nanochat's mid/SFT generators and training loops."""

import itertools
import random
from collections import deque

import numpy as np
import pytest

from nanochat_jax.chat_data import (
    MidTrainData,
    bucket_for,
    collate_sft,
    length_buckets,
    mid_val_batches,
    rank_cursor,
    render_all,
    sft_micro_batches,
)
from nanochat_jax.tokenizer import Tokenizer

WORDS = (
    "the cat sat on a mat and then it ran off to see what was there in the big old house".split()
)


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(200)) for _ in range(20)]
    return Tokenizer.train_from_iterator(iter(docs), 300)


def _conversations(n: int, seed: int = 0) -> list[dict]:
    """Rows of very different lengths, some with tool-call parts and system messages."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": text(1, 4)}] if i % 5 == 0 else []
        for turn in range(rng.choice([1, 1, 2, 3])):
            messages.append({"role": "user", "content": f"{i} {turn} " + text(1, 12)})
            if i % 4 == 1:
                content = [
                    {"type": "text", "text": text(1, 5)},
                    {"type": "python", "text": "2+3"},
                    {"type": "python_output", "text": "5"},
                    {"type": "text", "text": text(1, 3)},
                ]
            else:
                content = text(1, 20)
            messages.append({"role": "assistant", "content": content})
        rows.append({"messages": messages})
    return rows


def _nanochat_mid(tokenizer, dataset, B, T, W, A):
    """nanochat's mid_data_generator + loop bookkeeping: one generator per rank, last_step shared
    (all-reduced MAX), the next batch prefetched after each micro-step, progress kept monotone."""
    shared = {"last_step": False, "progress": {}}
    needed = B * T + 1

    def gen(rank):
        buffer, cursor, n = deque(), rank, len(dataset)
        while True:
            while len(buffer) < needed:
                buffer.extend(tokenizer.render_conversation(dataset[cursor])[0])
                cursor += W
                if cursor >= n:
                    cursor -= n
                    shared["last_step"] = True
            window = [buffer.popleft() for _ in range(needed)]
            shared["progress"][rank] = cursor / n
            yield window

    gens = [gen(r) for r in range(W)]
    x = [next(g) for g in gens]
    progress, batches, step_progress = 0.0, [], []
    while not shared["last_step"]:
        for _ in range(A):
            batches.append(x)
            x = [next(g) for g in gens]
            progress = max(progress, shared["progress"][0])
        step_progress.append(progress)
    return step_progress, batches


@pytest.mark.parametrize(
    "B,T,W,A,n",
    [(1, 8, 1, 1, 9), (2, 16, 1, 1, 23), (2, 16, 3, 2, 23), (1, 32, 4, 3, 41), (3, 8, 2, 1, 17)],
)
def test_mid_train_data_is_nanochats_generator(tokenizer, B, T, W, A, n):
    dataset = _conversations(n, seed=n)
    step_progress, batches = _nanochat_mid(tokenizer, dataset, B, T, W, A)
    rendered = render_all(tokenizer, dataset)
    ranks = list(range(W))[::-1][: max(1, W - 1)]  # some local ranks, in any order
    data = MidTrainData(rendered, batch_size=B, seq_len=T, world_size=W, ranks=ranks, accum_steps=A)
    assert data.num_steps == len(step_progress) > 0
    np.testing.assert_allclose(data.progress, step_progress)
    for k, windows in enumerate(batches):
        inputs, targets = data.micro_batch(k)
        expected = np.array([windows[r] for r in ranks])
        assert inputs.shape == targets.shape == (len(ranks) * B, T)
        assert inputs.dtype == targets.dtype == np.int32
        np.testing.assert_array_equal(inputs, expected[:, :-1].reshape(-1, T))
        np.testing.assert_array_equal(targets, expected[:, 1:].reshape(-1, T))
    lrm = data.lr_multipliers()
    p = np.asarray(step_progress)
    np.testing.assert_allclose(lrm, [1 if q < 0.8 else 1 - (q - 0.8) / 0.2 for q in p])


@pytest.mark.parametrize("N,W", [(5, 2), (7, 3), (4, 4), (9, 1), (10, 4)])
def test_rank_cursor_is_nanochats_cursor_or_restarting_range(N, W):
    for rank in range(W):
        mid = list(itertools.islice(rank_cursor(N, rank, W), 3 * N))
        assert mid == [(rank + j * W) % N for j in range(3 * N)]  # wraps by -N: shifts epochs
        sft = list(itertools.islice(rank_cursor(N, rank, W, restart_each_epoch=True), 3 * N))
        epoch = list(range(rank, N, W))
        assert sft == (epoch * 3 * N)[: 3 * N]  # every epoch starts at rank again


def test_rank_cursor_errors():
    with pytest.raises(ValueError, match="rank 3 of 4 has no rows among 3"):
        rank_cursor(3, 3, 4, restart_each_epoch=True)
    with pytest.raises(ValueError, match="rank 2 of 2 has no rows"):
        rank_cursor(9, 2, 2)
    with pytest.raises(ValueError, match="4 ranks wrap a cursor over only 3 rows"):
        rank_cursor(3, 0, 4)
    assert next(rank_cursor(3, 0, 4, restart_each_epoch=True)) == 0


def test_mid_stream_is_the_rendered_mixture_in_order(tokenizer):
    """One rank: the windows are every rendered conversation concatenated, in order, and the run
    stops at the window that would need the last conversation."""
    dataset = _conversations(30)
    rendered_ids = [tokenizer.render_conversation(row)[0] for row in dataset]
    stream = [t for ids in rendered_ids for t in ids]
    data = MidTrainData(
        render_all(tokenizer, dataset),
        batch_size=2,
        seq_len=8,
        world_size=1,
        ranks=[0],
        accum_steps=1,
    )
    got = []
    for k in range(data.num_steps):
        inputs, targets = data.micro_batch(k)
        got.extend(np.concatenate([inputs.ravel(), targets.ravel()[-1:]]).tolist())
    assert got == stream[: len(got)]
    assert data.num_steps == sum(map(len, rendered_ids[:-1])) // 17


def test_mid_lr_schedule_falls_to_zero_over_the_last_fifth(tokenizer):
    data = MidTrainData(
        render_all(tokenizer, _conversations(200)),
        batch_size=1,
        seq_len=16,
        world_size=1,
        ranks=[0],
        accum_steps=1,
    )
    lrm = data.lr_multipliers()
    assert data.num_steps > 50 and np.all(np.diff(data.progress) >= 0)
    assert lrm[0] == 1.0 and lrm[-1] < 0.1
    assert np.all(np.diff(lrm) <= 0) and np.all(lrm[data.progress < 0.8] == 1.0)


def test_mid_max_steps_caps_the_run_and_its_progress(tokenizer):
    rendered = render_all(tokenizer, _conversations(200))
    kwargs = dict(batch_size=1, seq_len=16, world_size=1, ranks=[0], accum_steps=1)
    full = MidTrainData(rendered, **kwargs)
    capped = MidTrainData(rendered, max_steps=10, **kwargs)
    assert capped.num_steps == 10 and capped.epoch_steps == full.num_steps > 10
    np.testing.assert_allclose(
        capped.progress, np.maximum(full.progress[:10], np.arange(1, 11) / 10)
    )
    longer = MidTrainData(rendered, max_steps=10_000, **kwargs)
    assert longer.num_steps == full.num_steps


def test_render_all_concatenates_ids(tokenizer):
    dataset = _conversations(12)
    rendered = render_all(tokenizer, dataset, max_tokens=20)
    assert rendered.tokens.dtype == np.uint16 and len(rendered) == 12
    for i, row in enumerate(dataset):
        ids, _ = tokenizer.render_conversation(row, max_tokens=20)
        got = rendered.tokens[rendered.offsets[i] : rendered.offsets[i + 1]]
        assert got.tolist() == ids


def test_mid_val_batches_match_nanochats_generator(tokenizer):
    dataset = _conversations(7)  # small: the ranks wrap around several times
    _, batches = _nanochat_mid(tokenizer, dataset, 2, 8, 3, 1)
    ranks = [1, 2]
    got = mid_val_batches(tokenizer, dataset, batch_size=2, seq_len=8, world_size=3, ranks=ranks)
    # rank r's cursor visits r, r+3, ... and wraps by -7: its order is (r + 3j) mod 7
    streams = {
        r: [
            t for j in range(60) for t in tokenizer.render_conversation(dataset[(r + 3 * j) % 7])[0]
        ]
        for r in ranks
    }
    for k in range(12):
        inputs, targets = next(got)
        windows = np.array([streams[r][k * 17 : (k + 1) * 17] for r in ranks])
        np.testing.assert_array_equal(inputs, windows[:, :-1].reshape(4, 8))
        np.testing.assert_array_equal(targets, windows[:, 1:].reshape(4, 8))
        if k < len(batches):  # the train reference (which stops at the wrap) agrees too
            np.testing.assert_array_equal(windows, np.array([batches[k][r] for r in ranks]))


def test_mid_errors(tokenizer):
    rendered = render_all(tokenizer, _conversations(3))
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        MidTrainData(rendered, batch_size=1, seq_len=8, world_size=4, ranks=[0], accum_steps=1)
    with pytest.raises(ValueError, match="too small"):
        MidTrainData(rendered, batch_size=64, seq_len=64, world_size=1, ranks=[0], accum_steps=1)
    with pytest.raises(ValueError, match=r"ranks \[2\]"):
        MidTrainData(rendered, batch_size=1, seq_len=8, world_size=2, ranks=[2], accum_steps=1)


# ----------------------------------------------------------------------------- SFT


def _nanochat_collate(batch, pad_id):
    """nanochat's collate_and_yield, transcribed with lists."""
    ncols = max(len(ids) for ids, _ in batch) - 1
    inputs = [[pad_id] * ncols for _ in batch]
    targets = [[-1] * ncols for _ in batch]
    for i, (ids, mask) in enumerate(batch):
        n = len(ids)
        inputs[i][: n - 1] = ids[:-1]
        targets[i][: n - 1] = [t if m == 1 else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
    return np.array(inputs), np.array(targets)


def test_collate_sft_pads_and_masks_like_nanochat(tokenizer):
    pad = tokenizer.encode_special("<|assistant_end|>")
    rows = [tokenizer.render_conversation(c) for c in _conversations(6)]
    want_in, want_tg = _nanochat_collate(rows, pad)
    inputs, targets = collate_sft(rows, pad)
    assert inputs.dtype == targets.dtype == np.int32
    np.testing.assert_array_equal(inputs, want_in)
    np.testing.assert_array_equal(targets, want_tg)
    # a bucket only appends padding that no loss sees
    wide_in, wide_tg = collate_sft(rows, pad, ncols=want_in.shape[1] + 5)
    np.testing.assert_array_equal(wide_in[:, : want_in.shape[1]], want_in)
    assert np.all(wide_in[:, want_in.shape[1] :] == pad)
    assert np.all(wide_tg[:, want_in.shape[1] :] == -1)
    with pytest.raises(ValueError, match="shorter than the longest row"):
        collate_sft(rows, pad, ncols=want_in.shape[1] - 1)


def test_collate_sft_hand_example():
    # bos user_start u user_end assistant_start a1 a2 assistant_end (ids 10..17)
    ids = [10, 11, 12, 13, 14, 15, 16, 17]
    mask = [0, 0, 0, 0, 0, 1, 1, 1]
    inputs, targets = collate_sft([(ids, mask), (ids[:3], mask[:3])], pad_id=99)
    np.testing.assert_array_equal(
        inputs, [[10, 11, 12, 13, 14, 15, 16], [10, 11, 99, 99, 99, 99, 99]]
    )
    np.testing.assert_array_equal(targets, [[-1, -1, -1, -1, 15, 16, 17], [-1] * 7])


def test_sft_micro_batches_stride_ranks_and_carry_over_epochs(tokenizer):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"row {i}"},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for i in range(5)
    ]
    ids_of = {tuple(tokenizer.render_conversation(r)[0]): i for i, r in enumerate(rows)}
    gen = sft_micro_batches(tokenizer, rows, batch_size=3, rank=1, world_size=2)
    got = [[ids_of[tuple(ids)] for ids, _ in next(gen)] for _ in range(3)]
    assert got == [[1, 3, 1], [3, 1, 3], [1, 3, 1]]
    gen = sft_micro_batches(tokenizer, rows, batch_size=2, rank=0, world_size=2, max_tokens=4)
    batch = next(gen)
    assert [len(ids) for ids, _ in batch] == [4, 4]
    with pytest.raises(ValueError, match="fewer than the 8 ranks"):
        sft_micro_batches(tokenizer, rows, batch_size=1, rank=0, world_size=8)
    with pytest.raises(ValueError, match="fewer than the 8 ranks"):
        mid_val_batches(tokenizer, rows, batch_size=1, seq_len=8, world_size=8, ranks=[0])


def test_length_buckets():
    assert length_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert length_buckets(256) == [64, 128, 256]
    assert length_buckets(300) == [64, 128, 256, 300]
    assert length_buckets(40) == [40]
    buckets = length_buckets(2048)
    assert [bucket_for(n, buckets) for n in (1, 64, 65, 2047, 2048)] == [64, 64, 128, 2048, 2048]
    with pytest.raises(ValueError, match="exceed the largest length bucket"):
        bucket_for(2049, buckets)
