"""Evaluation speed: CORE and chat categorical eval, nanochat_jax vs nanochat's own PyTorch code.

    uv run python -m bench.bench_eval --torch-nanochat PATH [--depth 4] [--vocab 8192]
        [--seq-len 2048] [--bundle DIR] [--max-per-task N] [--tokenizer DIR]
        [--task-base-dir DIR] [--chat-tasks ARC-Easy MMLU] [--max-problems N] [--batch-size 8]
        [--no-core] [--work-dir DIR] [--json OUT]

Both sides get the same model, tokenizer and data:
* model: GPTConfig.from_depth(--depth) with random weights (nanochat's init zeroes lm_head, so
  every option would tie), rounded through bf16 so that `convert.to_nanochat_state_dict`'s bf16
  wte is exact; nanochat's GPT loads that state dict and keeps wte in fp32. fp32 on both sides.
* tokenizer: ours (--tokenizer DIR, or one trained here with `Tokenizer.train_from_iterator` on
  the demo stdlib text at --vocab); nanochat's `RustBPETokenizer` wraps `to_tiktoken()` of it.
* CORE: the tasks of --bundle DIR, or of the offline demo bundle (`eval_bundle --demo`, written
  into the work dir), each shuffled with Random(1337) and cropped to --max-per-task as base_eval
  does. Ours: `core_eval.evaluate_task` (batched, length buckets); nanochat's:
  `nanochat.core_eval.evaluate_task` (one forward per example). --no-core: chat only.
* chat: `chat_eval.run_chat_eval(name, ..., task=...)` vs nanochat's
  `scripts/chat_eval.py::run_categorical_eval`, both handed the same task object of ours
  (nanochat's task classes load Hugging Face datasets; its eval loop only needs len, [i] and
  evaluate). Task data: --task-base-dir (a base dir with task_data/), else the offline demo
  tasks (`demo_tasks`) written into the work dir. The prompts that both tokenizers render are
  checked identical first.

Timing: JAX runs every eval twice: the first (cold) run compiles, the second is timed; the
compile time is reported as cold minus warm and as XLA's own compile-event total. nanochat runs
in a child process (so torch and XLA never share the cores at once), eager, after a warm-up on a
few examples of each task. On a GPU torch uses cuda, JAX its default backend.

Threads (CPU): by default (--threads 1) the process is pinned to one CPU core before XLA starts
(its thread pools and the torch child inherit the affinity), XLA's Eigen threading is off and
torch gets one thread: one core each, which also keeps the figures steady on a machine shared
with other jobs, where torch's default OpenMP threads (one per core) can run many times slower
than one thread. --threads default leaves both frameworks their own thread pools on every core.
The "CPU cores busy" figures (CPU time / wall time) show what each side really used; the "per
CPU second" rates (work / CPU time) are the steadier comparison when other jobs share the core.

Both reports also count the token positions each side forwards. CORE: nanochat pads an
example's rows to its longest; ours pads rows to half-octave length buckets and fills each batch
with dummy rows (counted as the batches run). Chat: nanochat pads a batch's prompts to its
longest; ours are counted as the batches run. On a compute-bound CPU padding costs part of what
batching saves.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import platform
import random
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_TOKENIZER_TEXT_CHARS = 2_000_000
_TORCH_WARMUP_EXAMPLES = 4  # per CORE task; chat: one batch
_XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false"  # dots and convolutions on one thread


# ---- set-up ---------------------------------------------------------------------------------


@dataclass
class _CoreTask:
    label: str
    meta: dict
    data: list[dict]


class _CompileClock:
    """Sums XLA's backend compile time in this process (listeners cannot be removed)."""

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_s: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            self.seconds += duration_s


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-nanochat", metavar="PATH", help="a nanochat checkout")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192, help="of the tokenizer trained here")
    parser.add_argument("--seq-len", type=int, default=2048, help="model sequence_len")
    parser.add_argument("--tokenizer", metavar="DIR", help="our tokenizer dir (default: train)")
    parser.add_argument("--bundle", metavar="DIR", help="a CORE eval bundle (default: demo)")
    parser.add_argument("--max-per-task", type=int, default=-1, help="CORE examples; -1: all")
    parser.add_argument("--task-base-dir", metavar="DIR", help="base dir holding task_data/")
    parser.add_argument("--chat-tasks", nargs="*", default=["ARC-Easy", "MMLU"])
    parser.add_argument("--max-problems", type=int, default=None, help="per chat task")
    parser.add_argument("--batch-size", type=int, default=8, help="chat categorical batch")
    parser.add_argument("--no-core", action="store_true", help="chat categorical eval only")
    parser.add_argument(
        "--threads",
        choices=["1", "default"],
        default="1",
        help="1 (default): each side pinned to one CPU core, one compute thread; default: "
        "each framework's own threads on every core",
    )
    parser.add_argument("--work-dir", metavar="DIR", help="default: a temporary directory")
    parser.add_argument("--json", metavar="OUT", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.depth < 1 or args.seq_len < 16 or args.batch_size < 1:
        parser.error("--depth must be >= 1, --seq-len >= 16, --batch-size >= 1")
    if args.max_problems is not None and args.max_problems < 1:
        parser.error("--max-problems must be >= 1")
    from nanochat_jax.chat_eval import BASELINE_ACCURACY

    for name in args.chat_tasks:
        if name not in ("ARC-Easy", "ARC-Challenge", "MMLU"):
            known = [k for k in BASELINE_ACCURACY if k.startswith(("ARC", "MMLU"))]
            parser.error(f"--chat-tasks: {name!r} is not categorical; allowed: {known}")
    for flag, path in (("--bundle", args.bundle), ("--tokenizer", args.tokenizer)):
        if path and not Path(path).is_dir():
            parser.error(f"{flag} {path}: no such directory")
    if args.torch_nanochat and not (Path(args.torch_nanochat) / "nanochat" / "gpt.py").is_file():
        parser.error(f"--torch-nanochat {args.torch_nanochat}: no nanochat/gpt.py there")
    return args


def _tokenizer(args, work: Path):
    """Ours, loaded or trained, and the dir it is saved in (the child loads it from there)."""
    from nanochat_jax.tokenizer import Tokenizer

    if args.tokenizer:
        return Tokenizer.load(args.tokenizer), Path(args.tokenizer)
    from nanochat_jax.demo_data import stdlib_documents

    docs = stdlib_documents(_TOKENIZER_TEXT_CHARS)
    tokenizer = Tokenizer.train_from_iterator(iter(docs), args.vocab)
    tokenizer.save(work / "tokenizer")
    return tokenizer, work / "tokenizer"


def _core_tasks(bundle: Path, max_per_task: int) -> list[_CoreTask]:
    from nanochat_jax.eval_bundle import load_task_data, read_tasks

    tasks = []
    for task in read_tasks(bundle):
        data = load_task_data(bundle, task)
        random.Random(1337).shuffle(data)  # base_eval's order and crop
        if max_per_task > 0:
            data = data[:max_per_task]
        tasks.append(_CoreTask(task.label, task.task_meta(), data))
    return tasks


def _random_model(config, seed: int = 0):
    """Scaled normal weights, every value exactly representable in bf16."""
    from nanochat_jax.model import GPT

    model = GPT(config, rngs=nnx.Rngs(seed), compute_dtype=np.float32)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    scaled = [
        (0.5 * jax.random.normal(k, x.shape) / np.sqrt(x.shape[0]))
        .astype(jax.numpy.bfloat16)
        .astype(np.float32)
        for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, scaled))
    return model


