import datetime

from nanochat_jax import report


def test_section_format_matches_nanochat(tmp_path):
    items = [
        {"depth": 4, "lr": 0.02, "tokens": 11219763200, "small": 9999, "flag": True},
        "free text",
    ]
    path = report.log_section("Base model training", items, base_dir=tmp_path)
    assert path == tmp_path / "report" / "base-model-training.md"
    text = path.read_text()
    assert text.startswith("## Base model training\ntimestamp: ")
    for line in (
        "- depth: 4",
        "- lr: 0.0200",
        "- tokens: 11,219,763,200",
        "- small: 9999",
        "- flag: True",
        "free text",
    ):
        assert line + "\n" in text


def test_render_is_deterministic_given_time():
    now = datetime.datetime(2026, 11, 28, 12, 0, 0)
    text = report.render_section("Tokenizer training", [{"a": 1.5}], now)
    assert text == "## Tokenizer training\ntimestamp: 2026-11-28 12:00:00\n\n- a: 1.5000\n"
