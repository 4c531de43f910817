"""ARC (AI2 Reasoning Challenge): grade-school science multiple choice (allenai/ai2_arc)."""

from __future__ import annotations

from nanochat_jax.tasks.common import Conversation, HFTask, evaluate_letter, mc_conversation

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(HFTask):
    """ARC-Easy or ARC-Challenge; the letters are the row's own labels (usually A-D, a few rows
    use 1-4 or five choices)."""

    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", split: str = "train", **kwargs):
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        super().__init__("allenai/ai2_arc", subset, split, **kwargs)
        self.subset, self.split = subset, split

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        choices = row["choices"]
        return mc_conversation(row["question"], choices["label"], choices["text"], row["answerKey"])

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return evaluate_letter(conversation, response)
