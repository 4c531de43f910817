"""chat_eval: categorical accuracy equals a hand computation from unpadded full forwards, the
batches length buckets make and their compilations, pass@k, grading in parallel, ChatCORE, and the
chat_eval script (errors, report).

Tiny random GPTs (weights at a useful scale, as in test_chat_cli) and a real ~320-token BPE
tokenizer; tasks are small in-memory stand-ins with the Task API.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import chat_eval, sharding
from nanochat_jax.chat_eval import chatcore_metric, run_categorical_eval, run_chat_eval
from nanochat_jax.config import GPTConfig
from nanochat_jax.engine import Engine, EnginePool, half_octave_bucket
from nanochat_jax.execution import execute_code
from nanochat_jax.model import GPT
from nanochat_jax.tasks import TASK_NAMES
from nanochat_jax.tokenizer import Tokenizer
from scripts import chat_eval as chat_eval_script

_TEXT = (
    "The quick brown fox jumps over the lazy dog. Which planet is red? Mars is red. "
    "Water boils at 100 degrees. Respond only with the letter of the correct answer. "
)
_QUESTIONS = [
    "Which planet is red?",
    "What is the boiling point of water at sea level, in degrees Celsius?",
    "Pick one.",
    "The quick brown fox jumps over which animal, according to the famous pangram sentence?",
    "Is Mars red?",
    "Which of these is a color?",
    "Water boils at what temperature?",
    "Name a fruit.",
    "Which animal is lazy in the sentence about the quick brown fox and the lazy dog, really?",
    "Two plus two?",
    "Red or blue?",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(iter([_TEXT * 20]), 320)


def tiny_gpt(tokenizer: Tokenizer, *, n_embd: int = 32, seed: int = 0) -> GPT:
    """A random 1-layer GPT with N(0, 0.5) weights (nanochat zero-inits lm_head, which would
    make every letter tie)."""
    config = GPTConfig(
        sequence_len=64,
        vocab_size=tokenizer.get_vocab_size(),
        n_layer=1,
        n_head=2,
        n_kv_head=2,
        n_embd=n_embd,
    )
    model = GPT(config, rngs=nnx.Rngs(seed))
    randomize(model, seed)
    return model


def randomize(model: GPT, seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    params = jax.tree.map(
        lambda x: np.asarray(rng.normal(0.0, 0.5, x.shape), np.float32), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


class ToyTask:
    """A Task stand-in over given conversations; records every graded response, in grading
    order (`responses`, of problems `graded`) and by problem (`answers`: problem index ->
    responses)."""

    def __init__(self, eval_type: str, conversations: list[dict], grade=None):
        self.eval_type, self.conversations = eval_type, conversations
        self.grade = grade or (lambda c, r: r == c["messages"][-1]["content"])
        self.responses: list[str] = []
        self.graded: list[int] = []
        self.answers: dict[int, list[str]] = {}

    def in_problem_order(self) -> list[str]:
        """The single response of each graded problem, by problem index."""
        assert all(len(r) == 1 for r in self.answers.values())
        return [self.answers[i][0] for i in sorted(self.answers)]

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> dict:
        return self.conversations[i]

    def evaluate(self, conversation: dict, response: str) -> bool:
        if self.eval_type == "categorical" and response not in conversation["letters"]:
            raise ValueError(f"{response!r} is not a letter")
        self.responses.append(response)
        index = next(i for i, c in enumerate(self.conversations) if c is conversation)
        self.graded.append(index)
        self.answers.setdefault(index, []).append(response)
        return self.grade(conversation, response)


def mc_conversation(question: str, letters: list[str], answer: str) -> dict:
    choices = "".join(f"- choice {i}={x}\n" for i, x in enumerate(letters))
    prompt = f"Multiple Choice question: {question}\n{choices}\nRespond only with the letter."
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        "letters": letters,
    }


def letters_of(i: int) -> list[str]:
    return [["A", "B", "C", "D"], ["A", "B", "C"], ["1", "2", "3", "4", "5"]][i % 3]


def hand_predictions(model: GPT, tokenizer: Tokenizer, conversations: list[dict]) -> list[str]:
    """nanochat's rule on one unpadded prompt at a time: the letter with the largest logit at
    the last prompt position."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids_1T: nnx.merge(graphdef, state)(ids_1T)[0, -1])
    predictions = []
    for conversation in conversations:
        ids = tokenizer.render_for_completion(conversation)
        logits_V = np.asarray(forward(state, jnp.asarray([ids], jnp.int32)))
        letters = conversation["letters"]
        letter_ids = [tokenizer.encode(x)[0] for x in letters]
        predictions.append(letters[int(np.argmax(logits_V[letter_ids]))])
    return predictions


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return tiny_gpt(tokenizer)


