"""The task abstraction shared by every dataset: sliced views, mixtures, sequences, MC prompts.

A task is a list of conversations (`{"messages": [{"role", "content"}, ...], ...extra}`) that
can be sliced lazily (`start/stop/step`), mixed with others in a fixed shuffled order
(TaskMixture, for mid-training and SFT) or chained (TaskSequence, for a curriculum), and that
knows how to grade a model's reply (`evaluate`, and `reward` for RL).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Sequence
from typing import Any

from nanochat_jax.hf_data import load_rows

Conversation = dict[str, Any]


class Task:
    """A logical slice `start:stop:step` of an underlying list of conversations.

    Subclasses define `eval_type`, `num_examples()` (size of the underlying data) and
    `get_example(index)`; graded ones define `evaluate` (and GSM8K `reward`). A `stop` past the
    end of the data is clamped to it (nanochat would fail on the first index out of range; the
    small offline demo data needs the clamp to run nanochat's own slices, e.g. MMLU stop=5200).
    """

    eval_type: str = "generative"  # "categorical" | "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"stop must be None or >= start ({start}), got {stop}")
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.start = start
        self.stop = stop
        self.step = step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        raise NotImplementedError

    def __len__(self) -> int:
        size = self.num_examples()
        stop = size if self.stop is None else min(self.stop, size)
        return max(0, -(-(stop - self.start) // self.step))  # ceil((stop - start) / step)

    def __getitem__(self, i: int) -> Conversation:
        i = operator.index(i)
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__} index {i} out of range for {n} examples")
        return self.get_example(self.start + i * self.step)

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no evaluate()")

    def reward(self, conversation: Conversation, response: str) -> float:
        raise NotImplementedError(
            f"{type(self).__name__} has no reward(); only GSM8K is used for RL"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(start={self.start}, stop={self.stop}, step={self.step})"


class TaskMixture(Task):
    """Every example of every task, in one order shuffled by random.Random(42) (nanochat's).

    Listing a task twice oversamples it (each copy contributes all its examples).
    """

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(42).shuffle(self.index_map)

    def num_examples(self) -> int:
        return len(self.index_map)

    def get_example(self, index: int) -> Conversation:
        task_index, local_index = self.index_map[index]
        return self.tasks[task_index][local_index]


class TaskSequence(Task):
    """The tasks' examples one task after another, unshuffled (a curriculum)."""

    def __init__(self, tasks: Sequence[Task], **kwargs):
        super().__init__(**kwargs)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> Conversation:
        for task, length in zip(self.tasks, self.lengths, strict=True):
            if index < length:
                return task[index]
            index -= length
        raise IndexError(f"TaskSequence index out of range for {self.num_examples()} examples")


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """nanochat's multiple-choice user prompt.

    The letter comes after its choice with no space (`- Paris=A`): the model's answer is the
    bare letter, and `=A` tokenizes the letter like the answer token the eval reads.
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    pairs = zip(letters, choices, strict=True)
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in pairs)
    return (
        f"Multiple Choice question: {question}\n{lines}\n"
        "Respond only with the letter of the correct answer."
    )


def mc_conversation(question: str, letters: Sequence[str], choices: Sequence[str], answer: str):
    """A categorical conversation: the MC prompt, the bare letter as the reply, the letters."""
    if answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of the letters {list(letters)}")
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": answer},
        ],
        "letters": list(letters),
    }


def evaluate_letter(conversation: Conversation, response: str) -> bool:
    """Categorical grading: the response must be one of the letters; right if it is the gold."""
    letters = conversation["letters"]
    if response not in letters:
        raise ValueError(f"answer {response!r} must be one of the letters {letters}")
    return response == conversation["messages"][-1]["content"]


class HFTask(Task):
    """A task over a Hugging Face dataset split, loaded shuffled with seed 42 (nanochat)."""

    def __init__(self, repo: str, config: str, split: str, **kwargs):
        super().__init__(**kwargs)
        self.rows = load_rows(repo, config, split)

    def num_examples(self) -> int:
        return len(self.rows)
