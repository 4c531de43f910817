"""Bits per byte of the base model on the train and val splits, plus greedy samples
(nanochat's scripts/base_loss.py), and the unigram baseline that a model which learnt must beat.

    python -m scripts.base_loss
    python -m scripts.base_loss --device_batch_size=16 --split_tokens=1048576 --mesh=8
"""

from __future__ import annotations

import dataclasses
import sys

from nanochat_jax import report, sharding, stage
from nanochat_jax.loss_eval import evaluate_bpb, unigram_bpb
from nanochat_jax.tokenizer import get_token_bytes, get_tokenizer


@dataclasses.dataclass
class BaseLossConfig:
    device_batch_size: int = 32
    split_tokens: int = 20 * 524288  # tokens evaluated per split
    model_tag: str = ""
    model_step: int = -1  # -1: the latest
    mesh: str = "1"
    dtype: str = "auto"


def main(argv: list[str] | None = None) -> None:
    cfg = stage.parse_config(BaseLossConfig, argv, __doc__.split("\n\n")[0])
    mesh = stage.setup_devices(cfg.mesh)
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes()
    model, meta = stage.load_model(
        "base",
        model_tag=cfg.model_tag or None,
        step=cfg.model_step if cfg.model_step >= 0 else None,
        compute_dtype=stage.compute_dtype(cfg.dtype),
        mesh=mesh,
    )
    seq_len = meta["model_config"]["sequence_len"]
    dp = sharding.data_parallel_size(mesh)
    tokens_per_step = cfg.device_batch_size * seq_len * dp
    if cfg.split_tokens % tokens_per_step:
        sys.exit(
            f"error: split_tokens={cfg.split_tokens} must be a multiple of device_batch_size * "
            f"sequence_len * data-parallel devices = {tokens_per_step}"
        )
    steps = cfg.split_tokens // tokens_per_step

    def loader(split: str):
        return stage.data_loader(tokenizer, mesh, cfg.device_batch_size, seq_len, split)

    results = {}
    for split in ("train", "val"):
        results[f"{split} bpb"] = evaluate_bpb(
            model, stage.sharded_batches(loader(split), mesh), steps, token_bytes
        )
        print(f"{split} bpb: {results[f'{split} bpb']:.4f}", flush=True)
    baseline = unigram_bpb(loader("train"), loader("val"), steps, token_bytes)
    results["unigram baseline val bpb"] = baseline
    print(f"unigram baseline val bpb: {baseline:.4f} (a model that learnt is below this)")

    samples = stage.sample_completions(model, tokenizer)
    for text in samples:
        print(text, flush=True)
    report.log_section(
        "Base model loss",
        [results, {f"sample {i}": text for i, text in enumerate(samples)}],
    )


if __name__ == "__main__":
    main()