@pytest.fixture(scope="module")
def mc(model, tokenizer) -> tuple[list[dict], list[str], float]:
    """(conversations, the model's hand-computed answers, expected accuracy): gold = the hand
    prediction for even problems, another letter for odd ones."""
    drafts = [mc_conversation(q, letters_of(i), "A") for i, q in enumerate(_QUESTIONS)]
    predicted = hand_predictions(model, tokenizer, drafts)
    conversations = []
    for i, (q, guess) in enumerate(zip(_QUESTIONS, predicted, strict=True)):
        letters = letters_of(i)
        wrong = letters[(letters.index(guess) + 1) % len(letters)]
        conversations.append(mc_conversation(q, letters, guess if i % 2 == 0 else wrong))
    expected = sum(i % 2 == 0 for i in range(len(_QUESTIONS))) / len(_QUESTIONS)
    return conversations, predicted, expected


def count_compiles(caplog, fn) -> int:
    caplog.clear()
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        fn()
    return sum(
        "Compiling" in r.getMessage() and "_answer_logits" in r.getMessage() for r in caplog.records
    )


# ---- categorical ---------------------------------------------------------------------------


def prompt_lengths(tokenizer, task: ToyTask) -> list[int]:
    return [len(tokenizer.render_for_completion(c)) for c in task.conversations]


def test_categorical_matches_unpadded_hand_computation(tokenizer, model, mc):
    conversations, predicted, expected = mc
    task = ToyTask("categorical", conversations)
    buckets = [half_octave_bucket(n, 640) for n in prompt_lengths(tokenizer, task)]
    assert buckets == [96, 128, 128, 192, 96, 128, 128, 96, 192, 128, 96]  # three buckets
    assert len(set(predicted)) >= 3  # the random model really chooses, it is not always "A"
    accuracy = run_categorical_eval(task, model, tokenizer, batch_size=4, progress=False)
    # padding, bucketing, shorter rows in a longer bucket, dummy rows change nothing
    assert task.in_problem_order() == predicted
    assert task.responses != predicted  # graded as batches are read, not in problem order
    assert accuracy == expected == 6 / 11
    # max_problems: the first problems only
    task = ToyTask("categorical", conversations)
    assert run_categorical_eval(task, model, tokenizer, batch_size=4, max_problems=3) == 2 / 3
    assert task.in_problem_order() == predicted[:3]


def record_batches(monkeypatch) -> list[tuple[tuple[int, int], list[int]]]:
    """Every forward chat_eval dispatches: (ids shape, each row's prompt length; 1 for a
    dummy row)."""
    batches = []
    forward = chat_eval._answer_logits

    def recording(graphdef, state, ids_BT, pos_B, vocab_C):
        batches.append((tuple(ids_BT.shape), [int(p) + 1 for p in np.asarray(pos_B)]))
        return forward(graphdef, state, ids_BT, pos_B, vocab_C)

    monkeypatch.setattr(chat_eval, "_answer_logits", recording)
    return batches


def test_categorical_batches_by_length_bucket(tokenizer, model, mc, monkeypatch):
    task = ToyTask("categorical", mc[0])
    lengths = prompt_lengths(tokenizer, task)  # buckets 96, 128, 128, 192, 96, 128, 128, ...
    batches = record_batches(monkeypatch)
    run_categorical_eval(task, model, tokenizer, batch_size=4)
    n = lengths
    assert batches == [
        ((4, 128), [n[1], n[2], n[5], n[6]]),  # the first bucket to fill (at problem 6)
        ((4, 96), [n[0], n[4], n[7], n[10]]),
        # leftovers, longest first: both of bucket 192, problem 9 (128) padded to 192, a dummy
        ((4, 192), [n[3], n[8], n[9], 1]),
    ]
    # a bucket never fills: its rows join the longer leftovers, the last batch gets the dummies
    batches.clear()
    run_categorical_eval(task, model, tokenizer, batch_size=8)
    assert batches == [
        ((8, 192), [n[3], n[8], n[1], n[2], n[5], n[6], n[9], n[0]]),
        ((8, 96), [n[4], n[7], n[10], 1, 1, 1, 1, 1]),
    ]


