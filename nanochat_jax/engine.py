"""Inference: jitted prefill + decode over a static KV cache, sampling, and the calculator tool.

nanochat's Engine is a Python loop of PyTorch calls. Here one jitted call runs many decode steps
inside `lax.while_loop` over a preallocated cache, so the host is involved only to hand out tokens.

Shapes are bucketed so that prompts of different lengths reuse compiled code: the prompt is padded
to a power of two P (at least 16) and the cache to a power of two S >= prompt + max_tokens (both
capped at the model's rotary table). Padding is harmless: attention is causal, the logits are read
at the last real position, and the cache position is then set to the real length, so decoding
overwrites the padded slots before any query can see them. Compilations are keyed by
(num_samples, P, S, top_k); temperature, max_tokens and the seed are runtime values.

One prefill at batch 1 (in `prefill_chunk`-token pieces, so the attention scores of a long prompt
stay small), then the cache is broadcast to `num_samples` rows. As in nanochat, the first token is
sampled once from the prefill logits and given to every row (its spec, section 11.2 step 5);
`Engine(..., broadcast_first_token=False)` samples it independently per row instead. Greedy
decoding (temperature 0) is unaffected. Randomness: step t uses `fold_in(PRNGKey(seed), t)`, so a
seed gives the same tokens whether they are streamed or produced in one call.

Tool use. A row that emits `<|python_end|>` stops the loop after that step; the host runs
nanochat's per-row state machine on the streamed tokens, evaluates the expression with
`use_calculator`, and queues `<|output_start|>` + encode(str(result)) + `<|output_end|>` in the
row's on-device forced-token buffer; the loop then resumes and feeds forced tokens (mask 0) before
sampling again. The calculator cannot run in XLA, so the alternative is a host callback inside the
loop, which blocks every step on the host. Measured on the 2-core CPU (bench/bench_engine.py,
depth 4, batch 1): a tool call costs 0.2-0.4 ms (loop exit, sync, calculator, re-dispatch), about
0.15 of a decode step, a few times per answer; paying a host round trip on every step instead
(streaming one step per call) cut throughput from 788 to 552 tokens/s.

Streaming. `generate` dispatches the next chunk of `stream_chunk` steps before reading the
current one (JAX dispatch is asynchronous), so the host's work of handing out tokens overlaps the
device's decoding; the cache is donated between calls so it is updated in place. A chunk that would
start after a tool call or after every row finished runs zero steps, so speculation is safe.

Several devices (`EnginePool`). nanochat's evals and RL spread problems over their GPU ranks. Here
one process holds one Engine replica per device (`Engine.replica`: the same jitted functions,
its own copy of the weights) and one host thread per replica pulls problems from a shared list.
Threads suffice because a whole answer is one jitted call that releases the GIL while its device
decodes. Measured on the 2-core CPU with 8 fake devices (chat_eval on demo GSM8K, d8, greedy,
128 new tokens, 32 problems): one engine 183 decode steps/s, a pool of 8 250 steps/s, with the
same answers. Fake CPU devices share the cores, which bounds the gain there; on GPUs each replica
decodes on its own device (not measured yet).

Differences from nanochat: rows that have finished keep being decoded (static shapes) but their
tool calls are ignored, and `max_tokens=None` means "up to `sequence_len` total" (nanochat grows
its cache without bound), both invisible to callers. The calculator is an AST whitelist with size
bounds instead of `eval` with a 3 s alarm. On arithmetic and `'word'.count('l')` calls it gives
nanochat's answers, including its refusal of `.count(` expressions that contain words like "dir"
or "eval"; it also accepts `%`, and refuses results beyond 1e30, expressions over 1000
characters and anything else nanochat's `eval` would reach (attributes, other methods).
"""

from __future__ import annotations

import ast
import copy
import math
import operator
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from nanochat_jax.model import KVCache

MIN_BUCKET_LEN = 16  # the shortest padded length: tiny prompts share one compiled shape
_MAX_FORCED = 64  # forced-token buffer per row; calculator results are at most ~35 characters
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class TokenizerLike(Protocol):
    def encode_special(self, name: str) -> int: ...
    def get_bos_token_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


