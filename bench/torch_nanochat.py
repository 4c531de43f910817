"""nanochat's own PyTorch GPT + optimizers, stepped the way its base_train steps (for bench_train).

    uv run python -m bench.torch_nanochat --nanochat PATH --depth 4 --vocab_size 8192 \
        --batch_size 2 --seq_len 128 [--accum 1] [--steps 5] [--dtype float32] [--compile 0]

Only nanochat/gpt.py (and the muon.py, adamw.py, common.py it imports) is used from the checkout
at PATH; nanochat's compute_init and data loader assume CUDA and real data, so the set-up of its
base_train is rebuilt here: the model on the meta device, `to_empty` + `init_weights`,
`torch.compile(model, dynamic=False)`, the model's own `setup_optimizers` (non-distributed path:
fused torch AdamW + nanochat Muon), bf16 autocast, loss / accum backward per micro-batch, grad
clip 1.0, lr and momentum set per step, `zero_grad(set_to_none=True)`. Random token batches.

Precision: `bfloat16` = nanochat's (autocast, wte stored in bf16 as its __init__ does);
`float32` = no autocast, and wte is cast back to fp32, since nanochat's bf16 wte only works under
autocast (fp32 CPU comparison runs use this).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from nanochat_jax.config import GPTConfig


def _load_nanochat(path: str):
    if not (Path(path) / "nanochat" / "gpt.py").is_file():
        raise SystemExit(
            f"error: --nanochat {path}: no nanochat/gpt.py there (a nanochat checkout)"
        )
    sys.path.insert(0, str(Path(path).resolve()))
    from nanochat import gpt

    return gpt


def bench_torch_nanochat(
    nanochat_path: str,
    *,
    depth: int,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    accum: int,
    steps: int,
    warmup: int = 2,
    dtype: str = "bfloat16",
    compile_model: bool | None = None,
) -> dict:
    """Time `steps` nanochat train steps (after the first, compiling one and `warmup` more)."""
    import torch

    gpt = _load_nanochat(nanochat_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile_model = device == "cuda" if compile_model is None else compile_model
    if not compile_model:
        torch.compiler.set_stance("force_eager")  # Muon's Newton-Schulz is @torch.compile too
    torch.manual_seed(42)
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # as nanochat's compute_init
    # the same depth dial as ours (model_dim 64*depth, heads of 128), checked against nanochat
    config = gpt.GPTConfig(**GPTConfig.from_depth(depth, vocab_size, seq_len).to_dict())
    with torch.device("meta"):
        orig_model = gpt.GPT(config)
    orig_model.to_empty(device=device)
    orig_model.init_weights()
    if dtype == "float32":
        orig_model.transformer.wte.to(dtype=torch.float32)
    elif dtype != "bfloat16":
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    model = torch.compile(orig_model, dynamic=False) if compile_model else orig_model
    optimizers = orig_model.setup_optimizers()
    muon = optimizers[1]
    autocast = (
        torch.amp.autocast(device_type=device, dtype=torch.bfloat16)
        if dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        torch.randint(0, vocab_size, (2, accum, batch_size, seq_len), generator=gen).to(device)
        for _ in range(2)
    ]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train_step(batch) -> torch.Tensor:
        for micro in range(accum):
            with autocast:
                loss = model(batch[0, micro], batch[1, micro])
            train_loss = loss.detach()
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(orig_model.parameters(), 1.0)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * 1.0  # lr multiplier (flat part of schedule)
        for group in muon.param_groups:
            group["momentum"] = 0.95
        for opt in optimizers:
            opt.step()
        orig_model.zero_grad(set_to_none=True)
        return train_loss

    sync()
    start = time.perf_counter()
    try:
        train_step(batches[0])
    except Exception as exc:  # torch.compile fails in many ways
        if not compile_model:
            raise
        print(f"torch.compile failed ({type(exc).__name__}: {exc}); running eager", flush=True)
        compile_model, model = False, orig_model
        torch.compiler.set_stance("force_eager")
        orig_model.zero_grad(set_to_none=True)
        train_step(batches[0])
    sync()
    first_step_s = time.perf_counter() - start
    for i in range(warmup):
        train_step(batches[(i + 1) % 2])
    sync()
    start = time.perf_counter()
    for i in range(steps):
        loss = train_step(batches[i % 2])
    sync()
    step_s = (time.perf_counter() - start) / steps
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": dtype,
        "compiled": compile_model,
        "first_step_s": first_step_s,
        "step_s": step_s,
        "tokens_per_step": accum * batch_size * seq_len,
        "flops_per_token": orig_model.estimate_flops(),
        "final_loss": float(loss),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanochat", required=True, metavar="PATH", help="a nanochat checkout")
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--vocab_size", type=int, required=True)
    parser.add_argument("--seq_len", type=int, required=True)
    parser.add_argument("--batch_size", type=int, required=True, help="rows per micro-batch")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--compile", choices=["auto", "0", "1"], default="auto")
    parser.add_argument("--json", metavar="OUT", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if min(args.depth, args.vocab_size, args.seq_len, args.batch_size, args.accum) < 1:
        parser.error("depth, vocab_size, seq_len, batch_size and accum must be >= 1")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    result = bench_torch_nanochat(
        args.nanochat,
        depth=args.depth,
        vocab_size=args.vocab_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        accum=args.accum,
        steps=args.steps,
        warmup=args.warmup,
        dtype=args.dtype,
        compile_model=None if args.compile == "auto" else args.compile == "1",
    )
    print(json.dumps(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