def test_categorical_compiles_once_per_length_bucket(tokenizer, mc, caplog):
    model = tiny_gpt(tokenizer, n_embd=48)  # a shape no other test compiles
    task = ToyTask("categorical", mc[0])
    # batches of 4 at lengths 128, 96, 192 (test_categorical_batches_by_length_bucket)
    run = lambda: run_categorical_eval(task, model, tokenizer, batch_size=4)  # noqa: E731
    assert count_compiles(caplog, run) == 3
    # another task with prompts of those buckets reuses them: here the first 7 problems (a 128
    # batch, then problem 3 (192) with problems 0 and 4 (96) in a 192 batch)
    first_7 = ToyTask("categorical", mc[0][:7])
    run_7 = lambda: run_categorical_eval(first_7, model, tokenizer, batch_size=4)  # noqa: E731
    assert count_compiles(caplog, run_7) == 0
    # a task of fewer letters (A-D, MMLU's, after ARC's A-E and 1-5) reads as many columns
    abcd = [mc_conversation(q, ["A", "B", "C", "D"], "A") for q in _QUESTIONS[:8]]
    abcd_task = ToyTask("categorical", abcd)
    buckets = {half_octave_bucket(n, 640) for n in prompt_lengths(tokenizer, abcd_task)}
    assert buckets == {96, 128, 192}
    run_abcd = lambda: run_categorical_eval(abcd_task, model, tokenizer, batch_size=4)  # noqa: E731
    assert count_compiles(caplog, run_abcd) == 0
    # chat_sft's pattern: the same model, trained further, evaluated again -> no new compilation
    randomize(model, seed=7)
    assert count_compiles(caplog, run) == 0
    # and a new model object of the same architecture reuses the compiled code too
    other = tiny_gpt(tokenizer, n_embd=48, seed=3)
    run = lambda: run_categorical_eval(task, other, tokenizer, batch_size=4)  # noqa: E731
    assert count_compiles(caplog, run) == 0


def test_categorical_coarse_shapes_give_the_same_answers(tokenizer, mc, caplog, monkeypatch):
    """fine_shapes=False (an accelerator's default): power-of-two buckets, fewer compiled
    shapes, the same answer to every problem as fine shapes (half-octave buckets)."""
    model = tiny_gpt(tokenizer, n_embd=40)  # a shape no other test compiles
    task = ToyTask("categorical", mc[0])
    n = prompt_lengths(tokenizer, task)
    coarse = ToyTask("categorical", mc[0])
    run = lambda: run_categorical_eval(coarse, model, tokenizer, batch_size=4, fine_shapes=False)  # noqa: E731
    assert count_compiles(caplog, run) == 2  # lengths 128 and 256
    fine = ToyTask("categorical", mc[0])
    run = lambda: run_categorical_eval(fine, model, tokenizer, batch_size=4, fine_shapes=True)  # noqa: E731
    assert count_compiles(caplog, run) == 2  # lengths 96 and 192; 128 is compiled already
    assert coarse.in_problem_order() == fine.in_problem_order()
    assert sorted(coarse.graded) == sorted(fine.graded) == list(range(len(mc[0])))
    batches = record_batches(monkeypatch)
    run_categorical_eval(
        ToyTask("categorical", mc[0]), model, tokenizer, batch_size=4, fine_shapes=False
    )
    assert batches == [
        ((4, 128), [n[0], n[1], n[2], n[4]]),  # buckets 96 and 128 of fine shapes: one bucket
        ((4, 128), [n[5], n[6], n[7], n[9]]),
        ((4, 256), [n[3], n[8], n[10], 1]),  # leftovers, longest first; one dummy row
    ]


