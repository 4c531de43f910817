"""The one GPU check: environment, correctness smoke, train and decode benchmarks, in < 8 minutes.

    python3 -m bench.gpu_check                    # on the GPU machine; writes under $OUT
    uv run python -m bench.gpu_check --dry-run --out /tmp/gpu_check   # CPU rehearsal, tiny shapes

Stages, each a child process with its own time limit, skipped when the overall budget
(--budget_s) has no room left for it, so the whole run ends in time and reports what it did:

1. env: nvidia-smi, python / jax / torch versions and devices.
2. packages: import the project with the machine's own flax/optax/orbax; if that fails, unpack
   the carried wheels (--wheels: our pinned flax, optax, orbax-checkpoint) into /tmp/site and
   put that first on PYTHONPATH.
3. smoke (`--smoke`): cuDNN attention (forward + grad) vs XLA's, which implementation the model
   picks and whether the compiled train step holds cuDNN's kernel; one train step of a random
   depth-4 model in bf16 on the accelerator vs the same step in fp32 on the CPU (and fp32 at
   "highest" matmul precision, a tighter check); Engine greedy decode vs the full forward.
4. bench_train d20, then d12: JAX vs nanochat PyTorch (--nanochat) at nanochat's device batch
   32 x 2048; a JAX out-of-memory is retried once with --remat=dots; then d12 --accum-sweep.
5. bench_engine decode speed (if bench/bench_engine.py exists).

Outputs in --out (default $OUT): gpu_check.log (everything printed), gpu_check.json (all
figures), gpu_check.md (summary tables), smoke.json, train_d20.json, train_d12.json,
train_d12_accum_sweep.json (7 files: the device tool brings back at most 8).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = "/tmp/site"
_PROBE = (
    "import jax, flax, optax, orbax.checkpoint; from flax import nnx; nnx.List; "
    "import nanochat_jax.train, nanochat_jax.stage, nanochat_jax.engine; "
    "print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, "
    "'orbax', orbax.checkpoint.__version__, 'backend', jax.default_backend(), jax.devices())"
)


# ----------------------------------------------------------------------------- smoke (child)


class _StubTokenizer:
    """Special tokens outside the vocab, so greedy decoding never stops early."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode_special(self, name: str) -> int:
        return self.vocab_size + 1

    def get_bos_token_id(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def _random_params(abstract, seed: int = 0):
    """N(0, 1) embedding, N(0, 0.5^2 / fan_in) kernels: nanochat's zero-init lm_head/c_proj would
    leave every block gradient 0 on the first step."""
    import numpy as np
    from jax import tree_util

    rng = np.random.default_rng(seed)
    leaves, treedef = tree_util.tree_flatten_with_path(abstract)
    arrays = []
    for path, leaf in leaves:
        scale = 1.0 if "wte" in tree_util.keystr(path) else 0.5 / np.sqrt(leaf.shape[0])
        arrays.append((scale * rng.standard_normal(leaf.shape)).astype(np.float32))
    return tree_util.tree_unflatten(treedef, arrays)


def _attention_check() -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    from nanochat_jax import model

    out = {"model_picks": model._attention_impl(jnp.bfloat16) or "xla (not on GPU)"}
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (2, 512, 4, 128), jnp.bfloat16) for key in keys)

    def loss_and_grads(impl):
        attend = functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation=impl
        )
        fn = jax.jit(jax.value_and_grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()))
        return jax.block_until_ready(fn(q, k, v))

    reference = loss_and_grads("xla")
    if jax.default_backend() != "gpu":
        out["cudnn_runs"] = None
        return out
    try:
        value, grads = loss_and_grads("cudnn")
        attend = functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"
        )
        hlo = jax.jit(attend).lower(q, k, v).compile().as_text() or ""
        out["cudnn_custom_calls"] = sorted(set(re.findall(r"__cudnn\$\w+", hlo)))
        out["cudnn_runs"] = True
        out["cudnn_loss_rel_diff"] = float(abs(value - reference[0]) / abs(reference[0]))
        out["cudnn_grad_max_abs_diff"] = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            for a, b in zip(grads, reference[1], strict=True)
        )
    except Exception as exc:  # any failure means: fall back to XLA attention
        out["cudnn_runs"] = False
        out["cudnn_error"] = f"{type(exc).__name__}: {exc}"[:600]
    return out


