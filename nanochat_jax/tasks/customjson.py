"""Conversations from a local JSONL file: one JSON list of messages per line (nanochat's
identity_conversations.jsonl format), user first, roles alternating."""

from __future__ import annotations

import json
from pathlib import Path

from nanochat_jax.tasks.common import Conversation, Task
from nanochat_jax.tasks.smoltalk import check_messages


class CustomJSON(Task):
    """Every conversation of a JSONL file, in file order (not shuffled, like nanochat)."""

    eval_type = "generative"

    def __init__(self, filepath: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.filepath = Path(filepath)
        if not self.filepath.is_file():
            raise FileNotFoundError(
                f"{self.filepath} does not exist; CustomJSON needs a JSONL file with one JSON "
                'list of messages per line, e.g. [{"role": "user", "content": "Hi"}, '
                '{"role": "assistant", "content": "Hello!"}]'
            )
        self.conversations: list[list[dict]] = []
        with open(self.filepath, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.filepath}:{line_number}"
                try:
                    messages = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from None
                check_messages(messages, where, allow_system=False)
                self.conversations.append(messages)

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> Conversation:
        return {"messages": self.conversations[index]}