def on_devices(model: GPT, placement) -> GPT:
    """The model with its parameters device_put onto a device or a pytree of shardings."""
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    if not isinstance(placement, jax.Device):
        placement = placement(pure)
    nnx.replace_by_pure_dict(state, jax.device_put(pure, placement))
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def full_forward_answer_logits(graphdef, state, ids_BT, pos_B) -> jax.Array:
    """chat_eval's path before GPT.head: the whole (B, T, V) forward, then the (B, V) logits
    at each row's answer position."""
    logits_BTV = nnx.merge(graphdef, state)(ids_BT)
    return jnp.take_along_axis(logits_BTV, pos_B[:, None, None], axis=1)[:, 0]


@pytest.mark.parametrize(
    "case",
    ["random", "random wider", "random seed 2", "zero lm_head", "saturated", "equal columns"],
)
def test_categorical_equals_the_full_forward_path(tokenizer, mc, case, monkeypatch):
    """lm_head on the answer positions and letters only: the same logits as the full forward's
    (up to fp32 summation order) and the same answers, ties included (the first letter of
    equal logits, as nanochat's argmax): nanochat's zero-init lm_head, logits saturated by the
    softcap, letters whose lm_head columns are equal."""
    model = tiny_gpt(tokenizer, n_embd=64 if case == "random wider" else 32, seed=case.count("2"))
    kernel_DV = np.array(model.lm_head.kernel[...])
    letter_ids = {x: tokenizer.encode(x)[0] for x in "ABCD12345"}
    scale = 1000.0 if case == "saturated" else 1.0
    kernel_DV *= scale  # saturated: letters' logits far beyond the softcap, many exactly +-15
    if case == "zero lm_head":
        kernel_DV[:] = 0.0
    elif case == "equal columns":
        for x, y in (("B", "A"), ("D", "C"), ("2", "1"), ("5", "3")):
            kernel_DV[:, letter_ids[x]] = kernel_DV[:, letter_ids[y]]
    model.lm_head.kernel[...] = jnp.asarray(kernel_DV)
    conversations = mc[0]
    new = ToyTask("categorical", conversations)
    run_categorical_eval(new, model, tokenizer, batch_size=4)

    answer_logits, errors, rows_V = chat_eval._answer_logits, [], []

    def full_forward(graphdef, state, ids_BT, pos_B, vocab_C):
        logits_BV = full_forward_answer_logits(graphdef, state, ids_BT, pos_B)
        ours_BC = answer_logits(graphdef, state, ids_BT, pos_B, vocab_C)
        errors.append(float(jnp.max(jnp.abs(ours_BC - logits_BV[:, vocab_C]))))
        rows_V.extend(np.asarray(logits_BV)[np.asarray(pos_B) > 0])  # the real rows
        return logits_BV[:, vocab_C]

    monkeypatch.setattr(chat_eval, "_answer_logits", full_forward)
    old = ToyTask("categorical", conversations)
    run_categorical_eval(old, model, tokenizer, batch_size=4)
    assert new.in_problem_order() == old.in_problem_order()
    assert new.graded == old.graded
    # fp32 summation order of lm_head's dot products: an error in proportion to their terms
    assert max(errors) < 1e-5 * scale, errors
    ties = 0
    for index, logits_V in zip(old.graded, rows_V, strict=True):
        letters = conversations[index]["letters"]
        scores = logits_V[[letter_ids[x] for x in letters]]
        ties += int(np.sum(scores == scores.max()) > 1)
    if case in ("zero lm_head", "saturated", "equal columns"):
        assert ties >= 3, f"{case}: only {ties} answers decided by a tie"
    if case == "zero lm_head":
        assert new.in_problem_order() == [letters_of(i)[0] for i in range(len(conversations))]


