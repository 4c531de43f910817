"""The CORE eval bundle: download (nanochat's eval_bundle.zip), an offline demo bundle, reading.

Layout of `<base_dir>/eval_bundle/` (DCLM's): `core.yaml` (key `icl_tasks`: label, dataset_uri,
num_fewshot (a list; the first is used), icl_task_type, optional continuation_delimiter),
`eval_meta_data.csv` (columns include `Eval Task` and `Random baseline`, in percent) and
`eval_data/<dataset_uri>` (JSON lines). The zip is fetched with retries and resume, checked (a
whole zip holding eval_bundle/core.yaml), extracted into a temporary directory and renamed into
place, so a bundle directory is always complete. `validate_bundle` checks an installed bundle
(every task's meta row and data file, every JSON line) before a run relies on it: base_eval and
base_train call it up front, so a broken bundle is one error line naming the file (and line), not
a traceback at the first CORE step.

    python -m nanochat_jax.eval_bundle            # download (~162 MB), skipped if present
    python -m nanochat_jax.eval_bundle --demo     # offline: small synthetic tasks, same layout

The demo bundle carries a marker file and never mixes with the real one: its CORE numbers only
show that a tiny model learnt something; they are not comparable with nanochat's.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import os
import platform
import random
import re
import shutil
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from nanochat_jax.common import atomic_write_text, get_base_dir, get_logger
from nanochat_jax.download import (
    CorruptDownload,
    DownloadConfig,
    OfflineError,
    check_reachable,
    download_file,
)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
URL_ENV = "NANOCHAT_JAX_EVAL_BUNDLE_URL"
BUNDLE_NAME = "eval_bundle"  # the directory in the zip and in the base dir
DEMO_MARKER = ".demo_bundle.json"
DEMO_VERSION = 1
# The icl_task_type values CORE scores (core_eval uses this one tuple too), and the fields each
# type's JSON lines need.
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
_ITEM_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}

log = get_logger("nanochat_jax.eval_bundle")  # not __name__: "__main__" under python -m


class BundleError(RuntimeError):
    """The bundle could not be downloaded or installed (one line, for the command line)."""


def bundle_dir(base_dir: str | Path | None = None) -> Path:
    return (Path(base_dir) if base_dir is not None else get_base_dir()) / BUNDLE_NAME


def no_bundle_message(directory: Path) -> str:
    return (
        f"no CORE eval bundle in {directory}. Download it with `python -m "
        "nanochat_jax.eval_bundle`, or write the offline demo bundle with `python -m "
        "nanochat_jax.eval_bundle --demo`."
    )


def is_demo(directory: str | Path) -> bool:
    return (Path(directory) / DEMO_MARKER).exists()


# ---- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str  # multiple_choice | schema | language_modeling
    dataset_uri: str  # relative to eval_data/
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent

    def task_meta(self) -> dict:
        """nanochat's task_meta dict, as core_eval.evaluate_task takes it."""
        return {
            "task_type": self.task_type,
            "dataset_uri": self.dataset_uri,
            "num_fewshot": self.num_fewshot,
            "continuation_delimiter": self.continuation_delimiter,
        }


def _redo_hint(directory: Path) -> str:
    """How to replace a broken bundle (downloading skips a directory that has core.yaml)."""
    flag = " --demo" if is_demo(directory) else ""
    return f"delete {directory} and run `python -m nanochat_jax.eval_bundle{flag}` again"


