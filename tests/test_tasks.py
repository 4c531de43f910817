"""nanochat_jax.tasks: slicing, mixtures, MC prompts, each task's conversations and grading, on
small hand-written parquet splits in the cache layout; rendering through the tokenizer."""

from __future__ import annotations

import gzip
import json
import random
import sys
import types
from pathlib import Path

import pyarrow as pa
import pytest

from nanochat_jax import hf_data
from nanochat_jax.tasks import (
    ARC,
    EXTRA_TASK_NAMES,
    GSM8K,
    MMLU,
    TASK_NAMES,
    CustomJSON,
    HumanEval,
    SmolTalk,
    SpellingBee,
    Task,
    TaskMixture,
    TaskSequence,
    get_task,
    render_mc,
)
from nanochat_jax.tasks.gsm8k import answer_parts, extract_answer
from nanochat_jax.tasks.humaneval import build_program, extract_imports, extract_program
from nanochat_jax.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "golden"


class Numbers(Task):
    """A task whose example i is {"i": i}."""

    def __init__(self, n: int, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        return {"i": index, "n": self.n}


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(hf_data.HF_URL_ENV, "http://127.0.0.1:9")  # never reach the real Hub
    return tmp_path


def write(repo: str, config: str, split: str, rows: list[dict], base_dir: Path) -> None:
    hf_split = hf_data.get_split(repo, config, split)
    hf_data.write_split(hf_split, pa.Table.from_pylist(rows), base_dir)


def shuffled(rows: list) -> list:
    """Rows in the order of HF `.shuffle(seed=42)`."""
    return [rows[i] for i in hf_data.hf_shuffle_permutation(len(rows))]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    with gzip.open(GOLDEN / "tok_corpus.txt.gz", "rt", encoding="utf-8") as f:
        docs = f.read().split("\x1e")[:200]
    return Tokenizer.train_from_iterator(iter(docs), 300)


# ---- Task, TaskMixture, TaskSequence, render_mc ---------------------------------------------


@pytest.mark.parametrize(
    "n,start,stop,step,expected",
    [
        (10, 0, None, 1, list(range(10))),
        (10, 2, None, 3, [2, 5, 8]),
        (10, 2, 9, 3, [2, 5, 8]),
        (10, 2, 8, 3, [2, 5]),
        (10, 4, 4, 1, []),
        (10, 0, 25, 4, [0, 4, 8]),  # stop past the end is clamped
        (10, 12, None, 1, []),
        (0, 0, None, 2, []),
    ],
)
def test_slicing(n, start, stop, step, expected):
    task = Numbers(n, start=start, stop=stop, step=step)
    assert len(task) == len(expected)
    assert [task[i]["i"] for i in range(len(task))] == expected
    assert [ex["i"] for ex in task] == expected  # iteration stops at IndexError
    with pytest.raises(IndexError, match="out of range"):
        task[len(expected)]
    with pytest.raises(IndexError):
        task[-1]


@pytest.mark.parametrize(
    "kwargs,match",
    [({"start": -1}, "start"), ({"start": 5, "stop": 4}, "stop"), ({"step": 0}, "step")],
)
def test_bad_slice(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Numbers(10, **kwargs)


def test_base_task_has_no_grading():
    with pytest.raises(NotImplementedError):
        Numbers(3).evaluate({}, "x")
    with pytest.raises(NotImplementedError, match="only GSM8K"):
        Numbers(3).reward({}, "x")


def test_mixture_order_is_nanochats():
    a, b = Numbers(5), Numbers(3, start=1)
    mixture = TaskMixture([a, b])
    pairs = [(0, i) for i in range(5)] + [(1, i) for i in range(2)]
    random.Random(42).shuffle(pairs)
    assert len(mixture) == 7
    expected = [{"i": i if t == 0 else 1 + i, "n": 5 if t == 0 else 3} for t, i in pairs]
    assert [mixture[i] for i in range(7)] == expected
    assert [TaskMixture([Numbers(5), Numbers(3, start=1)])[i] for i in range(7)] == expected
    # slicing the mixture applies to its shuffled order
    assert [ex for ex in TaskMixture([a, b], start=1, step=2)] == expected[1::2]


def test_mixture_oversamples_a_task_listed_twice():
    a, b = Numbers(4), Numbers(2, start=0)
    b.tag = "b"
    mixture = TaskMixture([a, b, b])
    assert len(mixture) == 8
    counts = {}
    for ex in mixture:
        counts[(ex["n"], ex["i"])] = counts.get((ex["n"], ex["i"]), 0) + 1
    assert counts == {(4, 0): 1, (4, 1): 1, (4, 2): 1, (4, 3): 1, (2, 0): 2, (2, 1): 2}


def test_sequence_is_concatenation():
    seq = TaskSequence([Numbers(3), Numbers(2, start=1), Numbers(4, step=2)])
    assert len(seq) == 3 + 1 + 2
    assert [(ex["n"], ex["i"]) for ex in seq] == [(3, 0), (3, 1), (3, 2), (2, 1), (4, 0), (4, 2)]
    with pytest.raises(ValueError, match="at least one"):
        TaskSequence([])
    with pytest.raises(ValueError, match="at least one"):
        TaskMixture([])


def test_render_mc_exact():
    text = render_mc("What is the capital of France?", ["A", "B", "C"], ["Paris", "Rome", "Oslo"])
    assert text == (
        "Multiple Choice question: What is the capital of France?\n"
        "- Paris=A\n- Rome=B\n- Oslo=C\n\n"
        "Respond only with the letter of the correct answer."
    )
    with pytest.raises(ValueError, match="2 letters for 3 choices"):
        render_mc("q", ["A", "B"], ["x", "y", "z"])


# ---- the datasets -----------------------------------------------------------------------------


ARC_ROWS = [
    {
        "id": f"q{i}",
        "question": f"Question {i}?",
        "choices": {"text": [f"c{i}a", f"c{i}b", f"c{i}c", f"c{i}d"], "label": list("ABCD")},
        "answerKey": "ABCD"[i % 4],
    }
    for i in range(9)
] + [
    {
        "id": "numeric",
        "question": "Which is odd?",
        "choices": {"text": ["2", "3", "4"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    }
]


def test_arc(base_dir):
    write("allenai/ai2_arc", "ARC-Easy", "train", ARC_ROWS, base_dir)
    task = ARC("ARC-Easy", "train")
    assert task.eval_type == "categorical" and len(task) == 10
    for conversation, row in zip(task, shuffled(ARC_ROWS), strict=True):
        user, assistant = conversation["messages"]
        assert conversation["letters"] == row["choices"]["label"]
        assert user == {
            "role": "user",
            "content": render_mc(row["question"], row["choices"]["label"], row["choices"]["text"]),
        }
        assert assistant == {"role": "assistant", "content": row["answerKey"]}
        assert task.evaluate(conversation, row["answerKey"]) is True
        wrong = next(x for x in conversation["letters"] if x != row["answerKey"])
        assert task.evaluate(conversation, wrong) is False
        with pytest.raises(ValueError, match="must be one of the letters"):
            task.evaluate(conversation, "E")
    numeric = next(c for c in task if c["letters"] == ["1", "2", "3"])
    assert "- 3=2\n" in numeric["messages"][0]["content"]
    assert len(ARC("ARC-Easy", "train", start=2, stop=8, step=3)) == 2


def test_arc_bad_args(base_dir):
    with pytest.raises(ValueError, match="ARC subset"):
        ARC("ARC-Medium", "train")
    with pytest.raises(ValueError, match="ARC split"):
        ARC("ARC-Easy", "dev")


MMLU_ROWS = [
    {
        "question": f"MMLU {i}?",
        "subject": "astronomy",
        "choices": ["w", "x", "y", "z"],
        "answer": i % 4,
    }
    for i in range(6)
]


def test_mmlu_all_and_auxiliary_train(base_dir):
    write("cais/mmlu", "all", "test", MMLU_ROWS, base_dir)
    write("cais/mmlu", "auxiliary_train", "train", [{"train": r} for r in MMLU_ROWS], base_dir)
    for task in (MMLU("all", "test"), MMLU("auxiliary_train", "train")):
        assert task.eval_type == "categorical" and len(task) == 6
        for conversation, row in zip(task, shuffled(MMLU_ROWS), strict=True):
            gold = "ABCD"[row["answer"]]
            assert conversation["letters"] == ["A", "B", "C", "D"]
            assert conversation["subject"] == "astronomy"
            assert conversation["messages"][0]["content"] == render_mc(
                row["question"], "ABCD", row["choices"]
            )
            assert conversation["messages"][1] == {"role": "assistant", "content": gold}
            assert task.evaluate(conversation, gold)
            assert not task.evaluate(conversation, "ABCD"[(row["answer"] + 1) % 4])
            with pytest.raises(ValueError, match="letters"):
                task.evaluate(conversation, "a")
    assert len(MMLU.groups) == 57 and "astronomy" in MMLU.groups
    with pytest.raises(ValueError, match="splits"):
        MMLU("auxiliary_train", "test")
    with pytest.raises(ValueError, match="MMLU subset"):
        MMLU("astronomy", "test")


GSM_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_gsm8k_parts():
    assert answer_parts(GSM_ANSWER) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    # split at the last '='; an annotation without '=' gets an empty output
    assert answer_parts("<<a=b=3>>x<<7>>")[:4] == [
        {"type": "text", "text": ""},
        {"type": "python", "text": "a=b"},
        {"type": "python_output", "text": "3"},
        {"type": "text", "text": "x"},
    ]
    assert answer_parts("<<7>>")[1:3] == [
        {"type": "python", "text": "7"},
        {"type": "python_output", "text": ""},
    ]


def test_gsm8k_extract_answer():
    assert extract_answer("so #### 1,234.5 done") == "1234.5"
    assert extract_answer("#### -7") == "-7"
    assert extract_answer("####  7") is None  # exactly one space after the hashes
    assert extract_answer("the answer is 7") is None


def test_gsm8k(base_dir):
    rows = [{"question": "Natalia sold clips ...", "answer": GSM_ANSWER}] + [
        {
            "question": f"What is {i}+{i}?",
            "answer": f"{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}",
        }
        for i in range(1, 5)
    ]
    write("openai/gsm8k", "main", "test", rows, base_dir)
    task = GSM8K("main", "test")
    assert task.eval_type == "generative" and len(task) == 5
    for conversation, row in zip(task, shuffled(rows), strict=True):
        user, assistant = conversation["messages"]
        assert user == {"role": "user", "content": row["question"]}
        assert assistant["content"] == answer_parts(row["answer"])
        gold = extract_answer(row["answer"])
        assert task.evaluate(conversation, f"blah\n#### {gold}") is True
        assert task.reward(conversation, f"#### {gold}") == 1.0
        assert task.reward(conversation, f"#### {gold}1") == 0.0
        assert task.reward(conversation, gold) == 0.0  # no '#### ' marker
    natalia = next(c for c in task if c["messages"][0]["content"].startswith("Natalia"))
    assert task.evaluate(natalia, "#### 72.") is False  # "72." != "72"
    assert task.evaluate(natalia, "x #### 7,2")  # commas are dropped
    with pytest.raises(ValueError, match="GSM8K subset"):
        GSM8K("hard", "test")


HE_PROMPT = (
    "from typing import List\nimport math\n\n\n"
    'def add(xs: List[int]) -> int:\n    """Sum them."""\n'
)


def test_humaneval_helpers():
    assert extract_imports(HE_PROMPT) == "from typing import List\nimport math"
    assert extract_imports("# header\n\nimport os\ndef f():\n    import sys\n") == "import os"
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nand ```\nx\n```") == (
        "def f():\n    return 1"
    )
    assert extract_program("```\ny = 2\n```") == "y = 2"
    assert extract_program("  def g(): pass \n") == "def g(): pass"


def test_humaneval(base_dir, monkeypatch):
    rows = [
        {
            "task_id": "HumanEval/0",
            "prompt": HE_PROMPT,
            "canonical_solution": "    return sum(xs)\n",
            "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n",
            "entry_point": "add",
        }
    ]
    write("openai/openai_humaneval", "openai_humaneval", "test", rows, base_dir)
    task = HumanEval()
    assert task.eval_type == "generative" and len(task) == 1
    conversation = task[0]
    assert conversation["messages"] == [
        {"role": "user", "content": HE_PROMPT},
        {"role": "assistant", "content": HE_PROMPT + "\n    return sum(xs)\n"},
    ]
    assert conversation["entry_point"] == "add" and conversation["test"] == rows[0]["test"]
    program = build_program(conversation, "```python\ndef add(xs):\n    return sum(xs)\n```")
    assert program == (
        "from typing import List\nimport math\n\ndef add(xs):\n    return sum(xs)\n\n"
        "def check(candidate):\n    assert candidate([1, 2]) == 3\n\ncheck(add)"
    )

    # evaluate hands the program to execution.execute_code and reports its success
    calls = []

    def fake_execute_code(code, timeout=5.0, maximum_memory_bytes=None):
        calls.append(code)
        namespace: dict = {}
        try:
            exec(code, namespace)
            return types.SimpleNamespace(success=True)
        except Exception:
            return types.SimpleNamespace(success=False)

    fake = types.ModuleType("nanochat_jax.execution")
    fake.execute_code = fake_execute_code
    monkeypatch.setitem(sys.modules, "nanochat_jax.execution", fake)
    assert task.evaluate(conversation, conversation["messages"][1]["content"]) is True
    assert task.evaluate(conversation, "def add(xs):\n    return 0\n") is False
    assert calls[0].endswith("check(add)") and "return sum(xs)" in calls[0]


SMOL_ROWS = [
    {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "source": "a",
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"},
        ],
        "source": "b",
    },
]


def test_smoltalk(base_dir):
    write("HuggingFaceTB/smol-smoltalk", "default", "test", SMOL_ROWS, base_dir)
    task = SmolTalk("test")
    assert len(task) == 2
    assert [c["messages"] for c in task] == [r["messages"] for r in shuffled(SMOL_ROWS)]
    bad = [
        {
            "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "source": "",
        }
    ]
    write("HuggingFaceTB/smol-smoltalk", "default", "test", bad, base_dir)
    with pytest.raises(ValueError, match="message 1 must have role 'assistant'"):
        SmolTalk("test")[0]
    with pytest.raises(ValueError, match="SmolTalk split"):
        SmolTalk("validation")


def test_smoltalk_train_spans_four_files(base_dir):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ],
            "source": "",
        }
        for i in range(10)
    ]
    write("HuggingFaceTB/smol-smoltalk", "default", "train", rows, base_dir)
    files = sorted((base_dir / "task_data/HuggingFaceTB/smol-smoltalk/default/train").iterdir())
    assert [f.name for f in files] == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    task = SmolTalk("train")
    assert [c["messages"][0]["content"] for c in task] == [
        r["messages"][0]["content"] for r in shuffled(rows)
    ]


