"""The sharded train step on 8 fake CPU devices: meshes and micro-batching change nothing; the
host TrainLoop of base_train and mid_train."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nanochat_jax import optim, sharding, train
from nanochat_jax.config import GPTConfig

CONFIG = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
ROWS = 8  # global rows per optimizer step


def _make_optimizer(params):
    cfg = optim.OptimConfig(model_dim=CONFIG.n_embd)
    return optim.make_optimizer(
        params,
        cfg,
        optim.lr_multiplier_schedule(10),
        optim.muon_momentum_schedule(),
    )


def _batches(num_steps, seed=0):
    """The same batch every step, so the loss must fall."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (1, ROWS, CONFIG.sequence_len + 1))
    tokens = np.repeat(tokens, num_steps, axis=0)
    return tokens[..., :-1].astype(np.int32), tokens[..., 1:].astype(np.int32)


def _run(mesh_spec, accum_steps=1, num_steps=3):
    mesh = sharding.make_mesh(mesh_spec)
    state, optimizer = train.init_train_state(CONFIG, _make_optimizer, mesh, seed=0)
    micro = ROWS // accum_steps
    step = train.make_train_step(
        state,
        optimizer,
        accum_steps=accum_steps,
        micro_batch_size=micro,
        sequence_len=CONFIG.sequence_len,
    )
    losses = []
    inputs, targets = _batches(num_steps)
    for x, y in zip(inputs, targets, strict=True):
        shape = (accum_steps, micro, CONFIG.sequence_len)
        metrics = state.apply_step(step, x.reshape(shape), y.reshape(shape))  # host arrays
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), state.params, state.opt_state


def _assert_params_close(params, reference):
    """Equal up to rounding. Other device counts sum in other orders (fp32 ~1e-7), which can flip
    a bf16 rounding inside Muon's Newton-Schulz: one bf16 ulp of an O(1) entry times lr 0.02
    (x2 aspect scale for c_fc) is <= 3e-4 per step, so 1e-3 after 3 steps; Adam moves wte by
    ~lr*sign(g) = 0.49 where g ~ 0 can change sign, so 1e-2 there. Measured: <= 6.6e-4 on
    matrices, 6.4e-3 on wte; the losses agree to 1e-6."""
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = sharding.path_str(path)
        b = _get(reference, path)
        atol = 1e-2 if name.startswith("wte") else 1e-3
        np.testing.assert_allclose(a, b, atol=atol, err_msg=name)


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.fixture(scope="module")
def single_device():
    return _run("1")


@pytest.fixture(scope="module")
def fsdp_run():
    return _run("data=2,fsdp=4")


@pytest.mark.parametrize("mesh_spec", ["8", "data=2,fsdp=4"])
def test_meshes_match_one_device(single_device, fsdp_run, mesh_spec):
    losses_1, params_1, *_ = single_device
    losses, params, *_ = fsdp_run if mesh_spec == "data=2,fsdp=4" else _run(mesh_spec)
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    assert losses[-1] < losses[0]
    _assert_params_close(params, params_1)


def test_micro_batches_equal_one_big_batch(single_device):
    losses_1, params_1, *_ = single_device
    losses, params, *_ = _run("1", accum_steps=4)
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    _assert_params_close(params, params_1)


def test_fsdp_shards_params_and_optimizer_state_by_the_rules(fsdp_run):
    *_, params, opt_state = fsdp_run
    assert params["h"][0]["mlp"]["c_fc"]["kernel"].sharding.spec == P("fsdp", None)
    assert params["wte"]["embedding"].sharding.spec == P(None, "fsdp")
    flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    checked = 0
    for path, leaf in flat:
        name = sharding.path_str(path)
        if name.endswith("mlp/c_fc/kernel"):  # Muon momentum buffer, Adam moments live elsewhere
            assert leaf.sharding.spec == P("fsdp", None), name
            checked += 1
        if name.endswith("lm_head/kernel"):
            assert leaf.sharding.spec == P("fsdp", None), name
            checked += 1
    assert checked >= 4  # c_fc buffers of 2 layers + lm_head's mu and nu


def test_grad_accum_steps_rule_and_error():
    assert train.grad_accum_steps(524288, 32, 2048, 8) == 1
    assert train.grad_accum_steps(524288, 8, 2048, 8) == 4
    assert train.grad_accum_steps(524288, 32, 2048, 1) == 8
    with pytest.raises(ValueError, match="multiple of"):
        train.grad_accum_steps(1000, 4, 64, 2)
    for bad in ((524288, 0, 2048, 8), (524288, 32, 0, 8), (524288, 32, 2048, 0), (8, -1, 8, 1)):
        with pytest.raises(ValueError, match="must be >= 1"):  # not a ZeroDivisionError
            train.grad_accum_steps(*bad)


