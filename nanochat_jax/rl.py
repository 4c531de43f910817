"""Reinforcement learning on a rewarded task (GSM8K): rollouts, advantages, policy-gradient
weights, pass@k. The pieces of nanochat's chat_rl, which is REINFORCE more than GRPO: no KL term,
no reference model, no PPO ratio or clip (strictly on-policy), advantage = reward minus the mean
of the question's samples (no std), and a token-level ("GAPO") normalisation.

nanochat's objective for one pass of `device_batch_size` rows of a question, on each of W ranks
that each take E questions of P passes per step, is

    loss_pass = -sum_{b,t} logp[b,t] * adv[b] / (num_valid_tokens_of_the_pass * P * E)

summed over the rank's passes, then averaged over ranks by DDP. The shared train step averages
the gradients of its A = P * E micro-batches, each holding one pass of every rank, so the same
gradient comes from the loss -sum(logp * w) with per-token weights

    w[b,t] = adv[b] / (num_valid_tokens_of_the_pass * W)  where target[b,t] is trained, else 0

and the RL step is the ordinary compiled step with one extra (A, B, T) float array.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax.chat import sample_answers
from nanochat_jax.chat_data import rank_cursor
from nanochat_jax.engine import Engine, EnginePool

_SEQ_ALIGN = 64  # the train step's sequence length is a multiple of this
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class RewardTask(Protocol):
    """What RL needs of a task (nanochat_jax.tasks.GSM8K has it)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict: ...
    def reward(self, conversation: dict, response: str) -> float: ...
    def evaluate(self, conversation: dict, response: str) -> bool: ...


@dataclass(frozen=True)
class Rollout:
    """The samples of one question: prompt + completion tokens (no terminal token), masks (0 on
    the prompt and on forced tool output), one reward per sample."""

    example_idx: int
    prefix_length: int
    sequences: list[list[int]]
    masks: list[list[int]]
    rewards: np.ndarray  # (N,) float32

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(s) - self.prefix_length for s in self.sequences)


def rollout_seed(step: int, example_idx: int, sampling_step: int) -> int:
    """nanochat's sampling seed. Python hashes a tuple of ints the same way in every process
    (PYTHONHASHSEED only affects str/bytes), so runs are reproducible."""
    return hash((step, example_idx, sampling_step)) & 0x7FFFFFFF


def example_schedule(
    num_examples: int, num_steps: int, examples_per_rank: int, world_size: int
) -> np.ndarray:
    """(num_steps, world_size, examples_per_rank) question indices, in nanochat's order (rank r
    cycles through range(r, num_examples, world_size), as nanochat's get_batch)."""
    out = np.zeros((num_steps, world_size, examples_per_rank), np.int64)
    count = num_steps * examples_per_rank
    for rank in range(world_size):
        cycle = rank_cursor(num_examples, rank, world_size, restart_each_epoch=True)
        out[:, rank, :] = np.fromiter(itertools.islice(cycle, count), np.int64, count).reshape(
            num_steps, examples_per_rank
        )
    return out