def test_categorical_on_a_mesh_agrees(tokenizer, model, mc):
    conversations, predicted, expected = mc
    mesh = sharding.make_mesh("4")
    fsdp = sharding.make_mesh("data=2,fsdp=2")
    # the model as chat_eval loads it (one device), on another device, sharded like chat_sft's;
    # on 8 devices (one row each, a dummy on 5 of them in the last batch)
    for placed, on in (
        (model, mesh),
        (model, sharding.make_mesh("8")),
        (on_devices(model, jax.devices()[5]), mesh),
        (on_devices(model, lambda tree: sharding.tree_shardings(tree, fsdp)), fsdp),
    ):
        task = ToyTask("categorical", conversations)
        assert run_categorical_eval(task, placed, tokenizer, batch_size=8, mesh=on) == expected
        assert task.in_problem_order() == predicted
    with pytest.raises(ValueError, match="multiple of the mesh's data-parallel size"):
        run_categorical_eval(task, model, tokenizer, batch_size=6, mesh=mesh)


def test_zero_lm_head_answers_the_first_letter(tokenizer):
    # nanochat's init (lm_head zero): every letter ties, argmax takes the first.
    model = tiny_gpt(tokenizer)
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
    conversations = [mc_conversation(q, letters_of(i), "B") for i, q in enumerate(_QUESTIONS)]
    task = ToyTask("categorical", conversations)
    assert run_categorical_eval(task, model, tokenizer, batch_size=8) == 0.0
    assert task.in_problem_order() == [letters_of(i)[0] for i in range(len(_QUESTIONS))]


def test_categorical_errors(tokenizer, model):
    assert len(tokenizer.encode("Ω")) > 1
    task = ToyTask("categorical", [mc_conversation("Pick one.", ["A", "Ω"], "A")])
    with pytest.raises(ValueError, match="'Ω' encodes to 2 tokens"):
        run_categorical_eval(task, model, tokenizer)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_categorical_eval(task, model, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="max_problems"):
        run_categorical_eval(task, model, tokenizer, max_problems=0)
    with pytest.raises(ValueError, match="no problems"):
        run_categorical_eval(ToyTask("categorical", []), model, tokenizer)
    long_task = ToyTask("categorical", [mc_conversation("fox " * 400, ["A", "B"], "A")])
    with pytest.raises(ValueError, match="exceeds the model's maximum 640"):
        run_categorical_eval(long_task, model, tokenizer)


# ---- generative ----------------------------------------------------------------------------


class CannedEngine:
    """generate_batch that answers prompt i with canned texts (one per sample)."""

    def __init__(self, tokenizer: Tokenizer, answers: list[list[str]]):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        self.calls.append({"num_samples": num_samples, **kwargs})
        texts = self.answers[len(self.calls) - 1]
        assert len(texts) == num_samples
        return [tokens + self.tokenizer.encode(t) for t in texts], None


