"""nanochat_jax.tasks.mixtures: the default mid/SFT mixtures are 2bc521a's, each extra adds
nanochat's components in nanochat's order, flags parse or fail clearly. On the offline demo
task data."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanochat_jax import hf_data
from nanochat_jax.demo_tasks import DemoTasksConfig, write_demo_tasks
from nanochat_jax.tasks import (
    ARC,
    GSM8K,
    MMLU,
    CustomJSON,
    SimpleSpelling,
    SmolTalk,
    SpellingBee,
    TaskDataError,
    TaskMixture,
)
from nanochat_jax.tasks.mixtures import (
    EXTRA_TASKS,
    mid_mixtures,
    parse_extra_tasks,
    parse_spelling_rows,
    sft_mixtures,
)

CFG = DemoTasksConfig(scale=0.05)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mix_base")
    write_demo_tasks(CFG, base)
    return base


@pytest.fixture
def demo(demo_dir, monkeypatch) -> Path:
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(demo_dir))
    for env in (hf_data.HF_URL_ENV, hf_data.WORDS_FILE.url_env, hf_data.IDENTITY_FILE.url_env):
        monkeypatch.setenv(env, "http://127.0.0.1:9/x")  # a download attempt fails fast
    return demo_dir


def kinds(mixture: TaskMixture) -> list[str]:
    return [type(task).__name__ for task in mixture.tasks]


def rows(task, n: int = 40) -> list[dict]:
    return [task[i] for i in range(min(n, len(task)))]


def test_parse_extra_tasks():
    assert EXTRA_TASKS == ("identity", "spelling")
    assert parse_extra_tasks("") == parse_extra_tasks("  ") == ()
    assert parse_extra_tasks("identity") == ("identity",)
    assert parse_extra_tasks(" spelling , identity ") == ("identity", "spelling")  # nanochat order
    with pytest.raises(ValueError, match=r"unknown extra task\(s\) \['spell'\]; allowed: identity"):
        parse_extra_tasks("identity,spell")
    with pytest.raises(ValueError, match="unknown extra task"):
        parse_extra_tasks("identity,")
    with pytest.raises(ValueError, match="repeat"):
        parse_extra_tasks("spelling,spelling")


def test_parse_spelling_rows():
    assert parse_spelling_rows("") is None
    assert parse_spelling_rows("20,20") == (20, 20) and parse_spelling_rows(" 0, 7") == (0, 7)
    for bad in ("20", "1,2,3", "a,b", "-1,2", "1.5,2"):
        with pytest.raises(ValueError, match="two ints >= 0, 'SIMPLE,BEE'"):
            parse_spelling_rows(bad)


def test_default_mid_mixture(demo):
    """extra=() is 2bc521a's mixture (what scripts/mid_train.py's load_mixtures builds): the
    same rows in the same order as nanochat's list."""
    train, val = mid_mixtures()
    expected_train = TaskMixture(
        [
            SmolTalk(split="train"),
            MMLU(subset="auxiliary_train", split="train"),
            GSM8K(subset="main", split="train"),
        ]
    )
    expected_val = TaskMixture(
        [
            SmolTalk(split="test"),
            MMLU(subset="all", split="test", stop=5200),
            GSM8K(subset="main", split="test", stop=420),
        ]
    )
    assert kinds(train) == ["SmolTalk", "MMLU", "GSM8K"] == kinds(val)
    assert (len(train), len(val)) == (len(expected_train), len(expected_val))
    assert rows(train, 300) == rows(expected_train, 300)
    assert rows(val, 300) == rows(expected_val, 300)
    assert [t.stop for t in val.tasks] == [None, 5200, 420]
    assert [(t.subset, t.split) for t in train.tasks[1:]] == [
        ("auxiliary_train", "train"),
        ("main", "train"),
    ]


def test_default_sft_mixture(demo):
    train, val = sft_mixtures()
    expected = TaskMixture(
        [
            ARC(subset="ARC-Easy", split="train"),
            ARC(subset="ARC-Challenge", split="train"),
            GSM8K(subset="main", split="train"),
            SmolTalk(split="train", stop=10_000),
        ]
    )
    assert kinds(train) == ["ARC", "ARC", "GSM8K", "SmolTalk"]
    assert len(train) == len(expected) and rows(train, 200) == rows(expected, 200)
    assert isinstance(val, SmolTalk) and val.split == "test"