def generate_rollout(
    engine: Engine,
    tokenizer: Any,
    task: RewardTask,
    example_idx: int,
    step: int,
    *,
    num_samples: int,
    device_batch_size: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    prompt: list[int] | None = None,
) -> Rollout:
    """`num_samples` completions of question `example_idx` in num_samples // device_batch_size
    generate_batch calls, each rewarded by `task.reward(conversation, decoded completion)`."""
    if num_samples % device_batch_size:
        raise ValueError(
            f"num_samples ({num_samples}) must be a multiple of device_batch_size "
            f"({device_batch_size})"
        )
    conversation = task[example_idx]
    tokens = prompt if prompt is not None else tokenizer.render_for_completion(conversation)
    sequences, masks = [], []
    for sampling_step in range(num_samples // device_batch_size):
        seqs, msks = engine.generate_batch(
            tokens,
            num_samples=device_batch_size,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=rollout_seed(step, example_idx, sampling_step),
        )
        sequences += seqs
        masks += msks
    rewards = [task.reward(conversation, tokenizer.decode(s[len(tokens) :])) for s in sequences]
    return Rollout(example_idx, len(tokens), sequences, masks, np.asarray(rewards, np.float32))


def advantages(rewards_N: np.ndarray) -> np.ndarray:
    """reward - mean over the question's samples (no division by the std)."""
    rewards_N = np.asarray(rewards_N, np.float32)
    return rewards_N - rewards_N.mean()


def pad_rollout(rollout: Rollout, pad_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs_NT, targets_NT) int32: sequences right-padded with `pad_id` (<|assistant_end|>) to
    seq_len + 1 tokens, masks with 0; targets -1 where the next token's mask is 0 (prompt, forced
    tool output, padding). Padding past the longest sample only adds ignored positions."""
    N = len(rollout.sequences)
    ids_NS = np.full((N, seq_len + 1), pad_id, np.int32)
    mask_NS = np.zeros((N, seq_len + 1), np.int32)
    for i, (seq, mask) in enumerate(zip(rollout.sequences, rollout.masks, strict=True)):
        if len(seq) > seq_len + 1:
            raise ValueError(f"a sample of {len(seq)} tokens exceeds seq_len + 1 = {seq_len + 1}")
        ids_NS[i, : len(seq)] = seq
        mask_NS[i, : len(mask)] = mask
    targets_NT = np.where(mask_NS[:, 1:] == 0, -1, ids_NS[:, 1:]).astype(np.int32)
    return ids_NS[:, :-1], targets_NT


def pass_weights(targets_BT: np.ndarray, advantages_B: np.ndarray, world_size: int) -> np.ndarray:
    """Per-token weights of one pass: adv / (valid tokens in the pass, at least 1, * world_size)
    on trained targets, 0 elsewhere (see the module docstring)."""
    valid_BT = targets_BT >= 0
    num_valid = max(int(valid_BT.sum()), 1)
    weights_BT = np.asarray(advantages_B, np.float32)[:, None] / (num_valid * world_size)
    return np.where(valid_BT, weights_BT, 0.0).astype(np.float32)


def pack_step(
    rollouts: Sequence[Sequence[Rollout]], device_batch_size: int, seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A step's rollouts, `rollouts[rank][example]`, as (inputs, targets, weights), each
    (A, B, T) with A = examples_per_rank * passes_per_example micro-batches and B = world_size *
    device_batch_size rows: micro-batch a = e * P + p holds pass p of example e of every rank,
    rank r in rows [r * device_batch_size, (r + 1) * device_batch_size)."""
    W = len(rollouts)
    if W == 0 or any(len(r) != len(rollouts[0]) for r in rollouts) or not rollouts[0]:
        raise ValueError("every rank needs the same, non-zero number of rollouts")
    inputs, targets, weights = [], [], []
    for e in range(len(rollouts[0])):
        per_rank = [pad_rollout(rollouts[r][e], pad_id, seq_len) for r in range(W)]
        num_samples = per_rank[0][0].shape[0]
        if num_samples % device_batch_size or any(x.shape[0] != num_samples for x, _ in per_rank):
            raise ValueError(
                f"every rollout needs the same number of samples, a multiple of "
                f"device_batch_size ({device_batch_size})"
            )
        for p in range(num_samples // device_batch_size):
            rows = slice(p * device_batch_size, (p + 1) * device_batch_size)
            x, y, w = [], [], []
            for r in range(W):
                adv_B = advantages(rollouts[r][e].rewards)[rows]
                x.append(per_rank[r][0][rows])
                y.append(per_rank[r][1][rows])
                w.append(pass_weights(y[-1], adv_B, W))
            inputs.append(np.concatenate(x))
            targets.append(np.concatenate(y))
            weights.append(np.concatenate(w))
    return np.stack(inputs), np.stack(targets), np.stack(weights)


def pg_loss(params, graphdef, rest, inputs_BT, targets_BT, weights_BT) -> jax.Array:
    """-sum(logp * w) of one micro-batch: the loss `train.make_train_step` differentiates."""
    nll_BT = nnx.merge(graphdef, params, rest)(inputs_BT, targets_BT, loss_reduction="none")
    return jnp.sum(nll_BT * weights_BT)


def train_seq_len(longest: int, sequence_len: int, max_len: int) -> int:
    """Length T of the compiled step's inputs for rollouts of up to `longest` tokens (prompt +
    max_new_tokens): longest - 1 rounded up to a multiple of 64 (aligned tiles, at most 63
    positions of padding), but not past the model's sequence_len unless the rollouts need it.
    One compiled step then serves every batch of the run."""
    need = longest - 1
    if need > max_len:
        raise ValueError(
            f"a prompt plus max_new_tokens reaches {longest} tokens; the model handles at most "
            f"{max_len + 1} (lower max_new_tokens)"
        )
    return max(need, min(-(-need // _SEQ_ALIGN) * _SEQ_ALIGN, sequence_len))


def pass_at_k(outcomes: Sequence[Sequence[bool]]) -> np.ndarray:
    """(K,) fraction of problems solved by any of their first k samples, k = 1..K."""
    if not outcomes or len({len(o) for o in outcomes}) != 1 or not outcomes[0]:
        raise ValueError(
            "pass_at_k needs >= 1 problem, each with the same number (>= 1) of samples"
        )
    solved_PK = np.logical_or.accumulate(np.asarray(outcomes, bool), axis=1)
    return solved_PK.mean(axis=0)


def engine_map(
    engine: Engine | EnginePool, fn: Callable[[Engine, _Item], _Result], items: Iterable[_Item]
) -> list[_Result]:
    """[fn(engine, item) for item in items]: on one Engine one after another, or spread over an
    EnginePool's replicas (one per device, as nanochat's ranks). Same results, in input order,
    either way: every item seeds its own sampling."""
    if isinstance(engine, EnginePool):
        return engine.map(fn, items)
    return [fn(engine, item) for item in items]


def evaluate_pass_at_k(
    engine: Engine | EnginePool,
    tokenizer: Any,
    task: RewardTask,
    *,
    max_examples: int,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
) -> np.ndarray:
    """pass@1..num_samples on the first `max_examples` problems (nanochat's run_gsm8k_eval:
    generate_batch's default seed, so each problem gets the same random numbers every eval).
    An EnginePool spreads the problems over its devices (nanochat strides them over ranks)."""

    def outcomes(replica: Engine, idx: int) -> list[bool]:
        conversation = task[idx]
        answers = sample_answers(
            replica,
            tokenizer,
            conversation,
            num_samples=num_samples,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
        )
        return [task.evaluate(conversation, text) for text in answers]

    return pass_at_k(engine_map(engine, outcomes, range(min(max_examples, len(task)))))
