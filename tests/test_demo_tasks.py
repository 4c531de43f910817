"""nanochat_jax.demo_tasks: the offline datasets load through the task classes unchanged, have
the real schemas, grade as right with their own answers, are deterministic, keep test apart
from train, and never mix with downloaded data."""

from __future__ import annotations

import gzip
import io
import json
import keyword
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nanochat_jax import demo_tasks, hf_data
from nanochat_jax.demo_tasks import DemoTasksConfig, generate, write_demo_tasks
from nanochat_jax.tasks import (
    ARC,
    GSM8K,
    MMLU,
    HumanEval,
    SmolTalk,
    TaskMixture,
    get_task,
)
from nanochat_jax.tasks.humaneval import build_program
from nanochat_jax.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "golden"
CFG = DemoTasksConfig()
# nanochat's calculator refuses `.count(` expressions holding these (engine.use_calculator)
COUNT_REFUSED = (
    "__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
    "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr",
)  # fmt: skip


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("demo_base")
    write_demo_tasks(CFG, base)
    return base


@pytest.fixture
def demo(demo_dir, monkeypatch) -> Path:
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(demo_dir))
    monkeypatch.setenv(hf_data.HF_URL_ENV, "http://127.0.0.1:9")  # a download attempt fails fast
    return demo_dir


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    with gzip.open(GOLDEN / "tok_corpus.txt.gz", "rt", encoding="utf-8") as f:
        docs = f.read().split("\x1e")[:200]
    return Tokenizer.train_from_iterator(iter(docs), 300)


def test_every_split_is_written_with_the_real_schema(demo):
    assert hf_data.is_demo(demo)
    for (repo, config, _), hf_split in hf_data.SPLITS.items():
        assert hf_split.is_cached(demo), hf_split.key
        schemas = {pq.read_schema(p) for p in hf_split.local_files(demo)}
        # as parquet spells the schema (list items are named "element")
        buffer = io.BytesIO()
        pq.write_table(demo_tasks._schema(repo, config).empty_table(), buffer)
        assert schemas == {pq.read_schema(buffer)}, hf_split.key
    smol = hf_data.get_split("HuggingFaceTB/smol-smoltalk", "default", "train")
    assert len(smol.local_files(demo)) == 4  # like the real train split


def test_sizes(demo):
    sizes = {
        ARC("ARC-Easy", "train"): 1000,
        ARC("ARC-Easy", "validation"): 150,
        ARC("ARC-Challenge", "test"): 300,
        MMLU("all", "test"): 500,
        MMLU("all", "dev"): 100,
        MMLU("auxiliary_train", "train"): 1500,
        GSM8K("main", "train"): 2000,
        GSM8K("socratic", "test"): 400,
        HumanEval(): 164,
        SmolTalk("train"): 2500,
        SmolTalk("test"): 250,
    }
    for task, size in sizes.items():
        assert len(task) == size, task
    # nanochat's own slices run on the small data (stop clamps)
    assert len(MMLU("all", "test", stop=5200)) == 500
    assert len(GSM8K("main", "test", stop=420)) == 400
    mid = TaskMixture([SmolTalk("train"), MMLU("auxiliary_train", "train"), GSM8K("main", "train")])
    sft = TaskMixture(
        [
            ARC("ARC-Easy", "train"),
            ARC("ARC-Challenge", "train"),
            GSM8K("main", "train"),
            SmolTalk("train", stop=10_000),
        ]
    )
    assert (len(mid), len(sft)) == (6000, 6100)


def test_categorical_tasks(demo, tok):
    for name in ("ARC-Easy", "ARC-Challenge", "MMLU"):
        task = get_task(name)
        labels = set()
        for conversation in task:
            gold = conversation["messages"][-1]["content"]
            labels.add(tuple(conversation["letters"]))
            assert task.evaluate(conversation, gold)
            assert not task.evaluate(
                conversation, next(x for x in conversation["letters"] if x != gold)
            )
            if name == "MMLU":
                assert conversation["subject"] in MMLU.groups
        if name.startswith("ARC"):  # like ARC: mostly A-D, some 3 or 5 choices, some 1-4
            assert {("A", "B", "C", "D"), ("A", "B", "C"), ("A", "B", "C", "D", "E")} <= labels
            assert ("1", "2", "3", "4") in labels
        ids, mask = tok.render_conversation(task[0])
        assert (
            tok.decode([i for i, m in zip(ids, mask, strict=True) if m][:-1])
            == task[0]["messages"][-1]["content"]
        )


