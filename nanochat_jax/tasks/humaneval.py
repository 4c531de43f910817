"""HumanEval: 164 Python functions to complete from a signature and docstring
(openai/openai_humaneval), graded by running the problem's unit tests on the completion."""

from __future__ import annotations

import re

from nanochat_jax.tasks.common import Conversation, HFTask

_FENCED_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The prompt's leading import lines (comments and blank lines skipped), one per line: the
    model's completion may omit them, the tests need them."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The first ```python fenced block of the completion, else the whole completion."""
    blocks = _FENCED_RE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


def build_program(conversation: Conversation, completion: str) -> str:
    """imports + code + the problem's tests + `check(<entry_point>)`."""
    imports = extract_imports(conversation["messages"][0]["content"])
    return (
        f"{imports}\n\n{extract_program(completion)}\n\n{conversation['test']}\n"
        f"check({conversation['entry_point']})"
    )


class HumanEval(HFTask):
    """user = the prompt; assistant = prompt + "\\n" + canonical solution; the conversation
    carries `entry_point` and `test`."""

    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__("openai/openai_humaneval", "openai_humaneval", "test", **kwargs)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"},
            ],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        # imported here: the sandbox is only needed when HumanEval is actually graded
        from nanochat_jax.execution import execute_code

        return bool(execute_code(build_program(conversation, response)).success)
