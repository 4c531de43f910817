"""The Hugging Face datasets behind nanochat's tasks, as parquet files in a local cache.

nanochat calls `datasets.load_dataset(repo, config, split=...).shuffle(seed=42)`. We do the same
without the `datasets` library: the split's parquet files are fetched once from
`https://huggingface.co/datasets/<repo>/resolve/main/<path>` (base URL overridable with
$NANOCHAT_JAX_HF_URL) into `<base_dir>/task_data/<repo>/<config>/<split>/`, read with pyarrow in
file order (the order `datasets` concatenates them in) and shuffled like `Dataset.shuffle`.

The paths below are the repos' own parquet files on their main branch (the Hub's "Use this
dataset -> pandas" snippets and the dataset cards' `data_files` patterns name them, e.g.
smol-smoltalk's `data/train-*` = four shards), so the Hub's parquet-conversion API
(`/api/datasets/<repo>/parquet/...`) is not needed. A machine that goes offline later
prefetches with

    python -m nanochat_jax.hf_data --all          # everything the pipeline reads (~1.1 GB)
    python -m nanochat_jax.hf_data arc gsm8k      # or some of it

and `python -m nanochat_jax.demo_tasks` writes small offline stand-ins in the same layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.common import get_base_dir, get_logger
from nanochat_jax.download import (
    CorruptDownload,
    DownloadConfig,
    OfflineError,
    check_reachable,
    download_file,
)

HF_URL = "https://huggingface.co"
HF_URL_ENV = "NANOCHAT_JAX_HF_URL"
DEMO_MARKER = ".demo_tasks.json"  # written by demo_tasks.py into task_data/
SHUFFLE_SEED = 42  # nanochat shuffles every HF dataset with seed 42

log = get_logger("nanochat_jax.hf_data")  # not __name__: "__main__" under python -m

GET_DATA_HINT = (
    "Prefetch on a machine with internet: `python -m nanochat_jax.hf_data --all`; or write "
    "offline demo data: `python -m nanochat_jax.demo_tasks`."
)


class TaskDataError(OSError):
    """A task's dataset is not on disk and cannot be fetched (offline, failed download, demo
    data in the way). The message is one line that says what to run. An OSError, like the
    FileNotFoundError of other missing inputs, so stage scripts catch both alike."""


@dataclass(frozen=True)
class HFSplit:
    """One split of one config of a Hugging Face dataset repo, and its parquet files."""

    repo: str
    config: str
    split: str
    files: tuple[str, ...]  # paths inside the repo, in the order the rows are concatenated

    @property
    def key(self) -> str:
        return f"{self.repo}/{self.config}/{self.split}"

    def local_dir(self, base_dir: str | Path | None = None) -> Path:
        return task_data_dir(base_dir) / self.repo / self.config / self.split

    def local_files(self, base_dir: str | Path | None = None) -> list[Path]:
        directory = self.local_dir(base_dir)
        return [directory / Path(f).name for f in self.files]

    def is_cached(self, base_dir: str | Path | None = None) -> bool:
        return all(p.is_file() for p in self.local_files(base_dir))


def _single(repo: str, config: str, splits: Sequence[str], folder: str | None = None):
    """Splits stored as `<folder>/<split>-00000-of-00001.parquet` (folder defaults to config)."""
    folder = config if folder is None else folder
    return [
        HFSplit(repo, config, split, (f"{folder}/{split}-00000-of-00001.parquet",))
        for split in splits
    ]


_SPLITS: list[HFSplit] = [
    *_single("allenai/ai2_arc", "ARC-Easy", ("train", "validation", "test")),
    *_single("allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test")),
    *_single("cais/mmlu", "all", ("test", "validation", "dev", "auxiliary_train")),
    # the auxiliary_train config: one column `train`, a struct holding the row (99,842 rows)
    *_single("cais/mmlu", "auxiliary_train", ("train",)),
    *_single("openai/gsm8k", "main", ("train", "test")),
    *_single("openai/gsm8k", "socratic", ("train", "test")),
    *_single("openai/openai_humaneval", "openai_humaneval", ("test",)),
    HFSplit(
        "HuggingFaceTB/smol-smoltalk",
        "default",
        "train",
        tuple(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)),
    ),
    HFSplit(
        "HuggingFaceTB/smol-smoltalk", "default", "test", ("data/test-00000-of-00001.parquet",)
    ),
]
SPLITS: dict[tuple[str, str, str], HFSplit] = {(s.repo, s.config, s.split): s for s in _SPLITS}

# CLI groups: what nanochat's stages read (mid/SFT mixtures, chat_eval, RL). MMLU's
# all/auxiliary_train (a copy of the auxiliary_train config) and GSM8K socratic are not read by
# any stage: they are fetched on first use only.
GROUPS: dict[str, list[tuple[str, str, str]]] = {
    "arc": [
        ("allenai/ai2_arc", subset, split)
        for subset in ("ARC-Easy", "ARC-Challenge")
        for split in ("train", "validation", "test")
    ],
    "mmlu": [
        ("cais/mmlu", "all", "test"),
        ("cais/mmlu", "all", "validation"),
        ("cais/mmlu", "all", "dev"),
        ("cais/mmlu", "auxiliary_train", "train"),
    ],
    "gsm8k": [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")],
    "humaneval": [("openai/openai_humaneval", "openai_humaneval", "test")],
    "smoltalk": [
        ("HuggingFaceTB/smol-smoltalk", "default", "train"),
        ("HuggingFaceTB/smol-smoltalk", "default", "test"),
    ],
}


def task_data_dir(base_dir: str | Path | None = None) -> Path:
    """`<base_dir>/task_data` (base_dir defaults to get_base_dir())."""
    return (Path(base_dir) if base_dir is not None else get_base_dir()) / "task_data"


def get_split(repo: str, config: str, split: str) -> HFSplit:
    try:
        return SPLITS[(repo, config, split)]
    except KeyError:
        known = ", ".join(s.key for s in _SPLITS)
        raise ValueError(f"unknown dataset split {repo}/{config}/{split}; known: {known}") from None


def resolve_hf_url(base_url: str | None = None) -> str:
    """The argument if given, else $NANOCHAT_JAX_HF_URL, else https://huggingface.co."""
    return (base_url or os.environ.get(HF_URL_ENV) or HF_URL).rstrip("/")


