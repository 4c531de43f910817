"""The mid-training and SFT data mixtures, in one place, with nanochat's later opt-in extras.

By default these are the mixtures of nanochat 2bc521a (our reference). Extras add what later
nanochat commits put into the same mixtures, each as nanochat lists it:
- "identity": the synthetic identity conversations `<base_dir>/task_data/
  identity_conversations.jsonl` through CustomJSON (fe5aed9): twice in the mid mixture (two
  epochs), once in SFT's.
- "spelling": SimpleSpelling + SpellingBee train rows (8892470): 200K + 80K in mid, 300 + 300 in
  SFT; `spelling_rows=(simple, bee)` sets other sizes (small runs: the rows are synthetic, so
  nanochat's sizes do not shrink with small demo data).
The components keep nanochat's order (identity before spelling, after the default ones):
TaskMixture shuffles the list of (task, index) pairs, so the order decides the row order.
The validation mixtures never change (nanochat's did not).
"""

from __future__ import annotations

from collections.abc import Sequence

from nanochat_jax.hf_data import IDENTITY_FILE, ensure_file
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.common import Task, TaskMixture
from nanochat_jax.tasks.customjson import CustomJSON
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.spellingbee import SimpleSpelling, SpellingBee

EXTRA_TASKS = ("identity", "spelling")
MID_SPELLING_ROWS = (200_000, 80_000)  # (SimpleSpelling, SpellingBee), nanochat's mid_train
SFT_SPELLING_ROWS = (300, 300)  # nanochat's chat_sft


def parse_extra_tasks(spec: str) -> tuple[str, ...]:
    """'identity,spelling' -> ("identity", "spelling"), in EXTRA_TASKS order; "" -> ().
    ValueError for an unknown or repeated name."""
    names = [name.strip() for name in spec.split(",")] if spec.strip() else []
    unknown = [name for name in names if name not in EXTRA_TASKS]
    if unknown:
        raise ValueError(
            f"unknown extra task(s) {unknown}; allowed: {', '.join(EXTRA_TASKS)} "
            "(comma-separated, or empty for none)"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"extra tasks repeat a name: {spec!r}")
    return tuple(name for name in EXTRA_TASKS if name in names)


def parse_spelling_rows(spec: str) -> tuple[int, int] | None:
    """'SIMPLE,BEE' (two ints >= 0) -> (SimpleSpelling rows, SpellingBee rows); "" -> None
    (nanochat's sizes). ValueError otherwise."""
    if not spec.strip():
        return None
    parts = [part.strip() for part in spec.split(",")]
    try:
        rows = tuple(int(part) for part in parts)
    except ValueError:
        rows = ()
    if len(rows) != 2 or min(rows) < 0:
        raise ValueError(
            f"spelling rows must be two ints >= 0, 'SIMPLE,BEE' (SimpleSpelling and SpellingBee "
            f"rows), or empty for nanochat's sizes; got {spec!r}"
        )
    return rows[0], rows[1]


def parse_extras(
    extra_tasks: str, spelling_rows: str
) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """The stage flags --extra_tasks and --spelling_rows, parsed and checked together;
    ValueError with a message that names the bad flag."""
    try:
        extra = parse_extra_tasks(extra_tasks)
    except ValueError as e:
        raise ValueError(f"--extra_tasks: {e}") from None
    try:
        rows = parse_spelling_rows(spelling_rows)
    except ValueError as e:
        raise ValueError(f"--spelling_rows: {e}") from None
    if rows is not None and "spelling" not in extra:
        raise ValueError(
            f"--spelling_rows={spelling_rows} needs 'spelling' in --extra_tasks "
            f"(got {extra_tasks!r})"
        )
    return extra, rows


def _extras(
    extra: Sequence[str],
    spelling_rows: tuple[int, int] | None,
    default_rows: tuple[int, int],
    identity_copies: int,
) -> list[Task]:
    unknown = [name for name in extra if name not in EXTRA_TASKS]
    if unknown:
        raise ValueError(f"unknown extra task(s) {unknown}; allowed: {', '.join(EXTRA_TASKS)}")
    if spelling_rows is not None and (len(spelling_rows) != 2 or min(spelling_rows) < 0):
        raise ValueError(f"spelling_rows must be (simple, bee) >= 0, got {spelling_rows!r}")
    tasks: list[Task] = []
    if "identity" in extra:
        path = ensure_file(IDENTITY_FILE)
        tasks += [CustomJSON(filepath=path) for _ in range(identity_copies)]
    if "spelling" in extra:
        simple, bee = default_rows if spelling_rows is None else spelling_rows
        tasks += [SimpleSpelling(size=simple, split="train"), SpellingBee(size=bee, split="train")]
    return tasks


def mid_mixtures(
    extra: Sequence[str] = (), spelling_rows: tuple[int, int] | None = None
) -> tuple[Task, Task]:
    """nanochat's (train, val) mixtures for mid-training, plus the extras named in `extra`."""
    train = TaskMixture(
        [
            SmolTalk(split="train"),  # ~460K general conversations
            MMLU(subset="auxiliary_train", split="train"),  # ~100K multiple choice problems
            GSM8K(subset="main", split="train"),  # ~8K maths problems with calculator calls
            *_extras(extra, spelling_rows, MID_SPELLING_ROWS, identity_copies=2),
        ]
    )
    val = TaskMixture(
        [
            SmolTalk(split="test"),
            MMLU(subset="all", split="test", stop=5200),
            GSM8K(subset="main", split="test", stop=420),
        ]
    )
    return train, val


def sft_mixtures(
    extra: Sequence[str] = (), spelling_rows: tuple[int, int] | None = None
) -> tuple[Task, Task]:
    """nanochat's (train, val) datasets for SFT, plus the extras named in `extra`."""
    train = TaskMixture(
        [
            ARC(subset="ARC-Easy", split="train"),  # 2.3K rows
            ARC(subset="ARC-Challenge", split="train"),  # 1.1K rows
            GSM8K(subset="main", split="train"),  # 8K rows
            SmolTalk(split="train", stop=10_000),  # 10K rows of general conversations
            *_extras(extra, spelling_rows, SFT_SPELLING_ROWS, identity_copies=1),
        ]
    )
    return train, SmolTalk(split="test")
