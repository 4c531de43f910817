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

Two single files that nanochat's later, opt-in tasks read live next to them (TaskFile, groups
`words` and `identity`): the English word list of SpellingBee/SimpleSpelling (nanochat 8892470)
and the synthetic identity conversations read by CustomJSON (nanochat fe5aed9), each fetched from
nanochat's URL (overridable with an environment variable) with the same retried, resumable,
verified and atomic download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
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


_WORD_RE = re.compile(r"[A-Za-z]+")


def word_list_problem(lines: Sequence[str]) -> str | None:
    """What is wrong with the lines of a word list (one alphabetic word per line, blank lines
    allowed, at least one word), or None if nothing."""
    if not any(line.strip() for line in lines):
        return "word list has no words"
    for line_number, line in enumerate(lines, start=1):
        word = line.strip()
        if word and not _WORD_RE.fullmatch(word):
            return f"word list line {line_number}: {word[:40]!r} is not a single alphabetic word"
    return None


def verify_word_list(path: Path) -> None:
    """Raise CorruptDownload unless `path` is UTF-8 text of one alphabetic word per line (blank
    lines allowed): an HTML error page or a binary file is caught here, not at training."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CorruptDownload(f"word list is not UTF-8 text ({e})") from None
    problem = word_list_problem(lines)
    if problem is not None:
        raise CorruptDownload(problem)


def verify_conversations(path: Path) -> None:
    """Raise CorruptDownload unless every non-blank line of `path` is a JSON list of messages,
    user first, roles alternating (the format CustomJSON reads)."""
    from nanochat_jax.tasks.smoltalk import check_messages  # lazy: tasks import this module

    count = 0
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                check_messages(json.loads(line), f"line {line_number}", allow_system=False)
                count += 1
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CorruptDownload(f"not a JSONL file of conversations ({e})") from None
    if not count:
        raise CorruptDownload("no conversations in the file")


@dataclass(frozen=True)
class TaskFile:
    """A single file a task reads from `<base_dir>/task_data/` (not a Hugging Face dataset)."""

    group: str  # its name on the CLI
    name: str  # the file name in task_data/ (nanochat's: it keeps it in its base dir)
    url: str  # where nanochat downloads it from
    url_env: str  # environment variable that overrides `url`
    verify: Callable[[Path], None]
    unit: str  # what one non-blank line holds, for the log line after a download

    def local_path(self, base_dir: str | Path | None = None) -> Path:
        return task_data_dir(base_dir) / self.name

    def is_cached(self, base_dir: str | Path | None = None) -> bool:
        return self.local_path(base_dir).is_file()

    def resolve_url(self, url: str | None = None) -> str:
        """The argument if given, else $<url_env>, else nanochat's URL."""
        return url or os.environ.get(self.url_env) or self.url


# nanochat 8892470, tasks/spellingbee.py: dwyl/english-words' 370K lowercase words. The URL
# follows the repo's master branch (unpinned, as nanochat's), so a download logs its sha256.
WORDS_FILE = TaskFile(
    group="words",
    name="words_alpha.txt",
    url="https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt",
    url_env="NANOCHAT_JAX_WORDS_URL",
    verify=verify_word_list,
    unit="words",
)
# nanochat fe5aed9, speedrun.sh: ~1K synthetic conversations about nanochat itself (2.3 MB)
IDENTITY_FILE = TaskFile(
    group="identity",
    name="identity_conversations.jsonl",
    url="https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl",
    url_env="NANOCHAT_JAX_IDENTITY_URL",
    verify=verify_conversations,
    unit="conversations",
)
FILES: dict[str, TaskFile] = {f.group: f for f in (WORDS_FILE, IDENTITY_FILE)}


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
        raise _demo_in_the_way(root, hf_split.key)
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


def _demo_in_the_way(root: Path, what: str) -> TaskDataError:
    return TaskDataError(
        f"{root} holds offline demo task data (see {DEMO_MARKER}) without {what}, "
        "and real downloads must not mix with it. Rewrite it with "
        "`python -m nanochat_jax.demo_tasks`, or delete it (or point NANOCHAT_JAX_BASE_DIR "
        "elsewhere) and run `python -m nanochat_jax.hf_data --all`."
    )


