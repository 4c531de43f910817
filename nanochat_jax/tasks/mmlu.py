"""MMLU: 57-subject multiple choice (cais/mmlu). `all` holds the test/validation/dev splits;
the `auxiliary_train` config (~100K questions from ARC, MC_TEST, OBQA, RACE) is midtraining's
multiple-choice practice."""

from __future__ import annotations

from nanochat_jax.tasks.common import Conversation, HFTask, evaluate_letter, mc_conversation

LETTERS = ("A", "B", "C", "D")
SPLITS = {"all": ("test", "validation", "dev", "auxiliary_train"), "auxiliary_train": ("train",)}


class MMLU(HFTask):
    """Four choices, letters A-D; the conversation also carries the row's `subject`."""

    eval_type = "categorical"
    letters = LETTERS
    groups = (
        "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
        "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_medicine", "college_physics", "computer_security",
        "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
        "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_european_history", "high_school_geography",
        "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
        "high_school_psychology", "high_school_statistics", "high_school_us_history",
        "high_school_world_history", "human_aging", "human_sexuality", "international_law",
        "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
        "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
        "philosophy", "prehistory", "professional_accounting", "professional_law",
        "professional_medicine", "professional_psychology", "public_relations",
        "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
    )  # fmt: skip

    def __init__(self, subset: str = "all", split: str = "test", **kwargs):
        if subset not in SPLITS:
            raise ValueError(f"MMLU subset must be one of {tuple(SPLITS)}, got {subset!r}")
        if split not in SPLITS[subset]:
            raise ValueError(
                f"MMLU subset {subset!r} has splits {SPLITS[subset]}, got split {split!r}"
            )
        super().__init__("cais/mmlu", subset, split, **kwargs)
        self.subset, self.split = subset, split

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        if self.subset == "auxiliary_train":
            row = row["train"]  # this config wraps each row in a `train` struct
        choices = row["choices"]
        if len(choices) != len(LETTERS):
            raise ValueError(f"MMLU row {index} has {len(choices)} choices, expected 4")
        conversation = mc_conversation(row["question"], LETTERS, choices, LETTERS[row["answer"]])
        conversation["subject"] = row["subject"]
        return conversation

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        return evaluate_letter(conversation, response)