def test_customjson(tmp_path):
    path = tmp_path / "identity.jsonl"
    convs = [
        [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "nanochat"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
    ]
    path.write_text(json.dumps(convs[0]) + "\n\n" + json.dumps(convs[1]) + "\n")
    task = CustomJSON(path)
    assert len(task) == 2 and [c["messages"] for c in task] == convs  # file order
    assert len(CustomJSON(path, start=1)) == 1

    path.write_text(json.dumps(convs[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"identity.jsonl:2: not valid JSON"):
        CustomJSON(path)
    path.write_text(json.dumps(convs[0]) + "\n" + json.dumps(convs[0][::-1]) + "\n")
    with pytest.raises(ValueError, match=r"identity.jsonl:2: message 0 must have role 'user'"):
        CustomJSON(path)
    path.write_text(json.dumps([{"role": "user", "content": "only"}]) + "\n")
    with pytest.raises(ValueError, match=r":1: needs at least a user and an assistant"):
        CustomJSON(path)
    path.write_text(json.dumps({"role": "user"}) + "\n")
    with pytest.raises(ValueError, match=r":1: messages must be a non-empty list"):
        CustomJSON(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CustomJSON(tmp_path / "missing.jsonl")


def test_get_task(base_dir):
    write("allenai/ai2_arc", "ARC-Challenge", "test", ARC_ROWS, base_dir)
    write("cais/mmlu", "all", "test", MMLU_ROWS, base_dir)
    task = get_task("ARC-Challenge")
    assert isinstance(task, ARC) and (task.subset, task.split) == ("ARC-Challenge", "test")
    task = get_task("MMLU", stop=4)
    assert isinstance(task, MMLU) and task.subset == "all" and len(task) == 4
    assert TASK_NAMES == ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
    with pytest.raises(ValueError, match="only the test split"):
        get_task("HumanEval", split="train")
    with pytest.raises(ValueError, match="unknown task 'SQuAD'; allowed: .*HumanEval, SpellingBee"):
        get_task("SQuAD")


def test_get_task_spelling_bee(base_dir):
    """nanochat's chat_eval: SpellingBee(size=256, split="test"); an extra, not a default task."""
    assert EXTRA_TASK_NAMES == ("SpellingBee",) and "SpellingBee" not in TASK_NAMES
    (base_dir / "task_data").mkdir()
    (base_dir / "task_data" / "words_alpha.txt").write_text("apple\nbanana\ncherry\n")
    task = get_task("SpellingBee")
    assert isinstance(task, SpellingBee) and task.split == "test" and len(task) == 256
    assert task.eval_type == "generative" and task.words == ["apple", "banana", "cherry"]
    assert len(get_task("SpellingBee", stop=10)) == 10
    assert get_task("SpellingBee", split="train")[0] != task[0]  # train and test seeds differ


def test_every_task_renders(base_dir, tok):
    write("allenai/ai2_arc", "ARC-Easy", "test", ARC_ROWS, base_dir)
    write("cais/mmlu", "all", "test", MMLU_ROWS, base_dir)
    write("openai/gsm8k", "main", "train", [{"question": "Q?", "answer": GSM_ANSWER}], base_dir)
    write("HuggingFaceTB/smol-smoltalk", "default", "test", SMOL_ROWS, base_dir)
    tasks = [ARC("ARC-Easy", "test"), MMLU("all", "test"), GSM8K("main", "train"), SmolTalk("test")]
    mixture = TaskMixture(tasks)
    assert len(mixture) == 10 + 6 + 1 + 2
    assistant_end = tok.encode_special("<|assistant_end|>")
    python_start = tok.encode_special("<|python_start|>")
    output_start = tok.encode_special("<|output_start|>")
    for conversation in mixture:
        ids, mask = tok.render_conversation(conversation)
        assert len(ids) == len(mask) and ids[0] == tok.get_bos_token_id()
        assert ids[-1] == assistant_end and mask[-1] == 1
        assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m][:-1])  # supervised text
        if "letters" in conversation:  # the bare letter is the whole supervised reply
            supervised = [i for i, m in zip(ids, mask, strict=True) if m]
            assert tok.decode(supervised[:-1]) == conversation["messages"][-1]["content"]
            prompt = tok.render_for_completion(conversation)
            assert prompt == ids[: len(prompt)]
        if isinstance(conversation["messages"][-1]["content"], list):  # GSM8K: tool calls
            assert mask[ids.index(python_start)] == 1 and mask[ids.index(output_start)] == 0