def _core_positions(tokenizer, tasks: list[_CoreTask], max_len: int) -> dict[str, int]:
    """Token positions forwarded over all tasks: the rows' real tokens, and nanochat's (each
    example's rows padded to its longest). Ours are counted as they run (`_jax_core`). On a CPU
    the forward is compute-bound, so these explain most of the speed difference."""
    from nanochat_jax import core_eval

    out = {"real": 0, "nanochat": 0}
    bos = tokenizer.get_bos_token_id()
    for task in tasks:
        task_type, shots = task.meta["task_type"], task.meta["num_fewshot"]
        delimiter = task.meta["continuation_delimiter"]
        for idx, item in enumerate(task.data):
            fewshot = [task.data[i] for i in core_eval.fewshot_indices(idx, len(task.data), shots)]
            prompts = core_eval.render_prompts(item, task_type, delimiter, fewshot)
            encoded = tokenizer.encode(prompts, prepend=bos)
            rows, _, _ = core_eval.continuation_spans(encoded, task_type)
            lengths = [min(len(row), max_len) for row in rows]
            out["real"] += sum(lengths)
            out["nanochat"] += len(lengths) * max(lengths)
    return out


def _chat_positions(tokenizer, task, num_problems: int, batch_size: int) -> dict[str, int]:
    """Prompt tokens of the first `num_problems` problems, and the positions nanochat forwards
    (batches of `batch_size` problems in order, each padded to its longest prompt)."""
    lengths = [len(tokenizer.render_for_completion(task[i])) for i in range(num_problems)]
    nanochat = sum(
        len(lengths[i : i + batch_size]) * max(lengths[i : i + batch_size])
        for i in range(0, num_problems, batch_size)
    )
    return {"real": sum(lengths), "nanochat": nanochat}


