"""chat_rl end to end on a tiny random "sft" model and a tiny GSM8K-like task held in memory:
steps, rewards, pass@k, checkpoints, logs, report, one compiled train step; clear errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import checkpoint, rl, stage
from nanochat_jax.metrics import read_jsonl
from nanochat_jax.tokenizer import Tokenizer
from scripts import chat_rl
from tests.test_chat_cli import make_tiny_base
from tests.test_train import record_hyperparams

FLAGS = [
    "--device_batch_size=2",
    "--examples_per_step=2",
    "--num_samples=4",
    "--max_new_tokens=12",
    "--eval_every=2",
    "--eval_examples=2",
    "--eval_max_new_tokens=12",
    "--save_every=2",
]


class TinyMathTask:
    """GSM8K-shaped conversations; the reward is something a random model sometimes earns
    (an even number of characters), so advantages are not all zero."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        question = f"Tom has {i} apples and buys {i + 2} more. How many now?"
        parts = [
            {"type": "text", "text": "He has "},
            {"type": "python", "text": f"{i}+{i + 2}"},
            {"type": "python_output", "text": str(2 * i + 2)},
            {"type": "text", "text": f" apples.\n#### {2 * i + 2}"},
        ]
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": parts},
            ]
        }

    def evaluate(self, conversation: dict, response: str) -> bool:
        return len(response) % 2 == 0

    def reward(self, conversation: dict, response: str) -> float:
        return float(self.evaluate(conversation, response))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tokenizer and a tiny random GPT saved as phase "sft" (d1, step 0)."""
    base = tmp_path_factory.mktemp("rl_base")
    model, _ = make_tiny_base(base)
    params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    with checkpoint.Checkpointer(
        checkpoint.checkpoint_dir("sft", "d1", base), async_save=False
    ) as c:
        c.save(0, params=params, meta={"model_config": model.config.to_dict(), "step": 0})
    return base


@pytest.fixture
def env(base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base_dir))
    monkeypatch.setattr(chat_rl, "load_tasks", lambda: (TinyMathTask(9), TinyMathTask(3)))
    return base_dir


def test_tiny_run_trains_logs_saves_and_reports(env, capsys, monkeypatch):
    used = record_hyperparams(monkeypatch)
    chat_rl.main(FLAGS)
    out = capsys.readouterr().out
    assert "Calculated number of steps: 4" in out  # 9 // 2
    records = read_jsonl(env / "runs" / "d1" / "rl" / "metrics.jsonl")
    train = {r["step"]: r for r in records if "train/reward" in r}
    evals = {r["step"]: r for r in records if "eval/pass@1" in r}
    assert sorted(train) == [0, 1, 2, 3] and sorted(evals) == [0, 2]
    for r in train.values():
        assert 0 <= r["train/reward"] <= 1 and r["train/sequence_length"] > 10
        assert r["train/rollout_tok_per_sec"] > 0
    assert [train[s]["train/lrm"] for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    # what the optimizer used: base lr * init_lr_frac (default 0.05) * (1 - step / 4), adam lrs
    # scaled by (n_embd/768)^-0.5, Muon momentum 0.95
    assert len(used) == 4 and chat_rl.ChatRLConfig().init_lr_frac == 0.05
    adam_scale = (32 / 768) ** -0.5  # the tiny model's n_embd is 32
    for step, lrs in enumerate(used):
        lrm = 0.05 * (1 - step / 4)
        assert lrs["muon"]["learning_rate"] == pytest.approx(0.02 * lrm, rel=1e-6)
        assert lrs["embedding"]["learning_rate"] == pytest.approx(0.2 * adam_scale * lrm)
        assert lrs["unembedding"]["learning_rate"] == pytest.approx(0.004 * adam_scale * lrm)
        assert lrs["muon"]["momentum"] == pytest.approx(0.95)
    for r in evals.values():  # pass@k is a non-decreasing fraction
        passk = [r[f"eval/pass@{k}"] for k in (1, 2)]
        assert 0 <= passk[0] <= passk[1] <= 1
    assert any(r["train/grad_norm"] > 0 for r in train.values())  # rewards differed somewhere

    rl_dir = checkpoint.checkpoint_dir("rl", "d1", env)
    assert sorted(p.name for p in rl_dir.iterdir()) == ["000002", "000003"]
    assert not (rl_dir / "000003" / "opt_state").exists()  # params only, like nanochat
    meta = checkpoint.read_meta(rl_dir)
    assert meta["step"] == 3 and meta["model_config"]["n_layer"] == 1 and "mean_reward" in meta
    sft_model, _ = stage.load_model("sft", base_dir=env)
    rl_model, _ = stage.load_model("rl", base_dir=env)
    assert not np.allclose(rl_model.h[0].mlp.c_fc.kernel[...], sft_model.h[0].mlp.c_fc.kernel[...])

    report = (env / "report" / "chat-rl.md").read_text()
    assert "## Chat RL" in report and "- num_samples: 4" in report
    assert "Engine compilations: " in out and "train step compilations: 1" in out


class _Evaluated(Exception):
    pass


def test_pass_at_k_samples_as_nanochats_eval_not_as_training(env, monkeypatch):
    """nanochat's run_gsm8k_eval samples at temperature 1.0, top_k 50, 256 tokens, whatever the
    rollouts use; the --eval_* flags default to exactly that."""
    seen = {}

    def spy(engine, tokenizer, task, **kwargs):
        seen.update(kwargs)
        raise _Evaluated

    monkeypatch.setattr(rl, "evaluate_pass_at_k", spy)
    flags = [f for f in FLAGS if not f.startswith("--eval_max_new_tokens")]
    with pytest.raises(_Evaluated):
        chat_rl.main([*flags, "--temperature=0.5", "--top_k=7", "--max_new_tokens=9"])
    assert seen == {
        "max_examples": 2,
        "num_samples": 2,  # device_batch_size
        "max_new_tokens": 256,
        "temperature": 1.0,
        "top_k": 50,
    }
    seen.clear()
    with pytest.raises(_Evaluated):
        chat_rl.main([*FLAGS, "--eval_temperature=0", "--eval_top_k=3"])
    assert (seen["max_new_tokens"], seen["temperature"], seen["top_k"]) == (12, 0.0, 3)


def _run(env, base, monkeypatch, *flags) -> list[tuple[float, float, float]]:
    for sub in ("tokenizer", "chatsft_checkpoints"):
        _copy_tree(env / sub, base / sub)
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    chat_rl.main([*FLAGS, "--num_iterations=2", "--eval_every=-1", *flags])
    records = read_jsonl(base / "runs" / "d1" / "rl" / "metrics.jsonl")
    return [(r["train/reward"], r["train/sequence_length"], r["train/loss"]) for r in records]


def test_same_flags_same_rewards_and_two_devices_see_the_same_questions(env, tmp_path, monkeypatch):
    """Rollout seeds are hash((step, example, sampling step)): a second run repeats the first.
    On 2 devices, rank r takes questions r, r+2, ...: step 0 visits the same two questions with
    the same seeds, so the same rollouts and (summed in another order) the same loss."""
    first = _run(env, tmp_path / "a", monkeypatch)
    assert first == _run(env, tmp_path / "b", monkeypatch) and len(first) == 2
    two = _run(env, tmp_path / "c", monkeypatch, "--mesh=2")
    assert first[0][2] != 0  # rewards differ within a question: a real gradient
    assert two[0][:2] == first[0][:2] and two[0][2] == pytest.approx(first[0][2], rel=1e-5)


def test_rollouts_on_an_engine_pool_equal_one_engines(env, tmp_path, monkeypatch, capsys):
    """--mesh=8: an EnginePool generates the 8 ranks' questions in parallel, and every step's
    rewards, lengths and loss equal those of one engine generating them in turn
    (--rollout_devices=1): same seeds, same train step on the same mesh. 3 replicas for 8 ranks
    (questions claimed as replicas free up, results reassembled by rank): the default, one per
    device, costs a compile per device and is checked below (on 2) without generating."""
    flags = ("--mesh=8", "--examples_per_step=8", "--num_samples=2")
    pool = _run(env, tmp_path / "pool", monkeypatch, *flags, "--rollout_devices=3")
    assert "(rollouts on 3 devices)" in capsys.readouterr().out
    single = _run(env, tmp_path / "one", monkeypatch, *flags, "--rollout_devices=1")
    assert "(rollouts on 1 device)" in capsys.readouterr().out
    assert len(pool) == 2 and pool == single and pool[0][2] != 0

    built = []

    def spy(model, tokenizer, *, devices, compute_dtype):
        built.append(devices)
        raise _Evaluated

    monkeypatch.setattr(chat_rl, "EnginePool", spy)
    with pytest.raises(_Evaluated):
        chat_rl.main([*FLAGS, "--mesh=2"])
    assert [set(d) for d in built] == [set(jax.local_devices()[:2])]  # one replica per device


def test_real_gsm8k_on_demo_task_data(base_dir, tmp_path, monkeypatch, capsys):
    """The default tasks: GSM8K main train/test from the offline demo data (tool-call answers)."""
    from nanochat_jax import demo_tasks

    base = tmp_path / "demo"
    for sub in ("tokenizer", "chatsft_checkpoints"):
        _copy_tree(base_dir / sub, base / sub)
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    demo_tasks.main(["--scale=0.01"])  # 20 train, 4 test problems
    chat_rl.main([*FLAGS, "--num_iterations=2", "--max_new_tokens=8"])
    out = capsys.readouterr().out
    assert "Step 0 | Pass@1: " in out and "Step 1/2 | Average reward: " in out
    records = read_jsonl(base / "runs" / "d1" / "rl" / "metrics.jsonl")
    assert [r["step"] for r in records if "train/reward" in r] == [0, 1]


def test_missing_task_data_is_one_clear_line(base_dir, tmp_path, monkeypatch):
    base = tmp_path / "nodata"
    for sub in ("tokenizer", "chatsft_checkpoints"):
        _copy_tree(base_dir / sub, base / sub)
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_JAX_HF_URL", "http://127.0.0.1:9")  # offline: refused at once
    with pytest.raises(SystemExit) as info:
        chat_rl.main(FLAGS)
    message = str(info.value)
    assert message.startswith("error: cannot load the GSM8K task: ") and "\n" not in message
    assert "nanochat_jax.demo_tasks" in message and "hf_data" in message


def _copy_tree(src, dst):
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--source=base"], "--source must be mid or sft"),
        (["--num_samples=3"], "must be a multiple of --device_batch_size"),
        (["--examples_per_step=3", "--mesh=2"], "multiple of the 2 data-parallel devices"),
        (["--max_new_tokens=700"], "lower max_new_tokens"),
        (["--examples_per_step=10"], "fewer than --examples_per_step=10"),
        (["--source=mid"], "no checkpoints in"),
        (["--model_step=5"], "no step 5 in"),
        (["--dtype=float16"], "dtype must be auto, float32 or bfloat16"),
        (["--dtype=fp16"], "--dtype must be auto, float32 or bfloat16, got 'fp16'"),
        (["--device_batch_size=0"], "--device_batch_size must be >= 1"),
        (["--top_k=0"], "--top_k must be >= 1"),
        (["--eval_examples=0"], "--eval_examples must be >= 1"),
        (["--eval_top_k=0"], "--eval_top_k must be >= 1"),
        (["--eval_max_new_tokens=0"], "--eval_max_new_tokens must be >= 1"),
        (["--eval_max_new_tokens=700"], "lower --eval_max_new_tokens"),
        (["--temperature=-1"], "--temperature must be a finite number >= 0"),
        (["--eval_temperature=nan"], "--eval_temperature must be a finite number >= 0"),
        (["--matrix_lr=-1"], "--matrix_lr must be a finite number >= 0"),
        (["--init_lr_frac=-0.5"], "--init_lr_frac must be a finite number >= 0"),
        (["--num_iterations=0"], "--num_iterations -1 or >= 1"),
        (["--model_step=-2"], "--model_step must be >= -1"),
        (["--rollout_devices=0"], "--rollout_devices must be -1 (all) or 1..1"),
        (["--rollout_devices=3", "--mesh=2"], "1..2 (the mesh's local devices), got 3"),
    ],
)
def test_clear_errors(env, flags, message):
    with pytest.raises(SystemExit) as info:
        chat_rl.main([*FLAGS, *flags])
    assert str(info.value).startswith("error: ") and message in str(info.value)


def test_tokenizer_of_another_vocab_is_one_error_line(base_dir, tmp_path, monkeypatch):
    base = tmp_path / "vocab"
    _copy_tree(base_dir / "chatsft_checkpoints", base / "chatsft_checkpoints")
    Tokenizer.train_from_iterator(iter(["one two three four five " * 50]), 280).save(
        base / "tokenizer"
    )
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    monkeypatch.setattr(chat_rl, "load_tasks", lambda: (TinyMathTask(9), TinyMathTask(3)))
    with pytest.raises(SystemExit) as info:
        chat_rl.main(FLAGS)
    text = str(info.value)
    assert text.startswith("error: the tokenizer in ") and str(base / "tokenizer") in text
    assert "has 280 tokens, but sft model d1 step 0" in text and "vocab_size 320" in text
