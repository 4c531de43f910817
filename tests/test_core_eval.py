"""core_eval against nanochat's own CORE scoring (tests/golden/core_eval_tiny.json, made by
tests/golden/make_core_golden.py) and core_render.json; bucketing, compile counts, sharding.

Measured on CPU (jax 0.10.2, fp32) against core_eval_tiny.json: every verdict identical (5 tasks,
40 examples, both variants); per-row mean span losses max abs error 1.9e-6 (no crop) and 1.9e-6
(rows left-cropped to 48 tokens), for losses of about 8-13 nats; lm_head on every position
instead of the span windows: 1.9e-6 and 2.9e-6 (the two paths differ by at most 1.9e-6, same
verdicts, exact matches and NaNs). Compilations: the whole demo bundle (6 tasks, 600 examples)
compiles 19 forwards (half-octave length buckets 16-128, each with a full and a quarter row
count, and a few span windows each; 13 with lm_head on every position; powers of two and full
batches only compiled 4, with 1.95x the real token positions forwarded instead of ~1.3x); a
second evaluation compiles nothing. Those are fine shapes (a CPU's default); coarse shapes (an
accelerator's) compile 4 there, with the same results and the same golden verdicts.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import core_eval, eval_bundle, sharding
from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import from_nanochat_state_dict
from nanochat_jax.engine import eval_length_bucket, fine_eval_shapes, half_octave_bucket
from nanochat_jax.eval_bundle import read_tasks, write_demo_bundle
from nanochat_jax.model import GPT
from nanochat_jax.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "golden"
LOSS_ATOL = 1e-5


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN / "core_eval_tiny.json").read_text())


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    state = json.loads((GOLDEN / "tokenizer.json").read_text())
    ranks = {base64.b64decode(k): v for k, v in state["mergeable_ranks_b64"].items()}
    return Tokenizer.from_ranks(ranks, state["pattern"])


@pytest.fixture(scope="module")
def model(golden) -> GPT:
    npz = np.load(GOLDEN / "bpb.npz")
    params = {k.removeprefix("param/"): npz[k] for k in npz if k.startswith("param/")}
    return from_nanochat_state_dict(params, GPTConfig(**golden["model"]["config"]))


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    return write_demo_bundle(tmp_path_factory.mktemp("bundle"))


def _compiles():
    """A listener counting XLA compilations, and a way to stop it."""
    events = []

    def listener(name: str, duration_s: float, **kwargs) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


# ---- prompts and spans ---------------------------------------------------------------------------


def test_core_render_golden(tok):
    core = json.loads((GOLDEN / "core_render.json").read_text())
    delimiter = core["continuation_delimiter"]
    for task_type, case in core["tasks"].items():
        prompts = core_eval.render_prompts(
            case["item"], task_type, delimiter, case["fewshot_examples"]
        )
        assert prompts == case["prompts"], task_type
        rows = tok.encode(prompts, prepend=tok.get_bos_token_id())
        rows, starts, ends = core_eval.continuation_spans(rows, task_type)
        assert rows == case["tokens"], task_type
        assert (starts, ends) == (case["start_indices"], case["end_indices"]), task_type


def test_fewshot_draw_and_prompts_match_nanochat(golden):
    for label, task in golden["tasks"].items():
        meta, data = task["task_meta"], task["data"]
        for idx, expected in enumerate(golden["prompts"][label]):
            fewshot = core_eval.fewshot_indices(idx, len(data), meta["num_fewshot"])
            assert fewshot == expected["fewshot"], (label, idx)
            prompts = core_eval.render_prompts(
                data[idx],
                meta["task_type"],
                meta["continuation_delimiter"],
                [data[i] for i in fewshot],
            )
            assert prompts == expected["prompts"], (label, idx)


def test_spans_match_nanochat(golden, tok):
    bos = tok.get_bos_token_id()
    for label, task in golden["tasks"].items():
        meta = task["task_meta"]
        for expected, rendered in zip(
            golden["variants"]["full"]["tasks"][label]["examples"],
            golden["prompts"][label],
            strict=True,
        ):
            rows = tok.encode(rendered["prompts"], prepend=bos)
            rows, starts, ends = core_eval.continuation_spans(rows, meta["task_type"])
            assert [len(r) for r in rows] == expected["row_lengths"]
            assert (starts, ends) == (expected["starts"], expected["ends"]), label


def test_crop_left_shifts_spans_and_clamps_to_one():
    rows, starts, ends = core_eval.crop_left([[1, 2, 3, 4, 5, 6], [7, 8, 9]], [4, 1], [6, 3], 4)
    assert rows == [[3, 4, 5, 6], [7, 8, 9]]
    assert (starts, ends) == ([2, 1], [4, 3])
    _, starts, _ = core_eval.crop_left([[1, 2, 3, 4, 5, 6]], [2], [6], 3)
    assert starts == [1]  # the span was cut into: position 0 has no prediction


# ---- scores against nanochat ---------------------------------------------------------------------


@pytest.mark.parametrize("fine_shapes", [True, False], ids=["fine", "coarse"])
@pytest.mark.parametrize("variant", ["full", "crop48"])
def test_scores_match_nanochat(golden, tok, model, variant, fine_shapes):
    spec = golden["variants"][variant]
    max_seq_len = spec["max_seq_len"] or model.config.rotary_seq_len
    worst = 0.0
    for label, expected in spec["tasks"].items():
        task = golden["tasks"][label]
        results = core_eval.evaluate_examples(
            model,
            tok,
            task["data"],
            task["task_meta"],
            max_seq_len=max_seq_len,
            batch_rows=8,
            fine_shapes=fine_shapes,
        )
        assert [r.correct for r in results] == [e["correct"] for e in expected["examples"]], label
        for result, example in zip(results, expected["examples"], strict=True):
            assert len(result.losses) == len(example["losses"])
            for ours, theirs in zip(result.losses, example["losses"], strict=True):
                if theirs is None:  # an empty span: NaN in both
                    assert math.isnan(ours), (label, example)
                else:
                    worst = max(worst, abs(ours - theirs))
        accuracy = sum(r.correct for r in results) / len(results)
        assert accuracy == pytest.approx(expected["accuracy"], rel=1e-6), label  # torch: fp32 mean
    assert worst < LOSS_ATOL, worst


def test_golden_covers_each_outcome(golden):
    """The fixture exercises what it should: right and wrong answers of every type, NaN spans,
    and an LM exact match."""
    full = golden["variants"]["full"]["tasks"]
    verdicts = {label: {e["correct"] for e in t["examples"]} for label, t in full.items()}
    assert all(v == {True, False} for k, v in verdicts.items() if k != "lm_2shot"), verdicts
    assert any(None in e["losses"] for e in full["mc_2shot"]["examples"])
    crop = golden["variants"]["crop48"]["tasks"]
    assert any(max(e["row_lengths"]) > 48 for t in crop.values() for e in t["examples"])


def test_batching_does_not_change_results(golden, tok, model):
    task = golden["tasks"]["mc_2shot"]
    one = core_eval.evaluate_examples(model, tok, task["data"], task["task_meta"], batch_rows=1)
    many = core_eval.evaluate_examples(
        model, tok, task["data"], task["task_meta"], batch_rows=64, batch_tokens=1 << 16
    )
    assert [r.correct for r in one] == [r.correct for r in many]
    np.testing.assert_allclose(
        [x for r in one for x in r.losses], [x for r in many for x in r.losses], atol=1e-5
    )


def test_sharded_model_gives_the_same_scores(golden, tok, model):
    """Parameters on a data=4,fsdp=2 mesh (as stage.load_model(mesh=) leaves them): batches are
    split over the mesh and the scores stay the same."""
    mesh = sharding.make_mesh("data=4,fsdp=2")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    nnx.replace_by_pure_dict(params, jax.device_put(pure, sharding.tree_shardings(pure, mesh)))
    sharded = nnx.merge(graphdef, params, rest)
    assert core_eval._model_mesh(sharded) is mesh
    task = golden["tasks"]["schema_1shot"]
    ref = core_eval.evaluate_examples(model, tok, task["data"], task["task_meta"], batch_rows=2)
    got = core_eval.evaluate_examples(sharded, tok, task["data"], task["task_meta"], batch_rows=2)
    assert [r.correct for r in got] == [r.correct for r in ref]
    np.testing.assert_allclose(
        [x for r in got for x in r.losses], [x for r in ref for x in r.losses], atol=1e-5
    )


# ---- the whole bundle ----------------------------------------------------------------------------


def test_evaluate_core_on_demo_bundle_compiles_a_few_shapes(tok, demo_bundle):
    # a model structure no other test uses, so the count is of this evaluation alone
    config = GPTConfig(
        sequence_len=64, vocab_size=1024, n_layer=1, n_head=2, n_kv_head=1, n_embd=64
    )
    fresh = GPT(config, rngs=nnx.Rngs(3))
    tasks = read_tasks(demo_bundle)
    events, stop = _compiles()
    try:
        out = core_eval.evaluate_core(fresh, tok, demo_bundle, verbose=False)
        first = len(events)
        again = core_eval.evaluate_core(fresh, tok, demo_bundle, verbose=False)
        second = len(events) - first
        core_eval.evaluate_core(fresh, tok, demo_bundle, max_per_task=10, verbose=False)
    finally:
        stop()
    # at most two row counts (full, quarter) for each length bucket used: 16, 24, 32, 48, 64,
    # 96, 128 (rows are not cropped to sequence_len 64: like nanochat, prompts may use the whole
    # rotary table), each with a few span windows (half-octave buckets of a batch's longest
    # span). Measured: 19 (13 when lm_head ran on every position).
    assert 1 <= first <= 20, first
    assert second == 0, "a second evaluation must reuse the compiled forwards"
    assert len(events) <= 20, "fewer examples per task need no other shapes"
    assert again == out
    assert list(out["results"]) == [t.label for t in tasks]
    for task in tasks:
        expected = core_eval.centered_accuracy(out["results"][task.label], task.random_baseline)
        assert out["centered_results"][task.label] == pytest.approx(expected)
    assert out["core_metric"] == pytest.approx(np.mean(list(out["centered_results"].values())))


def test_shape_policies_give_the_same_core_with_their_compile_counts(tok, demo_bundle):
    """Coarse shapes (an accelerator's default: power-of-two buckets, full batches, windows
    min(L, 128) or L) and fine shapes (a CPU's) score the demo bundle identically."""
    config = GPTConfig(  # a model structure no other test uses: the counts are of these evals
        sequence_len=64, vocab_size=1024, n_layer=1, n_head=2, n_kv_head=1, n_embd=32
    )
    fresh = GPT(config, rngs=nnx.Rngs(4))
    # N(0, 0.3) weights: a fresh GPT's zero lm_head makes every option's loss tie, and ties
    # break on summation order, which differs between padded shapes
    params = nnx.state(fresh, nnx.Param)
    rng = np.random.default_rng(4)
    nnx.replace_by_pure_dict(
        params,
        jax.tree.map(
            lambda x: rng.normal(0.0, 0.3, x.shape).astype(np.float32), nnx.to_pure_dict(params)
        ),
    )
    nnx.update(fresh, params)
    events, stop = _compiles()
    try:
        coarse = core_eval.evaluate_core(fresh, tok, demo_bundle, verbose=False, fine_shapes=False)
        coarse_compiles = len(events)
        fine = core_eval.evaluate_core(fresh, tok, demo_bundle, verbose=False, fine_shapes=True)
        fine_compiles = len(events) - coarse_compiles
    finally:
        stop()
    assert coarse == fine
    # coarse: (64, L) for L in 16, 32, 64, 128, window L (<= 128); fine: the 19 of
    # test_evaluate_core_on_demo_bundle_compiles_a_few_shapes less those coarse compiled
    assert coarse_compiles == 4, coarse_compiles
    assert fine_compiles <= 20, fine_compiles


def test_coarse_shapes_full_batches_and_two_windows(tok, model, monkeypatch):
    """Coarse shapes, batch_rows 4: full batches only (the leftovers of bucket 256 take a row
    of bucket 16, then a dummy row), window 128 for short spans in a 256 row, else 256."""
    shapes = []
    score_rows = core_eval._score_rows

    def recording(graphdef, mesh, state, tokens_RL, *rest, window):
        shapes.append((*tokens_RL.shape, window))
        return score_rows(graphdef, mesh, state, tokens_RL, *rest, window=window)

    rng = np.random.default_rng(2)
    rows = [list(rng.integers(1, 200, n)) for n in [10] * 4 + [200] * 6 + [10]]
    spans = [(1, 10)] * 4 + [(195, 200)] * 5 + [(50, 200), (3, 10)]
    monkeypatch.setattr(core_eval, "_score_rows", recording)
    bos = tok.get_bos_token_id()
    scorer = core_eval._RowScorer(model, bos, 4, 8192, 640, None, fine_shapes=False)
    for row, (start, end) in zip(rows, spans, strict=True):
        scorer.add(row, start, end)
    losses, exact = scorer.finish()
    assert shapes == [(4, 16, 16), (4, 256, 128), (4, 256, 256)]
    assert scorer.partial_rows(16, 1) == 4
    alone = core_eval._RowScorer(model, bos, 1, 8192, 640, None, fine_shapes=True)
    for row, (start, end) in zip(rows, spans, strict=True):
        alone.add(row, start, end)
    alone_losses, alone_exact = alone.finish()
    np.testing.assert_allclose(losses, alone_losses, atol=1e-5)
    np.testing.assert_array_equal(exact, alone_exact)


def test_span_windows_score_as_the_full_forward(model):
    """lm_head on each row's span window only: the full (R, L, V) logits' mean span losses (up
    to fp32 summation order) and exact matches, for spans from a row's first prediction, to its
    end, empty, greedy, in a window wider than the spans and as wide as the row."""
    R, L = 6, 24
    rng = np.random.default_rng(1)
    tokens_RL = rng.integers(1, model.config.vocab_size, (R, L)).astype(np.int32)
    forward = nnx.jit(lambda model, tokens_RL: model(tokens_RL))
    for p in range(9, 13):  # row 5's tokens 10..13: what argmax predicts from the tokens before
        tokens_RL[5, p + 1] = np.argmax(forward(model, tokens_RL)[5, p])
    start_R = np.asarray([1, 9, 20, 7, 12, 10], np.int32)
    end_R = np.asarray([5, 24, 24, 7, 20, 14], np.int32)  # row 3: an empty span
    logits_RLV = np.asarray(forward(model, tokens_RL), np.float64)
    logp_RLV = logits_RLV - np.log(np.exp(logits_RLV).sum(-1, keepdims=True))
    want_loss, want_exact = [], []
    for r in range(R):
        span = np.arange(start_R[r] - 1, end_R[r] - 1)
        targets = tokens_RL[r, span + 1]
        want_loss.append(-logp_RLV[r, span, targets].mean() if len(span) else np.nan)
        want_exact.append(bool(np.all(logits_RLV[r, span].argmax(-1) == targets)))
    assert want_exact == [False, False, False, True, False, True]
    graphdef, state = nnx.split(model)
    for window in (16, L):
        loss_R, exact_R = core_eval._score_rows(
            graphdef, None, state, tokens_RL, start_R, end_R, window=window
        )
        np.testing.assert_allclose(loss_R, want_loss, rtol=0, atol=1e-5)  # NaN where NaN
        assert np.asarray(exact_R).tolist() == want_exact


def test_bucket_lengths_take_half_octave_steps():
    lengths = [1, 16, 17, 24, 25, 33, 49, 65, 97, 129, 193]
    assert [half_octave_bucket(n, 4096) for n in lengths] == [
        16,
        16,
        24,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
        256,
    ]
    assert half_octave_bucket(600, 640) == 640  # the cap is the last bucket
    assert half_octave_bucket(500, 640) == 512
    assert half_octave_bucket(5, 8) == 8
    # the shape policies: fine (half-octave) by default on a CPU, coarse = powers of two
    assert fine_eval_shapes() is True and fine_eval_shapes(False) is False
    assert [eval_length_bucket(n, 640, False) for n in (1, 17, 33, 97, 600)] == [
        16,
        32,
        64,
        128,
        640,
    ]
    assert [eval_length_bucket(n, 640, True) for n in (17, 97)] == [24, 128]


def test_leftover_rows_go_in_quarter_batches_with_shorter_rows(tok, model, monkeypatch):
    """batch_rows 8: 20 rows of bucket 16 run as 2 full batches, the 3 rows of bucket 48 as
    quarter batches of 2 (whose spare row takes a row of bucket 16), the last 3 rows of bucket
    16 as quarter batches; every row scores as it does alone."""
    shapes = []
    score_rows = core_eval._score_rows

    def recording(graphdef, mesh, state, tokens_RL, *rest, window):
        shapes.append(tokens_RL.shape)
        return score_rows(graphdef, mesh, state, tokens_RL, *rest, window=window)

    rng = np.random.default_rng(0)
    rows = [list(rng.integers(1, 200, n)) for n in [10] * 20 + [40] * 3]
    spans = [(1, len(row)) for row in rows]
    monkeypatch.setattr(core_eval, "_score_rows", recording)
    scorer = core_eval._RowScorer(model, tok.get_bos_token_id(), 8, 8192, 640, None)
    for row, (start, end) in zip(rows, spans, strict=True):
        scorer.add(row, start, end)
    losses, exact = scorer.finish()
    assert shapes == [(8, 16), (8, 16), (2, 48), (2, 48), (2, 16), (2, 16)]
    alone = core_eval._RowScorer(model, tok.get_bos_token_id(), 1, 8192, 640, None)
    for row, (start, end) in zip(rows, spans, strict=True):
        alone.add(row, start, end)
    alone_losses, alone_exact = alone.finish()
    np.testing.assert_allclose(losses, alone_losses, atol=1e-5)
    np.testing.assert_array_equal(exact, alone_exact)
    assert scorer.partial_rows(16, 7) == 8  # a quarter batch would leave 5 rows: a full one


def test_centered_accuracy():
    assert core_eval.centered_accuracy(0.25, 25.0) == 0.0
    assert core_eval.centered_accuracy(1.0, 25.0) == 1.0
    assert core_eval.centered_accuracy(0.625, 25.0) == pytest.approx(0.5)
    assert core_eval.centered_accuracy(0.3, 0.0) == pytest.approx(0.3)


# ---- errors --------------------------------------------------------------------------------------


def test_bad_input_is_refused(tok, model):
    data = [{"context": "a b", "continuation": "c"}, {"context": "d e", "continuation": "f"}]
    with pytest.raises(ValueError, match="task_type must be one of"):
        core_eval.evaluate_task(model, tok, data, {"task_type": "essay", "num_fewshot": 0})
    with pytest.raises(ValueError, match="needs at least 3 examples"):
        core_eval.evaluate_task(
            model, tok, data, {"task_type": "language_modeling", "num_fewshot": 2}
        )
    with pytest.raises(ValueError, match="at least one example"):
        core_eval.evaluate_task(model, tok, [], {"task_type": "schema", "num_fewshot": 0})
    with pytest.raises(ValueError, match="max_seq_len must be in"):
        core_eval.evaluate_task(
            model, tok, data, {"task_type": "language_modeling"}, max_seq_len=10**6
        )
    bos = tok.get_bos_token_id()
    with pytest.raises(ValueError, match="strict prefix"):
        core_eval.continuation_spans([[bos, 5, 6], [bos, 5, 7]], "language_modeling")


def test_padding_rows_are_ignored(tok, model):
    """A single example in a bucket of many rows: the dummy rows do not leak into its score."""
    data = [{"query": "Is fire hot?", "choices": ["yes", "no"], "gold": 0}]
    meta = {"task_type": "multiple_choice", "num_fewshot": 0}
    small = core_eval.evaluate_examples(model, tok, data, meta, batch_rows=2)[0]
    padded = core_eval.evaluate_examples(model, tok, data, meta, batch_rows=32)[0]
    np.testing.assert_allclose(small.losses, padded.losses, atol=1e-5)


def test_a_broken_task_file_names_file_and_line(tok, model, tmp_path):
    directory = write_demo_bundle(tmp_path)
    first = read_tasks(directory)[0]
    path = directory / "eval_data" / first.dataset_uri
    lines = path.read_text().splitlines(keepends=True)
    lines[4] = lines[4][:-5] + "\n"  # a line cut short
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"{first.dataset_uri}:5: not valid JSON"):
        core_eval.evaluate_core(model, tok, directory, verbose=False)
    path.unlink()
    with pytest.raises(ValueError, match=rf"{first.label!r}: .* is missing; delete {directory}"):
        core_eval.evaluate_core(model, tok, directory, verbose=False)


def test_one_tuple_of_task_types():
    assert core_eval.TASK_TYPES is eval_bundle.TASK_TYPES
    assert not hasattr(eval_bundle, "_TASK_TYPES")