@contextlib.contextmanager
def _counting_forwards(counts: dict[str, int], module, name: str, tokens_arg: int):
    """Counts the batches and token positions (padding and dummy rows included) of every call of
    the jitted forward `module.name` (whose positional argument `tokens_arg` is the token
    batch), by wrapping it; the function itself stays the same."""
    forward = getattr(module, name)

    def counting(*args, **kwargs):
        counts["jax"] = counts.get("jax", 0) + args[tokens_arg].size
        counts["batches"] = counts.get("batches", 0) + 1
        return forward(*args, **kwargs)

    setattr(module, name, counting)
    try:
        yield
    finally:
        setattr(module, name, forward)


# ---- JAX side ---------------------------------------------------------------------------------


def _jax_core(model, tokenizer, tasks: list[_CoreTask], clock: _CompileClock) -> dict:
    from nanochat_jax import core_eval
    from nanochat_jax.core_eval import evaluate_task

    out = {"tasks": {}, "forwarded": {}}
    for phase in ("cold", "warm"):
        compile_before, total, cpu_before = clock.seconds, 0.0, time.process_time()
        # the cold run counts what is forwarded (same batches as the warm run's)
        counting = _counting_forwards(out["forwarded"], core_eval, "_score_rows", 3)
        with counting if phase == "cold" else contextlib.nullcontext():
            for task in tasks:
                start = time.perf_counter()
                accuracy = evaluate_task(model, tokenizer, task.data, task.meta)
                seconds = time.perf_counter() - start
                total += seconds
                row = out["tasks"].setdefault(task.label, {})
                if phase == "warm" and row["accuracy"] != accuracy:
                    raise AssertionError(f"{task.label}: cold and warm runs disagree")
                row.update(accuracy=accuracy, seconds=seconds)
        out[f"{phase}_s"] = total
        out[f"{phase}_cpu_s"] = time.process_time() - cpu_before
        out[f"{phase}_compile_s"] = clock.seconds - compile_before
    return out


def _jax_chat(model, tokenizer, tasks: dict, batch_size, max_problems, clock) -> dict:
    from nanochat_jax import chat_eval

    out = {}
    for name, task in tasks.items():
        row = {"forwarded": {}}
        for phase in ("cold", "warm"):
            compile_before, cpu_before = clock.seconds, time.process_time()
            # the cold run counts what is forwarded (same batches as the warm run's)
            counting = _counting_forwards(row["forwarded"], chat_eval, "_answer_logits", 2)
            start = time.perf_counter()
            with counting if phase == "cold" else contextlib.nullcontext():
                accuracy = chat_eval.run_chat_eval(
                    name,
                    model,
                    tokenizer,
                    batch_size=batch_size,
                    max_problems=max_problems,
                    task=task,
                    progress=False,
                )
            row[f"{phase}_s"] = time.perf_counter() - start
            if phase == "warm" and row["accuracy"] != accuracy:
                raise AssertionError(f"{name}: cold and warm runs disagree")
            row["accuracy"] = accuracy
            row[f"{phase}_cpu_s"] = time.process_time() - cpu_before
            row[f"{phase}_compile_s"] = clock.seconds - compile_before
        out[name] = row
    return out


# ---- nanochat side (child process) --------------------------------------------------------------


