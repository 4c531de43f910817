"""FineWeb-EDU pretraining shards: download (parallel, retried, verified, resumable) and reading.

The shards are nanochat's: karpathy/fineweb-edu-100b-shuffle on Hugging Face, 1823 parquet files
`shard_00000.parquet` ... `shard_01822.parquet`, each ~250M characters in one `text` column, row
groups of 1024 documents. They live in `<base_dir>/base_data/`. The last file on disk is the
validation split, everything before it is train (so with 240 shards, val is shard_00239).

    python -m nanochat_jax.dataset -n 240 -w 4
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from nanochat_jax.common import get_base_dir, get_logger
from nanochat_jax.download import (
    CorruptDownload,
    DownloadConfig,
    OfflineError,
    check_reachable,
    download_file,
    make_opener,
)

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
BASE_URL_ENV = "NANOCHAT_JAX_DATA_URL"
MAX_SHARD = 1822  # the last shard index: 1823 files in all
DEMO_MARKER = ".demo_data.json"  # written by demo_data.py; real downloads refuse to mix with it

log = get_logger("nanochat_jax.dataset")  # not __name__: "__main__" under python -m


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def get_data_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir` if given, else `<base_dir>/base_data`."""
    return Path(data_dir) if data_dir is not None else get_base_dir() / "base_data"


def no_data_message(data_dir: Path) -> str:
    return (
        f"no parquet shards in {data_dir}. Download FineWeb-EDU shards with "
        "`python -m nanochat_jax.dataset -n 8` (the speedrun uses -n 240), or write offline demo "
        "shards with `python -m nanochat_jax.demo_data`."
    )


def list_parquet_files(data_dir: str | Path | None = None) -> list[Path]:
    """Every finished shard in the data dir, sorted by name (partial `.tmp` files are ignored)."""
    data_dir = get_data_dir(data_dir)
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if p.name.endswith(".parquet") and p.is_file())


def split_files(split: str, data_dir: str | Path | None = None) -> list[Path]:
    """The files of a split: train = all but the last shard on disk, val = the last one."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = get_data_dir(data_dir)
    files = list_parquet_files(data_dir)
    if not files:
        raise FileNotFoundError(no_data_message(data_dir))
    if len(files) < 2:
        raise ValueError(
            f"only one shard in {data_dir} ({files[0].name}): it is the val split, so train would "
            "be empty. Get at least 2 shards (train = all but the last, val = the last)."
        )
    return files[:-1] if split == "train" else files[-1:]


def parquets_iter_batched(
    split: str, start: int = 0, step: int = 1, data_dir: str | Path | None = None
) -> Iterator[list[str]]:
    """Yield the documents of row groups start, start+step, ... of every file of the split.

    One list of texts (~1024 documents) per row group, files in order: nanochat's order, where
    rank r of W data-parallel workers reads start=r, step=W.
    """
    if start < 0 or step < 1:
        raise ValueError(f"need start >= 0 and step >= 1, got start={start}, step={step}")
    for path in split_files(split, data_dir):
        with pq.ParquetFile(path) as parquet_file:
            for rg_index in range(start, parquet_file.num_row_groups, step):
                table = parquet_file.read_row_group(rg_index, columns=["text"])
                yield table.column("text").to_pylist()


# ----------------------------------------------------------------------------------------------
# Download


@dataclass
class DownloadResult:
    downloaded: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # already on disk
    failed: dict[int, str] = field(default_factory=dict)  # index -> last error

    @property
    def ok(self) -> bool:
        return not self.failed


def resolve_base_url(base_url: str | None = None) -> str:
    """The argument if given, else $NANOCHAT_JAX_DATA_URL, else nanochat's Hugging Face URL."""
    return (base_url or os.environ.get(BASE_URL_ENV) or BASE_URL).rstrip("/")


def verify_shard(path: Path) -> None:
    """Raise unless `path` is a whole parquet file with a `text` column that decodes.

    Every row group is read (one at a time, ~0.3 s for a 100MB shard): a resumed download that
    glued wrong bytes in the middle keeps a valid footer, so opening the file is not enough.
    """
    with open(path, "rb") as f:
        if f.read(4) != b"PAR1":
            raise CorruptDownload("file does not start with the parquet magic bytes")
    try:
        with pq.ParquetFile(path) as parquet_file:
            names = parquet_file.schema_arrow.names
            if "text" not in names:
                raise CorruptDownload(f"parquet file has no 'text' column (columns: {names})")
            for rg_index in range(parquet_file.num_row_groups):
                parquet_file.read_row_group(rg_index, columns=["text"])
    except CorruptDownload:
        raise
    except Exception as e:  # pyarrow raises several types for garbage bytes
        raise CorruptDownload(f"not a readable parquet file ({e})") from None