# ---- calculator ----------------------------------------------------------------------------

_MAX_EXPR_CHARS = 1000
_MAX_DEPTH = 32
_MAX_MAGNITUDE = 10**30
# nanochat's two character gates: arithmetic, or a string `.count(` expression.
_ARITH_CHARS = frozenset("0123456789*+-/.() %")
_COUNT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
# nanochat parity: its string branch refuses any expression whose lowercased text contains one of
# these, even inside the quoted word, so words such as "direct", "medieval" or "profile" get no
# tool output there. Our AST whitelist would not need it; matching keeps the same answers. The
# arithmetic branch cannot contain letters or "_", so nanochat does not check it.
_COUNT_REFUSED = (
    "__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals",
    "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr",
)  # fmt: skip
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class _Refused(Exception):
    pass


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused(f"not a number: {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Refused("not finite")
    if abs(value) > _MAX_MAGNITUDE:
        raise _Refused("too large")
    return value


def _evaluate(node: ast.AST, depth: int) -> int | float | str:
    if depth > _MAX_DEPTH:
        raise _Refused("nested too deeply")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return node.value
        return _number(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left = _number(_evaluate(node.left, depth + 1))
        right = _number(_evaluate(node.right, depth + 1))
        return _number(_BINOPS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
        return _number(_UNARYOPS[type(node.op)](_number(_evaluate(node.operand, depth + 1))))
    if (  # "text".count("t"), both string literals
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.func.value.value.count(node.args[0].value)
    raise _Refused(f"{type(node).__name__} is not allowed")


def _paren_depth(expr: str) -> int:
    depth = deepest = 0
    for char in expr:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    return deepest


def use_calculator(expr: str) -> int | float | None:
    """Value of a small arithmetic or `'text'.count('t')` expression, or None if refused.

    Commas are dropped (nanochat: "1,000"). Accepted: int/float literals, + - * / // %, unary
    +/-, parentheses, and `.count` on string literals; no `**`, names, attributes, calls or
    comprehensions. As in nanochat, a `.count(` expression containing any of `_COUNT_REFUSED`
    (case-insensitive, even inside a quoted word: `'direction'.count('d')`) is refused.
    Literals, intermediates and the result are bounded by 1e30 in magnitude, the expression by
    1000 characters and 32 levels of nesting, so evaluation takes microseconds;
    nothing is `eval`ed.
    """
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "")
    if len(expr) > _MAX_EXPR_CHARS or "**" in expr:
        return None
    chars = set(expr)
    if not chars <= _ARITH_CHARS:
        if not (chars <= _COUNT_CHARS and ".count(" in expr):
            return None
        lowered = expr.lower()
        if any(pattern in lowered for pattern in _COUNT_REFUSED):
            return None
    if _paren_depth(expr) > _MAX_DEPTH:  # parentheses leave no trace in the AST: count them
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        return _number(_evaluate(tree.body, 0))
    except (_Refused, SyntaxError, ValueError, ArithmeticError, RecursionError, MemoryError):
        return None


# ---- sampling ------------------------------------------------------------------------------


def sample_next_token(
    logits_BV: jax.Array, key: jax.Array, temperature: jax.Array | float, top_k: int | None = None
) -> jax.Array:
    """(B,) int32 ids: argmax if temperature == 0, else a sample of softmax(logits / temperature)
    restricted to the top_k logits when top_k is given (nanochat's `sample_next_token`)."""
    temperature = jnp.asarray(temperature, jnp.float32)

    def sample(logits_BV):
        scaled_BV = logits_BV / temperature
        if top_k is None:
            return jax.random.categorical(key, scaled_BV, axis=-1)
        vals_BK, idx_BK = jax.lax.top_k(scaled_BV, min(top_k, logits_BV.shape[-1]))
        choice_B = jax.random.categorical(key, vals_BK, axis=-1)
        return jnp.take_along_axis(idx_BK, choice_B[:, None], axis=-1)[:, 0]

    def greedy(logits_BV):
        return jnp.argmax(logits_BV, axis=-1)

    # A real conditional: greedy decoding does not pay for B x V random numbers per step.
    return jax.lax.cond(temperature > 0, sample, greedy, logits_BV).astype(jnp.int32)


# ---- engine --------------------------------------------------------------------------------


@struct.dataclass
class _Rows:
    """Small per-row decode state (everything but the cache); copied, never donated."""

    last_B: jax.Array  # token to forward next
    gen_BG: jax.Array  # generated tokens, column t = step t
    mask_BG: jax.Array  # 1 sampled, 0 forced
    num_generated: jax.Array  # int32 scalar, columns filled
    done_B: jax.Array  # emitted <|assistant_end|> or <|bos|>
    tool_B: jax.Array  # emitted <|python_end|> at the last step; the host must look
    forced_BF: jax.Array  # queued forced tokens
    forced_len_B: jax.Array
    forced_pos_B: jax.Array


@dataclass(frozen=True)
class _Specials:
    bos: int
    assistant_end: int
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def of(cls, tokenizer: TokenizerLike) -> _Specials:
        get = tokenizer.encode_special
        return cls(
            bos=tokenizer.get_bos_token_id(),
            assistant_end=get("<|assistant_end|>"),
            python_start=get("<|python_start|>"),
            python_end=get("<|python_end|>"),
            output_start=get("<|output_start|>"),
            output_end=get("<|output_end|>"),
        )


@dataclass
class _TraceCount:
    value: int = 0


@dataclass
class _RowTool:
    """nanochat's per-row tool state machine, run on the host over the streamed tokens."""

    in_python: bool = False
    expr_tokens: list[int] = field(default_factory=list)


def length_bucket(length: int, cap: int) -> int:
    """The padded length of a sequence of `length` tokens: the next power of two, at least
    MIN_BUCKET_LEN, at most `cap` (the model's limit), so that a few shapes are compiled. The
    Engine's prompt and cache lengths (a cache must also hold the tokens to come)."""
    return min(max(MIN_BUCKET_LEN, 1 << (length - 1).bit_length()), cap)


def half_octave_bucket(length: int, cap: int) -> int:
    """The padded length of a row of `length` tokens: the smallest of 2^k and 3 * 2^(k-1) that
    holds it, at least MIN_BUCKET_LEN, at most `cap`. Half-octave steps (16, 24, 32, 48, ...) pad
    a row by ~1/6 on average where powers of two (length_bucket) pad by ~1/3, for twice the
    compiled lengths. The one-forward evals (core_eval, chat_eval's categorical tasks), whose
    cost is the positions they forward."""
    power = max(MIN_BUCKET_LEN, 1 << (length - 1).bit_length())
    three_quarters = 3 * power // 4
    if MIN_BUCKET_LEN <= three_quarters and length <= three_quarters:
        return min(three_quarters, cap)
    return min(power, cap)


# Eval shape policy (core_eval, chat_eval's categorical tasks). Every distinct (rows, length,
# span window) shape is one compilation. On a CPU a compile costs little next to the forwards,
# so fine shapes pay: half-octave lengths, quarter-size leftover batches and span windows in
# half-octave steps forward the fewest positions. On a GPU/TPU a large model's compile costs
# seconds while its forwards take milliseconds, so coarse shapes: powers of two, full-size
# batches only, and two span windows per length (bench/RESULTS.md has the estimate).
def fine_eval_shapes(fine_shapes: bool | None = None) -> bool:
    """Whether the one-forward evals use fine shapes: `fine_shapes` when given, else whether
    the default device is a CPU."""
    if fine_shapes is None:
        return jax.devices()[0].platform == "cpu"
    return bool(fine_shapes)


def eval_length_bucket(length: int, cap: int, fine: bool) -> int:
    """A one-forward eval's padded row length: half_octave_bucket when `fine`, else
    length_bucket (the next power of two)."""
    return half_octave_bucket(length, cap) if fine else length_bucket(length, cap)


def _compute_dtype(model: nnx.Module) -> jnp.dtype:
    head = getattr(model, "lm_head", None)
    return jnp.dtype(getattr(head, "dtype", None) or jnp.float32)


class Engine:
    """Generates from a GPT (anything with `.config` and `.forward_cached(idx_BT, cache)`).

    `compute_dtype=jnp.bfloat16` runs a GPT with bf16 matmuls (parameters cast once, cache in
    bf16); None keeps the model's own. `stream_chunk`: decode steps per jitted call in `generate`.
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: TokenizerLike,
        *,
        compute_dtype: jnp.dtype | None = None,
        stream_chunk: int = 1,
        prefill_chunk: int = 512,
        broadcast_first_token: bool = True,
    ):
        if stream_chunk < 1 or prefill_chunk < 1 or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(
                f"stream_chunk must be >= 1 and prefill_chunk a power of two, got "
                f"{stream_chunk} and {prefill_chunk}"
            )
        self.config = model.config
        self.tokenizer = tokenizer
        self.specials = _Specials.of(tokenizer)
        self.stream_chunk = stream_chunk
        self.prefill_chunk = prefill_chunk
        self.broadcast_first_token = broadcast_first_token
        graphdef, params = nnx.split(model)
        model_dtype = _compute_dtype(model)
        self.compute_dtype = jnp.dtype(compute_dtype or model_dtype)
        if self.compute_dtype != model_dtype:
            model_type, config = type(model), model.config
            shell = nnx.eval_shape(
                lambda: model_type(config, rngs=nnx.Rngs(0), compute_dtype=self.compute_dtype)
            )
            graphdef = nnx.graphdef(shell)
        if self.compute_dtype != jnp.float32:
            # The matmuls cast every weight to the compute dtype anyway: do it once, not per step.
            floats = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
            params = jax.tree.map(
                lambda x: x.astype(self.compute_dtype) if floats(x) else x, params
            )
        # device arrays even for a model built from host (numpy) weights: set_params needs them
        params = jax.tree.map(jnp.asarray, params)
        self._graphdef, self._params = graphdef, params
        self._traces = _TraceCount()  # shared with replicas, which share the jitted code
        self._prefill = jax.jit(
            self._prefill_impl, static_argnames=("num_samples", "cache_len", "chunk", "top_k")
        )
        self._decode = jax.jit(self._decode_impl, static_argnames=("top_k",), donate_argnums=1)
        self._inject = jax.jit(self._inject_impl)

    def set_params(self, model_or_params: nnx.Module | Any) -> None:
        """Swap in new weights of the same shapes without recompiling (RL: the policy after each
        update). Takes a model or the pure dict of its parameters (`TrainState.params`).

        Every array is copied into the old one's dtype (the compute dtype, as in __init__) and
        placement, committed or not: jit keys its compiled code on both, and the copy lets the
        caller donate or overwrite its own arrays afterwards (a train step does).
        """
        if isinstance(model_or_params, nnx.Module):
            model_or_params = nnx.to_pure_dict(nnx.split(model_or_params)[1])
        new = dict(jax.tree_util.tree_flatten_with_path(model_or_params)[0])
        old_tree = nnx.to_pure_dict(self._params)
        old = dict(jax.tree_util.tree_flatten_with_path(old_tree)[0])
        if new.keys() != old.keys():
            names = lambda paths: sorted(jax.tree_util.keystr(p) for p in paths)  # noqa: E731
            raise ValueError(
                f"set_params needs the engine's parameter tree: missing "
                f"{names(old.keys() - new.keys())}, unexpected {names(new.keys() - old.keys())}"
            )
        for path, x in new.items():
            if np.shape(x) != old[path].shape:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} has shape {np.shape(x)}, the "
                    f"engine's has {old[path].shape}: set_params only swaps same-shape weights"
                )

        def place(x, like: jax.Array) -> jax.Array:
            if like.committed:
                x = jax.device_put(x, like.sharding, may_alias=False)
            elif isinstance(x, jax.Array) and not x.committed:
                x = jax.device_put(x, may_alias=False)
            else:  # only a host round trip makes an uncommitted copy of a committed array
                x = jnp.asarray(np.asarray(x))
            return x.astype(like.dtype)

        placed = jax.tree.map(place, model_or_params, old_tree)
        params = jax.tree.map(lambda v: v, self._params)  # a fresh State to fill
        nnx.replace_by_pure_dict(params, placed)
        self._params = params

    @property
    def num_compilations(self) -> int:
        """How many times prefill/decode were traced, i.e. compiled for a new shape. An engine
        and its replicas share this count: they trace each shape once between them (XLA then
        compiles the traced code once for each device it runs on)."""
        return self._traces.value

    def replica(self, device: jax.Device) -> Engine:
        """This engine with a copy of its parameters on `device`, for data-parallel generation
        (`EnginePool`): its prefill/decode run on that device. It shares this engine's jitted
        functions, so a shape is traced once for all replicas and only compiled per device;
        its parameters are its own (`set_params` on it changes only it)."""
        clone = copy.copy(self)
        clone._params = jax.device_put(self._params, device)
        return clone

    # ---- jitted pieces ---------------------------------------------------------------------

    def _first_rows(self, token_B: jax.Array, cache_len: int) -> _Rows:
        sp, B = self.specials, token_B.shape[0]
        gen_BG = jnp.zeros((B, cache_len), jnp.int32).at[:, 0].set(token_B)
        return _Rows(
            last_B=token_B,
            gen_BG=gen_BG,
            mask_BG=jnp.zeros((B, cache_len), jnp.int32).at[:, 0].set(1),
            num_generated=jnp.ones((), jnp.int32),
            done_B=(token_B == sp.assistant_end) | (token_B == sp.bos),
            tool_B=token_B == sp.python_end,
            forced_BF=jnp.zeros((B, _MAX_FORCED), jnp.int32),
            forced_len_B=jnp.zeros((B,), jnp.int32),
            forced_pos_B=jnp.zeros((B,), jnp.int32),
        )

    def _prefill_impl(
        self, params, prompt_1P, length, key, temperature, *, num_samples, cache_len, chunk, top_k
    ):
        self._traces.value += 1
        model = nnx.merge(self._graphdef, params)
        cache = KVCache.init(self.config, 1, cache_len, self.compute_dtype)

        def prefill_piece(i, carry):
            cache, last_V = carry
            piece_1C = jax.lax.dynamic_slice_in_dim(prompt_1P, i * chunk, chunk, axis=1)
            logits_1CV, cache = model.forward_cached(piece_1C, cache.replace(pos=i * chunk))
            j = length - 1 - i * chunk  # the last real position, if it is in this piece
            row_V = jax.lax.dynamic_index_in_dim(logits_1CV[0], jnp.clip(j, 0, chunk - 1), 0, False)
            return cache, jnp.where((j >= 0) & (j < chunk), row_V, last_V)

        num_pieces = (length + chunk - 1) // chunk
        last_V = jnp.zeros((self.config.vocab_size,), jnp.float32)
        cache, last_V = jax.lax.fori_loop(0, num_pieces, prefill_piece, (cache, last_V))
        first_key = jax.random.fold_in(key, 0)
        if self.broadcast_first_token:
            token_B = jnp.broadcast_to(
                sample_next_token(last_V[None], first_key, temperature, top_k), (num_samples,)
            )
        else:
            logits_BV = jnp.broadcast_to(last_V, (num_samples, last_V.shape[0]))
            token_B = sample_next_token(logits_BV, first_key, temperature, top_k)
        shape = (cache.k.shape[0], num_samples, *cache.k.shape[2:])
        cache = KVCache(jnp.broadcast_to(cache.k, shape), jnp.broadcast_to(cache.v, shape), length)
        return cache, self._first_rows(token_B, cache_len)

    def _decode_impl(self, params, cache, rows, key, temperature, max_tokens, steps, *, top_k):
        self._traces.value += 1
        model = nnx.merge(self._graphdef, params)
        sp = self.specials
        row_ids_B = jnp.arange(rows.last_B.shape[0])

        def running(carry):
            _, rows, i = carry
            return (
                (i < steps)
                & (rows.num_generated < max_tokens)
                & ~jnp.all(rows.done_B)
                & ~jnp.any(rows.tool_B)
            )

        def step(carry):
            cache, rows, i = carry
            logits_B1V, cache = model.forward_cached(rows.last_B[:, None], cache)
            step_key = jax.random.fold_in(key, rows.num_generated)
            sampled_B = sample_next_token(logits_B1V[:, 0], step_key, temperature, top_k)
            forced_B = rows.forced_pos_B < rows.forced_len_B
            queued_B = rows.forced_BF[row_ids_B, jnp.minimum(rows.forced_pos_B, _MAX_FORCED - 1)]
            token_B = jnp.where(forced_B, queued_B, sampled_B)
            column = (0, rows.num_generated)
            rows = rows.replace(
                last_B=token_B,
                gen_BG=jax.lax.dynamic_update_slice(rows.gen_BG, token_B[:, None], column),
                mask_BG=jax.lax.dynamic_update_slice(
                    rows.mask_BG, (~forced_B).astype(jnp.int32)[:, None], column
                ),
                num_generated=rows.num_generated + 1,
                done_B=rows.done_B | (token_B == sp.assistant_end) | (token_B == sp.bos),
                tool_B=(token_B == sp.python_end) & ~rows.done_B,
                forced_pos_B=rows.forced_pos_B + forced_B,
            )
            return cache, rows, i + 1

        cache, rows, _ = jax.lax.while_loop(running, step, (cache, rows, jnp.zeros((), jnp.int32)))
        return cache, rows

    @staticmethod
    def _inject_impl(rows, new_B, forced_BF, forced_len_B):
        return rows.replace(
            forced_BF=jnp.where(new_B[:, None], forced_BF, rows.forced_BF),
            forced_len_B=jnp.where(new_B, forced_len_B, rows.forced_len_B),
            forced_pos_B=jnp.where(new_B, 0, rows.forced_pos_B),
            tool_B=jnp.zeros_like(rows.tool_B),
        )

    # ---- host loop -------------------------------------------------------------------------

    def _check(self, tokens, num_samples, max_tokens, temperature, top_k) -> int:
        V, limit = self.config.vocab_size, self.config.rotary_seq_len
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError("tokens must be a non-empty list of token ids")
        if not all(isinstance(t, (int, np.integer)) and 0 <= t < V for t in tokens):
            raise ValueError(f"every token id must be an int in [0, {V})")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if max_tokens is None:
            max_tokens = self.config.sequence_len - len(tokens)
            if max_tokens < 1:
                raise ValueError(
                    f"the prompt ({len(tokens)} tokens) fills the model's sequence_len "
                    f"({self.config.sequence_len}); pass max_tokens explicitly"
                )
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be None or an int >= 1, got {max_tokens!r}")
        if len(tokens) + max_tokens - 1 > limit:
            raise ValueError(
                f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                f"maximum length {limit} (10 * sequence_len)"
            )
        return max_tokens

    def _run(
        self, tokens, num_samples, max_tokens, temperature, top_k, seed, steps
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (tokens_BT, masks_BT) numpy blocks of new columns as they come off the device."""
        max_tokens = self._check(tokens, num_samples, max_tokens, temperature, top_k)
        n, limit = len(tokens), self.config.rotary_seq_len
        cache_len = length_bucket(n + max_tokens, limit)
        prompt_len = length_bucket(n, limit)
        chunk = min(self.prefill_chunk, prompt_len)
        if prompt_len % chunk:  # a capped, non-power-of-two bucket: prefill it in one piece
            chunk = prompt_len
        prompt_1P = np.zeros((1, prompt_len), np.int32)
        prompt_1P[0, :n] = tokens
        key = jax.random.PRNGKey(seed)
        temperature = jnp.float32(temperature)
        cache, rows = self._prefill(
            self._params,
            prompt_1P,
            jnp.int32(n),
            key,
            temperature,
            num_samples=num_samples,
            cache_len=cache_len,
            chunk=chunk,
            top_k=top_k,
        )
        decode_args = (key, temperature, jnp.int32(max_tokens), jnp.int32(steps))
        tools = [_RowTool() for _ in range(num_samples)]
        done = np.zeros(num_samples, bool)
        emitted = 0
        while True:
            # Dispatch the next chunk before reading this one: the device keeps decoding while the
            # host hands out tokens. It runs zero steps if this chunk ended on a tool or finished.
            next_cache, next_rows = self._decode(
                self._params, cache, rows, *decode_args, top_k=top_k
            )
            gen_BG, mask_BG, num_generated, done_B, tool_B = jax.device_get(
                (rows.gen_BG, rows.mask_BG, rows.num_generated, rows.done_B, rows.tool_B)
            )
            new_BT = gen_BG[:, emitted:num_generated]
            forced = self._tool_results(tools, new_BT, done)
            done = done_B.copy()
            emitted = int(num_generated)
            if new_BT.shape[1]:
                yield new_BT, mask_BG[:, emitted - new_BT.shape[1] : emitted]
            if emitted >= max_tokens or done.all():
                return
            if tool_B.any():
                next_rows = self._inject(next_rows, *self._forced_arrays(forced, num_samples))
            cache, rows = next_cache, next_rows

    def _tool_results(self, tools, new_BT, done_B) -> dict[int, list[int]]:
        """Steps nanochat's tool state machine over new columns; forced tokens per row."""
        sp, forced = self.specials, {}
        for row, tool in enumerate(tools):
            for token in [] if done_B[row] else new_BT[row].tolist():
                if token in (sp.assistant_end, sp.bos):
                    break  # finished rows' tool calls are ignored, on the device too
                if token == sp.python_start:
                    tool.in_python, tool.expr_tokens = True, []
                elif token == sp.python_end and tool.in_python:
                    tool.in_python = False
                    result = None
                    if tool.expr_tokens:
                        result = use_calculator(self.tokenizer.decode(tool.expr_tokens))
                    if result is not None:
                        ids = self.tokenizer.encode(str(result))
                        forced[row] = [sp.output_start, *ids, sp.output_end]
                    tool.expr_tokens = []
                elif tool.in_python:
                    tool.expr_tokens.append(token)
        return forced

    @staticmethod
    def _forced_arrays(forced: dict[int, list[int]], num_samples: int):
        new_B = np.zeros(num_samples, bool)
        forced_BF = np.zeros((num_samples, _MAX_FORCED), np.int32)
        forced_len_B = np.zeros(num_samples, np.int32)
        for row, ids in forced.items():
            if len(ids) > _MAX_FORCED:
                raise ValueError(f"calculator output of {len(ids)} tokens exceeds {_MAX_FORCED}")
            new_B[row], forced_len_B[row] = True, len(ids)
            forced_BF[row, : len(ids)] = ids
        return new_B, forced_BF, forced_len_B

    # ---- public API ------------------------------------------------------------------------

    def generate(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Streams (token_column, token_masks), one entry per row, one step at a time.

        Stops after max_tokens steps or when every row has emitted <|assistant_end|>/<|bos|>
        (that token is yielded). Masks are 1 for sampled tokens and 0 for forced tool output.
        """
        run = self._run(
            tokens, num_samples, max_tokens, temperature, top_k, seed, self.stream_chunk
        )
        for tokens_BT, masks_BT in run:
            for t in range(tokens_BT.shape[1]):
                yield tokens_BT[:, t].tolist(), masks_BT[:, t].tolist()

    def generate_batch(
        self, tokens: list[int], num_samples: int = 1, **kwargs: Any
    ) -> tuple[list[list[int]], list[list[int]]]:
        """(results, masks): per row the prompt + generated tokens up to (not including) its
        <|assistant_end|>/<|bos|>, and masks that are 0 on the prompt and on forced tokens.
        kwargs: max_tokens, temperature, top_k, seed as in `generate`. Decodes in one jitted call
        (plus one per tool call)."""
        unknown = set(kwargs) - {"max_tokens", "temperature", "top_k", "seed"}
        if unknown:
            raise ValueError(
                f"unknown arguments {sorted(unknown)}; allowed: max_tokens, "
                "temperature, top_k, seed"
            )
        args = {"max_tokens": None, "temperature": 1.0, "top_k": None, "seed": 42} | kwargs
        max_tokens = self._check(
            tokens, num_samples, args["max_tokens"], args["temperature"], args["top_k"]
        )
        sp = self.specials
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        run = self._run(
            tokens,
            num_samples,
            max_tokens,
            args["temperature"],
            args["top_k"],
            args["seed"],
            max_tokens,
        )
        for tokens_BT, masks_BT in run:
            for row in range(num_samples):
                for token, mask in zip(
                    tokens_BT[row].tolist(), masks_BT[row].tolist(), strict=True
                ):
                    if completed[row]:
                        break
                    if token in (sp.assistant_end, sp.bos):
                        completed[row] = True
                    else:
                        results[row].append(token)
                        masks[row].append(mask)
        return results, masks


# ---- data-parallel pool ------------------------------------------------------------------


class EnginePool:
    """One Engine replica per device, and work items spread over them (nanochat strides eval
    problems and RL rollouts over its GPU ranks; here one process drives every device).

    `pool.map(fn, items)` calls `fn(engine, item)` for every item, each on some replica, in one
    host thread per replica: a replica's thread takes the next unclaimed item as soon as its
    previous one is done (problems differ in length), and the results come back in input order.
    The threads overlap because JAX releases the GIL while a device computes and a whole answer
    is one jitted decode loop (plus one call per tool use). An item's result does not depend on
    the replica that ran it: same compiled code, same seed.

    The replicas share their jitted code (`Engine.replica`): a new shape is traced once and
    compiled once per device. `model` may live on one device or be sharded over a mesh; every
    replica gets a full copy of the weights (in `compute_dtype`, see Engine), so the model must
    fit on one device, as in nanochat. engine_kwargs: Engine's keyword arguments.
    """

    def __init__(
        self,
        model: nnx.Module,
        tokenizer: TokenizerLike,
        *,
        devices: list[jax.Device] | None = None,
        **engine_kwargs: Any,
    ):
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices or len(set(devices)) != len(devices):
            raise ValueError(f"devices must be distinct and at least one, got {devices}")
        first = Engine(model, tokenizer, **engine_kwargs)
        others = [first.replica(device) for device in devices[1:]]
        # The template itself becomes replica 0 (its jitted functions hold on to it, so a
        # separate template would keep a second copy of the weights alive).
        first._params = jax.device_put(first._params, devices[0])
        self.engines: list[Engine] = [first, *others]
        self.devices = devices
        self.config = first.config
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.engines)

    @property
    def num_compilations(self) -> int:
        """Shapes traced so far, shared by all replicas (see Engine.num_compilations)."""
        return self.engines[0].num_compilations

    def set_params(self, model_or_params: nnx.Module | Any) -> None:
        """Engine.set_params on every replica: new weights of the same shapes, no recompilation
        (RL: the policy after each update). Each replica copies them onto its device."""
        for engine in self.engines:
            engine.set_params(model_or_params)

    def imap(
        self, fn: Callable[[Engine, _Item], _Result], items: Iterable[_Item]
    ) -> Iterator[_Result]:
        """Yields fn(engine, item) for every item, in input order, as soon as it and every item
        before it are done; the replicas work ahead meanwhile. The first exception raised by fn
        is re-raised here (at its item's turn); unstarted items are then abandoned. Closing the
        iterator early waits for the items in progress (up to one per replica)."""
        items = list(items)
        results: list[Future] = [Future() for _ in items]
        claim = threading.Lock()
        next_item = 0
        stop = threading.Event()

        def work(engine: Engine) -> None:
            nonlocal next_item
            while not stop.is_set():
                with claim:
                    index, next_item = next_item, next_item + 1
                if index >= len(items):
                    return
                try:
                    results[index].set_result(fn(engine, items[index]))
                except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
                    results[index].set_exception(e)
                    stop.set()

        workers = [
            threading.Thread(target=work, args=(engine,), name=f"engine-{device}", daemon=True)
            for engine, device in zip(self.engines, self.devices, strict=True)
        ]
        for worker in workers[: len(items)]:
            worker.start()
        try:
            for result in results:
                yield result.result()
        finally:
            stop.set()
            for worker in workers[: len(items)]:
                worker.join()

    def map(self, fn: Callable[[Engine, _Item], _Result], items: Iterable[_Item]) -> list[_Result]:
        """[fn(engine, item) for item in items], spread over the replicas (see imap)."""
        return list(self.imap(fn, items))