def _import_nanochat_chat_eval(path: Path):
    """nanochat's scripts/chat_eval.py as a module. Its task imports need Hugging Face
    `datasets` at import time only; a stub stands in when it is not installed (the loop under
    test never loads a dataset: it is handed our task objects)."""
    import importlib.util

    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("bench_eval: Hugging Face datasets is stubbed out")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    spec = importlib.util.spec_from_file_location(
        "nanochat_scripts_chat_eval", path / "scripts" / "chat_eval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_side(spec: dict) -> dict:
    """nanochat's CORE and categorical chat evals, timed, on the weights in spec["weights"]."""
    import torch

    path = Path(spec["nanochat"]).resolve()
    sys.path.insert(0, str(path))
    from nanochat import core_eval, gpt
    from nanochat.tokenizer import RustBPETokenizer

    from nanochat_jax.tasks import get_task
    from nanochat_jax.tokenizer import Tokenizer

    chat_eval = _import_nanochat_chat_eval(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = Tokenizer.load(spec["tokenizer_dir"])
    tokenizer = RustBPETokenizer(ours.to_tiktoken(), "<|bos|>")
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**spec["config"]))
    model.to_empty(device=device)
    model.init_weights()  # the rotary buffers; every parameter is overwritten below
    with np.load(spec["weights"]) as npz:
        state = {k: torch.from_numpy(npz[k]) for k in npz.files}
    model.load_state_dict(state, strict=True)
    model.transformer.wte.to(torch.float32)  # nanochat's bf16 wte works only under autocast
    model.eval()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if spec["single_thread"]:
        torch.set_num_threads(1)

    out = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "core": {"tasks": {}},
        "chat": {},
    }
    quiet = contextlib.redirect_stdout(io.StringIO())  # nanochat prints its own "Final: ..."
    # warm-up: a few examples of every task (eager torch: allocator, kernels, jinja templates)
    for _, meta, data in spec["core_tasks"]:
        core_eval.evaluate_task(model, tokenizer, data[:_TORCH_WARMUP_EXAMPLES], device, meta)
    total, cpu_before = 0.0, time.process_time()
    for label, meta, data in spec["core_tasks"]:
        sync()
        start = time.perf_counter()
        accuracy = core_eval.evaluate_task(model, tokenizer, data, device, meta)
        sync()
        seconds = time.perf_counter() - start
        total += seconds
        out["core"]["tasks"][label] = {"accuracy": accuracy, "seconds": seconds}
    out["core"]["warm_s"] = total
    out["core"]["warm_cpu_s"] = time.process_time() - cpu_before

    for name in spec["chat_tasks"]:
        task = get_task(name)
        n = len(task) if spec["max_problems"] is None else min(len(task), spec["max_problems"])
        mismatched = sum(
            ours.render_for_completion(task[i]) != tokenizer.render_for_completion(task[i])
            for i in range(n)
        )
        with quiet:
            chat_eval.run_categorical_eval(task, tokenizer, model, spec["batch_size"], 1)
            sync()
            start, cpu_before = time.perf_counter(), time.process_time()
            accuracy = chat_eval.run_categorical_eval(
                task, tokenizer, model, spec["batch_size"], max_problems=spec["max_problems"]
            )
            sync()
        out["chat"][name] = {
            "accuracy": accuracy,
            "warm_s": time.perf_counter() - start,
            "warm_cpu_s": time.process_time() - cpu_before,
            "problems": n,
            "prompt_mismatches": mismatched,
        }
    return out


def _run_torch(spec: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_torch_side, spec).result()


# ---- report -------------------------------------------------------------------------------------


def _count(accuracy: float, n: int) -> int:
    """Examples right (nanochat's mean is a float32 tensor's, so compare counts, not floats)."""
    return round(accuracy * n)


def _ratio(ours_s: float, theirs_s: float) -> str:
    return f"{theirs_s / ours_s:.2f}x"


def _cores(row: dict, key: str = "warm") -> str:
    return f"{row[f'{key}_cpu_s'] / row[f'{key}_s']:.1f}"


