"""GSM8K: grade-school math word problems (openai/gsm8k), solved with calculator tool calls.

The reference answers annotate each computation as `<<48/2=24>>`; those become a `python` part
(the expression the model learns to emit) and a `python_output` part (the result the tool
returns), and the final line `#### 72` holds the number that is graded.
"""

from __future__ import annotations

import re

from nanochat_jax.tasks.common import Conversation, HFTask

SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
_CALC_RE = re.compile(r"(<<[^>]+>>)")
_ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after `#### `, stripped, commas removed; None if there is none."""
    match = _ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def answer_parts(answer: str) -> list[dict[str, str]]:
    """The reference solution as assistant parts: text, python (the expression before the last
    '='), python_output (what follows it); an annotation without '=' has an empty output."""
    parts = []
    for piece in _CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, sep, result = piece[2:-2].rpartition("=")
            if not sep:  # no '=' in the annotation
                expr, result = piece[2:-2], ""
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(HFTask):
    """Generative: graded by the final `#### number`; reward = 1.0 if right, else 0.0."""

    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "train", **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        super().__init__("openai/gsm8k", subset, split, **kwargs)
        self.subset, self.split = subset, split

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answer_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        if not isinstance(response, str):
            raise ValueError(f"response must be a str, got {type(response).__name__}")
        reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        predicted = extract_answer(response)
        return predicted is not None and predicted == reference

    def reward(self, conversation: Conversation, response: str) -> float:
        return float(self.evaluate(conversation, response))
