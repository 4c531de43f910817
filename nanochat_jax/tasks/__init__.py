"""nanochat's tasks: datasets as conversations, mixtures for mid-training and SFT, graders.

from nanochat_jax.tasks import ARC, GSM8K, TaskMixture, get_task
train = TaskMixture([ARC("ARC-Easy", "train"), GSM8K("main", "train")])
task = get_task("GSM8K")  # chat_eval's names: ARC-Easy ARC-Challenge MMLU GSM8K HumanEval

Opt-in extras from later nanochat (see tasks/mixtures.py): SpellingBee and SimpleSpelling
(spellingbee.py, 8892470), the identity conversations read by CustomJSON (fe5aed9); chat_eval
also knows "SpellingBee" (EXTRA_TASK_NAMES), evaluated only when asked for.
"""

from __future__ import annotations

from nanochat_jax.hf_data import TaskDataError
from nanochat_jax.tasks.arc import ARC
from nanochat_jax.tasks.common import Task, TaskMixture, TaskSequence, render_mc
from nanochat_jax.tasks.customjson import CustomJSON
from nanochat_jax.tasks.gsm8k import GSM8K
from nanochat_jax.tasks.humaneval import HumanEval
from nanochat_jax.tasks.mmlu import MMLU
from nanochat_jax.tasks.smoltalk import SmolTalk
from nanochat_jax.tasks.spellingbee import SimpleSpelling, SpellingBee

# chat_eval's task names in its default order
TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
# chat_eval's tasks beyond the default five (nanochat 8892470), evaluated when named
EXTRA_TASK_NAMES = ("SpellingBee",)
SPELLING_BEE_EVAL_SIZE = 256  # nanochat's chat_eval: SpellingBee(size=256, split="test")


def get_task(name: str, split: str = "test", **slice_kwargs) -> Task:
    """chat_eval's task by name: ARC-Easy/ARC-Challenge (split), MMLU (subset all), GSM8K
    (subset main), HumanEval (test only), SpellingBee (256 problems of the split).
    slice_kwargs: start, stop, step."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return ARC(name, split, **slice_kwargs)
    if name == "MMLU":
        return MMLU("all", split, **slice_kwargs)
    if name == "GSM8K":
        return GSM8K("main", split, **slice_kwargs)
    if name == "HumanEval":
        if split != "test":
            raise ValueError(f"HumanEval has only the test split, got {split!r}")
        return HumanEval(**slice_kwargs)
    if name == "SpellingBee":
        return SpellingBee(size=SPELLING_BEE_EVAL_SIZE, split=split, **slice_kwargs)
    allowed = ", ".join((*TASK_NAMES, *EXTRA_TASK_NAMES))
    raise ValueError(f"unknown task {name!r}; allowed: {allowed}")


__all__ = [
    "ARC",
    "EXTRA_TASK_NAMES",
    "GSM8K",
    "MMLU",
    "TASK_NAMES",
    "CustomJSON",
    "HumanEval",
    "SimpleSpelling",
    "SmolTalk",
    "SpellingBee",
    "Task",
    "TaskDataError",
    "TaskMixture",
    "TaskSequence",
    "get_task",
    "render_mc",
]
