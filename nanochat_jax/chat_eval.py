"""Chat evaluation (nanochat's scripts/chat_eval.py, the library half): accuracy of a chat model
on a task, and the ChatCORE metric.

Categorical tasks (ARC, MMLU): no sampling. Each prompt is rendered up to <|assistant_start|>,
a batch is right-padded with <|bos|>, one forward, and at each row's last prompt position the
logits of the allowed answer letters are compared; the largest is the answer. Attention is
causal, so padding after a row's prompt cannot change that row's logits. To compile a handful of
times rather than once per batch, every batch has the full `batch_size` rows (the last one is
filled with dummy rows) and the padded length is a power of two (at least 16).

Generative tasks (GSM8K, HumanEval): `Engine.generate_batch` with `num_samples` samples per
problem (nanochat's default seed 42 for each), the tokens after the prompt decoded and graded;
a problem passes if any sample passes (pass@num_samples). Grading runs in a thread pool while
the next problem is generated, so HumanEval's sandboxed programs overlap with decoding.

nanochat strides problems over its GPU ranks and all-reduces the counts; with JAX's single
controller one process drives every device, so it simply evaluates every problem (an optional
mesh shards the categorical batch over the data axes).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax import sharding

# ChatCORE's random-guess baselines; the keys are chat_eval's default task order.
BASELINE_ACCURACY = {
    "ARC-Easy": 0.25,
    "ARC-Challenge": 0.25,
    "MMLU": 0.25,
    "GSM8K": 0.0,
    "HumanEval": 0.0,
}
_MIN_BUCKET = 16


class TaskLike(Protocol):
    eval_type: str

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict: ...
    def evaluate(self, conversation: dict, response: str) -> bool: ...


def load_task(task_name: str) -> TaskLike:
    """The test split of one of chat_eval's tasks (BASELINE_ACCURACY's keys)."""
    if task_name not in BASELINE_ACCURACY:
        raise ValueError(f"unknown task {task_name!r}; allowed: {', '.join(BASELINE_ACCURACY)}")
    from nanochat_jax.tasks import get_task  # the datasets: only when a task is evaluated

    return get_task(task_name, split="test")


def chatcore_metric(accuracies: dict[str, float]) -> float | None:
    """Mean over the tasks of (acc - baseline) / (1 - baseline), or None unless all of
    chat_eval's default tasks were evaluated (nanochat reports it only then)."""
    if not all(name in accuracies for name in BASELINE_ACCURACY):
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


@functools.partial(jax.jit, static_argnums=0)
def _answer_logits(graphdef: nnx.GraphDef, state: nnx.State, ids_BT, pos_B) -> jax.Array:
    """(B, V) logits at each row's answer position. A module-level jit keyed on the (hashable)
    graphdef, so repeated evals of a training model (chat_sft) reuse the compiled code."""
    logits_BTV = nnx.merge(graphdef, state)(ids_BT)
    return jnp.take_along_axis(logits_BTV, pos_B[:, None, None], axis=1)[:, 0]


def _length_bucket(length: int, limit: int) -> int:
    if length > limit:
        raise ValueError(f"a prompt of {length} tokens exceeds the model's maximum {limit}")
    return min(max(_MIN_BUCKET, 1 << (length - 1).bit_length()), limit)


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
) -> float:
    """Accuracy of the model's letter choice over the first `max_problems` problems."""
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
    graphdef, state = nnx.split(model)
    letter_ids: dict[str, int] = {}
    passed = total = 0
    meter = _Progress(label, num_problems, progress)
    for first in range(0, num_problems, batch_size):
        conversations = [task[i] for i in range(first, min(first + batch_size, num_problems))]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        T = _length_bucket(max(len(p) for p in prompts), limit)
        # Dummy rows (a lone <|bos|>) fill the last batch up to the compiled batch size.
        ids_BT = np.full((batch_size, T), bos, np.int32)
        pos_B = np.zeros((batch_size,), np.int32)
        for row, prompt in enumerate(prompts):
            ids_BT[row, : len(prompt)] = prompt
            pos_B[row] = len(prompt) - 1
        if mesh is not None:
            ids_BT, pos_B = sharding.shard_batch(ids_BT, mesh), sharding.shard_batch(pos_B, mesh)
        logits_BV = np.asarray(jax.device_get(_answer_logits(graphdef, state, ids_BT, pos_B)))
        for row, conversation in enumerate(conversations):
            letters = conversation["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    letter_ids[letter] = _letter_token(tokenizer, letter)
            choice = int(np.argmax(logits_BV[row, [letter_ids[x] for x in letters]]))
            passed += bool(task.evaluate(conversation, letters[choice]))
            total += 1
        meter.update(passed, total)
    meter.update(passed, total, final=True)
    return passed / total


# ---- generative ----------------------------------------------------------------------------


def run_generative_eval(
    task: TaskLike,
    tokenizer,
    engine,
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
    """pass@num_samples over the first `max_problems` problems."""
    num_problems = _num_problems(task, max_problems)
    meter = _Progress(label, num_problems, progress)
    workers = grader_threads or os.cpu_count() or 1
    passed = done = 0
    pending: list[Future] = []

    def grade(conversation: dict, completions: list[str]) -> bool:
        return any(bool(task.evaluate(conversation, text)) for text in completions)

    def collect(wait: bool) -> None:
        nonlocal passed, done
        while pending and (wait or pending[0].done()):
            passed += pending.pop(0).result()
            done += 1
            meter.update(passed, done)

    with ThreadPoolExecutor(max_workers=workers) as graders:
        for i in range(num_problems):
            conversation = task[i]
            prompt = tokenizer.render_for_completion(conversation)
            results, _ = engine.generate_batch(
                prompt,
                num_samples=num_samples,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
            )
            completions = [tokenizer.decode(tokens[len(prompt) :]) for tokens in results]
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
    engine=None,
    mesh: jax.sharding.Mesh | None = None,
    task: TaskLike | None = None,
    progress: bool = True,
) -> float:
    """Accuracy of `model` on one of BASELINE_ACCURACY's tasks (its test split), or on `task`
    (an already loaded task object, reported under `task_name`). Categorical tasks use
    batch_size (and mesh); generative ones the sampling arguments and `engine` (default: a new
    Engine of the model; pass one to reuse its compilations across calls). top_k 0 or None:
    no top-k."""
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
            from nanochat_jax.engine import Engine

            engine = Engine(model, tokenizer)
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
