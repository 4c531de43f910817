"""Training throughput: step time, tokens/s and MFU of the sharded train step, vs nanochat.

    uv run python -m bench.bench_train --depth 4 --mesh 8 [--device_batch_size B] [--seq_len T]
        [--vocab_size V] [--accum A] [--steps N] [--warmup 2] [--dtype auto|bfloat16|float32]
        [--remat none|dots|full] [--peak_flops 989e12] [--accum-sweep] [--attention auto|xla]
        [--torch-nanochat PATH] [--torch-compile auto|0|1] [--json OUT]

The model, optimizer and AOT-compiled step are built as scripts/base_train builds them (mesh,
GPTConfig.from_depth, nanochat's optimizer groups and schedules, `init_train_state`,
`make_train_step`), fed random token batches instead of the data loader. Warm-up: compile plus
--warmup steps; then --steps steps are timed as one block, ended by `block_until_ready` on the
new parameters and metrics (dispatch is asynchronous, so per-step host timing would only measure
dispatch). MFU is nanochat's: flops_per_token * tokens_per_step / step time / (peak * devices).
Compilations are counted with a `jax.monitoring` listener on XLA's backend-compile event: after
warm-up the count must stay 0 (the step is AOT-compiled, so a shape change would raise instead).

Defaults follow the backend: on GPU nanochat's shapes (batch 32 per device, seq 2048, vocab
65536), on CPU tiny ones (2, 128, 8192) so that `--mesh 8` over 8 fake CPU devices (set here
with `jax_num_cpu_devices` when the mesh asks for more than one) finishes in seconds.

--torch-nanochat PATH runs nanochat's own PyTorch GPT + optimizers (bench/torch_nanochat.py) in a
child process first, on the same physical device with the same global shapes (one torch
micro-batch = the mesh's whole micro-batch), then frees it before JAX takes the GPU's memory.
The comparison is fair on one physical device (`--mesh 1` on a GPU); fake CPU devices share one
CPU, so there the JAX MFU (divided by 8 "devices") means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import optim, sharding, stage, train
from nanochat_jax.config import GPTConfig
from nanochat_jax.metrics import H100_BF16_PEAK_FLOPS, flops_per_token, mfu_percent

# XLA's "an executable was compiled" event (jax.monitoring); cache hits do not fire it.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_GPU_DEFAULTS = {"device_batch_size": 32, "seq_len": 2048, "vocab_size": 65536}
_CPU_DEFAULTS = {"device_batch_size": 2, "seq_len": 128, "vocab_size": 8192}


class _CompileCounter:
    """Counts XLA compilations in this process (listeners cannot be removed, so one per run)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_s: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            self.count += 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--mesh", default="1", help="devices: 8, or axes like data=2,fsdp=4")
    parser.add_argument("--device_batch_size", type=int, help="rows per device per micro-batch")
    parser.add_argument("--seq_len", type=int)
    parser.add_argument("--vocab_size", type=int)
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("--remat", choices=["none", "dots", "full"], default="none")
    parser.add_argument("--peak_flops", type=float, default=H100_BF16_PEAK_FLOPS)
    parser.add_argument("--accum-sweep", action="store_true", help="also time accum 1, 2, 4")
    parser.add_argument("--torch-nanochat", metavar="PATH", help="a nanochat checkout")
    parser.add_argument("--torch-compile", choices=["auto", "0", "1"], default="auto")
    parser.add_argument(
        "--attention",
        choices=["auto", "xla"],
        default="auto",
        help="xla: never cuDNN attention (fallback if this CUDA build's cuDNN path breaks)",
    )
    parser.add_argument("--json", metavar="OUT", help="write the figures here (also midway)")
    args = parser.parse_args(argv)
    for name in ("depth", "device_batch_size", "seq_len", "vocab_size", "accum", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if args.warmup < 0 or args.peak_flops <= 0:
        parser.error("--warmup must be >= 0 and --peak_flops > 0")
    try:
        args.mesh_sizes = sharding.parse_mesh_spec(args.mesh)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _time_jax(state, optimizer, *, accum, batch, seq_len, vocab, steps, warmup, counter) -> dict:
    """Compile the step for these shapes, warm up, time `steps` steps; state is advanced."""
    start = time.perf_counter()
    step_fn = train.make_train_step(
        state, optimizer, accum_steps=accum, micro_batch_size=batch, sequence_len=seq_len
    )
    compile_s = time.perf_counter() - start
    # cuDNN attention shows as a custom call such as __cudnn$fmhaSoftmax in the compiled HLO
    cudnn_attention = bool(re.search(r"cudnn\$\w*(fmha|flash|sdpa)", step_fn.as_text() or "", re.I))
    rng = np.random.default_rng(0)
    batches = [
        tuple(
            sharding.shard_batch(
                rng.integers(0, vocab, (accum, batch, seq_len), np.int32),
                state.mesh,
                leading_axes=1,
            )
            for _ in range(2)
        )
        for _ in range(2)
    ]

    def run(n: int, offset: int = 0):
        metrics = None
        for i in range(n):
            inputs, targets = batches[(i + offset) % 2]
            state.params, state.opt_state, metrics = step_fn(
                state.params, state.opt_state, state.rest, inputs, targets
            )
        jax.block_until_ready((state.params, metrics))
        return metrics

    start = time.perf_counter()
    run(warmup)
    warmup_s = time.perf_counter() - start
    compiles_before = counter.count
    start = time.perf_counter()
    metrics = run(steps, offset=warmup)
    step_s = (time.perf_counter() - start) / steps
    return {
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "step_s": step_s,
        "tokens_per_step": accum * batch * seq_len,
        "compiles_after_warmup": counter.count - compiles_before,
        "cudnn_attention": cudnn_attention,
        "final_loss": float(metrics["loss"]),
    }


def _run_torch(args, vocab: int, seq_len: int, batch: int, dtype_name: str) -> dict:
    """nanochat in a child process, so its GPU memory is released before JAX needs it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "torch.json"
        command = [
            sys.executable,
            "-m",
            "bench.torch_nanochat",
            f"--nanochat={args.torch_nanochat}",
            f"--depth={args.depth}",
            f"--vocab_size={vocab}",
            f"--seq_len={seq_len}",
            f"--batch_size={batch}",
            f"--accum={args.accum}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--dtype={dtype_name}",
            f"--compile={args.torch_compile}",
            f"--json={out}",
        ]
        print("torch nanochat:", " ".join(command[1:]), flush=True)
        root = Path(__file__).resolve().parent.parent
        done = subprocess.run(command, cwd=root, stdout=subprocess.DEVNULL, check=False)
        if done.returncode or not out.exists():
            return {"error": f"bench.torch_nanochat exited with status {done.returncode}"}
        return json.loads(out.read_text())


def _rate_line(name: str, result: dict, flops_per_tok: int, peak: float, devices: int) -> str:
    tokens_per_s = result["tokens_per_step"] / result["step_s"]
    result["tokens_per_s"] = tokens_per_s
    result["mfu_percent"] = mfu_percent(
        tokens_per_s, flops_per_tok, num_devices=devices, peak_flops_per_device=peak
    )
    return (
        f"{name:14s} step {1e3 * result['step_s']:9.1f} ms | {tokens_per_s:12,.0f} tok/s | "
        f"MFU {result['mfu_percent']:6.3g}% | loss {result['final_loss']:.3f}"
    )


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    num_devices = int(np.prod(list(args.mesh_sizes.values())))
    if num_devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        jax.config.update("jax_num_cpu_devices", num_devices)  # only the CPU backend reads it
    # JAX's GPU allocator stops at 75% of the memory by default; torch's may take it all.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if args.torch_nanochat:
        # JAX would otherwise reserve that memory at start-up, before nanochat's child runs.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.attention == "xla":
        os.environ["NANOCHAT_JAX_ATTENTION"] = "xla"  # read by model.py at trace time
    counter = _CompileCounter()
    mesh = stage.setup_devices(args.mesh)
    dtype = stage.compute_dtype(args.dtype)
    on_cpu = jax.devices()[0].platform == "cpu"
    defaults = _CPU_DEFAULTS if on_cpu else _GPU_DEFAULTS
    device_batch = args.device_batch_size or defaults["device_batch_size"]
    seq_len = args.seq_len or defaults["seq_len"]
    vocab = args.vocab_size or defaults["vocab_size"]
    dp = sharding.data_parallel_size(mesh)
    batch = device_batch * dp  # rows of one micro-batch over the whole mesh
    config = GPTConfig.from_depth(args.depth, vocab, seq_len)
    flops_per_tok = flops_per_token(config)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "dtype": jnp.dtype(dtype).name,
        "mesh": dict(mesh.shape),
        "config": config.to_dict(),
        "device_batch_size": device_batch,
        "accum": args.accum,
        "remat": args.remat,
        "flops_per_token": flops_per_tok,
        "peak_flops": args.peak_flops,
        "command": "python -m bench.bench_train " + " ".join(argv or sys.argv[1:]),
    }
    print(
        f"{report['backend']} ({report['device_kind']}) x{mesh.size}, mesh {dict(mesh.shape)}, "
        f"{report['dtype']} | depth {args.depth}: d={config.n_embd}, {config.n_head} heads, vocab "
        f"{vocab}, seq {seq_len} | {flops_per_tok:.3e} FLOPs/token | micro-batch {device_batch} "
        f"x {dp} devices, accum {args.accum}, remat {args.remat}",
        flush=True,
    )
    torch_result = None
    if args.torch_nanochat:
        torch_result = report["torch"] = _run_torch(args, vocab, seq_len, batch, report["dtype"])
        if "error" in torch_result:
            print(f"torch nanochat: {torch_result['error']}")
            torch_result = None
        else:
            name = "torch (compiled)" if torch_result["compiled"] else "torch (eager)"
            print(_rate_line(name, torch_result, flops_per_tok, args.peak_flops, 1), flush=True)
            print(
                f"torch {torch_result['torch']} on {torch_result['device']}: first step "
                f"{torch_result['first_step_s']:.1f} s, nanochat's estimate_flops "
                f"{torch_result['flops_per_token']:.3e}",
                flush=True,
            )
        _save(report, args.json)  # kept if the JAX side then fails (e.g. out of memory)

    opt_cfg = optim.OptimConfig(model_dim=config.n_embd)
    lr_schedule = optim.lr_multiplier_schedule(10**6)  # the flat part, as early in a real run

    def make_optimizer(params):
        return optim.make_optimizer(params, opt_cfg, lr_schedule, optim.muon_momentum_schedule())

    start = time.perf_counter()
    state, optimizer = train.init_train_state(
        config, make_optimizer, mesh, compute_dtype=dtype, remat=args.remat
    )
    jax.block_until_ready(state.params)
    report["init_s"] = time.perf_counter() - start
    timing = dict(batch=batch, seq_len=seq_len, vocab=vocab, counter=counter)
    jax_result = _time_jax(
        state, optimizer, accum=args.accum, steps=args.steps, warmup=args.warmup, **timing
    )
    report["jax"] = jax_result
    print(
        f"jax: init {report['init_s']:.1f} s, compile {jax_result['compile_s']:.1f} s, warm-up "
        f"{args.warmup} steps {jax_result['warmup_s']:.1f} s, compilations during the "
        f"{args.steps} timed steps: {jax_result['compiles_after_warmup']}, cuDNN attention in "
        f"the step: {jax_result['cudnn_attention']}",
        flush=True,
    )
    print(_rate_line("jax", jax_result, flops_per_tok, args.peak_flops, mesh.size))
    if torch_result:
        ratio = jax_result["tokens_per_s"] / torch_result["tokens_per_s"]
        report["jax_over_torch_tokens_per_s"] = ratio
        print(f"jax / torch nanochat tokens/s: {ratio:.3f}x", flush=True)
    if args.accum_sweep:
        sweep = {}
        for accum in (1, 2, 4):
            result = jax_result if accum == args.accum else None
            result = result or _time_jax(
                state, optimizer, accum=accum, steps=args.steps, warmup=args.warmup, **timing
            )
            sweep[accum] = result
            per_micro = result["step_s"] / accum / (sweep[1]["step_s"])
            print(
                f"accum {accum}: step {1e3 * result['step_s']:9.1f} ms, per micro-batch "
                f"{per_micro:.2f}x accum 1's step, compilations after warm-up "
                f"{result['compiles_after_warmup']}"
            )
        report["accum_sweep"] = sweep
    _save(report, args.json)
    return report


def _save(report: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