def _random_baselines(path: Path) -> dict[str, float]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; {_redo_hint(path.parent)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not rows or not {"Eval Task", "Random baseline"} <= set(rows[0]):
        raise ValueError(f"{path} needs the columns 'Eval Task' and 'Random baseline'")
    baselines = {}
    for line, row in enumerate(rows, start=2):  # line 1: the header
        try:
            baselines[row["Eval Task"]] = float(row["Random baseline"])
        except (TypeError, ValueError):
            raise ValueError(
                f"{path}:{line}: 'Random baseline' must be a number (percent), got "
                f"{row['Random baseline']!r}"
            ) from None
    return baselines


def _num_fewshot(value, where: str) -> int:
    shots = value[0] if isinstance(value, list) and value else value
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ValueError(
            f"{where}: num_fewshot must be an int >= 0 or a list of them, got {value!r}"
        )
    return shots


def read_tasks(directory: str | Path) -> list[CoreTask]:
    """The bundle's tasks in core.yaml order, with their random baselines (core.yaml and
    eval_meta_data.csv only; `validate_bundle` also checks the task data).

    Raises FileNotFoundError (no core.yaml: no bundle), ValueError (a broken bundle)."""
    directory = Path(directory)
    config_path = directory / "core.yaml"
    if not config_path.exists():
        raise FileNotFoundError(no_bundle_message(directory))
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {config_path}: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise ValueError(f"{config_path} has no list under 'icl_tasks'")
    if not config["icl_tasks"]:
        raise ValueError(f"{config_path} lists no tasks under 'icl_tasks'")
    baselines = _random_baselines(directory / "eval_meta_data.csv")
    tasks = []
    for position, entry in enumerate(config["icl_tasks"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{config_path}: icl_tasks[{position}] is not a mapping: {entry!r}")
        label = entry.get("label")
        missing = [
            k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in entry
        ]
        if missing:
            raise ValueError(f"{config_path}: task {label!r} lacks {', '.join(missing)}")
        if entry["icl_task_type"] not in TASK_TYPES:
            raise ValueError(
                f"{config_path}: task {label!r} has icl_task_type {entry['icl_task_type']!r}; "
                f"expected one of {', '.join(TASK_TYPES)}"
            )
        if label not in baselines:
            raise ValueError(f"{directory / 'eval_meta_data.csv'} has no row for task {label!r}")
        tasks.append(
            CoreTask(
                label=label,
                task_type=entry["icl_task_type"],
                dataset_uri=str(entry["dataset_uri"]),
                num_fewshot=_num_fewshot(entry["num_fewshot"], f"{config_path}: task {label!r}"),
                continuation_delimiter=str(entry.get("continuation_delimiter", " ")),
                random_baseline=baselines[label],
            )
        )
    return tasks


def _task_path(directory: Path, task: CoreTask) -> Path:
    data_dir = directory / "eval_data"
    path = data_dir / task.dataset_uri
    if not path.resolve().is_relative_to(data_dir.resolve()):
        raise ValueError(
            f"task {task.label!r}: dataset_uri {task.dataset_uri!r} points outside {data_dir}"
        )
    return path


def load_task_data(directory: str | Path, task: CoreTask) -> list[dict]:
    """The task's examples (one JSON object per non-blank line of eval_data/<dataset_uri>).

    Raises ValueError naming the file (and file:line for a bad line): a missing or unreadable
    file, a line that is not a JSON object with the fields of the task type, too few examples
    for num_fewshot."""
    directory = Path(directory)
    path = _task_path(directory, task)
    fields = _ITEM_FIELDS[task.task_type]
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
                if not isinstance(item, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {line[:80]!r}")
                missing = [k for k in fields if k not in item]
                if missing:
                    raise ValueError(
                        f"{path}:{number}: a {task.task_type} example needs the fields "
                        f"{', '.join(fields)}; {', '.join(missing)} missing"
                    )
                items.append(item)
    except FileNotFoundError:
        raise ValueError(
            f"task {task.label!r}: {path} is missing; {_redo_hint(directory)}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"task {task.label!r}: cannot read {path}: {e}") from None
    if len(items) < task.num_fewshot + 1:
        raise ValueError(
            f"task {task.label!r}: {path} has {len(items)} examples; {task.num_fewshot}-shot "
            f"needs at least {task.num_fewshot + 1}"
        )
    return items


def validate_bundle(directory: str | Path, *, read_data: bool = True) -> list[CoreTask]:
    """Check a whole bundle before a run uses it, and return its tasks: core.yaml, every task's
    row in eval_meta_data.csv, and every task's data file (exists; with read_data, every line
    parses as an example of its type: the real bundle takes a few seconds).

    Raises FileNotFoundError (no bundle at all) or ValueError (what is broken, where)."""
    directory = Path(directory)
    tasks = read_tasks(directory)
    for task in tasks:
        path = _task_path(directory, task)
        if read_data:
            load_task_data(directory, task)
        elif not path.is_file():
            raise ValueError(f"task {task.label!r}: {path} is missing; {_redo_hint(directory)}")
    return tasks


# ---- download -----------------------------------------------------------------------------------


def resolve_url(url: str | None = None) -> str:
    """The argument if given, else $NANOCHAT_JAX_EVAL_BUNDLE_URL, else nanochat's S3 URL."""
    return url or os.environ.get(URL_ENV) or EVAL_BUNDLE_URL


def _safe_members(archive: zipfile.ZipFile) -> list[str]:
    """The names under eval_bundle/, refusing any that would land outside it."""
    names = []
    for name in archive.namelist():
        parts = Path(name).parts
        if name.startswith("/") or ".." in parts:
            raise CorruptDownload(f"zip member {name!r} points outside the bundle", permanent=True)
        if parts and parts[0] == BUNDLE_NAME:
            names.append(name)
    return names


def verify_bundle_zip(path: Path) -> None:
    """Raise CorruptDownload unless `path` is a whole zip holding eval_bundle/core.yaml."""
    try:
        with zipfile.ZipFile(path) as archive:
            if f"{BUNDLE_NAME}/core.yaml" not in _safe_members(archive):
                raise CorruptDownload(f"the zip holds no {BUNDLE_NAME}/core.yaml", permanent=True)
            bad = archive.testzip()  # reads every member: catches wrong bytes glued by a resume
            if bad is not None:
                raise CorruptDownload(f"zip member {bad!r} fails its CRC check")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise CorruptDownload(f"not a readable zip file ({e})") from None


def _complete_zip(path: Path) -> bool:
    """Whether a zip left by an earlier run (whose extraction failed) can be used as is."""
    if not path.is_file():
        return False
    try:
        verify_bundle_zip(path)
    except CorruptDownload:
        path.unlink(missing_ok=True)
        return False
    log.info("using the zip downloaded earlier: %s", path)
    return True


def _install(staging: Path, dest: Path) -> None:
    """Rename a complete bundle in `staging` to `dest` (replacing a demo bundle there)."""
    if dest.exists():
        trash = dest.with_name(f".{BUNDLE_NAME}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(dest, trash)
        os.replace(staging, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, dest)


def _extract(zip_path: Path, dest: Path) -> None:
    work = dest.with_name(f".{BUNDLE_NAME}.partial")
    shutil.rmtree(work, ignore_errors=True)  # left by a killed extraction
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(work, members=_safe_members(archive))
    _install(work / BUNDLE_NAME, dest)
    shutil.rmtree(work, ignore_errors=True)


def download_bundle(
    base_dir: str | Path | None = None,
    *,
    url: str | None = None,
    cfg: DownloadConfig | None = None,
) -> Path:
    """Download and install the real bundle into `<base_dir>/eval_bundle` (skipped if there).

    Raises OfflineError (server unreachable), BundleError (download failed), ValueError (a demo
    bundle is in the way)."""
    dest = bundle_dir(base_dir)
    if is_demo(dest):
        raise ValueError(
            f"{dest} holds the offline demo bundle ({DEMO_MARKER}); the real bundle must not "
            "mix with it. Delete that directory or point NANOCHAT_JAX_BASE_DIR elsewhere."
        )
    if (dest / "core.yaml").exists():
        log.info("eval bundle already in %s", dest)
        return dest
    cfg = cfg or DownloadConfig()
    url = resolve_url(url)
    check_reachable(
        url,
        cfg.connect_timeout_s,
        "Offline demo bundle: `python -m nanochat_jax.eval_bundle --demo`.",
    )
    zip_path = dest.with_name(f"{BUNDLE_NAME}.zip")
    if not _complete_zip(zip_path):
        log.info("downloading %s", url)
        error = download_file(url, zip_path, cfg=cfg, verify=verify_bundle_zip)
        if error is not None:
            raise BundleError(
                f"downloading {url} failed: {error}. Run the same command again to resume, or "
                "use the offline demo bundle: `python -m nanochat_jax.eval_bundle --demo`."
            )
    try:
        _extract(zip_path, dest)
    except OSError as e:  # e.g. the disk filled up: keep the zip, drop the half extraction
        shutil.rmtree(dest.with_name(f".{BUNDLE_NAME}.partial"), ignore_errors=True)
        raise BundleError(
            f"extracting {zip_path} into {dest} failed: {e}. The zip is kept: free some space "
            "and run the same command again (or use the offline demo bundle: `python -m "
            "nanochat_jax.eval_bundle --demo`)."
        ) from None
    zip_path.unlink()
    log.info("eval bundle installed in %s", dest)
    return dest


# ---- the offline demo bundle ----------------------------------------------------------------

_DEMO_EXAMPLES = 100  # per task
_SIZED_THINGS = (  # (name, size rank) for the schema task: bigger rank = bigger thing
    ("coin", 1),
    ("key", 1),
    ("ring", 1),
    ("pencil", 2),
    ("cup", 2),
    ("phone", 2),
    ("book", 3),
    ("shoe", 3),
    ("hat", 3),
    ("chair", 4),
    ("suitcase", 4),
    ("box", 4),
    ("table", 5),
    ("bed", 5),
    ("piano", 6),
    ("car", 7),
    ("boat", 7),
    ("truck", 8),
    ("house", 9),
)


def _stdlib_sentences(count: int) -> list[str]:
    """Plain-prose sentences from the first paragraphs of stdlib docstrings, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sentence_ok = re.compile(r"[A-Z][A-Za-z ,'()-]*[a-z]\.")
    seen: dict[str, None] = {}
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            text = " ".join(doc.split("\n\n")[0].split())
            for sentence in re.split(r"(?<=\.)\s+", text):
                if 6 <= len(sentence.split()) <= 20 and sentence_ok.fullmatch(sentence):
                    seen[sentence] = None
                    if len(seen) == count:
                        return list(seen)
    if len(seen) < 8:
        raise ValueError(f"found only {len(seen)} docstring sentences in {root}")
    return list(seen)


def _split_words(sentence: str, rng: random.Random) -> tuple[str, str]:
    words = sentence.split()
    cut = rng.randint(2, len(words) - 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def _arithmetic(rng: random.Random) -> list[dict]:
    items = []
    for _ in range(_DEMO_EXAMPLES):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        answer = a + b
        wrong = rng.sample([x for x in range(max(0, answer - 6), answer + 7) if x != answer], 3)
        choices = [str(x) for x in wrong]
        gold = rng.randrange(4)
        choices.insert(gold, str(answer))
        items.append(
            {"query": f"Question: What is {a} plus {b}?", "choices": choices, "gold": gold}
        )
    return items


def _sentence_endings(sentences: list[str], rng: random.Random) -> list[dict]:
    halves = [_split_words(s, rng) for s in sentences]
    items = []
    for i in range(_DEMO_EXAMPLES):
        query, ending = halves[i % len(halves)]
        others = [halves[j][1] for j in rng.sample(range(len(halves)), 4) if j != i % len(halves)]
        choices = others[:3]
        gold = rng.randrange(4)
        choices.insert(gold, ending)
        items.append({"query": query, "choices": choices, "gold": gold})
    return items


def _sizes(rng: random.Random) -> list[dict]:
    items = []
    while len(items) < _DEMO_EXAMPLES:
        first, second = rng.sample(_SIZED_THINGS, 2)
        if first[1] == second[1]:
            continue
        big, small = (first[0], second[0]) if first[1] > second[1] else (second[0], first[0])
        adjective = rng.choice(("big", "small"))
        options = [big, small]
        rng.shuffle(options)
        context = f"The {big} did not fit into the {small} because the"
        items.append(
            {
                "context_options": [f"{context} {thing}" for thing in options],
                "continuation": f"was too {adjective}.",
                "gold": options.index(big if adjective == "big" else small),
            }
        )
    return items


def _sentence_starts(sentences: list[str], rng: random.Random) -> list[dict]:
    halves = [_split_words(s, rng) for s in sentences]
    items = []
    for i in range(_DEMO_EXAMPLES):
        start, ending = halves[i % len(halves)]
        other = halves[(i + 1 + rng.randrange(len(halves) - 1)) % len(halves)][0]
        options = [start, other] if rng.random() < 0.5 else [other, start]
        items.append(
            {"context_options": options, "continuation": ending, "gold": options.index(start)}
        )
    return items


def _counting(rng: random.Random) -> list[dict]:
    items = []
    for _ in range(_DEMO_EXAMPLES):
        first, step = rng.randint(1, 50), rng.randint(1, 3)
        numbers = [str(first + step * k) for k in range(6)]
        items.append(
            {"context": ", ".join(numbers[:4]) + ",", "continuation": ", ".join(numbers[4:])}
        )
    return items


def _last_words(sentences: list[str]) -> list[dict]:
    items = []
    for sentence in sentences[:_DEMO_EXAMPLES]:
        context, _, last = sentence.rstrip(".").rpartition(" ")
        items.append({"context": context, "continuation": last})
    return items


def _demo_tasks() -> list[tuple[dict, float, list[dict]]]:
    """(core.yaml entry, random baseline %, items) of each demo task."""
    sentences = _stdlib_sentences(2 * _DEMO_EXAMPLES)
    rng = random.Random(20251020)
    mc, schema, lm = TASK_TYPES

    def entry(label: str, kind: str, shots: int, delimiter: str = " ") -> dict:
        out = {"label": label, "dataset_uri": f"demo/{label}.jsonl", "num_fewshot": [shots]}
        out["icl_task_type"] = kind
        if delimiter != " ":
            out["continuation_delimiter"] = delimiter
        return out

    return [
        (entry("demo_arithmetic", mc, 3, "\nAnswer: "), 25.0, _arithmetic(rng)),
        (entry("demo_sentence_ending", mc, 0), 25.0, _sentence_endings(sentences, rng)),
        (entry("demo_sizes", schema, 0), 50.0, _sizes(rng)),
        (entry("demo_sentence_start", schema, 0), 50.0, _sentence_starts(sentences[::-1], rng)),
        (entry("demo_counting", lm, 3), 0.0, _counting(rng)),
        (entry("demo_last_word", lm, 0), 0.0, _last_words(sentences[_DEMO_EXAMPLES:])),
    ]


def _demo_marker() -> dict:
    return {"version": DEMO_VERSION, "python": platform.python_version()}


def write_demo_bundle(base_dir: str | Path | None = None) -> Path:
    """Write the offline demo bundle into `<base_dir>/eval_bundle` (skipped if the same one is
    there). Refuses to replace a real bundle."""
    dest = bundle_dir(base_dir)
    marker = _demo_marker()
    if is_demo(dest):
        if json.loads((dest / DEMO_MARKER).read_text()) == marker:
            log.info("demo eval bundle already in %s", dest)
            return dest
    elif dest.exists():
        raise ValueError(
            f"{dest} holds a real eval bundle (no {DEMO_MARKER}); the demo bundle must not "
            "mix with it. Point NANOCHAT_JAX_BASE_DIR elsewhere."
        )
    staging = dest.with_name(f".{BUNDLE_NAME}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tasks = _demo_tasks()
        config = {"icl_tasks": [task for task, _, _ in tasks]}
        atomic_write_text(staging / "core.yaml", yaml.safe_dump(config, sort_keys=False))
        meta = io.StringIO()
        writer = csv.writer(meta, lineterminator="\n")
        writer.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "Random baseline"])
        for task, baseline, _ in tasks:
            writer.writerow(
                [task["label"], "demo", task["icl_task_type"], task["num_fewshot"][0], baseline]
            )
        atomic_write_text(staging / "eval_meta_data.csv", meta.getvalue())
        for task, _, items in tasks:
            lines = "".join(json.dumps(item) + "\n" for item in items)
            atomic_write_text(staging / "eval_data" / task["dataset_uri"], lines)
        atomic_write_text(staging / DEMO_MARKER, json.dumps(marker))
        _install(staging, dest)
    except OSError:  # e.g. disk full: no half-written bundle left behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("demo eval bundle (%d tasks) written to %s", len(tasks), dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download the CORE eval bundle (or a demo one).")
    parser.add_argument("--demo", action="store_true", help="write the offline demo bundle")
    parser.add_argument("--url", default=None, help=f"default ${URL_ENV} or {EVAL_BUNDLE_URL}")
    parser.add_argument("--base-dir", default=None, help="default: nanochat_jax's base dir")
    args = parser.parse_args(argv)
    try:
        if args.demo:
            directory = write_demo_bundle(args.base_dir)
        else:
            directory = download_bundle(args.base_dir, url=args.url)
        tasks = validate_bundle(directory)
    except (OfflineError, BundleError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the demo bundle (disk full, no permission)
        print(f"error: writing the eval bundle failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    kind = "demo eval bundle" if is_demo(directory) else "eval bundle"
    print(f"{kind} in {directory}: {len(tasks)} tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
