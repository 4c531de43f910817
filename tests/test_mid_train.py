"""mid_train end to end on tiny in-memory conversations, from a tiny base checkpoint."""

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from nanochat_jax import checkpoint, optim, sharding, train
from nanochat_jax.chat_data import MidTrainData, render_all
from nanochat_jax.config import GPTConfig
from nanochat_jax.demo_tasks import DemoTasksConfig, write_demo_tasks
from nanochat_jax.metrics import read_jsonl
from nanochat_jax.tokenizer import Tokenizer
from scripts import mid_train
from tests.test_chat_data import _nanochat_mid
from tests.test_train import record_hyperparams

COLORS = "red green blue yellow black white pink brown".split()
THINGS = "sky grass sun snow coal milk rose bark ball hat car cup door box pen".split()


def conversations(n: int, seed: int) -> list[dict]:
    """Learnable chats: a fixed colour per thing, asked in a few ways; some with a tool call."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        thing = rng.choice(THINGS)
        color = COLORS[THINGS.index(thing) % len(COLORS)]
        question = rng.choice(["what color is the {}?", "the {} is which color?", "color of {}"])
        answer = f"the {thing} is {color}."
        if i % 6 == 0:
            answer = [
                {"type": "text", "text": "let me count. "},
                {"type": "python", "text": f"len('{thing}')"},
                {"type": "python_output", "text": str(len(thing))},
                {"type": "text", "text": f" so the {thing} is {color}."},
            ]
        messages = [{"role": "user", "content": question.format(thing)}]
        messages.append({"role": "assistant", "content": answer})
        rows.append({"messages": messages})
    return rows


def make_base_dir(base: Path, *, seq_len: int = 64, device_batch_size: int = 4) -> Path:
    """A vocab-300 tokenizer and a random depth-1 base checkpoint (step 0) in `base`."""
    rng = random.Random(0)
    words = COLORS + THINGS + "what is the which color of let me count so".split()
    docs = [" ".join(rng.choice(words) for _ in range(300)) for _ in range(30)]
    tokenizer = Tokenizer.train_from_iterator(iter(docs), 300)
    tokenizer.save(base / "tokenizer")
    np.save(base / "tokenizer" / "token_bytes.npy", tokenizer.token_bytes())
    config = GPTConfig.from_depth(1, tokenizer.get_vocab_size(), seq_len)
    opt_cfg = optim.OptimConfig(model_dim=config.n_embd)
    state, _ = train.init_train_state(
        config,
        lambda p: optim.make_optimizer(p, opt_cfg),
        sharding.make_mesh("1"),
        seed=0,
    )
    meta = {
        "step": 0,
        "model_config": config.to_dict(),
        "device_batch_size": device_batch_size,
        "max_seq_len": seq_len,
    }
    with checkpoint.Checkpointer(checkpoint.checkpoint_dir("base", "d1", base)) as ckpt:
        ckpt.save(0, params=state.params, meta=meta)
        ckpt.wait()
    return base


TRAIN, VAL = conversations(240, seed=1), conversations(40, seed=2)
FLAGS = [
    "--max_seq_len=64",
    "--device_batch_size=4",
    "--total_batch_size=256",
    "--eval_every=10",
    "--eval_tokens=512",
]


@pytest.fixture(scope="module")
def base_template(tmp_path_factory):
    # a longer base context than the runs' --max_seq_len=64: which one the mid meta keeps shows
    return make_base_dir(tmp_path_factory.mktemp("mid_base"), seq_len=128)


@pytest.fixture
def base(base_template, tmp_path, monkeypatch):
    """A fresh copy of the base dir as NANOCHAT_JAX_BASE_DIR, with the tiny mixtures."""
    shutil.copytree(base_template, tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setattr(mid_train, "load_mixtures", lambda *a: (TRAIN, VAL))
    return tmp_path / "base"


def _records(base: Path) -> list[dict]:
    return read_jsonl(base / "runs" / "d1" / "mid" / "metrics.jsonl")


def _losses(base: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in _records(base) if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(base_template, tmp_path_factory):
    """One full run (saving every 4 steps, all kept), the data it should have read, and the
    lrs/momentum its optimizer used at each step."""
    base = tmp_path_factory.mktemp("mid_ref") / "base"
    shutil.copytree(base_template, base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
        mp.setattr(mid_train, "load_mixtures", lambda *a: (TRAIN, VAL))
        used = record_hyperparams(mp)
        mid_train.main([*FLAGS, "--save_every=4", "--keep_checkpoints=100"])
    tokenizer = Tokenizer.load(base / "tokenizer")
    data = MidTrainData(
        render_all(tokenizer, TRAIN),
        batch_size=4,
        seq_len=64,
        world_size=1,
        ranks=[0],
        accum_steps=1,
    )
    return base, data, used


def test_mid_train_learns_saves_and_reports(reference):
    base, data, _ = reference
    steps = data.num_steps
    assert 20 < steps < 40
    losses = _losses(base)
    assert sorted(losses) == list(range(steps))
    assert losses[0] == pytest.approx(np.log(300), rel=1e-3)  # zero-init lm_head: uniform
    assert np.mean([losses[s] for s in range(steps - 5, steps)]) < losses[0] - 2.0, losses
    lrms = {r["step"]: r["train/lrm"] for r in _records(base) if "train/lrm" in r}
    np.testing.assert_allclose([lrms[s] for s in range(steps)], data.lr_multipliers(), rtol=1e-6)
    assert lrms[0] == 1.0 and lrms[steps - 1] < 0.2
    bpbs = [r["val/bpb"] for r in _records(base) if "val/bpb" in r]
    assert len(bpbs) == len(range(0, steps, 10)) + 1 and bpbs[-1] < bpbs[0] / 2

    ckpt_dir = base / "mid_checkpoints" / "d1"
    meta = checkpoint.read_meta(ckpt_dir)
    assert meta["step"] == steps and meta["val_bpb"] == pytest.approx(bpbs[-1])
    assert {"step", "val_bpb", "model_config", "user_config"} <= set(meta)
    assert meta["model_config"]["n_layer"] == 1 and meta["user_config"]["device_batch_size"] == 4
    # nanochat: model_config's sequence_len is midtraining's max_seq_len, not the base model's
    base_config = checkpoint.read_meta(base / "base_checkpoints" / "d1")["model_config"]
    assert base_config["sequence_len"] == 128
    assert meta["model_config"] == {**base_config, "sequence_len": 64}
    # the optimizer used the table: its last update's Muon lr and momentum
    opt_state = ocp.StandardCheckpointer().restore(ckpt_dir / f"{steps:06d}" / "opt_state")
    muon = opt_state[1]["inner_states"]["muon"]["inner_state"]["hyperparams"]
    assert float(muon["learning_rate"]) == pytest.approx(0.02 * data.lr_multipliers()[-1])
    assert float(muon["momentum"]) == pytest.approx(0.85 + 0.1 * (steps - 1) / 300)
    report = (base / "report" / "midtraining.md").read_text()
    assert "## Midtraining" in report and f"- Number of iterations: {steps}" in report
    assert "- DDP world size: 1" in report and "- Minimum validation bpb:" in report
    assert list((base / "runs" / "d1" / "mid").glob("events.out.tfevents.*"))


def test_optimizer_follows_nanochats_progress_schedule(reference):
    """The lrs the optimizer used at every step against nanochat's loop, transcribed: its
    generator's monotone progress, lrm = 1 then linear to 0 after 80%, lr = base lr * lrm (adam
    lrs scaled by (n_embd/768)^-0.5), Muon momentum 0.85 -> 0.95 over 300 steps."""
    base, _, used = reference
    tokenizer = Tokenizer.load(base / "tokenizer")
    progress, _ = _nanochat_mid(tokenizer, TRAIN, 4, 64, 1, 1)
    assert len(used) == len(progress)
    adam_scale = (64 / 768) ** -0.5  # d1: n_embd 64
    for step, (p, lrs) in enumerate(zip(progress, used, strict=True)):
        lrm = 1.0 if p < 0.8 else 1 - (p - 0.8) / 0.2
        assert lrs["muon"]["learning_rate"] == pytest.approx(0.02 * lrm, rel=1e-6, abs=1e-9)
        assert lrs["embedding"]["learning_rate"] == pytest.approx(0.2 * adam_scale * lrm, rel=1e-6)
        assert lrs["unembedding"]["learning_rate"] == pytest.approx(
            0.004 * adam_scale * lrm, rel=1e-6
        )
        assert lrs["muon"]["momentum"] == pytest.approx(0.85 + 0.1 * step / 300, rel=1e-6)
    assert used[0]["muon"]["learning_rate"] == pytest.approx(0.02)
    assert used[-1]["muon"]["learning_rate"] < 0.02 * 0.2  # the warmdown happened


def test_init_lr_frac_reaches_the_optimizer(base, monkeypatch):
    used = record_hyperparams(monkeypatch)
    flags = [*FLAGS, "--num_iterations=2", "--eval_every=-1", "--dry_run=1"]
    mid_train.main([*flags, "--init_lr_frac=0.25", "--matrix_lr=0.04"])
    # --num_iterations=2: progress (s + 1) / 2 dominates, so lrm = 1 then 0
    assert [u["muon"]["learning_rate"] for u in used] == pytest.approx([0.04 * 0.25, 0.0])


def test_resume_continues_exactly(reference, base):
    ref_base, data, _ = reference
    ckpt_dir = base / "mid_checkpoints" / "d1"
    shutil.copytree(ref_base / "mid_checkpoints" / "d1" / "000008", ckpt_dir / "000008")
    mid_train.main([*FLAGS, "--save_every=4", "--resume=1"])
    expected, got = _losses(ref_base), _losses(base)
    assert sorted(got) == list(range(8, data.num_steps))
    for step in got:
        assert got[step] == expected[step], (step, got[step], expected[step])


def test_mesh_8_matches_one_device(base):
    """Eight nanochat ranks' rows on one device, or one rank's rows per device: same run."""
    flags = [*FLAGS[:2], "--device_batch_size=1", "--total_batch_size=512", "--world_size=8"]
    flags += ["--num_iterations=3", "--eval_every=-1", "--dry_run=1"]
    mid_train.main([*flags, "--mesh=1"])
    one = _losses(base)
    (base / "runs" / "d1" / "mid" / "metrics.jsonl").unlink()
    mid_train.main([*flags, "--mesh=8"])
    eight = _losses(base)
    assert sorted(one) == sorted(eight) == [0, 1, 2]
    np.testing.assert_allclose([eight[s] for s in range(3)], [one[s] for s in range(3)], rtol=1e-5)
    # --eval_every=-1 still evaluates at the last step, as nanochat does
    assert [r["step"] for r in _records(base) if "val/bpb" in r] == [3]
    assert checkpoint.list_model_tags("mid", base) == [] and not (base / "report").exists()


def test_footgun_warning(base, caplog):
    logging.getLogger("nanochat_jax").addHandler(caplog.handler)
    try:
        mid_train.main(
            [
                *FLAGS,
                "--device_batch_size=8",
                "--total_batch_size=512",
                "--dry_run=1",
                "--num_iterations=1",
                "--eval_every=-1",
            ]
        )
    finally:
        logging.getLogger("nanochat_jax").removeHandler(caplog.handler)
    assert "FOOTGUN WARNING: base model training used device_batch_size 4" in caplog.text


def test_clear_errors(base, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="must be a positive multiple"):
        mid_train.main([*FLAGS, "--total_batch_size=300"])
    with pytest.raises(
        SystemExit, match="world_size 3 must be a positive multiple of the mesh's 8"
    ):
        mid_train.main([*FLAGS, "--mesh=8", "--world_size=3"])
    with pytest.raises(SystemExit, match="too small"):
        mid_train.main([*FLAGS, "--device_batch_size=128", "--total_batch_size=8192"])

    monkeypatch.setattr(mid_train, "load_mixtures", lambda *a: (TRAIN, VAL[:3]))
    flags = [*FLAGS, "--device_batch_size=1", "--world_size=4"]
    with pytest.raises(SystemExit, match="the val mixture has 3 conversations, fewer than the 4"):
        mid_train.main(flags)

    def missing(*args):
        raise FileNotFoundError("no task data in task_data/: run python -m nanochat_jax.demo_tasks")

    monkeypatch.setattr(mid_train, "load_mixtures", missing)
    with pytest.raises(SystemExit, match="cannot load the midtraining tasks: no task data"):
        mid_train.main(FLAGS)
    shutil.rmtree(base / "base_checkpoints")
    with pytest.raises(SystemExit, match="run the base stage first"):
        mid_train.main(FLAGS)


def test_default_mixtures_on_offline_demo_tasks(base_template, tmp_path, monkeypatch):
    """nanochat's mixtures through the real task classes: missing data, then the demo data."""
    base = tmp_path / "base"
    shutil.copytree(base_template, base)
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_JAX_HF_URL", "http://127.0.0.1:9")  # tests never download
    with pytest.raises(SystemExit, match="cannot load the midtraining tasks: .*demo_tasks"):
        mid_train.main(FLAGS)
    rows = write_demo_tasks(DemoTasksConfig(scale=0.05), base)
    train_ds, val_ds = mid_train.load_mixtures()
    smoltalk, gsm8k = "HuggingFaceTB/smol-smoltalk/default", "openai/gsm8k/main"
    assert len(train_ds) == (
        rows[f"{smoltalk}/train"] + rows["cais/mmlu/auxiliary_train/train"] + rows[f"{gsm8k}/train"]
    )
    assert len(val_ds) == (
        rows[f"{smoltalk}/test"]
        + min(rows["cais/mmlu/all/test"], 5200)
        + min(rows[f"{gsm8k}/test"], 420)
    )
    mid_train.main([*FLAGS, "--num_iterations=4", "--eval_every=2"])
    meta = checkpoint.read_meta(base / "mid_checkpoints" / "d1")
    assert meta["step"] == 4 and meta["val_bpb"] < 8


