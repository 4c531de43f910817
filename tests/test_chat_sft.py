"""chat_sft end to end on tiny in-memory conversations, from a tiny base/mid checkpoint."""

import logging
import random
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from nanochat_jax import checkpoint
from nanochat_jax.chat_data import sft_micro_batches
from nanochat_jax.demo_tasks import DemoTasksConfig, write_demo_tasks
from nanochat_jax.metrics import read_jsonl
from nanochat_jax.tokenizer import Tokenizer
from scripts import chat_sft
from tests.test_mid_train import COLORS, THINGS, conversations, make_base_dir
from tests.test_train import record_hyperparams


def _long_conversations(n: int, seed: int) -> list[dict]:
    """Several turns each, so rows reach the 128 and 256 length buckets."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        for row in conversations(rng.randint(4, 12), seed=rng.randrange(10**6)):
            messages += row["messages"]
        rows.append({"messages": messages})
    return rows


class _MultipleChoice:
    """A categorical task shaped like MMLU/ARC: which colour is the thing?"""

    eval_type = "categorical"

    def __init__(self, n: int):
        self.rows = []
        for i in range(n):
            thing = THINGS[i % len(THINGS)]
            right = COLORS[i % len(THINGS) % len(COLORS)]
            wrong = COLORS[(i % len(THINGS) + 3) % len(COLORS)]
            choices = [right, wrong] if i % 2 else [wrong, right]
            answer = "B" if choices[1] == right else "A"
            question = f"what color is the {thing}?\n- {choices[0]}=A\n- {choices[1]}=B"
            self.rows.append(
                {
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": answer},
                    ],
                    "letters": ["A", "B"],
                }
            )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def evaluate(self, conversation, response):
        return response == conversation["messages"][-1]["content"]


TRAIN = conversations(80, seed=3) + _long_conversations(16, seed=4)
random.Random(5).shuffle(TRAIN)
VAL = conversations(30, seed=6)
FLAGS = [
    "--source=base",
    "--device_batch_size=4",
    "--target_examples_per_step=8",
    "--max_seq_len=256",
    "--init_lr_frac=1.0",
    "--eval_every=4",
    "--eval_steps=3",
    "--eval_metrics_every=6",
]


def _use_tiny_tasks(mp):
    mp.setattr(chat_sft, "load_mixtures", lambda *extras: (TRAIN, VAL))
    tasks = {"mmlu_acc": _MultipleChoice(20), "arc_easy_acc": _MultipleChoice(12)}
    mp.setattr(chat_sft, "load_metric_tasks", lambda: tasks)


@pytest.fixture(scope="module")
def base_template(tmp_path_factory):
    return make_base_dir(tmp_path_factory.mktemp("sft_base"))


@pytest.fixture
def base(base_template, tmp_path, monkeypatch):
    shutil.copytree(base_template, tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path / "base"))
    _use_tiny_tasks(monkeypatch)
    return tmp_path / "base"


def _records(base: Path) -> list[dict]:
    return read_jsonl(base / "runs" / "d1" / "sft" / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(base_template, tmp_path_factory):
    base = tmp_path_factory.mktemp("sft_ref") / "base"
    shutil.copytree(base_template, base)
    handler = _Collect()
    logging.getLogger("nanochat_jax").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
            _use_tiny_tasks(mp)
            chat_sft.main([*FLAGS, "--min_bucket_len=64"])  # the default 256 would be one bucket
    finally:
        logging.getLogger("nanochat_jax").removeHandler(handler)
    return base, handler.messages


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_sft_learns_evaluates_and_saves(reference):
    base, messages = reference
    num_iterations = len(TRAIN) // 8  # 12: 11 optimizer steps, the last iteration evaluates
    records = _records(base)
    train = {r["step"]: r for r in records if "train/loss" in r}
    assert sorted(train) == list(range(num_iterations - 1))
    losses = [train[s]["train/loss"] for s in range(num_iterations - 1)]
    assert np.mean(losses[-3:]) < losses[0] - 1.5, losses
    np.testing.assert_allclose(
        [train[s]["train/lrm"] for s in train], [1 - s / num_iterations for s in train], rtol=1e-6
    )
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}
    assert sorted(val) == [0, 4, 8, 11] and val[11] < val[0] - 1.5
    metric_steps = sorted(r["step"] for r in records if "val/mmlu_acc" in r)
    assert metric_steps == [6, 11]

    # one compiled step per padded length used, and the long rows reached several buckets
    lengths = {int(r["train/length"]) for r in train.values()}
    compiled = [m for m in messages if m.startswith("compiled the train step for length")]
    assert len(compiled) == len(lengths) >= 2 and lengths <= {64, 128, 256}

    # num_tokens: the supervised targets of nanochat's per-rank micro-batches
    tokenizer = Tokenizer.load(base / "tokenizer")
    rows = sft_micro_batches(tokenizer, TRAIN, batch_size=4, rank=0, world_size=1, max_tokens=256)
    for step in range(num_iterations - 1):
        micro = [next(rows) for _ in range(2)]
        expected = sum(sum(mask[1:]) for batch in micro for _, mask in batch)
        assert train[step]["train/num_tokens"] == expected
        longest = max(len(ids) for batch in micro for ids, _ in batch) - 1
        assert train[step]["train/length"] == min(b for b in (64, 128, 256) if b >= longest)

    ckpt_dir = base / "chatsft_checkpoints" / "d1"
    meta = checkpoint.read_meta(ckpt_dir)
    assert set(meta) == {"step", "val_loss", "mmlu_acc", "arc_easy_acc", "model_config"}
    assert meta["step"] == num_iterations - 1 and meta["val_loss"] == pytest.approx(val[11])
    assert 0 <= meta["mmlu_acc"] <= 1 and 0 <= meta["arc_easy_acc"] <= 1
    step_dir = ckpt_dir / f"{num_iterations - 1:06d}"
    assert (step_dir / "params").is_dir() and not (step_dir / "opt_state").exists()
    report = (base / "report" / "chat-sft.md").read_text()
    assert "## Chat SFT" in report and f"- Training rows: {len(TRAIN)}" in report
    assert f"- Number of iterations: {num_iterations}" in report
    assert "- Training loss:" in report and "- Validation loss:" in report


def test_rank_losses_are_means_of_per_rank_means():
    nll = jnp.array([[1.0, 2.0], [3.0, 0.0], [5.0, 6.0], [0.0, 0.0]])
    targets = jnp.array([[1, 1], [1, -1], [1, 1], [-1, -1]])
    # rank 0: rows 0-1 -> (1+2+3)/3; rank 1: rows 2-3 -> (5+6)/2
    np.testing.assert_allclose(chat_sft.rank_losses(nll, targets, 2), [2.0, 5.5])
    np.testing.assert_allclose(chat_sft.rank_losses(nll, targets, 4), [1.5, 3.0, 5.5, 0.0])


def test_mesh_8_matches_one_device(base, capsys):
    flags = [*FLAGS, "--device_batch_size=1", "--world_size=8", "--max_iterations=4"]
    flags += ["--eval_every=-1", "--eval_metrics_every=-1"]
    chat_sft.main([*flags, "--mesh=1"])
    one = {r["step"]: r["train/loss"] for r in _records(base) if "train/loss" in r}
    (base / "runs" / "d1" / "sft" / "metrics.jsonl").unlink()
    chat_sft.main([*flags, "--mesh=8"])
    records = _records(base)
    eight = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert sorted(one) == sorted(eight) == [0, 1, 2]
    np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], rtol=1e-5)
    # evaluations at the last step whatever eval_every and eval_metrics_every (nanochat)
    assert [r["step"] for r in records if "val/loss" in r] == [3]
    assert [r["step"] for r in records if "val/mmlu_acc" in r] == [3]
    # the default shortest bucket is 256: with --max_seq_len=256, one compiled train step
    assert {r["train/length"] for r in records if "train/length" in r} == {256}
    out = capsys.readouterr().out
    expected = "compilations: 1 train steps (lengths [256]), 1 validation step (length 256)"
    assert out.count(expected) == 2


def test_lrs_reach_the_optimizer(base, monkeypatch):
    """The lrs the optimizer used, with nanochat's default init_lr_frac (0.02): base lr *
    init_lr_frac * (1 - step / num_iterations), adam lrs scaled by (n_embd/768)^-0.5."""
    assert chat_sft.ChatSFTConfig().init_lr_frac == 0.02
    used = record_hyperparams(monkeypatch)
    flags = [f for f in FLAGS if not f.startswith("--init_lr_frac")]
    chat_sft.main([*flags, "--max_iterations=4", "--eval_every=-1", "--eval_metrics_every=-1"])
    assert len(used) == 3  # 4 iterations: 3 optimizer steps, the last one evaluates
    adam_scale = (64 / 768) ** -0.5  # d1: n_embd 64
    for step, lrs in enumerate(used):
        lrm = 0.02 * (1 - step / 4)
        assert lrs["muon"]["learning_rate"] == pytest.approx(0.02 * lrm, rel=1e-6)
        assert lrs["embedding"]["learning_rate"] == pytest.approx(0.2 * adam_scale * lrm)
        assert lrs["unembedding"]["learning_rate"] == pytest.approx(0.004 * adam_scale * lrm)
        assert lrs["muon"]["momentum"] == pytest.approx(0.95)


def test_default_source_is_mid(base):
    with pytest.raises(SystemExit, match="run the mid stage first"):
        chat_sft.main(FLAGS[1:])
    shutil.copytree(base / "base_checkpoints", base / "mid_checkpoints")
    chat_sft.main([*FLAGS[1:], "--max_iterations=2", "--eval_metrics_every=-1"])
    assert checkpoint.read_meta(base / "chatsft_checkpoints" / "d1")["step"] == 1


def test_clear_errors(base, monkeypatch):
    with pytest.raises(SystemExit, match="--source must be base or mid"):
        chat_sft.main([*FLAGS, "--source=rl"])
    with pytest.raises(SystemExit, match="must be a multiple of device_batch_size"):
        chat_sft.main([*FLAGS, "--target_examples_per_step=6"])
    with pytest.raises(SystemExit, match="--eval_steps must be >= 1"):
        chat_sft.main([*FLAGS, "--eval_steps=0"])
    with pytest.raises(SystemExit, match="leave no iteration to run"):
        chat_sft.main([*FLAGS, "--target_examples_per_step=128"])

    monkeypatch.setattr(chat_sft, "load_mixtures", lambda *extras: (TRAIN, VAL[:3]))
    with pytest.raises(SystemExit, match="the dataset has 3 conversations, fewer than the 4 ranks"):
        chat_sft.main([*FLAGS, "--device_batch_size=1", "--world_size=4"])

    def missing(*extras):
        raise FileNotFoundError("no task data in task_data/: run python -m nanochat_jax.demo_tasks")

    monkeypatch.setattr(chat_sft, "load_mixtures", missing)
    with pytest.raises(SystemExit, match="cannot load the SFT tasks: no task data"):
        chat_sft.main(FLAGS)


def test_default_mixtures_and_metrics_on_offline_demo_tasks(base_template, tmp_path, monkeypatch):
    """nanochat's datasets and chat_eval's MMLU / ARC-Easy through the real task classes."""
    base = tmp_path / "base"
    shutil.copytree(base_template, base)
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_JAX_HF_URL", "http://127.0.0.1:9")  # tests never download
    with pytest.raises(SystemExit, match="cannot load the SFT tasks: .*demo_tasks"):
        chat_sft.main(FLAGS)
    rows = write_demo_tasks(DemoTasksConfig(scale=0.05), base)
    train_ds, val_ds = chat_sft.load_mixtures()
    arc = "allenai/ai2_arc"
    assert len(train_ds) == (
        rows[f"{arc}/ARC-Easy/train"]
        + rows[f"{arc}/ARC-Challenge/train"]
        + rows["openai/gsm8k/main/train"]
        + min(rows["HuggingFaceTB/smol-smoltalk/default/train"], 10_000)
    )
    assert len(val_ds) == rows["HuggingFaceTB/smol-smoltalk/default/test"]
    flags = [*FLAGS, "--max_iterations=3", "--eval_metrics_every=2"]
    chat_sft.main([*flags, "--eval_metrics_max_problems=8"])
    meta = checkpoint.read_meta(base / "chatsft_checkpoints" / "d1")
    assert meta["step"] == 2 and meta["mmlu_acc"] in {i / 8 for i in range(9)}
    assert meta["arc_easy_acc"] in {i / 8 for i in range(9)}


def _no_data(*extras):
    raise AssertionError("a bad flag must be reported before any data is loaded")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--source=rl"], "--source must be base or mid"),
        (["--device_batch_size=0"], "--device_batch_size must be >= 1, got 0"),
        (["--target_examples_per_step=0"], "--target_examples_per_step must be >= 1, got 0"),
        (["--target_examples_per_step=6"], "must be a multiple of device_batch_size"),
        (["--num_epochs=0"], "--num_epochs must be >= 1"),
        (["--eval_steps=0"], "--eval_steps must be >= 1"),
        (["--eval_metrics_max_problems=0"], "--eval_metrics_max_problems must be >= 1"),
        (["--max_seq_len=0"], "--max_seq_len must be >= 1"),
        (["--min_bucket_len=0"], "--min_bucket_len must be >= 1"),
        (["--log_every=0"], "--log_every must be >= 1"),
        (["--dtype=fp16"], "--dtype must be auto, float32 or bfloat16, got 'fp16'"),
        (["--remat=bogus"], "--remat must be one of"),
        (["--embedding_lr=-1"], "--embedding_lr must be a finite number >= 0"),
        (["--init_lr_frac=inf"], "--init_lr_frac must be a finite number >= 0"),
        (["--step=-2"], "--step and --max_iterations must be >= -1"),
        (["--max_iterations=-2"], "--step and --max_iterations must be >= -1"),
        (["--world_size=-1"], "--world_size >= 0"),
        (["--max_seq_len=1000"], "exceeds the base model's rotary table (640"),
        (["--model_tag=d7"], "d7"),
        (["--extra_tasks=identity,spell"], "--extra_tasks: unknown extra task(s) ['spell']"),
        (["--extra_tasks=identity,identity"], "--extra_tasks: extra tasks repeat a name"),
        (["--extra_tasks=spelling", "--spelling_rows=20"], "--spelling_rows: spelling rows must"),
        (["--spelling_rows=20,20"], "--spelling_rows=20,20 needs 'spelling' in --extra_tasks"),
    ],
)
def test_bad_flags_are_one_error_line_before_any_work(base, monkeypatch, flags, message):
    monkeypatch.setattr(chat_sft, "load_mixtures", _no_data)
    with pytest.raises(SystemExit) as info:
        chat_sft.main([*FLAGS, *flags])
    text = str(info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_tokenizer_of_another_vocab_is_one_error_line(base):
    rng = random.Random(1)
    docs = [" ".join(rng.choice(COLORS) for _ in range(100)) for _ in range(10)]
    Tokenizer.train_from_iterator(iter(docs), 280).save(base / "tokenizer")
    with pytest.raises(SystemExit) as info:
        chat_sft.main(FLAGS)
    text = str(info.value)
    assert text.startswith("error: the tokenizer in ") and str(base / "tokenizer") in text
    assert "has 280 tokens, but base model d1 step 0" in text and "vocab_size 300" in text


def test_extra_tasks_on_offline_demo_tasks(base_template, tmp_path, monkeypatch):
    """--extra_tasks=identity,spelling: nanochat's later SFT mixture (identity conversations,
    SimpleSpelling + SpellingBee; here 20 + 20 rows) on the offline demo data."""
    base = tmp_path / "base"
    shutil.copytree(base_template, base)
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_JAX_HF_URL", "http://127.0.0.1:9")  # tests never download
    cfg = DemoTasksConfig(scale=0.05)
    write_demo_tasks(cfg, base)
    default_rows = len(chat_sft.load_mixtures()[0])
    loaded = []
    real_load = chat_sft.load_mixtures

    def recording_load(*args):
        loaded.append(args)
        train_ds, val_ds = real_load(*args)
        loaded.append([type(t).__name__ for t in train_ds.tasks])
        return train_ds, val_ds

    monkeypatch.setattr(chat_sft, "load_mixtures", recording_load)
    flags = [*FLAGS, "--max_iterations=2", "--eval_metrics_every=-1"]
    chat_sft.main([*flags, "--extra_tasks=identity,spelling", "--spelling_rows=20,20"])
    assert loaded[0] == (("identity", "spelling"), (20, 20))
    assert loaded[1][-3:] == ["CustomJSON", "SimpleSpelling", "SpellingBee"]
    rows = default_rows + cfg.rows(cfg.identity) + 40
    report = (base / "report" / "chat-sft.md").read_text()
    assert f"- Training rows: {rows}" in report and "- extra_tasks: identity,spelling" in report
    assert checkpoint.read_meta(base / "chatsft_checkpoints" / "d1")["step"] == 1