def _train_step_check(dtype_name: str, device_mesh) -> dict:
    """One step (2 micro-batches of 4 x 256) of a random depth-4 model on `device_mesh`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from nanochat_jax import optim, sharding, train
    from nanochat_jax.config import GPTConfig
    from nanochat_jax.model import GPT

    config = GPTConfig.from_depth(4, 1024, 256)  # 2 heads of 128: cuDNN's head size
    abstract = nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))), nnx.Param)
    )
    host_params = _random_params(abstract)
    opt_cfg = optim.OptimConfig(model_dim=config.n_embd)

    def make_optimizer(params):
        return optim.make_optimizer(params, opt_cfg, optim.lr_multiplier_schedule(100))

    def load(params_target, _opt_target):
        place = lambda a, t: jax.device_put(a, t.sharding)  # noqa: E731
        return jax.tree.map(place, host_params, params_target), None

    # fp32 at "highest": no TF32 on the GPU, so fp32 GPU vs CPU is a tight comparison.
    precision = "highest" if dtype_name == "float32" else None
    with jax.default_matmul_precision(precision):
        state, optimizer = train.init_train_state(
            config, make_optimizer, device_mesh, compute_dtype=jnp.dtype(dtype_name), load=load
        )
        step = train.make_train_step(
            state, optimizer, accum_steps=2, micro_batch_size=4, sequence_len=256
        )
    tokens = np.random.default_rng(1).integers(0, 1024, (2, 4, 257), np.int32)  # (A, B, T+1)
    inputs = sharding.shard_batch(tokens[..., :-1], device_mesh, leading_axes=1)
    targets = sharding.shard_batch(tokens[..., 1:], device_mesh, leading_axes=1)
    params, _, metrics = step(state.params, state.opt_state, state.rest, inputs, targets)
    updates = jax.tree.map(lambda new, old: np.asarray(new) - old, params, host_params)
    return {"metrics": {k: float(v) for k, v in metrics.items()}, "updates": updates}


def _compare_steps(test: dict, ref: dict) -> dict:
    """Relative differences of loss / grad norm, and of the parameter updates per group."""
    import jax
    import numpy as np

    out = {}
    for name in ("loss", "grad_norm"):
        a, b = test["metrics"][name], ref["metrics"][name]
        out[f"{name}_rel_diff"] = abs(a - b) / abs(b)
    for group, key in (("wte", "wte"), ("lm_head", "lm_head"), ("blocks", "h")):
        a, b = (
            np.concatenate([np.ravel(x) for x in jax.tree.leaves(side["updates"][key])])
            for side in (test, ref)
        )
        out[f"{group}_update_rel_err"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        out[f"{group}_update_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return out


def _engine_check(dtype_name: str) -> dict:
    """Greedy Engine tokens vs the argmax of one full forward over the same sequence."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from nanochat_jax.config import GPTConfig
    from nanochat_jax.engine import Engine
    from nanochat_jax.model import GPT

    config = GPTConfig.from_depth(4, 1024, 256)
    model = GPT(config, rngs=nnx.Rngs(0), compute_dtype=jnp.dtype(dtype_name))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(jnp.asarray, _random_params(params, seed=2)))
    prompt = np.random.default_rng(3).integers(0, 1024, 16).tolist()
    results, _ = Engine(model, _StubTokenizer(1024)).generate_batch(
        prompt, 1, max_tokens=64, temperature=0
    )
    seq = results[0]
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray([seq], jnp.int32))
    predicted = np.asarray(jnp.argmax(logits[0, len(prompt) - 1 : len(seq) - 1], -1))
    matches = predicted == np.asarray(seq[len(prompt) :])
    return {"tokens": int(matches.size), "matching": int(matches.sum())}