def file_url(base_url: str, repo: str, path: str) -> str:
    return f"{base_url}/datasets/{repo}/resolve/main/{path}"


def verify_parquet(path: Path) -> None:
    """Raise CorruptDownload unless `path` is a parquet file whose every row group decodes."""
    with open(path, "rb") as f:
        if f.read(4) != b"PAR1":
            raise CorruptDownload("file does not start with the parquet magic bytes")
    try:
        with pq.ParquetFile(path) as parquet_file:
            for rg_index in range(parquet_file.num_row_groups):
                parquet_file.read_row_group(rg_index)
    except Exception as e:  # pyarrow raises several types for garbage bytes
        raise CorruptDownload(f"not a readable parquet file ({e})") from None


def is_demo(base_dir: str | Path | None = None) -> bool:
    """Whether task_data/ holds demo_tasks.py's synthetic data."""
    return (task_data_dir(base_dir) / DEMO_MARKER).exists()


def ensure_split(
    hf_split: HFSplit,
    *,
    base_dir: str | Path | None = None,
    base_url: str | None = None,
    cfg: DownloadConfig | None = None,
) -> list[Path]:
    """The split's local parquet files, downloading the missing ones first."""
    paths = hf_split.local_files(base_dir)
    if hf_split.is_cached(base_dir):
        return paths
    root = task_data_dir(base_dir)
    if is_demo(base_dir):
        raise TaskDataError(
            f"{root} holds offline demo task data (see {DEMO_MARKER}) without {hf_split.key}, "
            "and real downloads must not mix with it. Rewrite it with "
            "`python -m nanochat_jax.demo_tasks`, or delete it (or point NANOCHAT_JAX_BASE_DIR "
            "elsewhere) and run `python -m nanochat_jax.hf_data --all`."
        )
    cfg = cfg or DownloadConfig()
    base_url = resolve_hf_url(base_url)
    try:
        check_reachable(base_url, cfg.connect_timeout_s)
    except OfflineError as e:
        raise TaskDataError(
            f"{hf_split.key} is not in {root} and {str(e).strip()} {GET_DATA_HINT}"
        ) from None
    for path_in_repo, local in zip(hf_split.files, paths, strict=True):
        if local.is_file():
            continue
        url = file_url(base_url, hf_split.repo, path_in_repo)
        log.info("downloading %s", url)
        error = download_file(url, local, cfg=cfg, verify=verify_parquet)
        if error is not None:
            raise TaskDataError(
                f"download of {url} failed: {error}. Run the same command again to resume. "
                f"{GET_DATA_HINT}"
            )
    return paths