def _print_core(tasks: list[_CoreTask], jax_core: dict, torch_core: dict | None) -> list[str]:
    problems = []
    n_total = sum(len(t.data) for t in tasks)
    print(f"\nCORE: {len(tasks)} tasks, {n_total} examples (examples/s, warm)")
    head = f"  {'task':24s} {'type':17s} {'n':>4s} {'acc JAX':>8s} {'JAX':>7s}"
    if torch_core:
        head += f" {'acc nanochat':>12s} {'nanochat':>8s} {'same acc':>8s} {'JAX/nanochat':>12s}"
    print(head)
    for task in tasks:
        ours = jax_core["tasks"][task.label]
        n = len(task.data)
        line = f"  {task.label:24s} {task.meta['task_type']:17s} {n:4d}"
        line += f" {ours['accuracy']:8.4f} {n / ours['seconds']:7.1f}"
        if torch_core:
            theirs = torch_core["tasks"][task.label]
            diff = _count(theirs["accuracy"], n) - _count(ours["accuracy"], n)
            if diff:
                problems.append(f"CORE {task.label}: nanochat gets {diff:+d} example(s) right")
            line += f" {theirs['accuracy']:12.4f} {n / theirs['seconds']:8.1f}"
            line += f" {'yes' if not diff else 'NO':>8s}"
            line += f" {_ratio(ours['seconds'], theirs['seconds']):>12s}"
        print(line)
    warm = jax_core["warm_s"]
    line = f"  {'all':24s} {'':17s} {n_total:4d} {'':8s} {n_total / warm:7.1f}"
    if torch_core:
        theirs = torch_core["warm_s"]
        line += f" {'':12s} {n_total / theirs:8.1f} {'':8s} {_ratio(warm, theirs):>12s}"
    print(line)
    line = f"  {'all, per CPU second':42s} {n_total:4d} {'':8s}"
    line += f" {n_total / jax_core['warm_cpu_s']:7.1f}"
    if torch_core:
        theirs = torch_core["warm_cpu_s"]
        line += f" {'':12s} {n_total / theirs:8.1f} {'':8s}"
        line += f" {_ratio(jax_core['warm_cpu_s'], theirs):>12s}"
    print(line)
    print(
        f"  JAX: {warm:.2f} s warm ({_cores(jax_core)} CPU cores busy); first run "
        f"{jax_core['cold_s']:.2f} s, so compile ~{jax_core['cold_s'] - warm:.2f} s (XLA "
        f"compile events {jax_core['cold_compile_s']:.2f} s; in the warm run "
        f"{jax_core['warm_compile_s']:.2f} s)"
    )
    if torch_core:
        print(f"  nanochat: {torch_core['warm_s']:.2f} s ({_cores(torch_core)} CPU cores busy)")
    positions = jax_core["positions"]
    print(
        f"  token positions forwarded: {positions['real']} real; nanochat "
        f"{positions['nanochat']} (x{positions['nanochat'] / positions['real']:.2f}), JAX "
        f"{positions['jax']} (x{positions['jax'] / positions['real']:.2f}: length buckets and "
        f"dummy rows, in {jax_core['forwarded']['batches']} batches)"
    )
    return problems


