"""scripts/tok_train.py end to end on tiny parquet shards: files, report, doc capping."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax.tokenizer import get_token_bytes, get_tokenizer
from scripts import tok_train

GOLDEN = Path(__file__).parent / "golden"


def write_shards(data_dir: Path, n_shards: int = 3, docs_per_shard: int = 40) -> list[str]:
    with gzip.open(GOLDEN / "tok_corpus.txt.gz", "rt", encoding="utf-8") as f:
        docs = [d for d in f.read().split("\x1e") if d]
    data_dir.mkdir(parents=True)
    for i in range(n_shards):
        shard = docs[i * docs_per_shard : (i + 1) * docs_per_shard]
        table = pa.table({"text": shard})
        pq.write_table(table, data_dir / f"shard_{i:05d}.parquet", row_group_size=16)
    return docs[: n_shards * docs_per_shard]


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    write_shards(tmp_path / "base_data")
    return tmp_path


def test_iter_capped_docs():
    docs = ["aaaa", "bbbbbb", "cc", "dd"]
    # caps to 5 chars; stops after the running total exceeds 8 (the crossing doc included)
    assert list(tok_train.iter_capped_docs(docs, max_chars=8, doc_cap=5)) == ["aaaa", "bbbbb"]
    assert list(tok_train.iter_capped_docs(docs, max_chars=100, doc_cap=3)) == [
        "aaa",
        "bbb",
        "cc",
        "dd",
    ]


def test_tok_train_end_to_end(base_dir):
    tok = tok_train.main(["--vocab_size=400", "--max_chars=150000", "--doc_cap=3000"])
    assert tok.get_vocab_size() == 400 and tok.get_bos_token_id() == 391
    loaded = get_tokenizer()
    assert loaded.get_mergeable_ranks() == tok.get_mergeable_ranks()
    token_bytes = get_token_bytes()
    assert token_bytes.dtype == np.int32 and token_bytes.tolist() == tok.token_bytes().tolist()
    tok_dir = base_dir / "tokenizer"
    enc = pickle.loads((tok_dir / "tokenizer.pkl").read_bytes())
    assert enc.encode_ordinary("Hello there, 123!") == tok.encode("Hello there, 123!")
    assert (tok_dir / "tokenizer.json").exists()

    report = (base_dir / "report" / "tokenizer-training.md").read_text()
    assert report.startswith("## Tokenizer training\ntimestamp: ")
    for line in [
        "- max_chars: 150,000",
        "- doc_cap: 3000",
        "- vocab_size: 400",
        "- num_special_tokens: 9",
        "- token_bytes_min: 1",
    ]:
        assert line in report
    assert "- train_time: " in report and "- token_bytes_std: " in report


def test_tok_train_without_data(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no parquet shards"):
        tok_train.main(["--vocab_size=300"])