def qa(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def test_generative_pass_at_k(tokenizer, model):
    task = ToyTask("generative", [qa(f"q{i}", "yes") for i in range(4)])
    engine = CannedEngine(tokenizer, [["no", "yes"], ["no", "no"], ["yes", "yes"], ["maybe", "no"]])
    accuracy = run_chat_eval(
        "toy",
        model,
        tokenizer,
        task=task,
        engine=engine,
        num_samples=2,
        max_new_tokens=7,
        temperature=0.5,
        top_k=0,
    )
    assert accuracy == 2 / 4  # problems 0 and 2 pass: any sample passing is enough
    assert sorted(task.responses) == sorted(["no", "yes", "no", "no", "yes", "maybe", "no"])
    assert (
        engine.calls == [{"num_samples": 2, "max_tokens": 7, "temperature": 0.5, "top_k": None}] * 4
    )


def test_generative_with_the_real_engine_decodes_after_the_prompt(tokenizer, model):
    engine = Engine(model, tokenizer)
    conversations = [qa("Which planet is red?", "x"), qa("Two plus two?", "x")]
    expected = []
    for c in conversations:
        prompt = tokenizer.render_for_completion(c)
        results, _ = engine.generate_batch(prompt, max_tokens=6, temperature=0)
        expected.append(tokenizer.decode(results[0][len(prompt) :]))
    gold = [expected[0], "something else"]
    task = ToyTask(
        "generative",
        [qa("Which planet is red?", gold[0]), qa("Two plus two?", gold[1])],
    )
    acc = run_chat_eval("toy", model, tokenizer, task=task, engine=engine, max_new_tokens=6)
    assert task.responses == expected and acc == 0.5


def test_generative_on_a_pool_equals_one_engine(tokenizer, model):
    words = ["red", "blue", "water", "fox", "dog", "Mars", "lazy"]
    questions = [f"Is the {w} {v}?" for w in words[:4] for v in words[4:7]]  # 12 problems
    single = Engine(model, tokenizer)
    pool = EnginePool(model, tokenizer, devices=jax.devices()[:2])
    for kwargs in (
        {"num_samples": 1, "temperature": 0.0},  # greedy pass@1
        {"num_samples": 2, "temperature": 1.0, "top_k": 20},  # sampled pass@2
    ):
        # gold: the single engine's first answer on even problems, something else on odd ones
        gold = []
        for i, q in enumerate(questions):
            prompt = tokenizer.render_for_completion(qa(q, ""))
            results, _ = single.generate_batch(prompt, max_tokens=8, **kwargs)
            gold.append(tokenizer.decode(results[0][len(prompt) :]) if i % 2 == 0 else "(none)")
        accuracies, responses = [], []
        # one Engine; a pool; the pool run_chat_eval makes itself over a mesh's devices
        for engine, mesh in ((single, None), (pool, None), (None, sharding.make_mesh("2"))):
            task = ToyTask("generative", [qa(q, g) for q, g in zip(questions, gold, strict=True)])
            accuracies.append(
                run_chat_eval(
                    "toy",
                    model,
                    tokenizer,
                    task=task,
                    engine=engine,
                    mesh=mesh,
                    max_new_tokens=8,
                    progress=False,
                    **kwargs,
                )  # fmt: skip
            )
            responses.append(sorted(task.responses))
        assert accuracies == [6 / 12] * 3
        # pass@k stops grading a problem at its first passing sample (the 6 even ones: sample 0)
        assert len(responses[0]) == 6 + 6 * kwargs["num_samples"]
        assert responses[0] == responses[1] == responses[2]


def test_generative_grading_runs_programs_in_parallel(tokenizer):
    # HumanEval-like: each completion is a program that sleeps 0.4 s; graded while generating.
    good = "import time\ntime.sleep(0.4)\nassert 1 + 1 == 2"
    bad = "import time\ntime.sleep(0.4)\nassert 1 + 1 == 3"
    answers = [[good], [bad], [good], [good], [bad], [good], [good], [bad]]
    task = ToyTask(
        "generative",
        [qa(f"write program {i}", "") for i in range(len(answers))],
        grade=lambda c, r: execute_code(r).success,
    )
    start = time.perf_counter()
    acc = chat_eval.run_generative_eval(
        task, tokenizer, CannedEngine(tokenizer, answers), grader_threads=8
    )
    elapsed = time.perf_counter() - start
    assert acc == 5 / 8
    assert elapsed < 8 * 0.4  # sequential grading would take at least this long


def test_run_chat_eval_errors(tokenizer, model):
    with pytest.raises(ValueError, match="unknown task 'SQuAD'; allowed: ARC-Easy, ARC-Challenge"):
        run_chat_eval("SQuAD", model, tokenizer)
    with pytest.raises(ValueError, match="eval_type 'ranking'"):
        run_chat_eval("toy", model, tokenizer, task=ToyTask("ranking", [qa("q", "a")]))


def test_progress_line(tokenizer, model, mc, capsys):
    task = ToyTask("categorical", mc[0])
    run_chat_eval("Toy-MC", model, tokenizer, task=task, batch_size=4)
    out = capsys.readouterr().out
    assert "Toy-MC: 6/11 (54.55%) [11/11 problems" in out
    run_chat_eval("Toy-MC", model, tokenizer, task=task, batch_size=4, progress=False)
    assert capsys.readouterr().out == ""


# ---- ChatCORE ------------------------------------------------------------------------------


def test_baselines_follow_the_task_names():
    from nanochat_jax.tasks import EXTRA_TASK_NAMES

    assert tuple(chat_eval.BASELINE_ACCURACY) == (*TASK_NAMES, *EXTRA_TASK_NAMES)
    assert chat_eval.BASELINE_ACCURACY == {
        "ARC-Easy": 0.25,
        "ARC-Challenge": 0.25,
        "MMLU": 0.25,
        "GSM8K": 0.0,
        "HumanEval": 0.0,
        "SpellingBee": 0.0,  # nanochat 8892470
    }


def test_chatcore_metric():
    accuracies = {
        "ARC-Easy": 0.40,
        "ARC-Challenge": 0.30,
        "MMLU": 0.3175,
        "GSM8K": 0.05,
        "HumanEval": 0.07,
    }
    expected = ((0.40 - 0.25) / 0.75 + (0.05) / 0.75 + 0.0675 / 0.75 + 0.05 + 0.07) / 5
    assert math.isclose(chatcore_metric(accuracies), expected, rel_tol=1e-12)
    at_chance = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0, "HumanEval": 0}
    assert chatcore_metric(at_chance) == 0.0
    assert chatcore_metric({k: 1.0 for k in at_chance}) == 1.0
    # SpellingBee evaluated too: a mean over six (nanochat 8892470's ChatCORE)
    with_bee = {**accuracies, "SpellingBee": 0.6}
    assert math.isclose(chatcore_metric(with_bee), (5 * expected + 0.6) / 6, rel_tol=1e-12)
    del accuracies["HumanEval"]
    assert chatcore_metric(accuracies) is None
    assert chatcore_metric({**accuracies, "SpellingBee": 0.6}) is None  # a default is missing


