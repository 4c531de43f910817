"""Train the BPE tokenizer on the pretraining shards (nanochat's scripts/tok_train.py).

    python -m scripts.tok_train --max_chars=2000000000

Reads the train split document by document, each cropped to --doc_cap characters, until more
than --max_chars characters have been read; learns --vocab_size - 9 mergeable tokens with
bpe_rust (nanochat's rustbpe merges) and adds the 9 special tokens. Writes into
`<base_dir>/tokenizer/`: nanochat_tokenizer.json + token_bytes.npy (what get_tokenizer loads),
tokenizer.json (the same tokenizer for HF `tokenizers`) and, when tiktoken is installed,
tokenizer.pkl (a pickled tiktoken Encoding, nanochat's own file). Report: "Tokenizer training".
"""

from __future__ import annotations

import argparse
import pickle
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanochat_jax.common import atomic_write_bytes, get_base_dir, get_logger
from nanochat_jax.dataset import parquets_iter_batched
from nanochat_jax.report import log_section
from nanochat_jax.tokenizer import SPECIAL_TOKENS, Tokenizer

log = get_logger("scripts.tok_train")

# Round-trip check after training: ASCII, digits, contractions, symbols, CJK, emoji.
SANITY_TEXT = (
    "The tokenizer says hello! 42 apples, 1999 pears, 3.14159.\n"
    "We're sure it'll work; isn't it? <tag> {braces} @#$%^&*\n"
    "\tTabs and    spaces, 日本語の文章, 한국어, emoji 🚀🌍✨"
)


def iter_capped_docs(docs: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Each doc cropped to `doc_cap` chars; stops once more than `max_chars` chars were yielded
    (the doc that crosses the limit is still yielded), as nanochat's text_iterator."""
    total = 0
    for doc in docs:
        doc = doc[:doc_cap]
        total += len(doc)
        yield doc
        if total > max_chars:
            return


def _train_docs(data_dir: str | None) -> Iterator[str]:
    for batch in parquets_iter_batched("train", data_dir=data_dir):
        yield from batch


def _with_progress(docs: Iterator[str], max_chars: int) -> Iterator[str]:
    """tqdm over characters read (its rate is the chars/s ingestion speed)."""
    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="reading text") as bar:
        for doc in docs:
            bar.update(len(doc))
            yield doc


def token_bytes_stats(token_bytes: np.ndarray) -> dict[str, float | int]:
    """min/max/mean/std (sample std, as torch's) over the non-special tokens."""
    nonzero = token_bytes[token_bytes > 0].astype(np.float64)
    return {
        "token_bytes_min": int(nonzero.min()),
        "token_bytes_max": int(nonzero.max()),
        "token_bytes_mean": float(nonzero.mean()),
        "token_bytes_std": float(nonzero.std(ddof=1)),
    }


def save_all(tokenizer: Tokenizer, directory: Path) -> None:
    tokenizer.save(directory)
    tokenizer.save_hf_json(directory / "tokenizer.json")
    try:
        enc = tokenizer.to_tiktoken()
    except ImportError:
        log.info("tiktoken is not installed: skipping tokenizer.pkl (nanochat's format)")
        return
    atomic_write_bytes(directory / "tokenizer.pkl", pickle.dumps(enc))


def main(argv: list[str] | None = None) -> Tokenizer:
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer (nanochat's tok_train)")
    parser.add_argument("--max_chars", type=int, default=10_000_000_000, help="chars to train on")
    parser.add_argument("--doc_cap", type=int, default=10_000, help="max chars per document")
    parser.add_argument("--vocab_size", type=int, default=65536, help="vocab incl. 9 specials")
    parser.add_argument("--data_dir", type=str, default=None, help="default <base>/base_data")
    args = parser.parse_args(argv)
    if args.max_chars < 1 or args.doc_cap < 1:
        parser.error("--max_chars and --doc_cap must be positive")
    log.info("args: %s", vars(args))

    docs = iter_capped_docs(_train_docs(args.data_dir), args.max_chars, args.doc_cap)
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(_with_progress(docs, args.max_chars), args.vocab_size)
    train_time = time.perf_counter() - t0
    log.info("trained vocab %d in %.2fs", tokenizer.get_vocab_size(), train_time)

    decoded = tokenizer.decode(tokenizer.encode(SANITY_TEXT))
    if decoded != SANITY_TEXT:
        raise RuntimeError(f"round trip failed: {SANITY_TEXT!r} -> {decoded!r}")

    directory = get_base_dir() / "tokenizer"
    save_all(tokenizer, directory)
    log.info("saved the tokenizer to %s", directory)

    token_bytes = tokenizer.token_bytes()
    log_section(
        "Tokenizer training",
        [
            {k: v for k, v in vars(args).items() if k != "data_dir"},
            {"train_time": train_time},
            {"num_special_tokens": len(SPECIAL_TOKENS)},
            token_bytes_stats(token_bytes),
        ],
    )
    return tokenizer


if __name__ == "__main__":
    main()