def test_mc_answers_are_right():
    """Spot-check the facts behind the generated multiple choice."""
    splits = generate(CFG)
    checked = 0
    for row in splits[("cais/mmlu", "all", "test")] + splits[("cais/mmlu", "all", "dev")]:
        answer = row["choices"][row["answer"]]
        if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", row["question"]):
            assert int(answer) == int(m[1]) + int(m[2])
        elif m := re.fullmatch(r"What is (\d+) times (\d+)\?", row["question"]):
            assert int(answer) == int(m[1]) * int(m[2])
        elif row["question"] == "Which number is the largest?":
            assert int(answer) == max(map(int, row["choices"]))
        elif m := re.fullmatch(
            r"Which letter comes right after (\w) in the alphabet\?", row["question"]
        ):
            assert ord(answer) == ord(m[1]) + 1
        elif row["question"] == "Which of these words is a Python keyword?":
            assert keyword.iskeyword(answer)
            assert sum(map(keyword.iskeyword, row["choices"])) == 1
        else:
            continue
        checked += 1
        assert len(set(row["choices"])) == 4
    assert checked > 100


def test_gsm8k(demo, tok):
    for subset in ("main", "socratic"):
        task = GSM8K(subset, "train")
        for conversation in task:
            parts = conversation["messages"][-1]["content"]
            # each calculator call evaluates to the output that follows it
            for call, output in zip(parts, parts[1:], strict=False):
                if call["type"] == "python":
                    assert output["type"] == "python_output"
                    assert eval(call["text"], {"__builtins__": {}}) == int(output["text"])
            assert re.search(r"#### \d+$", parts[-1]["text"])
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            assert task.reward(conversation, text) == 1.0
            assert task.reward(conversation, text + "1") == 0.0
        if subset == "socratic":
            assert " ** " in parts[0]["text"]
    ids, mask = tok.render_conversation(GSM8K("main", "test")[0])
    assert tok.encode_special("<|python_start|>") in ids and len(ids) == len(mask)


def test_humaneval_solutions_pass(demo):
    task = HumanEval()
    names = set()
    for conversation in task:
        names.add(conversation["entry_point"])
        solution = conversation["messages"][1]["content"]
        exec(build_program(conversation, solution), {})  # the canonical solution passes
        with pytest.raises(AssertionError):  # and its tests can fail
            exec(
                build_program(
                    conversation, conversation["messages"][0]["content"] + "    return None\n"
                ),
                {},
            )
    assert len(names) == 164


def test_humaneval_through_the_sandbox(demo):
    task = HumanEval(stop=2)
    for conversation in task:
        assert task.evaluate(conversation, conversation["messages"][1]["content"]) is True
        fenced = "Sure:\n```python\n" + conversation["messages"][1]["content"] + "\n```\n"
        assert task.evaluate(conversation, fenced) is True
        assert task.evaluate(conversation, "def nothing():\n    pass\n") is False


def test_smoltalk(demo, tok):
    task = SmolTalk("train")
    systems = turns = docs = 0
    for i, conversation in enumerate(task):
        messages = conversation["messages"]
        systems += messages[0]["role"] == "system"
        turns += len(messages) >= 4
        docs += task.rows[i]["source"] == "demo-stdlib-docs"
        ids, mask = tok.render_conversation(conversation)
        assert sum(mask) > 0
    assert systems > 200 and turns > 200 and 0.2 < docs / len(task) < 0.6
    contents = [c["messages"][-1]["content"] for c in task]
    assert any("`textwrap.dedent`" in c or "`json.dumps`" in c for c in contents)


