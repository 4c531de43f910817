"""Chat evaluation (nanochat's scripts/chat_eval.py, the library half): accuracy of a chat model
on a task, and the ChatCORE metric.

Tasks: the five of nanochat 2bc521a (tasks.TASK_NAMES, the default) and SpellingBee (nanochat
8892470, tasks.EXTRA_TASK_NAMES: 256 test problems, generative, random baseline 0), evaluated
only when named. ChatCORE (`chatcore_metric`) is the mean centered accuracy
(acc - baseline) / (1 - baseline) over every evaluated task, reported only when all five default
tasks were evaluated: over those five (2bc521a's metric), or over six when SpellingBee was
evaluated too (8892470's metric, which requires all six).

Categorical tasks (ARC, MMLU): no sampling. Each prompt is rendered up to <|assistant_start|>,
a batch is right-padded with <|bos|>, one forward, and at each row's last prompt position the
logits of the allowed answer letters are compared; the largest is the answer (the first of
equal ones, as nanochat's argmax). lm_head runs only there and only on the letters' token ids
(`GPT.head`): over every position and the whole vocab it would be 38% of a depth-4 forward's
FLOPs (a (8, 128) batch: 4.3 of 11.3 GFLOP), for logits nobody reads. Attention is
causal, so padding after a row's prompt cannot change that row's logits, and a problem's answer
does not depend on the batch it runs in. Where nanochat batches problems in order, each padded
to its batch's longest, here each prompt is queued by its own length bucket
(`engine.eval_length_bucket`, as core_eval's) and a bucket's batch runs as soon as it holds
`batch_size` prompts; the leftovers then run longest first, a batch's spare rows taking the next
shorter buckets' leftovers, so only the very last batch is filled up with dummy rows (a lone
<|bos|>). That pads far less than in-order batches do. Every batch has `batch_size` rows, so one
shape per length bucket is compiled, and later tasks reuse them. The buckets are half-octave
steps with fine shapes (the default on a CPU, where compiles are cheap) and powers of two with
coarse ones (the default on an accelerator, where they are not): `fine_shapes`, see
engine.fine_eval_shapes; measurements are in bench/RESULTS.md.
Problems are graded as their batch is read, so not in problem order (as with nanochat's ranks).
With a mesh the batch is split over its data-parallel devices (nanochat strides batches over its
ranks); a batch is read only after the next one is dispatched, so the host's rendering overlaps
the devices' forward.

Generative tasks (GSM8K, HumanEval, SpellingBee): `generate_batch` with `num_samples` samples
per problem (nanochat's default seed 42 for each), the tokens after the prompt decoded and
graded; a problem passes if any sample passes (pass@num_samples). Given an `EnginePool`, the
problems are spread over its replicas, one per device (nanochat strides them over its ranks);
each problem's answer is the same as a single Engine's. Grading runs in a thread pool while
later problems are generated, so HumanEval's sandboxed programs overlap with decoding.

nanochat all-reduces its ranks' counts; with JAX's single controller one process drives every
device and counts everything itself.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import jax
import numpy as np
from flax import nnx

from nanochat_jax import sharding
from nanochat_jax.chat import sample_answers
from nanochat_jax.engine import Engine, EnginePool, eval_length_bucket, fine_eval_shapes
from nanochat_jax.tasks import EXTRA_TASK_NAMES, TASK_NAMES, get_task

# A random letter is right one time in four on these; a random answer never is on the others
# (GSM8K, HumanEval, SpellingBee).
_FOUR_CHOICE_TASKS = frozenset({"ARC-Easy", "ARC-Challenge", "MMLU"})
# ChatCORE's random-guess baselines of every task chat_eval knows, in nanochat's order: the
# default tasks (tasks.TASK_NAMES), then the extras (tasks.EXTRA_TASK_NAMES).
BASELINE_ACCURACY = {
    name: 0.25 if name in _FOUR_CHOICE_TASKS else 0.0 for name in (*TASK_NAMES, *EXTRA_TASK_NAMES)
}


class TaskLike(Protocol):
    eval_type: str

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict: ...
    def evaluate(self, conversation: dict, response: str) -> bool: ...


def load_task(task_name: str) -> TaskLike:
    """The test split of one of chat_eval's tasks (BASELINE_ACCURACY's; data read here)."""
    if task_name not in BASELINE_ACCURACY:
        raise ValueError(f"unknown task {task_name!r}; allowed: {', '.join(BASELINE_ACCURACY)}")
    return get_task(task_name, split="test")


def chatcore_metric(accuracies: dict[str, float]) -> float | None:
    """Mean over the evaluated tasks of (acc - baseline) / (1 - baseline), or None unless all
    of chat_eval's default tasks (TASK_NAMES) were evaluated (nanochat reports it only then).
    An extra task evaluated too (SpellingBee) counts in the mean, as in nanochat 8892470."""
    if not all(name in accuracies for name in TASK_NAMES):
        return None
    centered = [
        (acc - BASELINE_ACCURACY.get(name, 0.0)) / (1.0 - BASELINE_ACCURACY.get(name, 0.0))
        for name, acc in accuracies.items()
    ]
    return sum(centered) / len(centered)


class _Progress:
    """nanochat's running-accuracy line: rewritten in place on a terminal, else printed at
    most every 10 s (log files stay readable)."""

    def __init__(self, label: str, total: int, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = enabled and sys.stdout.isatty()
        self.start = self.last_print = time.perf_counter()

    def update(self, passed: int, done: int, final: bool = False) -> None:
        if not self.enabled or done == 0:
            return
        now = time.perf_counter()
        if not (self.tty or final or now - self.last_print >= 10.0):
            return
        self.last_print = now
        elapsed = now - self.start
        eta = elapsed / done * (self.total - done)
        line = (
            f"{self.label}: {passed}/{done} ({100 * passed / done:.2f}%) "
            f"[{done}/{self.total} problems, {elapsed:.0f}s, eta {eta:.0f}s]"
        )
        if self.tty:
            print(f"\r\033[K{line}", end="\n" if final else "", flush=True)
        else:
            print(line, flush=True)


def _num_problems(task: TaskLike, max_problems: int | None) -> int:
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be None or >= 1, got {max_problems}")
    n = len(task) if max_problems is None else min(len(task), max_problems)
    if n == 0:
        raise ValueError(f"{task!r} has no problems to evaluate")
    return n


# ---- categorical ---------------------------------------------------------------------------


# The letters' logits are computed for the token ids of every letter seen so far, padded to a
# power of two, at least 16 (ARC labels its choices A-E or 1-5, MMLU A-D), so one compilation
# per length bucket serves whole tasks, and the next task too.
_MIN_LETTER_COLUMNS = 16


@functools.partial(jax.jit, static_argnums=0)
def _answer_logits(graphdef: nnx.GraphDef, state: nnx.State, ids_BT, pos_B, vocab_C) -> jax.Array:
    """(B, C) logits of the vocab ids vocab_C at each row's answer position. A module-level jit
    keyed on the (hashable) graphdef, so repeated evals of a training model (chat_sft) reuse the
    compiled code."""
    model = nnx.merge(graphdef, state)
    return model.head(model.hidden_states(ids_BT), pos_B[:, None], vocab_C)[:, 0]


def _length_bucket(length: int, limit: int, fine: bool) -> int:
    if length > limit:
        raise ValueError(f"a prompt of {length} tokens exceeds the model's maximum {limit}")
    return eval_length_bucket(length, limit, fine)


def _on_mesh(state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """The model's arrays laid out on the mesh by the sharding rules (replicated over `data`),
    so that a batch split over the mesh meets them; no copy for arrays already there (a
    model from chat_sft's train state)."""
    pure = nnx.to_pure_dict(state)
    placed = jax.device_put(pure, sharding.tree_shardings(pure, mesh))
    state = jax.tree.map(lambda v: v, state)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, placed)
    return state