def optimizer_hyperparams(opt_state) -> dict[str, dict[str, float]]:
    """The lr (and Muon momentum) each optimizer group used in the update that made opt_state,
    read where optim.make_optimizer's inject_hyperparams keep them."""
    groups = opt_state[1].inner_states
    return {
        group: {
            name: float(value)
            for name, value in groups[group].inner_state.hyperparams.items()
            if name in ("learning_rate", "momentum")
        }
        for group in optim.GROUPS
    }


def record_hyperparams(monkeypatch) -> list[dict[str, dict[str, float]]]:
    """Make every train step a stage script compiles append optimizer_hyperparams of the state
    it returns, one entry per optimizer step in order: what the optimizer really used."""
    records = []
    make_train_step = train.make_train_step

    def spy(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def run(*arrays):
            params, opt_state, metrics = step(*arrays)
            records.append(optimizer_hyperparams(opt_state))
            return params, opt_state, metrics

        return run

    monkeypatch.setattr(train, "make_train_step", spy)
    return records


def test_optimizer_hyperparams_are_the_schedules_values(single_device):
    *_, opt_state = single_device
    used = optimizer_hyperparams(opt_state)  # after 3 steps: the values of step 2
    lrm = float(optim.lr_multiplier_schedule(10)(2))
    adam_scale = (CONFIG.n_embd / 768) ** -0.5
    assert used["muon"]["learning_rate"] == pytest.approx(0.02 * lrm)
    assert used["muon"]["momentum"] == pytest.approx(0.85 + 0.1 * 2 / 300)
    assert used["embedding"]["learning_rate"] == pytest.approx(0.2 * adam_scale * lrm)
    assert used["unembedding"]["learning_rate"] == pytest.approx(0.004 * adam_scale * lrm)


def test_extra_batch_arrays_reach_the_loss(single_device):
    """A loss with a per-token weight array: weights of 1 reproduce the plain step; weights of 0
    on half the rows equal training on the other half only (targets -1 there)."""
    from nanochat_jax.model import cross_entropy

    def weighted(params, graphdef, rest, inputs_BT, targets_BT, weights_BT):
        logits = train.nnx.merge(graphdef, params, rest)(inputs_BT)
        nll_BT = cross_entropy(logits, targets_BT, loss_reduction="none")
        return (nll_BT * weights_BT).sum() / weights_BT.sum()

    def run(weights_BT, mask_targets, loss=weighted):
        mesh = sharding.make_mesh("1")
        state, optimizer = train.init_train_state(CONFIG, _make_optimizer, mesh, seed=0)
        shape = (1, ROWS, CONFIG.sequence_len)
        step = train.make_train_step(
            state,
            optimizer,
            accum_steps=1,
            micro_batch_size=ROWS,
            sequence_len=CONFIG.sequence_len,
            loss=loss,
            extra_dtypes=(np.float32,) if loss is weighted else (),
        )
        inputs, targets = _batches(1)
        targets = np.where(mask_targets, -1, targets)
        arrays = [a.reshape(shape) for a in (inputs, targets, weights_BT)]
        arrays = arrays if loss is weighted else arrays[:2]
        _, _, metrics = step(state.params, state.opt_state, state.rest, *arrays)
        return float(metrics["loss"])

    ones = np.ones((ROWS, CONFIG.sequence_len), np.float32)
    losses_1, *_ = single_device
    np.testing.assert_allclose(run(ones, False), losses_1[0], rtol=1e-6)
    half = ones.copy()
    half[ROWS // 2 :] = 0
    masked = np.zeros((1, ROWS, CONFIG.sequence_len), bool)
    masked[:, ROWS // 2 :] = True
    np.testing.assert_allclose(run(half, False), run(ones, masked, train.loss_fn), rtol=1e-6)
    with pytest.raises((TypeError, ValueError)):
        mesh = sharding.make_mesh("1")
        state, optimizer = train.init_train_state(CONFIG, _make_optimizer, mesh, seed=0)
        step = train.make_train_step(
            state, optimizer, accum_steps=1, micro_batch_size=ROWS, sequence_len=16
        )
        step(state.params, state.opt_state, state.rest, *([np.zeros((1, ROWS, 8), np.int32)] * 2))


# --- TrainLoop: the host loop of base_train / mid_train, with a fake compiled step ---


@dataclasses.dataclass
class _LoopFlags:
    total_batch_size: int = 2 * 4 * 16  # accum 2 of 4 rows x 16 tokens
    device_batch_size: int = 4
    max_seq_len: int = 16
    eval_every: int = 2
    save_every: int = 3
    log_every: int = 2
    peak_flops: float = 1e12


class _Loss:
    """A step's loss on the device: records when the host reads it."""

    def __init__(self, step, value, events):
        self.step, self.value, self.events = step, value, events

    def __float__(self):
        self.events.append(("read", self.step))
        return self.value


class _Writer:
    def __init__(self):
        self.records = []

    def scalars(self, step, values):
        self.records.append((step, dict(values)))

    def text(self, step, tag, text):
        raise AssertionError("the loop writes no text itself")


def _loop(monkeypatch, events, *, losses=None, flags=None, **kwargs):
    """A TrainLoop whose compiled step is a fake that checks its batch and records each dispatch;
    each micro-batch's tokens are 100 * step + m."""
    flags = flags or _LoopFlags()
    compiled = []

    def fake_make_train_step(state, optimizer, *, accum_steps, micro_batch_size, sequence_len):
        compiled.append((accum_steps, micro_batch_size, sequence_len))
        dispatched = []

        def step_fn(params, opt_state, rest, inputs_ABT, targets_ABT):
            s = len(dispatched) + kwargs.get("start_step", 0)
            dispatched.append(s)
            events.append(("step", s))
            assert inputs_ABT.shape == targets_ABT.shape == (accum_steps, micro_batch_size, 16)
            np.testing.assert_array_equal(np.asarray(inputs_ABT)[:, 0, 0], [100 * s, 100 * s + 1])
            np.testing.assert_array_equal(np.asarray(targets_ABT), np.asarray(inputs_ABT) + 1)
            loss = 5.0 - 0.1 * s if losses is None else losses[s]
            return params, opt_state, {"loss": _Loss(s, loss, events), "grad_norm": 0.5}

        return step_fn

    monkeypatch.setattr(train, "make_train_step", fake_make_train_step)
    mesh = sharding.make_mesh("1")
    state = train.TrainState(None, {}, {}, {}, mesh, None, None, CONFIG)
    world = kwargs.pop("world_size", 1)

    def micro_batch(step, m):
        rows = np.full((flags.device_batch_size * world, 16), 100 * step + m, np.int32)
        return rows, rows + 1

    loop = train.TrainLoop(
        state,
        None,
        flags,
        _Writer(),
        micro_batch=micro_batch,
        world_size=world,
        steps_total=kwargs.pop("steps_total", 5),
        lrm_by_step=np.linspace(1.0, 0.5, 6),
        **kwargs,
    )
    assert compiled == [(2, 4 * world, 16)]  # compiled once, when made
    assert loop.accum_steps == 2
    return loop


def test_loop_reads_metrics_one_step_late_and_evaluates_saves_on_cadence(monkeypatch, capsys):
    events, vals = [], iter([3.0, 2.0, 2.5, 2.7])

    def val_bpb():
        events.append(("eval",))
        return next(vals)

    def save(step, val):
        events.append(("save", step, val))

    task = train.Periodic(4, lambda step: events.append(("task", step)))
    loop = _loop(monkeypatch, events, val_bpb=val_bpb, periodic=[task], save=save)
    result = loop.run()
    # step s's loss is read after step s + 1 is dispatched, or first thing where the host stops
    # for an eval or a save; evals/tasks/saves before step s see the model after s steps
    assert events == [
        ("eval",),  # step 0: val bpb, no task at step 0, no save at the start step
        ("step", 0),
        ("step", 1),
        ("read", 0),
        ("read", 1),  # step 2: eval
        ("eval",),
        ("step", 2),
        ("read", 2),  # step 3: save (with the val bpb of step 2)
        ("save", 3, 2.0),
        ("step", 3),
        ("read", 3),  # step 4: eval, then the task
        ("eval",),
        ("task", 4),
        ("step", 4),
        ("read", 4),  # the end (step 5): eval, task, save
        ("eval",),
        ("task", 5),
        ("save", 5, 2.7),
    ]
    assert (result.val_bpb, result.min_val_bpb) == (2.7, 2.0)
    records = loop.writer.records
    train_steps = [step for step, r in records if "train/loss" in r]
    assert train_steps == [0, 1, 2, 3, 4]
    assert [(step, r["val/bpb"]) for step, r in records if "val/bpb" in r] == [
        (0, 3.0),
        (2, 2.0),
        (4, 2.5),
        (5, 2.7),
    ]
    step4 = next(r for step, r in records if step == 4 and "train/loss" in r)
    assert list(step4) == [
        "train/loss",
        "train/loss_smooth",
        "train/dt",
        "train/tok_per_sec",
        "train/mfu",
        "train/lrm",
        "train/grad_norm",
    ]
    assert step4["train/loss"] == pytest.approx(4.6) and step4["train/lrm"] == 0.6
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if "/00005" in line]  # log_every=2, and the last step
    assert [line[:27] for line in steps] == [
        "step 00000/00005 (20.00%) |",
        "step 00002/00005 (60.00%) |",
        "step 00004/00005 (100.00%) ",
    ]
    assert all(" | eta: " in line for line in steps)
    assert "step 00002 | validation bpb: 2.0000" in lines
    assert result.final_line().startswith("Total training time: ")
    assert result.final_line().endswith("m; minimum validation bpb: 2.0000")


def test_resumed_loop_starts_at_its_step_and_does_not_resave_it(monkeypatch):
    events = []
    loop = _loop(
        monkeypatch,
        events,
        start_step=3,
        save=lambda step, val: events.append(("save", step, val)),
        flags=_LoopFlags(eval_every=-1),
    )
    result = loop.run()
    assert events == [
        ("step", 3),
        ("step", 4),
        ("read", 3),
        ("read", 4),
        ("save", 5, None),
    ]
    assert (result.val_bpb, result.min_val_bpb) == (None, float("inf"))


def test_mid_style_loop_evaluates_at_the_end_and_logs_data_progress(monkeypatch, capsys):
    """always_eval_last: the val bpb at the end even with eval_every <= 0; progress: the line
    shows the data's progress and no eta; save=None (--dry_run): nothing is saved."""
    events = []
    progress = np.array([0.1, 0.3, 0.55, 0.8, 1.0])
    loop = _loop(
        monkeypatch,
        events,
        flags=_LoopFlags(total_batch_size=2 * 4 * 16 * 2, eval_every=0, log_every=1),
        val_bpb=lambda: 1.5,
        always_eval_last=True,
        progress=progress,
        world_size=2,
    )
    result = loop.run()
    assert result.val_bpb == result.min_val_bpb == 1.5
    steps = [line for line in capsys.readouterr().out.splitlines() if "/00005" in line]
    assert [line.split(" | ")[0] for line in steps] == [
        f"step {s:05d}/00005 ({100 * p:.2f}%)" for s, p in enumerate(progress)
    ]
    assert not any("eta" in line for line in steps)
    records = [r for _, r in loop.writer.records]
    assert [r["train/progress"] for r in records if "train/loss" in r] == list(progress)
    assert records[-1] == {"val/bpb": 1.5}


def test_nan_loss_ends_the_run_with_one_error_line(monkeypatch):
    events = []
    loop = _loop(monkeypatch, events, losses=[4.0, 3.0, float("nan"), 2.0, 1.0])
    with pytest.raises(SystemExit, match="error: loss is nan at step 2"):
        loop.run()
    assert ("step", 3) in events  # found one step late, without waiting on the device


def test_late_metrics_logs_each_step_once_one_push_late_on_the_host():
    logged = []
    late = train.LateMetrics(lambda step, metrics, *extra: logged.append((step, metrics, extra)))
    late.flush()  # nothing held yet
    late.push(0, {"loss": jax.numpy.float32(4.0)}, 256)
    assert logged == []  # held while step 1 has not been dispatched
    late.push(1, {"loss": jax.numpy.float32(3.5)}, 128)
    assert [(s, float(m["loss"]), e) for s, m, e in logged] == [(0, 4.0, (256,))]
    assert isinstance(logged[0][1]["loss"], np.ndarray)  # fetched to the host for the log
    late.flush()
    late.flush()  # logged once only
    assert [(s, float(m["loss"]), e) for s, m, e in logged[1:]] == [(1, 3.5, (128,))]


def test_loop_derived_fields_are_not_arguments():
    derived = {f.name for f in dataclasses.fields(train.TrainLoop) if not f.init}
    assert derived == {"accum_steps", "_step_fn"}


def test_check_step():
    train.check_step({"loss": 2.5, "grad_norm": np.float32(0.3)}, 3)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(SystemExit, match=r"^error: loss is (nan|inf) at step 7; stopping"):
            train.check_step({"loss": bad, "grad_norm": 1.0}, 7)
        # a finite loss (weights before the update) but a bad update: caught before a save
        with pytest.raises(SystemExit, match=r"^error: gradient norm is (nan|inf) at step 7"):
            train.check_step({"loss": 2.5, "grad_norm": bad}, 7)
