"""Tokenizer benchmark: bpe_rust vs rustbpe (training) and vs tiktoken (encoding).

One corpus, one run: the golden tokenizer corpus (Python docs, code, many scripts) grown to
--mb megabytes by re-emitting its chunks with a share of the words replaced by splices of two
corpus words, so the text keeps its shape but has many distinct words (as web text does; a
plain repetition would have almost no new words and make training look cheap).

Training: both train on the same documents, same pattern and vocab size, and their mergeable
ranks are asserted identical. Encoding: ids of every document with the trained ranks, tiktoken's
`encode_ordinary_batch` vs our `encode_batch`, on 1 thread and on all cores; ids asserted
identical. Times are the best of --repeats runs.

    uv run python -m bench.bench_tokenizer [--mb 16] [--vocab_size 16384] [--record]

--record writes the table into the "Tokenizer" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import platform
import random
import re
import time
from pathlib import Path

import rustbpe
import tiktoken

import bpe_rust
from nanochat_jax.common import atomic_write_text
from nanochat_jax.tokenizer import SPLIT_PATTERN

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "golden" / "tok_corpus.txt.gz"
RESULTS = ROOT / "bench" / "RESULTS.md"


def make_corpus(megabytes: float, seed: int = 0) -> list[str]:
    """Documents totalling about `megabytes` MB of UTF-8 (see the module docstring)."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        source_docs = [d for d in f.read().split("\x1e") if d]
    words = sorted({w for d in source_docs for w in re.findall(r"[^\W\d_]{3,}", d)})
    rng = random.Random(seed)
    word_re = re.compile(r"[^\W\d_]{3,}")

    def splice(m: re.Match) -> str:
        if rng.random() < 0.3:
            a, b = rng.choice(words), rng.choice(words)
            return a[: rng.randint(1, len(a))] + b[rng.randint(0, len(b) - 1) :]
        return m.group(0)

    docs, total = [], 0
    target = int(megabytes * 1e6)
    while total < target:
        for d in source_docs:
            new = word_re.sub(splice, d)
            docs.append(new)
            total += len(new.encode("utf-8"))
            if total >= target:
                break
    return docs


def best_time(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_training(docs: list[str], vocab_size: int, repeats: int) -> dict:
    def ours():
        return bpe_rust.Tokenizer.train_from_iterator(iter(docs), vocab_size, SPLIT_PATTERN)

    def reference():
        ref = rustbpe.Tokenizer()
        ref.train_from_iterator(iter(docs), vocab_size, pattern=SPLIT_PATTERN)
        return ref

    t_ours, tok = best_time(ours, repeats)
    t_ref, ref = best_time(reference, repeats)
    assert tok.get_mergeable_ranks() == dict(ref.get_mergeable_ranks()), "merges differ"
    return {"ours_s": t_ours, "rustbpe_s": t_ref, "tokenizer": tok}


def bench_encoding(docs: list[str], tok: bpe_rust.Tokenizer, repeats: int) -> list[dict]:
    enc = tiktoken.Encoding(
        name="bench",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks=tok.get_mergeable_ranks(),
        special_tokens={},
    )
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        t_ours, ours = best_time(lambda t=threads: tok.encode_batch(docs, num_threads=t), repeats)
        t_ref, ref = best_time(
            lambda t=threads: enc.encode_ordinary_batch(docs, num_threads=t), repeats
        )
        assert ours == ref, "ids differ from tiktoken"
        rows.append(
            {
                "threads": threads,
                "ours_mbs": n_bytes / t_ours / 1e6,
                "ref_mbs": n_bytes / t_ref / 1e6,
            }
        )
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(args, docs, train, enc_rows) -> str:
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "## Tokenizer",
        "",
        f"`uv run python -m bench.bench_tokenizer --mb {args.mb:g} --vocab_size "
        f"{args.vocab_size} --record` (`bench/bench_tokenizer.py`), {datetime.date.today()}, "
        f"{_cpu_name()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{load:.1f} at the end of the run), best of {args.repeats}.",
        f"Corpus: {len(docs)} docs, {n_bytes / 1e6:.1f} MB: the golden tokenizer corpus grown with "
        "spliced words (seed 0); nanochat's split pattern.",
        "",
        "| what | bpe_rust | reference | ratio |",
        "| --- | --- | --- | --- |",
        f"| train, vocab {args.vocab_size} (identical merges) | {train['ours_s']:.2f} s | "
        f"rustbpe 0.1.0 {train['rustbpe_s']:.2f} s | "
        f"{train['ours_s'] / train['rustbpe_s']:.2f}x the time |",
    ]
    for r in enc_rows:
        lines.append(
            f"| encode, {r['threads']} thread(s) (identical ids) | {r['ours_mbs']:.1f} MB/s | "
            f"tiktoken {tiktoken.__version__} {r['ref_mbs']:.1f} MB/s | "
            f"{r['ours_mbs'] / r['ref_mbs']:.2f}x the throughput |"
        )
    train_ratio = train["ours_s"] / train["rustbpe_s"]
    enc_ratio = min(r["ours_mbs"] / r["ref_mbs"] for r in enc_rows)
    lines += [
        "",
        f"Targets: training <= 0.5x rustbpe's time: {'met' if train_ratio <= 0.5 else 'MISSED'} "
        f"({train_ratio:.2f}x); encoding >= 1.5x tiktoken's throughput: "
        f"{'met' if enc_ratio >= 1.5 else 'MISSED'} (>= {enc_ratio:.2f}x).",
    ]
    return "\n".join(lines) + "\n"


def record(section: str) -> None:
    """Replace (or append) the '## Tokenizer' section of bench/RESULTS.md."""
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Tokenizer\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(RESULTS, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=16.0, help="corpus size in MB")
    parser.add_argument("--vocab_size", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="write into bench/RESULTS.md")
    args = parser.parse_args()

    docs = make_corpus(args.mb)
    train = bench_training(docs, args.vocab_size, args.repeats)
    print(
        f"train: ours {train['ours_s']:.2f}s, rustbpe {train['rustbpe_s']:.2f}s "
        f"-> {train['ours_s'] / train['rustbpe_s']:.2f}x the time (identical merges)"
    )
    enc_rows = bench_encoding(docs, train["tokenizer"], args.repeats)
    for r in enc_rows:
        print(
            f"encode {r['threads']} thread(s): ours {r['ours_mbs']:.1f} MB/s, tiktoken "
            f"{r['ref_mbs']:.1f} MB/s -> {r['ours_mbs'] / r['ref_mbs']:.2f}x (identical ids)"
        )
    section = report(args, docs, train, enc_rows)
    print(section)
    if args.record:
        record(section)


if __name__ == "__main__":
    main()
