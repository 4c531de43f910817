"""nanochat's tasks: datasets as conversations, mixtures for mid-training and SFT, graders.

from nanochat_jax.tasks import ARC, GSM8K, TaskMixture, get_task
train = TaskMixture([ARC("ARC-Easy", "train"), GSM8K("main", "train")])
task = get_task("GSM8K")  # chat_eval's names: ARC-Easy ARC-Challenge MMLU GSM8K HumanEval
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

# chat_eval's task names in its default order
TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")


def get_task(name: str, split: str = "test", **slice_kwargs) -> Task:
    """chat_eval's task by name: ARC-Easy/ARC-Challenge (split), MMLU (subset all), GSM8K
    (subset main), HumanEval (test only). slice_kwargs: start, stop, step."""
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
    raise ValueError(f"unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}")


__all__ = [
    "ARC",
    "GSM8K",
    "MMLU",
    "TASK_NAMES",
    "CustomJSON",
    "HumanEval",
    "SmolTalk",
    "Task",
    "TaskDataError",
    "TaskMixture",
    "TaskSequence",
    "get_task",
    "render_mc",
]