def _letter_token(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(
            f"answer letter {letter!r} encodes to {len(ids)} tokens {ids}; categorical "
            "evaluation reads one logit per letter, so each letter must be exactly one token"
        )
    return ids[0]


def run_categorical_eval(
    task: TaskLike,
    model: nnx.Module,
    tokenizer,
    *,
    batch_size: int = 8,
    max_problems: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    label: str = "categorical",
    fine_shapes: bool | None = None,
) -> float:
    """Accuracy of the model's letter choice over the first `max_problems` problems.
    batch_size: rows per forward, over the whole mesh (a multiple of its data-parallel size).
    fine_shapes: half-octave (True) or power-of-two (False) length buckets; None: fine on a
    CPU, coarse on an accelerator. The answers are the same either way."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mesh is not None:
        dp = sharding.data_parallel_size(mesh)
        if batch_size % dp:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of the mesh's data-parallel "
                f"size ({dp})"
            )
    num_problems = _num_problems(task, max_problems)
    bos = tokenizer.get_bos_token_id()
    limit = model.config.rotary_seq_len
    fine = fine_eval_shapes(fine_shapes)
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = _on_mesh(state, mesh)
    column_of: dict[str, int] = {}  # answer letter -> its column of the letters' logits
    vocab: list[int] = []  # the letters' token ids, by column
    passed = total = 0
    meter = _Progress(label, num_problems, progress)
    # (conversation, prompt) of the problems waiting for their bucket's batch to fill
    queues: dict[int, list[tuple[dict, list[int]]]] = {}
    # dispatched batches whose logits are not read yet: (conversations, logits_BC)
    in_flight: list[tuple[list[dict], jax.Array]] = []

    def dispatch(T: int, rows: list[tuple[dict, list[int]]]) -> None:
        ids_BT = np.full((batch_size, T), bos, np.int32)  # spare rows: dummies, a lone <|bos|>
        pos_B = np.zeros((batch_size,), np.int32)
        for row, (_, prompt) in enumerate(rows):
            ids_BT[row, : len(prompt)] = prompt
            pos_B[row] = len(prompt) - 1
        if mesh is not None:
            ids_BT, pos_B = sharding.shard_batch(ids_BT, mesh), sharding.shard_batch(pos_B, mesh)
        width = max(_MIN_LETTER_COLUMNS, 1 << (len(vocab) - 1).bit_length())
        vocab_C = np.asarray(vocab + vocab[:1] * (width - len(vocab)), np.int32)
        logits_BC = _answer_logits(graphdef, state, ids_BT, pos_B, vocab_C)
        in_flight.append(([conversation for conversation, _ in rows], logits_BC))

    def grade(keep: int) -> None:
        """Reads and grades the oldest dispatched batches until `keep` are left (the newest
        keeps the devices busy meanwhile)."""
        nonlocal passed, total
        while len(in_flight) > keep:
            conversations, logits_BC = in_flight.pop(0)
            logits_BC = np.asarray(jax.device_get(logits_BC))
            for row, conversation in enumerate(conversations):
                letters = conversation["letters"]
                # np.argmax: the first of equal logits, as nanochat's
                choice = int(np.argmax(logits_BC[row, [column_of[x] for x in letters]]))
                passed += bool(task.evaluate(conversation, letters[choice]))
                total += 1
            meter.update(passed, total)

    for i in range(num_problems):
        conversation = task[i]
        for letter in conversation["letters"]:
            if letter not in column_of:
                column_of[letter] = len(vocab)
                vocab.append(_letter_token(tokenizer, letter))
        prompt = tokenizer.render_for_completion(conversation)
        T = _length_bucket(len(prompt), limit, fine)
        queue = queues.setdefault(T, [])
        queue.append((conversation, prompt))
        if len(queue) == batch_size:
            dispatch(T, queue)
            queues[T] = []
            grade(keep=1)
    # Leftovers, longest first: a batch's padded length is its first (longest) prompt's bucket.
    leftovers = [row for T in sorted(queues, reverse=True) for row in queues[T]]
    for first in range(0, len(leftovers), batch_size):
        rows = leftovers[first : first + batch_size]
        dispatch(_length_bucket(len(rows[0][1]), limit, fine), rows)
        grade(keep=1)
    grade(keep=0)
    meter.update(passed, total, final=True)
    return passed / total


# ---- generative ----------------------------------------------------------------------------


def run_generative_eval(
    task: TaskLike,
    tokenizer,
    engine: Engine | EnginePool,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    max_problems: int | None = None,
    progress: bool = True,
    label: str = "generative",
    grader_threads: int | None = None,
) -> float:
    """pass@num_samples over the first `max_problems` problems. `engine`: an EnginePool spreads
    the problems over its replicas; anything else with Engine's `generate_batch` answers them
    one after another. Either way the answers, and so the accuracy, are the same."""
    num_problems = _num_problems(task, max_problems)
    meter = _Progress(label, num_problems, progress)
    workers = grader_threads or os.cpu_count() or 1
    passed = done = 0
    pending: list[Future] = []

    def answer(engine: Engine, i: int) -> tuple[dict, list[str]]:
        conversation = task[i]
        return conversation, sample_answers(
            engine,
            tokenizer,
            conversation,
            num_samples=num_samples,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
        )

    def grade(conversation: dict, completions: list[str]) -> bool:
        return any(bool(task.evaluate(conversation, text)) for text in completions)

    def collect(wait: bool) -> None:
        nonlocal passed, done
        while pending and (wait or pending[0].done()):
            passed += pending.pop(0).result()
            done += 1
            meter.update(passed, done)

    if isinstance(engine, EnginePool):
        answers = engine.imap(answer, range(num_problems))
    else:
        answers = (answer(engine, i) for i in range(num_problems))
    with ThreadPoolExecutor(max_workers=workers) as graders:
        for conversation, completions in answers:
            pending.append(graders.submit(grade, conversation, completions))
            collect(wait=False)
        collect(wait=True)
    meter.update(passed, done, final=True)
    return passed / done


# ---- either --------------------------------------------------------------------------------


def run_chat_eval(
    task_name: str,
    model: nnx.Module,
    tokenizer,
    *,
    batch_size: int = 8,
    max_problems: int | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = 50,
    engine: Engine | EnginePool | None = None,
    mesh: jax.sharding.Mesh | None = None,
    task: TaskLike | None = None,
    progress: bool = True,
) -> float:
    """Accuracy of `model` on one of BASELINE_ACCURACY's tasks (its test split), or on `task`
    (an already loaded task object, reported under `task_name`). Categorical tasks use
    batch_size (rows per forward over the whole mesh) and mesh; generative ones the sampling
    arguments and `engine` (an Engine, or an EnginePool to spread the problems over devices;
    default: a pool over the mesh's devices, or one Engine without a mesh; pass one to reuse
    its compilations across calls). top_k 0 or None: no top-k."""
    if task is None:
        task = load_task(task_name)
    if task.eval_type == "categorical":
        return run_categorical_eval(
            task,
            model,
            tokenizer,
            batch_size=batch_size,
            max_problems=max_problems,
            mesh=mesh,
            progress=progress,
            label=task_name,
        )
    if task.eval_type == "generative":
        if engine is None:
            engine = (
                Engine(model, tokenizer)
                if mesh is None
                else EnginePool(model, tokenizer, devices=mesh.local_devices)
            )
        return run_generative_eval(
            task,
            tokenizer,
            engine,
            num_samples=num_samples,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k or None,
            max_problems=max_problems,
            progress=progress,
            label=task_name,
        )
    raise ValueError(
        f"{task_name} has eval_type {task.eval_type!r}; allowed: 'categorical', 'generative'"
    )