def test_test_splits_stay_out_of_train():
    splits = generate(DemoTasksConfig(scale=0.5))
    for subset in ("ARC-Easy", "ARC-Challenge"):

        def key(row):
            return row["question"], frozenset(row["choices"]["text"])

        train = {key(r) for r in splits[("allenai/ai2_arc", subset, "train")]}
        assert not train & {key(r) for r in splits[("allenai/ai2_arc", subset, "test")]}
    train = {r["question"] for r in splits[("openai/gsm8k", "main", "train")]}
    assert not train & {r["question"] for r in splits[("openai/gsm8k", "main", "test")]}
    mmlu_test = {
        (r["question"], frozenset(r["choices"])) for r in splits[("cais/mmlu", "all", "test")]
    }
    aux = splits[("cais/mmlu", "auxiliary_train", "train")]
    assert not mmlu_test & {(r["train"]["question"], frozenset(r["train"]["choices"])) for r in aux}
    assert [r["train"] for r in aux] == splits[("cais/mmlu", "all", "auxiliary_train")]


def test_deterministic():
    cfg = DemoTasksConfig(scale=0.1)
    assert generate(cfg) == generate(cfg)
    other = generate(DemoTasksConfig(scale=0.1, seed=7))
    assert (
        other[("openai/gsm8k", "main", "train")] != generate(cfg)[("openai/gsm8k", "main", "train")]
    )


def test_deterministic_across_processes():
    # nothing process-specific (memory addresses in signatures, hash order) may reach the rows
    code = "from nanochat_jax.demo_tasks import _doc_items; print(repr(_doc_items()))"
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1] and " at 0x" not in outputs[0]


def test_rewrite_and_markers(tmp_path, monkeypatch):
    cfg = DemoTasksConfig(scale=0.05)
    rows = write_demo_tasks(cfg, tmp_path)
    assert rows["openai/gsm8k/main/train"] == 100
    files = sorted(tmp_path.rglob("*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert write_demo_tasks(cfg, tmp_path) == rows  # already there: nothing rewritten
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    files[0].unlink()  # a missing file -> written again
    write_demo_tasks(cfg, tmp_path)
    assert files[0].exists()

    # a download never lands in demo data
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    gsm = hf_data.get_split("openai/gsm8k", "main", "test")
    gsm.local_files(tmp_path)[0].unlink()
    with pytest.raises(hf_data.TaskDataError, match="offline demo task data"):
        GSM8K("main", "test")

    # and demo data never lands in downloaded data
    real = tmp_path / "real"
    hf_data.write_split(gsm, pq.read_table(files[1]), real)
    with pytest.raises(ValueError, match="already holds downloaded task data"):
        write_demo_tasks(cfg, real)


def test_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    assert demo_tasks.main(["--scale", "0.02"]) == 0
    out = capsys.readouterr().out
    assert (
        "40  openai/gsm8k/main/train" in out and "HuggingFaceTB/smol-smoltalk/default/test" in out
    )
    assert "60  words_alpha.txt" in out and "1  identity_conversations.jsonl" in out
    with pytest.raises(SystemExit):
        demo_tasks.main(["--scale", "0"])
    (tmp_path / "real").mkdir()
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path / "real"))
    hf_data.write_split(
        hf_data.get_split("openai/gsm8k", "main", "test"),
        pq.read_table(next(tmp_path.rglob("test-00000-of-00001.parquet"))),
    )
    assert demo_tasks.main([]) == 2
    assert "error: " in capsys.readouterr().err


# ---- the opt-in extras' files: word list, identity conversations -----------------------------