def hf_shuffle_permutation(num_rows: int, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """The row order of Hugging Face `datasets.Dataset.shuffle(seed=seed)`.

    `Dataset.shuffle` (src/datasets/arrow_dataset.py) builds `generator =
    np.random.default_rng(seed)` and selects `indices=generator.permutation(len(self))`; so row
    i of the shuffled dataset is row `np.random.default_rng(seed).permutation(n)[i]` of the
    unshuffled one (the split's parquet files concatenated in order).
    """
    if num_rows == 0:  # Dataset.shuffle returns an empty dataset unchanged
        return np.zeros(0, dtype=np.int64)
    return np.random.default_rng(seed).permutation(num_rows)


class Rows(Sequence[dict[str, Any]]):
    """A dataset split as a read-only sequence of row dicts, in (optionally shuffled) order.

    Rows are converted to Python on access: SmolTalk's 460K conversations stay in Arrow memory
    instead of becoming millions of Python objects.
    """

    def __init__(self, table: pa.Table, order: np.ndarray | None = None):
        self._table = table
        self._order = order

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index %= len(self)
        row = int(self._order[index]) if self._order is not None else index
        return self._table.slice(row, 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    @property
    def column_names(self) -> list[str]:
        return self._table.column_names


def load_rows(
    repo: str,
    config: str,
    split: str,
    *,
    shuffle_seed: int | None = SHUFFLE_SEED,
    base_dir: str | Path | None = None,
    base_url: str | None = None,
    cfg: DownloadConfig | None = None,
) -> Rows:
    """The rows of a split (downloaded on first use), shuffled like HF `.shuffle(seed=42)`
    (pass shuffle_seed=None for file order). Raises TaskDataError when it cannot be had."""
    hf_split = get_split(repo, config, split)
    paths = ensure_split(hf_split, base_dir=base_dir, base_url=base_url, cfg=cfg)
    try:
        table = pa.concat_tables([pq.read_table(p) for p in paths])
    except (pa.ArrowInvalid, OSError) as e:
        raise TaskDataError(
            f"cannot read {hf_split.key} from {hf_split.local_dir(base_dir)} ({e}); delete that "
            f"directory to download it again. {GET_DATA_HINT}"
        ) from None
    if is_demo(base_dir):
        log.info("%s: offline demo data (%d rows)", hf_split.key, table.num_rows)
    order = None if shuffle_seed is None else hf_shuffle_permutation(table.num_rows, shuffle_seed)
    return Rows(table, order)


def write_split(
    hf_split: HFSplit, table: pa.Table, base_dir: str | Path | None = None
) -> list[Path]:
    """Write `table` as the split's parquet files (rows dealt out in order over its files, like
    a sharded upload), each atomically: what demo_tasks.py and the tests use to fill the cache."""
    paths = hf_split.local_files(base_dir)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    bounds = [k * table.num_rows // len(paths) for k in range(len(paths) + 1)]
    for path, start, stop in zip(paths, bounds[:-1], bounds[1:], strict=True):
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table.slice(start, stop - start), tmp, compression="zstd")
        os.replace(tmp, path)
    return paths


def prefetch(
    names: Sequence[str],
    *,
    base_dir: str | Path | None = None,
    base_url: str | None = None,
    cfg: DownloadConfig | None = None,
) -> list[HFSplit]:
    """Download the splits of the named groups (see GROUPS) that are not cached yet."""
    unknown = [n for n in names if n.lower() not in GROUPS]
    if unknown:
        raise ValueError(f"unknown dataset name(s) {unknown}; allowed: {sorted(GROUPS)}")
    wanted = [SPLITS[key] for name in names for key in GROUPS[name.lower()]]
    for hf_split in wanted:
        cached = hf_split.is_cached(base_dir)
        ensure_split(hf_split, base_dir=base_dir, base_url=base_url, cfg=cfg)
        log.info("%s: %s", hf_split.key, "already there" if cached else "downloaded")
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Prefetch the Hugging Face datasets of nanochat's tasks into "
        "<base_dir>/task_data (for machines that go offline later)."
    )
    parser.add_argument("names", nargs="*", help=f"dataset groups: {', '.join(GROUPS)}")
    parser.add_argument("--all", action="store_true", help="every group")
    parser.add_argument("--base-url", default=None, help=f"default ${HF_URL_ENV} or {HF_URL}")
    args = parser.parse_args(argv)
    if args.all == bool(args.names):
        parser.error(f"name dataset groups ({', '.join(GROUPS)}) or pass --all")
    names = list(GROUPS) if args.all else args.names
    try:
        splits = prefetch(names, base_url=args.base_url)
    except (TaskDataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"{len(splits)} dataset splits ready in {task_data_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