def test_mid_extras(demo):
    base_train, base_val = mid_mixtures()
    identity_rows = CFG.rows(CFG.identity)
    train, val = mid_mixtures(("identity",))
    assert kinds(train) == ["SmolTalk", "MMLU", "GSM8K", "CustomJSON", "CustomJSON"]  # 2 epochs
    assert len(train) == len(base_train) + 2 * identity_rows
    assert rows(val, 100) == rows(base_val, 100) and len(val) == len(base_val)  # val unchanged

    train, _ = mid_mixtures(("identity", "spelling"), spelling_rows=(30, 20))
    assert kinds(train)[3:] == ["CustomJSON", "CustomJSON", "SimpleSpelling", "SpellingBee"]
    assert [len(t) for t in train.tasks[5:]] == [30, 20]
    assert len(train) == len(base_train) + 2 * identity_rows + 50
    assert all(t.split == "train" for t in train.tasks[5:])
    # nanochat's list, in its order: TaskMixture's shuffle makes the order visible in the rows
    identity = hf_data.IDENTITY_FILE.local_path()
    nanochat = TaskMixture(
        [
            SmolTalk(split="train"),
            MMLU(subset="auxiliary_train", split="train"),
            GSM8K(subset="main", split="train"),
            CustomJSON(filepath=identity),
            CustomJSON(filepath=identity),
            SimpleSpelling(size=30, split="train"),
            SpellingBee(size=20, split="train"),
        ]
    )
    assert rows(train, len(train)) == rows(nanochat, len(nanochat))
    swapped = TaskMixture([*nanochat.tasks[:5], nanochat.tasks[6], nanochat.tasks[5]])
    assert rows(train, len(train)) != rows(swapped, len(swapped))

    # nanochat's sizes: 200K SimpleSpelling + 80K SpellingBee
    train, _ = mid_mixtures(("spelling",))
    assert kinds(train)[3:] == ["SimpleSpelling", "SpellingBee"]
    assert [len(t) for t in train.tasks[3:]] == [200_000, 80_000]
    assert len(train) == len(base_train) + 280_000


def test_sft_extras(demo):
    base_train, base_val = sft_mixtures()
    identity_rows = CFG.rows(CFG.identity)
    train, val = sft_mixtures(("identity", "spelling"))
    assert kinds(train) == [
        "ARC", "ARC", "GSM8K", "SmolTalk", "CustomJSON", "SimpleSpelling", "SpellingBee"
    ]  # fmt: skip
    assert [len(t) for t in train.tasks[5:]] == [300, 300]  # nanochat's SFT sizes
    assert len(train) == len(base_train) + identity_rows + 600
    assert rows(val, 50) == rows(base_val, 50)
    train, _ = sft_mixtures(("spelling",), spelling_rows=(0, 5))
    assert kinds(train)[4:] == ["SimpleSpelling", "SpellingBee"]
    assert len(train) == len(base_train) + 5
    train, _ = sft_mixtures(("identity",))
    assert kinds(train)[4:] == ["CustomJSON"] and len(train) == len(base_train) + identity_rows


def test_bad_arguments(demo):
    with pytest.raises(ValueError, match=r"unknown extra task\(s\) \['cats'\]"):
        mid_mixtures(("cats",))
    with pytest.raises(ValueError, match="spelling_rows must be"):
        sft_mixtures(("spelling",), spelling_rows=(-1, 3))


def test_missing_identity_file_offline(tmp_path, monkeypatch, demo_dir):
    """Real (non-demo) task data without the identity file: one clear error line."""
    import shutil

    base = tmp_path / "real"
    shutil.copytree(demo_dir, base)
    (base / "task_data" / hf_data.DEMO_MARKER).unlink()
    (base / "task_data" / hf_data.IDENTITY_FILE.name).unlink()
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    monkeypatch.setenv(hf_data.IDENTITY_FILE.url_env, "http://127.0.0.1:9/identity.jsonl")
    assert len(sft_mixtures(("spelling",), spelling_rows=(2, 2))[0]) > 0
    with pytest.raises(TaskDataError) as info:
        sft_mixtures(("identity",))
    message = str(info.value)
    assert "identity_conversations.jsonl is not in" in message and "\n" not in message
    assert "python -m nanochat_jax.hf_data identity" in message
