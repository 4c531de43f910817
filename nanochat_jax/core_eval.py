"""The CORE metric (DCLM, arXiv 2406.11794) exactly as nanochat's core_eval.py scores it.

Per example: few-shot examples drawn with random.Random(1234 + idx), one prompt per option
(multiple_choice: per choice; schema: per context option; language_modeling: the prompt without
and with the continuation), each encoded with BOS prepended. The scored span of a row is the
continuation: after the common token prefix (multiple choice), the common token suffix (schema),
or after the prompt without continuation (LM). multiple_choice / schema pick the option with the
lowest mean loss over its span; LM is right when greedy argmax reproduces the continuation
exactly. A task's accuracy is centered against its random baseline and CORE is the mean.

Speed: nanochat runs one forward per example at that example's length. Here the option rows of
many examples are right-padded with BOS into length buckets and stacked into batches of a fixed
row count per bucket, so one jitted forward serves each bucket shape for the whole eval (and for
later evals of a model with the same structure). A task's leftover rows (fewer than a batch)
fill batches whose spare rows take the leftovers of shorter buckets, so only a task's last batch
has dummy rows. Right-padding cannot change a causal model's outputs at the real positions.
lm_head (and the log-softmax over the vocab) runs only on a window of each row's positions from
its span's start, as wide as the batch's longest span needs, since the spans are a small part
of the rows. How fine the shapes are (`fine_shapes`, see engine.fine_eval_shapes) trades
padding for compilations: fine (the default on a CPU, where compiles are cheap) uses half-octave
buckets (16, 24, 32, 48, ...), quarter-size leftover batches and half-octave windows; coarse
(the default on an accelerator, where a big model's compile outweighs its forwards) uses
power-of-two buckets, full-size batches only and two windows per bucket, min(L, 128) or L.
Measurements are in bench/RESULTS.md.
Batches may be split over the mesh's data axes when the model's parameters live on a mesh (as
`stage.load_model(..., mesh=mesh)` leaves them).
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nanochat_jax import sharding
from nanochat_jax.engine import eval_length_bucket, fine_eval_shapes, half_octave_bucket
from nanochat_jax.eval_bundle import TASK_TYPES, load_task_data, read_tasks
from nanochat_jax.model import GPT, cross_entropy

_ENCODE_CHUNK = 256  # examples tokenized per call (the Rust tokenizer encodes a list in parallel)
# Fine shapes: a task's leftover rows of a bucket run in batches of a quarter of the full row
# count (two compiled row counts per bucket, less than a quarter batch of dummy rows per
# leftover); bench/RESULTS.md compares full, quarter, and quarter-and-half leftover batches.
_PARTIAL_BATCH_FRACTION = 4
# Coarse shapes: the narrow span window of a bucket (CORE's spans are mostly a few to a few
# dozen tokens); a batch with a longer span takes the whole row length.
_NARROW_WINDOW = 128


# ---- prompts (nanochat's three Jinja templates, written out in Python) ------------------------


def render_prompts(
    item: dict, task_type: str, delimiter: str, fewshot: list[dict] | tuple = ()
) -> list[str]:
    """The prompts of one item: one per option; for LM [without, with] the continuation.

    Every few-shot example is followed by a blank line. LM contexts are whitespace-trimmed and
    the prompt without continuation is stripped (else its trailing space would be a different
    token than in the prompt with the continuation)."""
    if task_type == "multiple_choice":
        shots = "".join(
            f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot
        )
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        shots = "".join(
            f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n"
            for ex in fewshot
        )
        return [
            f"{shots}{context}{delimiter}{item['continuation']}"
            for context in item["context_options"]
        ]
    if task_type == "language_modeling":
        shots = "".join(
            f"{str(ex['context']).strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot
        )
        without = f"{shots}{str(item['context']).strip()}{delimiter}"
        return [without.strip(), f"{without}{item['continuation']}"]
    raise ValueError(f"task type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")


def fewshot_indices(idx: int, num_examples: int, num_fewshot: int) -> list[int]:
    """nanochat's draw: Random(1234 + idx).sample of the indices other than idx.

    sample() picks positions from the population's length alone, so sampling range(n - 1) and
    skipping over idx gives the same indices without building the n-1 list per example."""
    if num_fewshot <= 0:
        return []
    if num_fewshot > num_examples - 1:
        raise ValueError(
            f"num_fewshot={num_fewshot} needs at least {num_fewshot + 1} examples in the task, "
            f"got {num_examples}"
        )
    positions = random.Random(1234 + idx).sample(range(num_examples - 1), num_fewshot)
    return [j + (j >= idx) for j in positions]


def _common_length(rows: list[list[int]], from_end: bool) -> int:
    """Length of the token prefix (or suffix) that all rows share."""
    shortest = min(len(row) for row in rows)
    for i in range(shortest):
        position = -1 - i if from_end else i
        token = rows[0][position]
        if any(row[position] != token for row in rows):
            return i
    return shortest


def continuation_spans(
    rows: list[list[int]], task_type: str
) -> tuple[list[list[int]], list[int], list[int]]:
    """(rows, starts, ends) to score: [start, end) is the continuation of each row."""
    ends = [len(row) for row in rows]
    if task_type == "multiple_choice":
        return rows, [_common_length(rows, from_end=False)] * len(rows), ends
    if task_type == "schema":
        suffix = _common_length(rows, from_end=True)
        return rows, [end - suffix for end in ends], ends
    if task_type == "language_modeling":
        without, with_ = rows
        if not (len(without) < len(with_) and with_[: len(without)] == without):
            raise ValueError(
                "language_modeling: the tokens of the prompt without continuation must be a "
                "strict prefix of those with it (a continuation that merges with the context?)"
            )
        return [with_], [len(without)], [len(with_)]
    raise ValueError(f"task type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")


def crop_left(
    rows: list[list[int]], starts: list[int], ends: list[int], max_len: int
) -> tuple[list[list[int]], list[int], list[int]]:
    """Keep the last max_len tokens of longer rows and shift their span (nanochat's crop for
    models with a max_seq_len). A span start pushed below 1 is clamped to 1: position 0 has no
    prediction."""
    out_rows, out_starts, out_ends = [], [], []
    for row, start, end in zip(rows, starts, ends, strict=True):
        cut = max(0, len(row) - max_len)
        out_rows.append(row[cut:])
        out_starts.append(max(1, start - cut))
        out_ends.append(end - cut)
    return out_rows, out_starts, out_ends


# ---- batched scoring on device ----------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames="window")
def _score_rows(graphdef, mesh, state, tokens_RL, start_R, end_R, *, window: int):
    """Mean loss over each row's span [start-1, end-1) of next-token predictions, and whether
    greedy argmax reproduces the span exactly. An empty span gives NaN (torch's empty mean).
    lm_head runs only on the `window` positions from each row's start-1 (W: at least the
    longest span; positions past a row's span are masked, those past the padded length are
    clamped to L-1)."""
    model = nnx.merge(graphdef, state)
    L = tokens_RL.shape[1]
    offset_W = jnp.arange(window)
    pos_RW = jnp.minimum(start_R[:, None] - 1 + offset_W, L - 1)
    span_RW = offset_W < (end_R - start_R)[:, None]
    logits_RWV = model.head(model.hidden_states(tokens_RL), pos_RW)
    targets_RW = jnp.take_along_axis(tokens_RL, jnp.minimum(pos_RW + 1, L - 1), axis=1)
    loss_RW = cross_entropy(logits_RWV, jnp.where(span_RW, targets_RW, -1), "none")
    hit_RW = jnp.argmax(logits_RWV, axis=-1) == targets_RW
    mean_loss_R = loss_RW.sum(axis=1) / (end_R - start_R)
    exact_R = jnp.all(hit_RW | ~span_RW, axis=1)
    if mesh is not None:  # every process reads every row's result
        replicated = NamedSharding(mesh, P())
        mean_loss_R = jax.lax.with_sharding_constraint(mean_loss_R, replicated)
        exact_R = jax.lax.with_sharding_constraint(exact_R, replicated)
    return mean_loss_R, exact_R


def _model_mesh(model: GPT) -> Mesh | None:
    """The mesh the parameters were placed on (None: a single device)."""
    leaf = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    spec = getattr(leaf, "sharding", None)
    if isinstance(spec, NamedSharding) and spec.mesh.size > 1:
        return spec.mesh
    return None


class _RowScorer:
    """Queues rows by length bucket and runs a bucket's batch as soon as it is full.

    Each bucket length L (engine.eval_length_bucket, at most max_len) has a whole batch's row
    count (rows_per_batch) and, with fine shapes, a quarter batch's for leftovers
    (partial_rows), so every forward has one of a handful of shapes. `finish` runs the
    leftovers, longest bucket first,
    and fills their batches' spare rows with leftovers of shorter buckets before padding with
    dummy rows. Results stay on device until `finish`, so the host prepares the next rows while
    the device works."""

    def __init__(
        self,
        model: GPT,
        bos: int,
        batch_rows: int,
        batch_tokens: int,
        max_len: int,
        mesh,
        fine_shapes: bool | None = None,
    ):
        if batch_rows < 1 or batch_tokens < 1:
            raise ValueError(
                f"batch_rows and batch_tokens must be >= 1, got {batch_rows}, {batch_tokens}"
            )
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh if mesh is not None else _model_mesh(model)
        self.dp = 1 if self.mesh is None else sharding.data_parallel_size(self.mesh)
        self.bos, self.max_len = bos, max_len
        self.batch_rows, self.batch_tokens = batch_rows, batch_tokens
        self.queues: dict[int, list[tuple[int, list[int], int, int]]] = {}
        self.launched: list[tuple[list[int], jax.Array, jax.Array]] = []
        self.num_rows = 0
        self.fine = fine_eval_shapes(fine_shapes)

    def bucket(self, length: int) -> int:
        return eval_length_bucket(length, self.max_len, self.fine)

    def window(self, span: int, bucket: int) -> int:
        """The span window of a batch whose longest span is `span`: it must cover every row's
        span (positions past it are masked). Fine: the half-octave step holding it; coarse:
        _NARROW_WINDOW when it fits, else the whole row (two windows per bucket)."""
        if self.fine:
            return half_octave_bucket(span, bucket)
        return min(bucket, _NARROW_WINDOW) if span <= _NARROW_WINDOW else bucket

    def rows_per_batch(self, bucket: int) -> int:
        per_device = max(1, min(self.batch_rows, self.batch_tokens // bucket))
        return per_device * self.dp

    def partial_rows(self, bucket: int, num_rows: int) -> int:
        """The size of the next batch of `bucket` when `num_rows` of its rows are left over: a
        whole batch when that pads it with fewer dummy rows than a quarter batch holds
        (num_rows > whole - quarter), else a quarter batch (at least one row per device).
        Coarse shapes: always a whole batch."""
        full = self.rows_per_batch(bucket)
        if not self.fine:
            return full
        part = max(1, full // self.dp // _PARTIAL_BATCH_FRACTION) * self.dp
        return full if num_rows > full - part else part

    def add(self, row: list[int], start: int, end: int) -> int:
        """Queue one row; returns its id (index into `finish`'s arrays)."""
        row_id = self.num_rows
        self.num_rows += 1
        bucket = self.bucket(len(row))
        queue = self.queues.setdefault(bucket, [])
        queue.append((row_id, row, start, end))
        if len(queue) == self.rows_per_batch(bucket):
            self._launch(bucket, queue, len(queue))
            self.queues[bucket] = []
        return row_id

    def _launch(self, bucket: int, queue: list, num: int) -> None:
        tokens_RL = np.full((num, bucket), self.bos, dtype=np.int32)
        start_R = np.ones(num, dtype=np.int32)  # dummy rows: a one-token span, ignored
        end_R = np.full(num, 2, dtype=np.int32)
        for r, (_, row, start, end) in enumerate(queue):
            tokens_RL[r, : len(row)] = row
            start_R[r], end_R[r] = start, end
        arrays = [self._place(a) for a in (tokens_RL, start_R, end_R)]
        window = self.window(int(np.max(end_R - start_R)), bucket)
        mean_loss_R, exact_R = _score_rows(
            self.graphdef, self.mesh, self.state, *arrays, window=window
        )
        self.launched.append(([row_id for row_id, *_ in queue], mean_loss_R, exact_R))

    def _place(self, array: np.ndarray) -> np.ndarray | jax.Array:
        if self.mesh is None:
            return array  # jit transfers it (jnp.asarray would compile a copy per shape)
        # Every process holds the whole batch, so each fills the rows of its own devices.
        spec = sharding.batch_sharding(self.mesh)
        return jax.make_array_from_callback(array.shape, spec, lambda index: array[index])

    def _launch_leftovers(self) -> None:
        """Every queued row, in batches of a bucket's partial sizes, longest bucket first; a
        batch's spare rows take the next shorter buckets' rows (right-padded like the rest)."""
        buckets = sorted((b for b, q in self.queues.items() if q), reverse=True)
        for i, bucket in enumerate(buckets):
            queue = self.queues[bucket]
            while queue:
                num = self.partial_rows(bucket, len(queue))
                batch, queue[:] = queue[:num], queue[num:]
                for shorter in buckets[i + 1 :]:
                    spare = num - len(batch)
                    batch += self.queues[shorter][:spare]
                    del self.queues[shorter][:spare]
                self._launch(bucket, batch, num)
        self.queues = {}

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean loss, exact match) of every row added, in row-id order."""
        self._launch_leftovers()
        losses = np.full(self.num_rows, np.nan, dtype=np.float32)
        exact = np.zeros(self.num_rows, dtype=bool)
        for row_ids, mean_loss_R, exact_R in self.launched:
            n = len(row_ids)
            losses[row_ids] = np.asarray(mean_loss_R)[:n]
            exact[row_ids] = np.asarray(exact_R)[:n]
        self.launched = []
        return losses, exact


# ---- tasks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExampleResult:
    correct: bool
    losses: list[float]  # mean span loss per scored row (one per option; LM: its single row)
    exact_match: bool  # LM: greedy argmax reproduced the continuation (else: of the gold row)


def _check_task_meta(task_meta: dict) -> tuple[str, int, str]:
    task_type = task_meta.get("task_type")
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    num_fewshot = task_meta.get("num_fewshot", 0)
    if not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot must be an int >= 0, got {num_fewshot!r}")
    return task_type, num_fewshot, task_meta.get("continuation_delimiter", " ")


def evaluate_examples(
    model: GPT,
    tokenizer,
    data: list[dict],
    task_meta: dict,
    *,
    batch_rows: int = 64,
    batch_tokens: int = 8192,
    max_seq_len: int | None = None,
    mesh: Mesh | None = None,
    fine_shapes: bool | None = None,
) -> list[ExampleResult]:
    """Score every example of one task (nanochat's evaluate_example for each idx).

    task_meta: {"task_type", "num_fewshot" (int), "continuation_delimiter" (default " ")}.
    batch_rows / batch_tokens: rows, and rows x bucket length, per data-parallel device and
    forward. max_seq_len: rows are left-cropped to it (default: the model's rotary table, 10x
    sequence_len, as nanochat, which crops only Hugging Face models, lets its own models see).
    mesh: default the one the model's parameters live on. fine_shapes: the batch shape
    policy (module docstring; None: fine on a CPU, coarse on an accelerator); the scores are
    the same either way."""
    task_type, num_fewshot, delimiter = _check_task_meta(task_meta)
    max_len = max_seq_len or model.config.rotary_seq_len
    if not 1 < max_len <= model.config.rotary_seq_len:
        raise ValueError(
            f"max_seq_len must be in [2, {model.config.rotary_seq_len}], got {max_seq_len}"
        )
    bos = tokenizer.get_bos_token_id()
    scorer = _RowScorer(model, bos, batch_rows, batch_tokens, max_len, mesh, fine_shapes)
    row_ids: list[list[int]] = []
    for first in range(0, len(data), _ENCODE_CHUNK):
        indices = range(first, min(len(data), first + _ENCODE_CHUNK))
        prompts = []
        for idx in indices:
            fewshot = [data[i] for i in fewshot_indices(idx, len(data), num_fewshot)]
            prompts.append(render_prompts(data[idx], task_type, delimiter, fewshot))
        flat = tokenizer.encode([p for group in prompts for p in group], prepend=bos)
        offset = 0
        for group in prompts:
            rows, starts, ends = continuation_spans(flat[offset : offset + len(group)], task_type)
            offset += len(group)
            rows, starts, ends = crop_left(rows, starts, ends, max_len)
            row_ids.append([scorer.add(*r) for r in zip(rows, starts, ends, strict=True)])
    losses, exact = scorer.finish()
    results = []
    for idx, ids in enumerate(row_ids):
        example_losses = losses[ids].tolist()
        if task_type == "language_modeling":
            correct = matched = bool(exact[ids[0]])
        else:
            # Python's min over floats, as nanochat: a NaN (empty span) first wins, later loses
            predicted = example_losses.index(min(example_losses))
            correct = predicted == data[idx]["gold"]
            matched = bool(exact[ids[data[idx]["gold"]]])
        results.append(ExampleResult(correct, example_losses, matched))
    return results


def evaluate_task(
    model: GPT,
    tokenizer,
    data: list[dict],
    task_meta: dict,
    *,
    batch_rows: int = 64,
    batch_tokens: int = 8192,
    max_seq_len: int | None = None,
    mesh: Mesh | None = None,
    fine_shapes: bool | None = None,
) -> float:
    """Accuracy of the model on one task (fraction of examples scored correct)."""
    if not data:
        raise ValueError("a task needs at least one example")
    results = evaluate_examples(
        model,
        tokenizer,
        data,
        task_meta,
        batch_rows=batch_rows,
        batch_tokens=batch_tokens,
        max_seq_len=max_seq_len,
        mesh=mesh,
        fine_shapes=fine_shapes,
    )
    return sum(r.correct for r in results) / len(results)


def centered_accuracy(accuracy: float, random_baseline_pct: float) -> float:
    """(acc - baseline) / (1 - baseline): 0 at chance level, 1 when perfect."""
    baseline = 0.01 * random_baseline_pct
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(
    model: GPT,
    tokenizer,
    bundle_dir: str | Path,
    *,
    max_per_task: int = -1,
    batch_rows: int = 64,
    batch_tokens: int = 8192,
    max_seq_len: int | None = None,
    verbose: bool = True,
    fine_shapes: bool | None = None,
) -> dict[str, Any]:
    """Every task of the eval bundle: {"results": {label: accuracy}, "centered_results":
    {label: centered}, "core_metric": mean centered}. Each task's examples are shuffled with
    Random(1337) and cropped to max_per_task (-1: all), as nanochat's base_eval. A broken
    bundle raises ValueError naming the file (`eval_bundle.validate_bundle` checks it all up
    front). fine_shapes: as evaluate_examples'."""
    results: dict[str, float] = {}
    centered: dict[str, float] = {}
    show = verbose and jax.process_index() == 0
    for task in read_tasks(bundle_dir):
        start_s = time.perf_counter()
        if show:
            print(
                f"Evaluating: {task.label} ({task.num_fewshot}-shot, type: {task.task_type})... ",
                end="",
                flush=True,
            )
        data = load_task_data(bundle_dir, task)
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        accuracy = evaluate_task(
            model,
            tokenizer,
            data,
            task.task_meta(),
            batch_rows=batch_rows,
            batch_tokens=batch_tokens,
            max_seq_len=max_seq_len,
            fine_shapes=fine_shapes,
        )
        results[task.label] = accuracy
        centered[task.label] = centered_accuracy(accuracy, task.random_baseline)
        if show:
            print(
                f"accuracy: {accuracy:.4f} | centered: {centered[task.label]:.4f} | "
                f"time: {time.perf_counter() - start_s:.2f}s",
                flush=True,
            )
    core = sum(centered.values()) / len(centered)
    return {"results": results, "centered_results": centered, "core_metric": core}