def _print_chat(
    jax_chat: dict, torch_chat: dict | None, n_problems: dict, batch_size: int
) -> list[str]:
    problems = []
    print(f"\nchat categorical eval, batch {batch_size} (problems/s, warm)")
    head = f"  {'task':14s} {'n':>4s} {'acc JAX':>8s} {'JAX':>7s}"
    if torch_chat:
        head += f" {'acc nanochat':>12s} {'nanochat':>8s} {'same acc':>8s} {'JAX/nanochat':>12s}"
    print(head + f"  {'JAX first run (compile)':s}")
    for name, ours in jax_chat.items():
        n = n_problems[name]
        line = f"  {name:14s} {n:4d} {ours['accuracy']:8.4f} {n / ours['warm_s']:7.1f}"
        if torch_chat:
            theirs = torch_chat[name]
            diff = _count(theirs["accuracy"], n) - _count(ours["accuracy"], n)
            if diff:
                problems.append(f"chat {name}: nanochat gets {diff:+d} problem(s) right")
            if theirs["prompt_mismatches"]:
                problems.append(
                    f"chat {name}: {theirs['prompt_mismatches']} prompt(s) render differently"
                )
            line += f" {theirs['accuracy']:12.4f} {n / theirs['warm_s']:8.1f}"
            line += f" {'yes' if not diff else 'NO':>8s}"
            line += f" {_ratio(ours['warm_s'], theirs['warm_s']):>12s}"
        line += (
            f"  {ours['cold_s']:.2f} s (~{ours['cold_s'] - ours['warm_s']:.2f} s; XLA "
            f"{ours['cold_compile_s']:.2f} s)"
        )
        print(line)
        line = f"  {'  per CPU s':14s} {'':4s} {'':8s} {n / ours['warm_cpu_s']:7.1f}"
        if torch_chat:
            theirs = torch_chat[name]["warm_cpu_s"]
            line += f" {'':12s} {n / theirs:8.1f} {'':8s} {_ratio(ours['warm_cpu_s'], theirs):>12s}"
        print(line)
    cores = ", ".join(f"{name} {_cores(row)}" for name, row in jax_chat.items())
    print(f"  CPU cores busy: JAX {cores}", end="")
    if torch_chat:
        cores = ", ".join(f"{name} {_cores(row)}" for name, row in torch_chat.items())
        identical = all(not row["prompt_mismatches"] for row in torch_chat.values())
        print(f"; nanochat {cores}. Prompts rendered identically by both tokenizers: ", end="")
        print("yes" if identical else "NO", end="")
    print()
    for name, ours in jax_chat.items():
        positions, forwarded = ours["positions"], ours["forwarded"]
        print(
            f"  token positions forwarded, {name}: {positions['real']} real; nanochat "
            f"{positions['nanochat']} (x{positions['nanochat'] / positions['real']:.2f}), JAX "
            f"{forwarded['jax']} (x{forwarded['jax'] / positions['real']:.2f}, in "
            f"{forwarded['batches']} batches)"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    pinned = None
    if args.threads == "1":
        # Before the backend starts (first use, below): the thread pools XLA makes then, and the
        # torch child process, inherit this thread's affinity. XLA_FLAGS is read then too.
        pinned = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {_XLA_ONE_THREAD}".strip()
    clock = _CompileClock()
    load_start = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_eval_")))
        from nanochat_jax.config import GPTConfig
        from nanochat_jax.convert import to_nanochat_state_dict
        from nanochat_jax.demo_tasks import write_demo_tasks
        from nanochat_jax.eval_bundle import write_demo_bundle
        from nanochat_jax.tasks import get_task

        tokenizer, tokenizer_dir = _tokenizer(args, work)
        bundle, core_tasks = None, []
        if not args.no_core:
            bundle = Path(args.bundle) if args.bundle else write_demo_bundle(work)
            core_tasks = _core_tasks(bundle, args.max_per_task)
        task_base = Path(args.task_base_dir) if args.task_base_dir else work
        if not args.task_base_dir:
            write_demo_tasks(base_dir=work)
        # get_task reads <base dir>/task_data; the child process inherits the variable
        os.environ["NANOCHAT_JAX_BASE_DIR"] = str(task_base)
        chat_tasks = {name: get_task(name) for name in args.chat_tasks}
        n_problems = {
            name: len(t) if args.max_problems is None else min(len(t), args.max_problems)
            for name, t in chat_tasks.items()
        }
        config = GPTConfig.from_depth(args.depth, tokenizer.get_vocab_size(), args.seq_len)
        model = _random_model(config)
        print(
            f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
            f"float32; depth {args.depth} (d={config.n_embd}, {config.n_head} heads), vocab "
            f"{config.vocab_size}, sequence_len {config.sequence_len}; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average {load_start:.1f}; "
            + (f"both sides pinned to CPU {pinned}" if pinned is not None else "default threads")
        )
        print(f"CORE bundle: {bundle or 'none'}; chat task data: {task_base / 'task_data'}")

        torch_out = None
        if args.torch_nanochat:
            weights = work / "weights.npz"
            state = {k: np.asarray(v, np.float32) for k, v in to_nanochat_state_dict(model).items()}
            np.savez(weights, **state)
            spec = {
                "nanochat": args.torch_nanochat,
                "config": config.to_dict(),
                "weights": str(weights),
                "tokenizer_dir": str(tokenizer_dir),
                "core_tasks": [(t.label, t.meta, t.data) for t in core_tasks],
                "chat_tasks": list(args.chat_tasks),
                "max_problems": args.max_problems,
                "batch_size": args.batch_size,
                "single_thread": args.threads == "1",
            }
            start = time.perf_counter()
            torch_out = _run_torch(spec)
            print(
                f"nanochat (torch {torch_out['torch']}, {torch_out['device']}, "
                f"{torch_out['threads']} thread(s), eager, float32) done in "
                f"{time.perf_counter() - start:.0f} s"
            )
        jax_core = None
        if core_tasks:
            jax_core = _jax_core(model, tokenizer, core_tasks, clock)
            jax_core["positions"] = _core_positions(tokenizer, core_tasks, config.rotary_seq_len)
            jax_core["positions"]["jax"] = jax_core["forwarded"]["jax"]
        jax_chat = _jax_chat(
            model, tokenizer, chat_tasks, args.batch_size, args.max_problems, clock
        )
        for name, row in jax_chat.items():
            row["positions"] = _chat_positions(
                tokenizer, chat_tasks[name], n_problems[name], args.batch_size
            )
    problems = []
    if jax_core:
        problems += _print_core(core_tasks, jax_core, torch_out and torch_out["core"])
    problems += _print_chat(jax_chat, torch_out and torch_out["chat"], n_problems, args.batch_size)
    print(f"\nload average: {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    for line in problems:
        print(f"MISMATCH: {line}")
    if args.json:
        result = {"args": vars(args), "jax_core": jax_core, "jax_chat": jax_chat}
        result["torch"] = torch_out
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
