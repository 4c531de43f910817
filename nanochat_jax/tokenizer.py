"""nanochat's tokenizer on top of the Rust crate `bpe_rust`: special tokens, chat rendering,
token_bytes, save/load, and export to tiktoken / HF `tokenizers`.

Ids: the mergeable ranks first (256 bytes + merges, learned exactly as nanochat's rustbpe
learns them), then nanochat's 9 special tokens in SPECIAL_TOKENS order. Text is always encoded
as ordinary text: special-token strings inside it are not parsed as specials.

On disk, `save(dir)` writes `dir/nanochat_tokenizer.json` (format below) and
`dir/token_bytes.npy`; `save_hf_json(path)` writes a HF `tokenizer.json` that encodes the same.

    {"format": "nanochat_jax.tokenizer", "version": 1,
     "pattern": <split regex>,
     "mergeable_tokens_b64": [base64 of the bytes of rank 0, rank 1, ...],
     "special_tokens": {"<|bos|>": id, ...}}
"""

from __future__ import annotations

import base64
import copy
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

import bpe_rust
from nanochat_jax.common import atomic_write_bytes, atomic_write_text, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # document delimiter, prepended to every document
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, fed back to the assistant
    "<|output_end|>",
]

# GPT-4's pattern with numbers split into runs of at most 2 digits (nanochat: saves vocab slots
# at small vocab sizes).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

