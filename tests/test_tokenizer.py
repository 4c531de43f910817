"""nanochat_jax.tokenizer against nanochat's golden tokenizer: ranks, encodings, token_bytes,
chat renders; save/load; tiktoken and HF exports; errors."""

from __future__ import annotations

import base64
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from nanochat_jax.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    TOKENIZER_FILE,
    Tokenizer,
    get_token_bytes,
    get_tokenizer,
)
from tests.test_bpe_rust import random_text

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    with gzip.open(GOLDEN / "tok_corpus.txt.gz", "rt", encoding="utf-8") as f:
        docs = f.read().split("\x1e")
    return Tokenizer.train_from_iterator(iter(docs), 1024)


def test_constants(golden):
    assert SPLIT_PATTERN == golden["pattern"]
    assert SPECIAL_TOKENS == list(golden["special_tokens"])


def test_golden_vocab_and_specials(tok, golden):
    ranks = {base64.b64decode(k): v for k, v in golden["mergeable_ranks_b64"].items()}
    assert tok.get_mergeable_ranks() == ranks
    assert tok.get_vocab_size() == 1024
    assert {s: tok.encode_special(s) for s in SPECIAL_TOKENS} == golden["special_tokens"]
    assert tok.get_bos_token_id() == golden["bos_token_id"] == 1015
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tok.id_to_token(1016) == "<|user_start|>"


def test_golden_encodings(tok, golden):
    texts = [item["text"] for item in golden["encodings"]]
    for item in golden["encodings"]:
        assert tok.encode(item["text"]) == item["ids"]
        assert tok.decode(item["ids"]) == item["text"]
    assert tok.encode(texts) == [item["ids"] for item in golden["encodings"]]
    assert tok.encode(texts, num_threads=1) == [item["ids"] for item in golden["encodings"]]


def test_golden_token_bytes(tok, golden):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (1024,)
    assert tb.tolist() == golden["token_bytes"]
    assert tb[0x80] == 3  # lone continuation byte decodes to U+FFFD, 3 bytes (nanochat quirk)
    assert (tb[1015:] == 0).all()


def test_golden_renders(tok, golden):
    for name, case in golden["render_conversation"].items():
        ids, mask = tok.render_conversation(case["conversation"])
        assert ids == case["ids"], name
        assert mask == case["mask"], name
    rfc = golden["render_for_completion"]
    conversation = golden["render_conversation"][rfc["conversation"]]["conversation"]
    before = json.dumps(conversation)
    assert tok.render_for_completion(conversation) == rfc["ids"]
    assert json.dumps(conversation) == before  # the caller's conversation is not modified


def test_specials_in_text_are_plain_text(tok):
    ids = tok.encode("<|bos|><|assistant_end|>")
    assert all(i < 1015 for i in ids)
    assert tok.decode(ids) == "<|bos|><|assistant_end|>"


def test_prepend_append(tok):
    hi = tok.encode("hi")
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    assert tok.encode("hi", prepend="<|bos|>", append=end) == [bos, *hi, end]
    assert tok.encode(["hi", ""], prepend=bos) == [[bos, *hi], [bos]]
    assert tok("hi", append="<|bos|>") == [*hi, bos]
    with pytest.raises(ValueError, match="unknown special token '<\\|eos\\|>'"):
        tok.encode("hi", prepend="<|eos|>")
    with pytest.raises(ValueError, match="outside"):
        tok.encode("hi", append=5000)
    with pytest.raises(TypeError, match="str or a list of str"):
        tok.encode(b"hi")


def test_render_rules_and_errors(tok):
    conv = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": [{"type": "python_output", "text": "1"}]},
        ]
    }
    ids, mask = tok.render_conversation(conv)
    sp = {s: tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert ids[-4:] == [sp["<|output_start|>"], tok.encode("1")[0], sp["<|output_end|>"], ids[-1]]
    assert mask[-4:] == [0, 0, 0, 1] and ids[-1] == sp["<|assistant_end|>"]
    assert tok.render_conversation(conv, max_tokens=3) == (ids[:3], mask[:3])

    def bad(messages, match):
        with pytest.raises(ValueError, match=match):
            tok.render_conversation({"messages": messages})

    user = {"role": "user", "content": "q"}
    assistant = {"role": "assistant", "content": "a"}
    bad([], "at least one message")
    bad([assistant], "message 0 has role 'assistant' but must be 'user'")
    bad([user, user], "message 1 has role 'user' but must be 'assistant'")
    bad([{"role": "system", "content": "s"}, assistant], "system message must be followed")
    bad([user, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "'image'")
    bad([user, {"role": "assistant", "content": 3}], "str or a list of parts")
    bad([{"role": "user", "content": ["x"]}], "content must be a str")
    with pytest.raises(ValueError, match="ending with assistant"):
        tok.render_for_completion({"messages": [user]})


def test_roundtrip_fuzz(tok):
    rng = random.Random(5)
    texts = [random_text(rng, rng.randint(1, 50)) for _ in range(200)]
    for text, ids in zip(texts, tok.encode(texts), strict=True):
        assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("x\ud800y")


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    loaded = get_tokenizer(tmp_path)
    assert loaded.get_mergeable_ranks() == tok.get_mergeable_ranks()
    assert loaded.get_pattern() == SPLIT_PATTERN
    assert loaded.encode("Hello world!") == tok.encode("Hello world!")
    assert get_token_bytes(tmp_path).tolist() == tok.token_bytes().tolist()
    assert not list((tmp_path / "tokenizer").glob("*.tmp"))

    with pytest.raises(FileNotFoundError, match="tok_train"):
        Tokenizer.load(tmp_path / "missing")
    path = tmp_path / "tokenizer" / TOKENIZER_FILE
    path.write_text(json.dumps({"format": "something else", "version": 1}))
    with pytest.raises(ValueError, match="not a nanochat_jax.tokenizer v1 file"):
        Tokenizer.load(tmp_path / "tokenizer")


def test_train_errors():
    with pytest.raises(ValueError, match=">= 265"):
        Tokenizer.train_from_iterator(["abc"], 264)
    with pytest.raises(TypeError, match="item 0 is a int"):
        Tokenizer.train_from_iterator([1], 300)
    with pytest.raises(ValueError, match="no texts"):
        Tokenizer.train_from_iterator([], 300)


def test_tiktoken_and_hf_exports_encode_identically(tok, golden, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    enc = tok.to_tiktoken()
    assert enc.n_vocab == 1024 and enc.encode_single_token("<|bos|>") == 1015
    tok.save_hf_json(tmp_path / "tokenizer.json")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.token_to_id("<|bos|>") == 1015 and hf.get_vocab_size() == 1024
    hf.encode_special_tokens = True  # specials in text are plain text, as in our encode
    rng = random.Random(6)
    texts = [item["text"] for item in golden["encodings"]] + [random_text(rng) for _ in range(100)]
    ours = tok.encode(texts)
    assert enc.encode_ordinary_batch(texts) == ours
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == ours
    assert hf.decode(ours[0]) == texts[0]


def test_core_render_rows(tok):
    # core_render.json's token rows are BOS + encode(prompt) with this same tokenizer; the
    # language-modelling task keeps only the row of its full (with continuation) prompt.
    core = json.loads((GOLDEN / "core_render.json").read_text())
    bos = tok.get_bos_token_id()
    assert core["bos_token_id"] == bos
    for name, task in core["tasks"].items():
        prompts = task["prompts"][-1:] if name == "language_modeling" else task["prompts"]
        assert tok.encode(prompts, prepend=bos) == task["tokens"], name