def smoke(json_path: str | None) -> dict:
    import jax

    from nanochat_jax import sharding

    accel = jax.default_backend()
    report = {"backend": accel, "devices": [str(d) for d in jax.devices()]}
    report["attention"] = _attention_check()
    print("attention:", json.dumps(report["attention"]), flush=True)
    accel_mesh = sharding.make_mesh("1")
    ref = _train_step_check("float32", sharding.make_mesh("1", devices=jax.devices("cpu")))
    bf16 = _compare_steps(_train_step_check("bfloat16", accel_mesh), ref)
    fp32 = _compare_steps(_train_step_check("float32", accel_mesh), ref)
    report["train_step_bf16_vs_cpu_fp32"] = bf16
    report["train_step_fp32_vs_cpu_fp32"] = fp32
    print(f"train step, bf16 on {accel} vs fp32 on cpu: {json.dumps(bf16)}", flush=True)
    print(f"train step, fp32 on {accel} vs fp32 on cpu: {json.dumps(fp32)}", flush=True)
    report["engine_greedy"] = {dt: _engine_check(dt) for dt in ("bfloat16", "float32")}
    print("engine greedy vs full forward:", json.dumps(report["engine_greedy"]), flush=True)

    def cosine(side):
        return min(v for k, v in side.items() if k.endswith("cosine"))

    checks = {
        "bf16 step: loss within 2%": bf16["loss_rel_diff"] < 0.02,
        "bf16 step: grad norm within 5%": bf16["grad_norm_rel_diff"] < 0.05,
        "bf16 step: update cosine > 0.97 per group": cosine(bf16) > 0.97,
        "fp32 step: loss, grad norm within 1e-4": max(
            fp32["loss_rel_diff"], fp32["grad_norm_rel_diff"]
        )
        < 1e-4,
        "fp32 step: update cosine > 0.999 per group": cosine(fp32) > 0.999,
        "engine: greedy == forward argmax on >= 90% of tokens": all(
            r["matching"] >= 0.9 * r["tokens"] for r in report["engine_greedy"].values()
        ),
    }
    if accel == "gpu":
        checks["cuDNN attention runs"] = bool(report["attention"]["cudnn_runs"])
    report["checks"] = {k: bool(v) for k, v in checks.items()}
    report["passed"] = all(report["checks"].values())
    for name, ok in report["checks"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    return report


# ----------------------------------------------------------------------------- orchestrator


class _Runner:
    """Runs stages as child processes within one time budget, logging everything."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.log = open(out / "gpu_check.log", "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.stages: dict[str, dict] = {}

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str], timeout_s: float, min_s: float = 0) -> dict:
        timeout_s = min(timeout_s, self.left_s())
        if timeout_s < min_s:
            self.say(f"=== {name}: skipped, {self.left_s():.0f} s left of the budget")
            self.stages[name] = {"status": "skipped"}
            return self.stages[name]
        self.say(f"=== {name} (limit {timeout_s:.0f} s): {' '.join(command)}")
        start, lines = time.monotonic(), []
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # so a timeout kills its children too (nanochat's torch)
        )

        def pump():
            for line in proc.stdout:
                lines.append(line)
                sys.stdout.write(line)
                sys.stdout.flush()
                self.log.write(line)

        reader = threading.Thread(target=pump)
        reader.start()
        try:
            status = "ok" if proc.wait(timeout=timeout_s) == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
        reader.join()
        seconds = time.monotonic() - start
        self.say(f"=== {name}: {status} in {seconds:.1f} s")
        self.stages[name] = {"status": status, "seconds": round(seconds, 1)}
        self.stages[name]["output_tail"] = "".join(lines[-5:])[-800:]
        text = "".join(lines).lower()
        self.stages[name]["oom"] = "resource_exhausted" in text or "out of memory" in text
        return self.stages[name]


def _install_wheels(runner: _Runner, wheels: Path) -> None:
    """Unpack the carried wheels into SITE (what pip --target --no-deps does, without pip)."""
    files = sorted(wheels.glob("*.whl"))
    runner.say(f"=== install {len(files)} wheel(s) from {wheels} into {SITE}")
    for path in files:
        with zipfile.ZipFile(path) as wheel:
            wheel.extractall(SITE)
        runner.say(f"  {path.name}")
    if files:
        old = runner.env.get("PYTHONPATH")
        runner.env["PYTHONPATH"] = SITE + (os.pathsep + old if old else "")


def _train_command(args, depth: int, batch: int, steps: int, json_name: str, torch: bool):
    command = [sys.executable, "-m", "bench.bench_train", f"--depth={depth}", "--mesh=1"]
    command += [f"--steps={steps}", f"--json={args.out / json_name}"]
    if args.dry_run:
        command += ["--device_batch_size=2", "--seq_len=128", "--vocab_size=4096"]
    else:
        command += [f"--device_batch_size={batch}", "--seq_len=2048", "--vocab_size=65536"]
    if torch and (ROOT / args.nanochat / "nanochat" / "gpt.py").exists():
        command += [f"--torch-nanochat={ROOT / args.nanochat}"]
    if args.attention_fallback:
        command += ["--attention=xla"]
    return command


def _markdown(summary: dict) -> str:
    kinds = {t["device_kind"] for t in summary["train"].values()}
    rows = [f"gpu_check {summary['date']}, device {', '.join(kinds) or '?'}", ""]
    rows += ["| what | status | s |", "| --- | --- | --- |"]
    rows += [
        f"| {k} | {v['status']} | {v.get('seconds', '')} |" for k, v in summary["stages"].items()
    ]
    smoke_report = summary.get("smoke") or {}
    if smoke_report:
        rows += ["", "| smoke check | result |", "| --- | --- |"]
        rows += [
            f"| {k} | {'PASS' if ok else 'FAIL'} |" for k, ok in smoke_report["checks"].items()
        ]
        rows += ["", f"attention: `{json.dumps(smoke_report['attention'])}`"]
    rows += [
        "",
        "| model | side | step ms | tokens/s | MFU % | jax/torch | cuDNN attn | compiles |",
    ]
    rows += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, train in summary.get("train", {}).items():
        cfg = train["config"]
        label = f"{name}: B {train['device_batch_size']} x {cfg['sequence_len']}, {train['dtype']}"
        label += f", remat {train['remat']}" if train.get("remat", "none") != "none" else ""
        jax_side, torch_side = train["jax"], train.get("torch") or {}
        ratio = train.get("jax_over_torch_tokens_per_s")
        rows.append(
            f"| {label} | jax {train['jax_version']} | {1e3 * jax_side['step_s']:.1f} | "
            f"{jax_side['tokens_per_s']:,.0f} | {jax_side['mfu_percent']:.2f} | "
            f"{f'{ratio:.3f}' if ratio else ''} | {jax_side['cudnn_attention']} | "
            f"{jax_side['compiles_after_warmup']} |"
        )
        if "tokens_per_s" in torch_side:
            kind = "compiled" if torch_side["compiled"] else "eager"
            rows.append(
                f"| {label} | torch {torch_side['torch']} ({kind}) | "
                f"{1e3 * torch_side['step_s']:.1f} | {torch_side['tokens_per_s']:,.0f} | "
                f"{torch_side['mfu_percent']:.2f} | | | |"
            )
        for accum, res in (train.get("accum_sweep") or {}).items():
            rows.append(f"| {name} accum {accum} | jax | {1e3 * res['step_s']:.1f} | | | | | |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT", "/tmp/gpu_check"))
    parser.add_argument("--nanochat", default=".nanochat_ref", help="nanochat checkout (in repo)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    parser.add_argument("--budget_s", type=float, default=None, help="default 460 (GPU), 1500")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal with tiny shapes")
    parser.add_argument("--force-wheels", action="store_true", help="install wheels regardless")
    parser.add_argument("--smoke", action="store_true", help="(child) run only the smoke checks")
    parser.add_argument("--json", help="(child) where --smoke writes its report")
    args = parser.parse_args(argv)
    if args.smoke:
        sys.exit(0 if smoke(args.json)["passed"] else 1)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(args.out, args.budget_s or (1500 if args.dry_run else 460))
    py = sys.executable
    if not args.dry_run:
        runner.run("nvidia-smi", ["nvidia-smi"], 20)
    runner.run(
        "torch", [py, "-c", "import torch; print(torch.__version__, torch.version.cuda)"], 60
    )
    probe = runner.run("packages", [py, "-c", _PROBE], 90)
    if probe["status"] != "ok" or args.force_wheels:
        _install_wheels(runner, args.wheels)
        runner.run("packages (carried wheels)", [py, "-c", _PROBE], 90)
    smoke_json = args.out / "smoke.json"
    runner.run("smoke", [py, "-m", "bench.gpu_check", "--smoke", f"--json={smoke_json}"], 150)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "stages": runner.stages, "train": {}}
    summary["smoke"] = json.loads(smoke_json.read_text()) if smoke_json.exists() else None
    args.attention_fallback = (summary["smoke"] or {}).get("attention", {}).get(
        "cudnn_runs"
    ) is False
    # name, depth, batch, timed steps, time limit, least time worth starting, vs torch, sweep
    plans = [
        ("d20", 20, 32, 8, 240, 150, True, False),
        ("d12", 12, 32, 10, 150, 90, True, False),
        ("d12_accum_sweep", 12, 32, 5, 120, 75, False, True),
    ]
    if args.dry_run:
        plans = [
            (name, depth // 5, 2, 2, 300, 0, *rest) for name, depth, _, _, _, _, *rest in plans
        ]
    for name, depth, batch, steps, limit, min_s, torch, sweep in plans:
        path = args.out / f"train_{name}.json"
        command = _train_command(args, depth, batch, steps, path.name, torch)
        command += ["--accum-sweep"] if sweep else []
        result = runner.run(f"bench_train {name}", command, limit, min_s)
        first = json.loads(path.read_text()) if path.exists() else {}
        if result["status"].startswith("exit") and result.get("oom"):
            # same shapes with activation checkpointing; nanochat's figures from the first try
            retry = [c for c in command if not c.startswith("--torch-nanochat")]
            runner.run(f"bench_train {name} remat dots", [*retry, "--remat=dots"], limit, min_s)
            if path.exists() and first.get("torch"):
                again = json.loads(path.read_text())
                again["torch"] = first["torch"]
                if "jax" in again and "tokens_per_s" in again["torch"]:
                    tps = again["jax"]["tokens_per_s"], again["torch"]["tokens_per_s"]
                    again["jax_over_torch_tokens_per_s"] = tps[0] / tps[1]
                path.write_text(json.dumps(again, indent=1) + "\n")
        if path.exists() and "jax" in json.loads(path.read_text()):
            summary["train"][name] = json.loads(path.read_text())
        _write_summary(args.out, summary)
    if (ROOT / "bench" / "bench_engine.py").exists():
        # the naive baseline compiles once per 16 tokens: keep the token count modest
        shape = ["--depth=2", "--tokens=16"] if args.dry_run else ["--depth=20", "--tokens=128"]
        command = [py, "-m", "bench.bench_engine", *shape, "--vocab=65536", "--batch", "1", "8"]
        runner.run("bench_engine", [*command, "--repeats=2", "--no-tool"], 120, 45)
    _write_summary(args.out, summary)
    runner.say(_markdown(summary))
    runner.say(f"done: {runner.left_s():.0f} s of the budget left; files in {args.out}")


def _write_summary(out: Path, summary: dict) -> None:
    """Rewritten after every stage, so a run cut short still leaves its figures."""
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "gpu_check.md").write_text(_markdown(summary))


if __name__ == "__main__":
    main()