def test_extra_files_load_through_the_tasks(demo, tok):
    from nanochat_jax.engine import use_calculator
    from nanochat_jax.tasks import CustomJSON, SimpleSpelling, SpellingBee

    raw = (demo / "task_data" / "words_alpha.txt").read_bytes()
    assert raw.endswith(b"\r\n") and raw.count(b"\r\n") == CFG.words == 3000  # CRLF, as real
    words = raw.decode().split()
    assert words == sorted(set(words)) and all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert {"strawberry", "banana", "mississippi"} <= set(words)
    assert 6 < sum(map(len, words)) / len(words) < 11  # English-like lengths
    hf_data.verify_word_list(demo / "task_data" / "words_alpha.txt")
    # real words (the Python reference's prose) for all but a few hundred
    assert len(set(words) & set(demo_tasks._prose_words())) > 2000

    bee = SpellingBee(size=400, split="test")
    assert bee.words == words
    refused = 0
    for conversation in bee:
        parts = conversation["messages"][1]["content"]
        result = use_calculator(parts[2]["text"])
        if any(pattern in parts[2]["text"] for pattern in COUNT_REFUSED):  # "directive", ...
            assert result is None
            refused += 1
        else:
            assert str(result) == parts[3]["text"]
        assert bee.reward(conversation, parts[-1]["text"]) == 1.0
    assert refused > 0
    assert len(SimpleSpelling(size=50)) == 50

    identity = CustomJSON(demo / "task_data" / "identity_conversations.jsonl")
    assert len(identity) == CFG.identity == 60
    texts = [json.dumps(c["messages"]) for c in identity]
    assert len(set(texts)) == 60 and sum("nanochat-jax" in t for t in texts) > 30
    hf_data.verify_conversations(demo / "task_data" / "identity_conversations.jsonl")
    ids, mask = tok.render_conversation(identity[0])
    assert sum(mask) > 0


def test_prose_words_are_words():
    words = demo_tasks._prose_words()
    assert words == sorted(set(words)) and all(re.fullmatch(r"[a-z]{2,}", w) for w in words)
    assert len(words) > 1500 and {"assignment", "statement", "value", "number"} <= set(words)
    # not Python's names, nor the identifiers of grammar rules and signatures
    assert not set(words) & {"def", "elif", "isinstance", "getattr", "fillchar", "longbyteschar"}


def test_word_list_takes_real_words_before_made_up_ones():
    prose = set(demo_tasks._prose_words())
    small = demo_tasks.generate_files(DemoTasksConfig(scale=0.2))["words_alpha.txt"].split()
    assert len(small) == 600 and {"strawberry", "banana"} <= set(small)
    assert len(set(small) - prose) < 200  # only the demo's own words are not prose words
    # past every real word, made-up ones fill up to the count
    big = demo_tasks._demo_words(random.Random(0), len(prose) + 1000)
    assert prose <= set(big) and len(big) == len(set(big)) == len(prose) + 1000


def test_extra_files_are_deterministic_and_scale():
    cfg = DemoTasksConfig(scale=0.1)
    assert demo_tasks.generate_files(cfg) == demo_tasks.generate_files(cfg)
    files = demo_tasks.generate_files(cfg)
    assert files["words_alpha.txt"].count("\r\n") == 300
    assert files["identity_conversations.jsonl"].count("\n") == 6
    other = demo_tasks.generate_files(DemoTasksConfig(scale=0.1, seed=7))
    assert other["identity_conversations.jsonl"] != files["identity_conversations.jsonl"]


def test_extra_files_markers(tmp_path):
    cfg = DemoTasksConfig(scale=0.02)
    rows = write_demo_tasks(cfg, tmp_path)
    assert rows["words_alpha.txt"] == 60 and rows["identity_conversations.jsonl"] == 1
    words = tmp_path / "task_data" / "words_alpha.txt"
    words.unlink()  # demo data from before the extras (or a lost file) -> written again
    assert write_demo_tasks(cfg, tmp_path) == rows and words.is_file()

    # a downloaded word list alone (no marker) is downloaded data: demo data must not mix in
    real = tmp_path / "real" / "task_data"
    real.mkdir(parents=True)
    (real / "words_alpha.txt").write_text("apple\n")
    with pytest.raises(ValueError, match="already holds downloaded task data"):
        write_demo_tasks(cfg, tmp_path / "real")
