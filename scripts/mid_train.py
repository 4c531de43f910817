"""Midtrain the base model on conversations (nanochat's scripts/mid_train.py, in JAX).

    python -m scripts.mid_train                                  # the largest base model
    python -m scripts.mid_train --mesh=8 --device_batch_size=16
    python -m scripts.mid_train ... --resume=1                   # continue from the last save

Teaches the chat format, tool use and multiple choice: one epoch over SmolTalk + MMLU
auxiliary_train + GSM8K, training on every token of each rendered conversation like pretraining
(--extra_tasks=identity,spelling adds nanochat's later identity conversations and 200K + 80K
SimpleSpelling/SpellingBee rows, see tasks/mixtures.py).
The lr stays flat until 80% of the data is seen, then falls linearly to 0; Muon's momentum goes
0.85 -> 0.95 over 300 steps; no gradient clipping. The train mixture is rendered up front, which
gives the number of steps and each step's lr (see chat_data). Saves to mid_checkpoints/<tag>
(params + optimizer state); logs to the console, TensorBoard and metrics.jsonl under
<base_dir>/runs/<tag>/mid, and the report section "Midtraining".
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from nanochat_jax import checkpoint, optim, report, sharding, stage, train
from nanochat_jax.chat_data import MidTrainData, mid_val_batches, render_all
from nanochat_jax.common import get_base_dir, get_logger
from nanochat_jax.loss_eval import evaluate_bpb
from nanochat_jax.metrics import H100_BF16_PEAK_FLOPS, MetricsWriter
from nanochat_jax.tokenizer import get_token_bytes, get_tokenizer

log = get_logger("mid_train")


@dataclasses.dataclass
class MidTrainConfig:
    run: str = "dummy"  # nanochat's wandb run name; kept for flag compatibility
    model_tag: str = ""  # base model to start from (default: the largest dN)
    step: int = -1  # its step (-1: the latest)
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU (nanochat: bfloat16)
    max_seq_len: int = 2048
    device_batch_size: int = 32
    unembedding_lr: float = 0.004
    embedding_lr: float = 0.2
    matrix_lr: float = 0.02
    init_lr_frac: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 150
    eval_tokens: int = 20 * 524288
    total_batch_size: int = 524288
    dry_run: bool = False  # no checkpoint, no report
    # ours
    num_iterations: int = -1  # > 0: stop after this many steps (nanochat's later flag)
    world_size: int = 0  # nanochat DDP ranks whose data order to follow (0: data-parallel devices)
    mesh: str = "1"
    remat: str = "none"
    resume: bool = False
    save_every: int = -1  # also save every N steps (-1: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    peak_flops: float = H100_BF16_PEAK_FLOPS
    # nanochat's later additions to the mixture (tasks.mixtures): "identity", "spelling"
    extra_tasks: str = ""  # comma-separated; "" = 2bc521a's mixture
    spelling_rows: str = ""  # "SIMPLE,BEE" rows of SimpleSpelling, SpellingBee; "" = 200K,80K


def load_mixtures(
    extra: tuple[str, ...] = (), spelling_rows: tuple[int, int] | None = None
) -> tuple[Any, Any]:
    """nanochat's (train, val) mixtures for midtraining, with the opt-in extras
    (tasks.mixtures)."""
    from nanochat_jax.tasks.mixtures import mid_mixtures

    return mid_mixtures(extra, spelling_rows)


def _check(cfg: MidTrainConfig) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """Every flag, before any work: one error line for the first bad one. Returns the parsed
    --extra_tasks and --spelling_rows."""
    from nanochat_jax.tasks.mixtures import parse_extras

    positive = ("max_seq_len", "device_batch_size", "total_batch_size", "eval_tokens")
    stage.check_flags(cfg, positive=(*positive, "log_every", "keep_checkpoints", "peak_flops"))
    if cfg.step < -1 or cfg.world_size < 0:
        sys.exit(
            f"error: --step must be >= -1 and --world_size >= 0, got {cfg.step}, {cfg.world_size}"
        )
    if cfg.num_iterations == 0 or cfg.num_iterations < -1:
        sys.exit(
            f"error: --num_iterations must be -1 (one epoch) or >= 1, got {cfg.num_iterations}"
        )
    try:
        return parse_extras(cfg.extra_tasks, cfg.spelling_rows)
    except ValueError as e:
        sys.exit(f"error: {e}")


def main(argv: list[str] | None = None) -> None:
    cfg = stage.parse_config(MidTrainConfig, argv, __doc__.split("\n\n")[0])
    extra, spelling_rows = _check(cfg)
    mesh = stage.setup_devices(cfg.mesh)
    base_dir = get_base_dir()
    world = cfg.world_size or sharding.data_parallel_size(mesh)
    try:
        dtype = stage.compute_dtype(cfg.dtype)
        ranks = stage.local_ranks(world, mesh)
        accum = train.grad_accum_steps(
            cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, world
        )
        tokenizer = get_tokenizer()
        token_bytes = get_token_bytes()
        source = stage.load_source(
            "base", cfg.model_tag or None, None if cfg.step < 0 else cfg.step, tokenizer
        )
    except (FileNotFoundError, checkpoint.CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    config, model_tag = source.config, source.tag
    if cfg.max_seq_len > config.rotary_seq_len:
        sys.exit(
            f"error: --max_seq_len={cfg.max_seq_len} exceeds the base model's rotary table "
            f"({config.rotary_seq_len} = 10 x its sequence_len)"
        )
    # nanochat saves the midtraining context as the model's sequence_len
    saved_config = {**config.to_dict(), "sequence_len": cfg.max_seq_len}
    base_batch_size = source.meta.get("device_batch_size")
    if base_batch_size is not None and cfg.device_batch_size > base_batch_size:
        log.warning(
            "FOOTGUN WARNING: base model training used device_batch_size %d, did you pass in a "
            "good --device_batch_size to this script?",
            base_batch_size,
        )
    try:
        train_ds, val_ds = load_mixtures(extra, spelling_rows)
    except (ImportError, OSError, ValueError) as e:
        sys.exit(f"error: cannot load the midtraining tasks: {e}")

    t0 = time.perf_counter()
    rendered = render_all(tokenizer, train_ds)
    render_s = time.perf_counter() - t0
    log.info(
        "rendered the train mixture: %d conversations, %d tokens in %.1fs",
        len(rendered),
        len(rendered.tokens),
        render_s,
    )
    try:
        data = MidTrainData(
            rendered,
            batch_size=cfg.device_batch_size,
            seq_len=cfg.max_seq_len,
            world_size=world,
            ranks=ranks,
            accum_steps=accum,
            max_steps=cfg.num_iterations,
        )
        val_batches = mid_val_batches(
            tokenizer,
            val_ds,
            batch_size=cfg.device_batch_size,
            seq_len=cfg.max_seq_len,
            world_size=world,
            ranks=ranks,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    steps_total = data.num_steps
    lrm_by_step = (cfg.init_lr_frac * data.lr_multipliers()).astype(np.float32)
    print(
        f"{len(rendered):,} conversations, {len(rendered.tokens):,} tokens: {steps_total} steps of "
        f"{cfg.total_batch_size:,} tokens ({accum} micro-batches of {cfg.device_batch_size}x"
        f"{cfg.max_seq_len} per rank, {world} ranks); one epoch is {data.epoch_steps} steps"
    )

    # nanochat clips only in base training
    opt_cfg = optim.OptimConfig.from_flags(cfg, config.n_embd, grad_clip=0.0)
    lrm_table = jnp.asarray(lrm_by_step)
    last = len(lrm_by_step) - 1

    def make_optimizer(params):
        # the progress-based multiplier of every step, looked up by the optimizer's step count
        return optim.make_optimizer(
            params,
            opt_cfg,
            lambda step: lrm_table[jnp.minimum(step, last)],
            optim.muon_momentum_schedule(),
        )

    ckpt = checkpoint.Checkpointer(
        checkpoint.checkpoint_dir("mid", model_tag), max_to_keep=cfg.keep_checkpoints
    )
    resuming = cfg.resume and ckpt.latest_step() is not None
    if cfg.resume and not resuming:
        log.info("--resume: no checkpoint in %s yet, starting from the base model", ckpt.directory)
    restored = None

    def load(params_target, opt_target):
        nonlocal restored
        if resuming:
            restored = ckpt.restore(params_target=params_target, opt_state_target=opt_target)
            return restored.params, restored.opt_state
        return source.load(params_target, opt_target)

    state, optimizer = train.init_train_state(
        config, make_optimizer, mesh, compute_dtype=dtype, remat=cfg.remat, load=load
    )
    data_id = {"conversations": len(rendered), "tokens": len(rendered.tokens)}
    start_step = 0
    if restored is not None:
        saved = (restored.meta.get("num_iterations"), restored.meta.get("train_data"))
        if saved != (steps_total, data_id) or restored.meta["model_config"] != saved_config:
            ckpt.close()
            sys.exit(
                f"error: checkpoint step {restored.step} in {ckpt.directory} was made with "
                "another model, data or number of iterations; rerun with the same flags, or "
                "without --resume"
            )
        start_step = restored.step
        log.info("resumed from step %d of %s", start_step, ckpt.directory)
    log.info(
        "loaded base model %s step %d from %s", model_tag, source.meta["step"], source.directory
    )

    writer = MetricsWriter(base_dir / "runs" / model_tag / "mid")
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len * world
    eval_steps = max(1, cfg.eval_tokens // tokens_per_micro)
    val_cache: list[tuple[np.ndarray, np.ndarray]] = []

    def val_bpb() -> float:
        # the val windows are the same at every eval (nanochat re-renders them): render once
        if not val_cache:
            val_cache.extend(next(val_batches) for _ in range(eval_steps))
        return evaluate_bpb(
            state.model(), stage.sharded_batches(val_cache, mesh), eval_steps, token_bytes
        )

    def save(step: int, val: float | None) -> None:
        meta = {
            "step": step,
            "val_bpb": val,
            "model_config": saved_config,
            "user_config": dataclasses.asdict(cfg),
            "num_iterations": steps_total,
            "train_data": data_id,
        }
        ckpt.save(step, params=state.params, opt_state=state.opt_state, meta=meta)

    def micro_batch(step: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        # the data lays out data.accum_steps windows per step (checked against the loop's below)
        return data.micro_batch(step * data.accum_steps + m)

    # Logging only: nanochat's mid_train counts its step up before debiasing the EMA loss, so
    # its smoothed loss at step s divides by 1 - 0.9**(s + 2); the loop's StepClock uses
    # base_train's 1 - 0.9**(s + 1). The two agree within a few steps; training is unaffected.
    try:  # the loop compiles the train step when made: inside, so errors there close too
        loop = train.TrainLoop(
            state,
            optimizer,
            cfg,
            writer,
            micro_batch=micro_batch,
            world_size=world,
            steps_total=steps_total,
            lrm_by_step=lrm_by_step,
            start_step=start_step,
            val_bpb=val_bpb,
            always_eval_last=True,  # as nanochat: at the last step whatever eval_every is
            save=None if cfg.dry_run else save,
            progress=data.progress,
        )
        # both come from grad_accum_steps of the same flags and world size
        assert loop.accum_steps == data.accum_steps, (loop.accum_steps, data.accum_steps)
        result = loop.run()
    finally:  # also on errors and Ctrl-C: let an async save finish
        ckpt.close()
        writer.close()

    print(result.final_line())
    if not cfg.dry_run:
        report.log_section(
            "Midtraining",
            [
                dataclasses.asdict(cfg),
                {"Number of iterations": steps_total, "DDP world size": world},
                {"Minimum validation bpb": result.min_val_bpb},
            ],
        )


if __name__ == "__main__":
    main()