# ---- the script ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory, tokenizer, model):
    """A base dir with the offline demo tasks (scale 0.05) and the tiny model saved as sft d1."""
    from nanochat_jax import checkpoint, demo_tasks

    base = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
        assert demo_tasks.main(["--scale", "0.05"]) == 0
    tokenizer.save(base / "tokenizer")
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    directory = checkpoint.checkpoint_dir("sft", "d1", base)
    with checkpoint.Checkpointer(directory, async_save=False) as ckpt:
        ckpt.save(0, params=params, meta={"model_config": model.config.to_dict(), "step": 0})
    return base


def report_items(base) -> tuple[str, dict[str, str]]:
    text = (base / "report" / "chat-evaluation-sft.md").read_text()
    items = dict(line[2:].split(": ", 1) for line in text.splitlines() if line.startswith("- "))
    return text, items


def test_script_all_tasks_and_report(demo_base, monkeypatch, capsys):
    from nanochat_jax import engine as engine_module

    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(demo_base))
    pools: list[int] = []

    class RecordedPool(EnginePool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(len(self))

    monkeypatch.setattr(engine_module, "EnginePool", RecordedPool)
    argv = ["-i", "sft", "-x", "6", "-m", "8", "-b", "4", "-d", "float32"]
    assert chat_eval_script.main(argv) == 0
    out = capsys.readouterr().out
    text, items = report_items(demo_base)
    assert text.startswith("## Chat evaluation sft\n")
    for key, value in {"source": "sft", "task_name": "None", "max_problems": "6"}.items():
        assert items[key] == value
    assert items["Task data"] == "offline demo (not comparable with nanochat)"
    accuracies = {name: float(items[name]) for name in TASK_NAMES}  # the default: five
    assert "SpellingBee" not in items
    for name, acc in accuracies.items():
        assert f"{name} accuracy: " in out
        assert acc * 6 == pytest.approx(round(acc * 6), abs=1e-3)  # k of 6 problems passed
    expected = chatcore_metric(accuracies)
    assert float(items["ChatCORE metric"]) == pytest.approx(expected, abs=1e-4)
    assert pools == [8]  # the default: every local device
    # One device: the same accuracies.
    assert chat_eval_script.main([*argv, "--mesh", "1"]) == 0
    assert pools == [8, 1]
    _, one_device = report_items(demo_base)
    assert one_device["mesh"] == "1" and items["mesh"] == "8"
    assert {name: float(one_device[name]) for name in accuracies} == accuracies
    # A subset of the tasks: no ChatCORE.
    assert chat_eval_script.main(["-i", "sft", "-a", "ARC-Easy|MMLU", "-x", "4"]) == 0
    text, items = report_items(demo_base)
    assert "ChatCORE" not in text and items["task_name"] == "ARC-Easy|MMLU"
    assert set(items) & set(chat_eval.BASELINE_ACCURACY) == {"ARC-Easy", "MMLU"}


def test_script_spelling_bee(demo_base, monkeypatch, capsys):
    """-a SpellingBee: generative, on the demo word list; alone no ChatCORE, with the five
    default tasks a ChatCORE over six."""
    from nanochat_jax.tasks import get_task

    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(demo_base))
    task = get_task("SpellingBee")
    assert len(task) == 256 and task.split == "test" and task.eval_type == "generative"
    assert chat_eval_script.main(["-i", "sft", "-a", "SpellingBee", "-x", "3", "-m", "8"]) == 0
    text, items = report_items(demo_base)
    assert "SpellingBee accuracy: " in capsys.readouterr().out
    assert float(items["SpellingBee"]) in {0.0, 1 / 3, 2 / 3, 1.0} and "ChatCORE" not in text
    all_six = "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee"
    argv = ["-i", "sft", "-a", all_six, "-x", "2", "-m", "8", "-b", "2", "--mesh", "1"]
    assert chat_eval_script.main(argv) == 0
    _, items = report_items(demo_base)
    accuracies = {name: float(items[name]) for name in all_six.split("|")}
    expected = chatcore_metric(accuracies)
    assert float(items["ChatCORE metric"]) == pytest.approx(expected, abs=1e-4)
    centered = [(a - chat_eval.BASELINE_ACCURACY[n]) / (1 - chat_eval.BASELINE_ACCURACY[n])
                for n, a in accuracies.items()]  # fmt: skip
    assert expected == pytest.approx(sum(centered) / 6)
    # the default task list stays the five of 2bc521a
    assert chat_eval_script.task_names(None) == list(TASK_NAMES)


