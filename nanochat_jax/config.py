"""GPTConfig: nanochat's model hyperparameters and its single "depth" dial."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# nanochat derives the width from the depth with an "aspect ratio" of 64 and aims for 128-dim heads.
ASPECT_RATIO = 64
TARGET_HEAD_DIM = 128


@dataclass(frozen=True)
class GPTConfig:
    """Field names and defaults are nanochat's, so `meta["model_config"]` maps 1:1."""

    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{field.name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head}) "
                "for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = n_embd // n_head = {self.head_dim} must be even (rotary splits it "
                "into two halves)"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_seq_len(self) -> int:
        """nanochat precomputes rotary tables for 10x the training context."""
        return 10 * self.sequence_len

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int = 2048) -> GPTConfig:
        """base_train's recipe: width 64*depth, ceil(width/128) heads, plain MHA."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        model_dim = depth * ASPECT_RATIO
        num_heads = max(1, -(-model_dim // TARGET_HEAD_DIM))
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=num_heads,
            n_kv_head=num_heads,
            n_embd=model_dim,
        )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)