FORMAT_NAME = "nanochat_jax.tokenizer"
FORMAT_VERSION = 1
TOKENIZER_FILE = "nanochat_tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map, which byte-level HF tokenizers use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """A BPE tokenizer with nanochat's special tokens and chat format."""

    def __init__(self, core: bpe_rust.Tokenizer):
        specials = core.get_special_tokens()
        n = core.n_mergeable
        expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        if specials != expected:
            raise ValueError(
                f"the core tokenizer must carry nanochat's special tokens {expected}, "
                f"got {specials}"
            )
        self._core = core
        self._special_ids = expected

    # ---- construction, save, load ---------------------------------------------------------

    @classmethod
    def from_ranks(
        cls, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN
    ) -> Tokenizer:
        """From `{token bytes: rank}` (ranks 0..n-1); the special tokens get ids n..n+8."""
        n = len(mergeable_ranks)
        specials = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(bpe_rust.Tokenizer.from_ranks(mergeable_ranks, pattern, specials))

    @classmethod
    def train_from_iterator(
        cls, text_iter: Iterable[str], vocab_size: int, *, buffer_size: int = 8192
    ) -> Tokenizer:
        """Learn `vocab_size - 9` mergeable tokens (nanochat's rustbpe merges) from text."""
        min_size = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < min_size:
            raise ValueError(
                f"vocab_size must be an int >= {min_size} (256 byte tokens + "
                f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
            )
        core = bpe_rust.Tokenizer.train_from_iterator(
            text_iter, vocab_size - len(SPECIAL_TOKENS), SPLIT_PATTERN, buffer_size
        )
        specials = {name: core.n_mergeable + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(core.with_special_tokens(specials))

    def save(self, directory: str | Path) -> Path:
        """Write `nanochat_tokenizer.json` and `token_bytes.npy` into `directory` (atomically)."""
        directory = Path(directory)
        state = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "pattern": self.get_pattern(),
            "mergeable_tokens_b64": [
                base64.b64encode(t).decode("ascii") for t in self.get_mergeable_ranks()
            ],
            "special_tokens": self._special_ids,
        }
        atomic_write_text(directory / TOKENIZER_FILE, json.dumps(state))
        buf = io.BytesIO()
        np.save(buf, self.token_bytes())
        atomic_write_bytes(directory / TOKEN_BYTES_FILE, buf.getvalue())
        return directory / TOKENIZER_FILE

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"no tokenizer at {path}; train one first: python -m scripts.tok_train"
            )
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("format") != FORMAT_NAME or state.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is not a {FORMAT_NAME} v{FORMAT_VERSION} file "
                f"(format={state.get('format')!r}, version={state.get('version')!r})"
            )
        tokens = [base64.b64decode(t) for t in state["mergeable_tokens_b64"]]
        tok = cls.from_ranks({t: r for r, t in enumerate(tokens)}, state["pattern"])
        if state["special_tokens"] != tok._special_ids:
            raise ValueError(f"{path}: special tokens {state['special_tokens']} are not nanochat's")
        return tok

    # ---- vocabulary -----------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self._core.vocab_size

    def get_pattern(self) -> str:
        return self._core.get_pattern()

    def get_special_tokens(self) -> set[str]:
        return set(self._special_ids)

    def get_mergeable_ranks(self) -> dict[bytes, int]:
        return self._core.get_mergeable_ranks()

    def encode_special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise ValueError(
                f"unknown special token {name!r}; the special tokens are {SPECIAL_TOKENS}"
            ) from None

    def get_bos_token_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def id_to_token(self, token_id: int) -> str:
        return self.decode([token_id])

    def token_bytes(self) -> np.ndarray:
        """int32 (vocab_size,): UTF-8 length of each id's decoded string, 0 for specials.

        Exactly as nanochat's tok_train: decoding a lone id replaces invalid UTF-8 with U+FFFD,
        so e.g. the byte tokens 0x80-0xFF count 3 bytes, not 1. Used for bits per byte.
        """
        specials = self.get_special_tokens()
        out = np.zeros(self.get_vocab_size(), dtype=np.int32)
        for token, rank in self.get_mergeable_ranks().items():
            text = token.decode("utf-8", errors="replace")
            out[rank] = 0 if text in specials else len(text.encode("utf-8"))
        return out

    # ---- encode / decode ------------------------------------------------------------------

    def _special_or_id(self, token: str | int) -> int:
        if isinstance(token, int):
            if not 0 <= token < self.get_vocab_size():
                raise ValueError(f"token id {token} is outside [0, {self.get_vocab_size()})")
            return token
        return self.encode_special(token)

    def encode(
        self,
        text: str | list[str],
        prepend: str | int | None = None,
        append: str | int | None = None,
        num_threads: int | None = None,
    ) -> list[int] | list[list[int]]:
        """Ids of `text` (or of each text in a list, in parallel on `num_threads`, default
        all cores). `prepend` / `append`: a special-token name or an id added to each row."""
        head = [] if prepend is None else [self._special_or_id(prepend)]
        tail = [] if append is None else [self._special_or_id(append)]
        if isinstance(text, str):
            ids = self._core.encode(text)
            return head + ids + tail if head or tail else ids
        if isinstance(text, list):
            rows = self._core.encode_batch(text, num_threads)
            return [head + row + tail for row in rows] if head or tail else rows
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (as tiktoken)."""
        return self._core.decode(list(ids)).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._core.decode(list(ids))

    # ---- chat format ----------------------------------------------------------------------

    def render_conversation(
        self, conversation: dict[str, Any], max_tokens: int = 2048
    ) -> tuple[list[int], list[int]]:
        """nanochat's chat format: (ids, mask), mask 1 on the tokens the assistant is trained
        to produce (its text, python calls, <|assistant_end|>), 0 elsewhere; both truncated
        to `max_tokens`. A leading system message is merged into the first user message."""
        messages = _messages_of(conversation)
        if messages[0].get("role") == "system":
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = dict(messages[1])
            merged["content"] = _content_str(messages[0], 0) + "\n\n" + _content_str(merged, 1)
            messages = [merged, *messages[2:]]

        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: list[int], m: int) -> None:
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self._special_ids
        add([sp["<|bos|>"]], 0)
        for i, message in enumerate(messages):
            role = message.get("role")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(
                    f"message {i} has role {role!r} but must be {expected!r}: roles alternate "
                    "user, assistant, user, ... (an optional system message may come first)"
                )
            content = message.get("content")
            if role == "user":
                add([sp["<|user_start|>"]], 0)
                add(self._core.encode(_content_str(message, i)), 0)
                add([sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)
            if isinstance(content, str):
                add(self._core.encode(content), 1)
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    self._render_part(part, i, j, add)
            else:
                raise ValueError(
                    f"message {i}: assistant content must be a str or a list of parts, "
                    f"got {type(content).__name__}"
                )
            add([sp["<|assistant_end|>"]], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def _render_part(self, part: Any, i: int, j: int, add) -> None:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} part {j} must be a dict with a str 'text', got {part!r}")
        kind = part.get("type")
        tokens = self._core.encode(part["text"])
        sp = self._special_ids
        if kind == "text":
            add(tokens, 1)
        elif kind == "python":
            add([sp["<|python_start|>"]], 1)
            add(tokens, 1)
            add([sp["<|python_end|>"]], 1)
        elif kind == "python_output":
            # Tool output comes from the interpreter at inference, so it is never supervised.
            add([sp["<|output_start|>"]], 0)
            add(tokens, 0)
            add([sp["<|output_end|>"]], 0)
        else:
            raise ValueError(
                f"message {i} part {j} has type {kind!r}; allowed: 'text', 'python', "
                "'python_output'"
            )

    def render_for_completion(self, conversation: dict[str, Any]) -> list[int]:
        """Ids that prime the assistant's reply: the conversation without its last (assistant)
        message, then <|assistant_start|>."""
        messages = _messages_of(conversation)
        if messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation ending with assistant")
        trimmed = copy.deepcopy(conversation)
        trimmed["messages"] = trimmed["messages"][:-1]
        ids, _ = self.render_conversation(trimmed)
        return ids + [self._special_ids["<|assistant_start|>"]]

    # ---- export ---------------------------------------------------------------------------

    def to_tiktoken(self):
        """A `tiktoken.Encoding` with the same ranks, pattern and special tokens."""
        import tiktoken

        return tiktoken.Encoding(
            name="nanochat_jax",
            pat_str=self.get_pattern(),
            mergeable_ranks=self.get_mergeable_ranks(),
            special_tokens=self._special_ids,
        )

    def to_hf_tokenizer(self):
        """A HF `tokenizers.Tokenizer` that encodes like this one: byte-level BPE whose merges
        are every two-token split of each token, ordered by rank, and which takes a whole chunk
        that is a token as is (tiktoken's rule). Set `encode_special_tokens = True` on it to
        treat special-token strings in text as ordinary text, as `encode` does."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        alphabet = _gpt2_byte_alphabet()
        tokens = list(self.get_mergeable_ranks())
        names = ["".join(alphabet[b] for b in t) for t in tokens]
        vocab = {name: rank for rank, name in enumerate(names)}
        merges = [(names[a], names[b]) for a, b, _ in self._core.get_merge_pairs()]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(self.get_pattern()), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens(
            [AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS]
        )
        return hf

    def save_hf_json(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_hf_tokenizer().to_str())
        return path

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.get_vocab_size()}, bos={self.get_bos_token_id()})"


def _messages_of(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is {'messages': [...]} with at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    return messages


def _content_str(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(
            f"message {i} ({message.get('role')}) content must be a str, "
            f"got {type(content).__name__}"
        )
    return content


def get_tokenizer(base_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer trained by scripts/tok_train under `<base_dir>/tokenizer/`."""
    base = Path(base_dir) if base_dir is not None else get_base_dir()
    return Tokenizer.load(base / "tokenizer")


def get_token_bytes(base_dir: str | Path | None = None) -> np.ndarray:
    """`<base_dir>/tokenizer/token_bytes.npy` (int32, one entry per id)."""
    base = Path(base_dir) if base_dir is not None else get_base_dir()
    path = base / "tokenizer" / TOKEN_BYTES_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no {path}; train the tokenizer first: python -m scripts.tok_train"
        )
    return np.load(path)