def test_spelling_bee_answers_are_graded(tokenizer, model, tmp_path):
    """run_chat_eval's generative path grades SpellingBee replies with its evaluate()."""
    from nanochat_jax.tasks import SpellingBee

    (tmp_path / "words.txt").write_text("red\nmars\nwater\n")
    task = SpellingBee(size=4, split="test", words_path=tmp_path / "words.txt")
    graded = []
    real = task.evaluate
    task.evaluate = lambda c, r: graded.append(r) or real(c, r)
    accuracy = run_chat_eval("SpellingBee", model, tokenizer, task=task, max_new_tokens=6)
    assert accuracy == 0.0 and len(graded) == 4  # a random tiny model never writes "#### N"


def test_script_errors(demo_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(demo_base))
    with pytest.raises(SystemExit, match="unknown task 'SQuAD'; allowed: ARC-Easy, .*SpellingBee"):
        chat_eval_script.main(["-i", "sft", "-a", "ARC-Easy|SQuAD"])
    with pytest.raises(SystemExit, match="no mid checkpoint"):
        chat_eval_script.main(["-i", "mid", "-a", "ARC-Easy"])
    with pytest.raises(SystemExit, match="no sft model tagged 'd9'; available: d1"):
        chat_eval_script.main(["-i", "sft", "-g", "d9", "-a", "ARC-Easy"])
    with pytest.raises(SystemExit, match="error: --mesh '16' needs 16 devices but only 8"):
        chat_eval_script.main(["-i", "sft", "-a", "ARC-Easy", "--mesh", "16"])
    for argv in (
        ["-a", "MMLU"],
        ["-i", "base"],
        ["-i", "sft", "-n", "0"],
        ["-i", "sft", "-x", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            chat_eval_script.main(argv)
        assert exit_info.value.code == 2  # argparse usage error
    err = capsys.readouterr().err
    assert "--source" in err and "invalid choice: 'base'" in err
    assert "--num-samples must be >= 1" in err and "--max-problems must be >= 1" in err
    # Task data missing: demo data without the HumanEval split (nothing is downloaded then).
    import shutil

    shutil.copytree(demo_base, tmp_path / "base")
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path / "base"))
    shutil.rmtree(tmp_path / "base" / "task_data" / "openai" / "openai_humaneval")
    with pytest.raises(SystemExit, match="error: .*openai_humaneval.*demo_tasks"):
        chat_eval_script.main(["-i", "sft", "-a", "ARC-Easy|HumanEval"])