def _no_data():
    raise AssertionError("a bad flag must be reported before any data is loaded")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device_batch_size=0"], "--device_batch_size must be >= 1, got 0"),
        (["--max_seq_len=0"], "--max_seq_len must be >= 1, got 0"),
        (["--total_batch_size=0"], "--total_batch_size must be >= 1"),
        (["--eval_tokens=0"], "--eval_tokens must be >= 1"),
        (["--log_every=0"], "--log_every must be >= 1"),
        (["--keep_checkpoints=0"], "--keep_checkpoints must be >= 1"),
        (["--peak_flops=0"], "--peak_flops must be >= 1"),
        (["--dtype=fp16"], "--dtype must be auto, float32 or bfloat16, got 'fp16'"),
        (["--remat=bogus"], "--remat must be one of"),
        (["--matrix_lr=-1"], "--matrix_lr must be a finite number >= 0"),
        (["--init_lr_frac=nan"], "--init_lr_frac must be a finite number >= 0"),
        (["--weight_decay=-0.1"], "--weight_decay must be a finite number >= 0"),
        (["--step=-2"], "--step must be >= -1"),
        (["--world_size=-1"], "--world_size >= 0"),
        (["--num_iterations=0"], "--num_iterations must be -1 (one epoch) or >= 1"),
        (["--total_batch_size=300"], "must be a positive multiple"),
        (["--mesh=8", "--world_size=3"], "world_size 3 must be a positive multiple"),
        (["--max_seq_len=2048", "--total_batch_size=8192"], "exceeds the base model's rotary"),
        (["--model_tag=d7"], "d7"),
        (["--extra_tasks=spell"], "--extra_tasks: unknown extra task(s) ['spell']"),
        (["--spelling_rows=20,20"], "--spelling_rows=20,20 needs 'spelling' in --extra_tasks"),
    ],
)
def test_bad_flags_are_one_error_line_before_any_work(base, monkeypatch, flags, message):
    monkeypatch.setattr(mid_train, "load_mixtures", _no_data)
    with pytest.raises(SystemExit) as info:
        mid_train.main([*FLAGS, *flags])
    text = str(info.value)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_extra_task_flags_reach_the_mixture(base, monkeypatch):
    seen = []

    def record(*args):
        seen.append(args)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(mid_train, "load_mixtures", record)
    with pytest.raises(SystemExit, match="cannot load the midtraining tasks: stop here"):
        mid_train.main([*FLAGS, "--extra_tasks=spelling,identity", "--spelling_rows=30,10"])
    assert seen == [(("identity", "spelling"), (30, 10))]


def test_tokenizer_of_another_vocab_is_one_error_line(base):
    rng = random.Random(1)
    docs = [" ".join(rng.choice(COLORS) for _ in range(100)) for _ in range(10)]
    Tokenizer.train_from_iterator(iter(docs), 280).save(base / "tokenizer")
    with pytest.raises(SystemExit) as info:
        mid_train.main(FLAGS)
    text = str(info.value)
    assert text.startswith("error: the tokenizer in ") and str(base / "tokenizer") in text
    assert "has 280 tokens, but base model d1 step 0" in text and "vocab_size 300" in text
