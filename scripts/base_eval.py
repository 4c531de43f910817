"""The CORE metric of the base model (nanochat's scripts/base_eval.py, in JAX).

    python -m scripts.base_eval                          # latest base checkpoint, every example
    python -m scripts.base_eval --mesh=8                 # batches split over 8 devices
    python -m scripts.base_eval --max_per_task=100       # a quick estimate

Needs the eval bundle in <base_dir>/eval_bundle (`python -m nanochat_jax.eval_bundle`, or the
offline `--demo` one). Writes <base_dir>/base_eval/base_model_{step:06d}.csv (one row per task:
accuracy and centered accuracy, then CORE), prints it, and logs the report section
"Base model evaluation". nanochat's optional HuggingFace-model argument is not supported.
"""

from __future__ import annotations

import dataclasses
import sys

import jax

from nanochat_jax import report, stage
from nanochat_jax.common import atomic_write_text, get_base_dir
from nanochat_jax.core_eval import evaluate_core
from nanochat_jax.eval_bundle import bundle_dir, is_demo, validate_bundle
from nanochat_jax.tokenizer import get_tokenizer


@dataclasses.dataclass
class BaseEvalConfig:
    model_tag: str = ""  # default: the largest dN under base_checkpoints
    step: int = -1  # -1: the latest
    max_per_task: int = -1  # crop each task to this many examples (-1: all)
    mesh: str = "1"
    dtype: str = "auto"  # auto = bf16 on GPU (nanochat's autocast), fp32 on CPU
    batch_rows: int = 64  # rows per device and forward
    batch_tokens: int = 8192  # rows x padded length per device and forward
    max_seq_len: int = -1  # left-crop rows to this (-1: the rotary table, 10x sequence_len, which
    # is what nanochat's own models see: it crops only Hugging Face models)


def results_csv(results: dict, centered: dict, core_metric: float) -> str:
    """nanochat's CSV: padded `Task, Accuracy, Centered` rows, then `CORE, , value`."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, accuracy in results.items():
        lines.append(f"{label:<35}, {accuracy:<10.6f}, {centered[label]:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {core_metric:<10.6f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    cfg = stage.parse_config(BaseEvalConfig, argv, __doc__.split("\n\n")[0])
    bundle = bundle_dir()
    try:  # the whole bundle, before minutes of model loading and compiling
        validate_bundle(bundle)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    mesh = stage.setup_devices(cfg.mesh)
    try:
        tokenizer = get_tokenizer()
        model, meta = stage.load_model(
            "base",
            model_tag=cfg.model_tag or None,
            step=cfg.step if cfg.step >= 0 else None,
            compute_dtype=stage.compute_dtype(cfg.dtype),
            mesh=mesh,
        )
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    step = meta["step"]
    model_name = f"base_model (step {step})"
    demo = is_demo(bundle)
    if demo:
        print("note: the offline demo eval bundle; its CORE is not comparable with nanochat's")
    out = evaluate_core(
        model,
        tokenizer,
        bundle,
        max_per_task=cfg.max_per_task,
        batch_rows=cfg.batch_rows,
        batch_tokens=cfg.batch_tokens,
        max_seq_len=cfg.max_seq_len if cfg.max_seq_len > 0 else None,
    )
    results, centered, core_metric = out["results"], out["centered_results"], out["core_metric"]
    if jax.process_index() != 0:
        return
    table = results_csv(results, centered, core_metric)
    csv_path = get_base_dir() / "base_eval" / f"base_model_{step:06d}.csv"
    atomic_write_text(csv_path, table)
    print("=" * 80)
    print(f"Model: {model_name}")
    print("=" * 80)
    print(table, flush=True)
    summary = {"Model": model_name, "CORE metric": core_metric}
    if demo:
        summary["Eval bundle"] = "offline demo (not comparable with nanochat)"
    report.log_section("Base model evaluation", [summary, centered])


if __name__ == "__main__":
    main()
