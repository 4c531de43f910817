"""SmolTalk: general multi-turn conversations for SFT (HuggingFaceTB/smol-smoltalk, the version
made for small models; train ~460K rows, test ~24K)."""

from __future__ import annotations

from nanochat_jax.tasks.common import Conversation, HFTask

SPLITS = ("train", "test")


def check_messages(messages: list, where: str, *, allow_system: bool) -> None:
    """Raise ValueError unless the messages are (an optional system message, when allowed, then)
    user, assistant, user, ... with string contents, at least one exchange."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages must be a non-empty list, got {messages!r}")
    has_system = isinstance(messages[0], dict) and messages[0].get("role") == "system"
    rest = messages[1:] if allow_system and has_system else messages
    if len(rest) < 2:
        raise ValueError(f"{where}: needs at least a user and an assistant message")
    for i, message in enumerate(rest):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(message, dict) or message.get("role") != expected:
            raise ValueError(
                f"{where}: message {i} must have role {expected!r} (roles alternate user, "
                f"assistant, ...), got {message!r}"
            )
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} content must be a string")


class SmolTalk(HFTask):
    """Conversations as they are, with an optional leading system message; never evaluated."""

    eval_type = "generative"

    def __init__(self, split: str = "train", **kwargs):
        if split not in SPLITS:
            raise ValueError(f"SmolTalk split must be one of {SPLITS}, got {split!r}")
        super().__init__("HuggingFaceTB/smol-smoltalk", "default", split, **kwargs)
        self.split = split

    def get_example(self, index: int) -> Conversation:
        messages = self.rows[index]["messages"]
        check_messages(messages, f"SmolTalk {self.split} row {index}", allow_system=True)
        return {"messages": messages}