def ensure_file(
    task_file: TaskFile,
    *,
    base_dir: str | Path | None = None,
    url: str | None = None,
    cfg: DownloadConfig | None = None,
) -> Path:
    """The file's local path, downloading it first if it is missing (TaskDataError if that
    cannot be done: one line naming the commands to run)."""
    path = task_file.local_path(base_dir)
    if path.is_file():
        return path
    root = task_data_dir(base_dir)
    if is_demo(base_dir):
        raise _demo_in_the_way(root, task_file.name)
    cfg = cfg or DownloadConfig()
    url = task_file.resolve_url(url)
    hint = (
        f"Prefetch on a machine with internet: `python -m nanochat_jax.hf_data "
        f"{task_file.group}` (URL: ${task_file.url_env} or nanochat's); or write offline demo "
        "data: `python -m nanochat_jax.demo_tasks`."
    )
    try:
        check_reachable(url, cfg.connect_timeout_s)
    except OfflineError as e:
        offline = str(e).strip()
        raise TaskDataError(f"{task_file.name} is not in {root} and {offline} {hint}") from None
    except ValueError as e:
        raise TaskDataError(f"{task_file.name}: {e} (from ${task_file.url_env}?)") from None
    log.info("downloading %s", url)
    error = download_file(url, path, cfg=cfg, verify=task_file.verify)
    if error is not None:
        raise TaskDataError(
            f"download of {url} failed: {error}. Run the same command again to resume. {hint}"
        )
    # Which version arrived: nanochat's URLs are not pinned to a commit or a checksum.
    data = path.read_bytes()
    count = sum(1 for line in data.splitlines() if line.strip())
    log.info(
        "%s: %d %s, sha256 %s",
        task_file.name,
        count,
        task_file.unit,
        hashlib.sha256(data).hexdigest(),
    )
    return path


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
) -> list[HFSplit | TaskFile]:
    """Download what the named groups hold (the splits of GROUPS, the files of FILES) that is
    not cached yet. base_url: the Hub's (files use their own URLs)."""
    unknown = [n for n in names if n.lower() not in GROUPS and n.lower() not in FILES]
    if unknown:
        allowed = sorted([*GROUPS, *FILES])
        raise ValueError(f"unknown dataset name(s) {unknown}; allowed: {allowed}")
    wanted: list[HFSplit | TaskFile] = []
    for name in names:
        if name.lower() in FILES:
            wanted.append(FILES[name.lower()])
        else:
            wanted.extend(SPLITS[key] for key in GROUPS[name.lower()])
    for item in wanted:
        cached = item.is_cached(base_dir)
        if isinstance(item, TaskFile):
            ensure_file(item, base_dir=base_dir, cfg=cfg)
            what = item.name
        else:
            ensure_split(item, base_dir=base_dir, base_url=base_url, cfg=cfg)
            what = item.key
        log.info("%s: %s", what, "already there" if cached else "downloaded")
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Prefetch the Hugging Face datasets of nanochat's tasks (and the word list "
        "and identity conversations of its opt-in extras) into <base_dir>/task_data (for "
        "machines that go offline later)."
    )
    groups = [*GROUPS, *FILES]
    parser.add_argument("names", nargs="*", help=f"dataset groups: {', '.join(groups)}")
    parser.add_argument("--all", action="store_true", help="every group")
    parser.add_argument(
        "--base-url", default=None, help=f"the Hub's (default ${HF_URL_ENV} or {HF_URL})"
    )
    args = parser.parse_args(argv)
    if args.all == bool(args.names):
        parser.error(f"name dataset groups ({', '.join(groups)}) or pass --all")
    names = groups if args.all else args.names
    try:
        fetched = prefetch(names, base_url=args.base_url)
    except (TaskDataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    splits = sum(isinstance(item, HFSplit) for item in fetched)
    files = f" and {len(fetched) - splits} files" if len(fetched) > splits else ""
    print(f"{splits} dataset splits{files} ready in {task_data_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