def download_shard(
    index: int,
    data_dir: Path,
    *,
    base_url: str,
    cfg: DownloadConfig,
    opener: urllib.request.OpenerDirector | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    stop: threading.Event | None = None,
) -> str | None:
    """Fetch one shard into `data_dir` with retries; None on success, else the last error."""
    return download_file(
        f"{base_url}/{shard_name(index)}",
        data_dir / shard_name(index),
        cfg=cfg,
        verify=verify_shard,
        opener=opener,
        on_bytes=on_bytes,
        stop=stop,
    )


def download(
    num_files: int = -1,
    num_workers: int = 4,
    *,
    data_dir: str | Path | None = None,
    base_url: str | None = None,
    cfg: DownloadConfig | None = None,
    progress: bool = True,
) -> DownloadResult:
    """Download shards 0..num_files-1 (-1 = all 1823) that are not on disk yet.

    Raises OfflineError when the server is unreachable; per-shard failures are in the result.
    """
    cfg = cfg or DownloadConfig()
    if num_files == 0 or num_files < -1:
        raise ValueError(f"num_files must be -1 (all) or >= 1, got {num_files}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    num_files = MAX_SHARD + 1 if num_files == -1 else min(num_files, MAX_SHARD + 1)
    data_dir = get_data_dir(data_dir)
    if (data_dir / DEMO_MARKER).exists():
        raise ValueError(
            f"{data_dir} holds offline demo shards (see {DEMO_MARKER}); FineWeb-EDU shards must "
            "not mix with them. Delete that directory or point NANOCHAT_JAX_BASE_DIR elsewhere."
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    result = DownloadResult()
    todo = []
    for index in range(num_files):
        (result.skipped if (data_dir / shard_name(index)).exists() else todo).append(index)
    log.info(
        "%d shards wanted, %d already in %s, %d to download with %d workers",
        num_files,
        len(result.skipped),
        data_dir,
        len(todo),
        num_workers,
    )
    if not todo:
        return result
    base_url = resolve_base_url(base_url)
    check_reachable(
        base_url, cfg.connect_timeout_s, "Offline demo shards: `python -m nanochat_jax.demo_data`."
    )

    from tqdm import tqdm

    opener = make_opener(cfg.read_timeout_s)
    stop = threading.Event()
    lock = threading.Lock()
    total_bytes = [0]

    def count_bytes(n: int) -> None:
        with lock:
            total_bytes[0] += n

    bar = tqdm(total=len(todo), unit="shard", disable=not progress, dynamic_ncols=True)
    start_s = time.monotonic()
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="shard-download")
    try:
        futures = {
            pool.submit(
                download_shard,
                index,
                data_dir,
                base_url=base_url,
                cfg=cfg,
                opener=opener,
                on_bytes=count_bytes,
                stop=stop,
            ): index
            for index in todo
        }
        for future in as_completed(futures):
            index = futures[future]
            error = future.result()
            if error is None:
                result.downloaded.append(index)
            else:
                result.failed[index] = error
                log.warning("%s failed: %s", shard_name(index), error)
            mb_s = total_bytes[0] / 1e6 / max(time.monotonic() - start_s, 1e-9)
            bar.set_postfix(failed=len(result.failed), MB_s=f"{mb_s:.1f}")
            bar.update(1)
    except BaseException:
        stop.set()  # workers give up at their next chunk; their .tmp files stay for resume
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    result.downloaded.sort()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download FineWeb-EDU-100B shuffled shards.")
    parser.add_argument(
        "-n", "--num-files", type=int, default=-1, help="shards 0..N-1 (-1 = all 1823)"
    )
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base-url", default=None, help=f"default ${BASE_URL_ENV} or {BASE_URL}")
    parser.add_argument("--data-dir", default=None, help="default <base_dir>/base_data")
    args = parser.parse_args(argv)
    try:
        result = download(
            args.num_files, args.num_workers, data_dir=args.data_dir, base_url=args.base_url
        )
    except (OfflineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    data_dir = get_data_dir(args.data_dir)
    print(
        f"{len(result.downloaded)} downloaded, {len(result.skipped)} already present, "
        f"{len(result.failed)} failed, in {data_dir}"
    )
    if result.failed:
        print("failed shards (run the same command again to retry):", file=sys.stderr)
        for index, error in sorted(result.failed.items()):
            print(f"  {shard_name(index)}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
