"""Supervised finetuning on conversations (nanochat's scripts/chat_sft.py, in JAX).

    python -m scripts.chat_sft                                   # from the largest mid model
    python -m scripts.chat_sft --source=base --mesh=8

One epoch over ARC-Easy + ARC-Challenge + GSM8K + 10K SmolTalk rows (nanochat 2bc521a; with
--extra_tasks=identity,spelling also nanochat's later identity conversations and 300 + 300
SimpleSpelling/SpellingBee rows, see tasks/mixtures.py), each conversation its own row,
padded per micro-batch; only the assistant's tokens are supervised. lr = nanochat's base lrs *
init_lr_frac (0.02), decaying linearly to 0; Muon momentum 0.95; no clipping. Rows vary in
length, so each step pads to a length bucket (a power of two from --min_bucket_len up to
--max_seq_len: 256, 512, 1024, 2048 by default) and one step is compiled per bucket, when first
needed; the validation batches are all padded to one length (one compilation). Validation loss
every eval_every steps, MMLU and ARC-Easy accuracy every eval_metrics_every steps, both at the
end whatever those are. Saves the params (no optimizer state,
like nanochat) to chatsft_checkpoints/<tag>; logs to the console, TensorBoard and metrics.jsonl
under <base_dir>/runs/<tag>/sft, and the report section "Chat SFT".

As in nanochat, the run has num_iterations - 1 optimizer steps: its last iteration only
evaluates.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanochat_jax import checkpoint, optim, report, sharding, stage, train
from nanochat_jax.chat_data import bucket_for, collate_sft, length_buckets, sft_micro_batches
from nanochat_jax.common import get_base_dir, get_logger
from nanochat_jax.metrics import MetricsWriter
from nanochat_jax.tokenizer import get_tokenizer

log = get_logger("chat_sft")

METRIC_TASKS = {"mmlu_acc": "MMLU", "arc_easy_acc": "ARC-Easy"}


@dataclasses.dataclass
class ChatSFTConfig:
    run: str = "dummy"  # nanochat's wandb run name; kept for flag compatibility
    source: str = "mid"  # base | mid
    model_tag: str = ""  # default: the largest dN of the source
    step: int = -1  # the source's step (-1: the latest)
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU (nanochat: bfloat16)
    device_batch_size: int = 4
    num_epochs: int = 1
    max_iterations: int = -1  # cap on the number of iterations (-1: none)
    target_examples_per_step: int = 32
    unembedding_lr: float = 0.004
    embedding_lr: float = 0.2
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    init_lr_frac: float = 0.02
    eval_every: int = 100
    eval_steps: int = 100
    eval_metrics_every: int = 200
    # ours
    eval_metrics_max_problems: int = 1024  # per task (nanochat: 1024)
    max_seq_len: int = 2048  # rows are truncated to this many tokens (nanochat: 2048)
    min_bucket_len: int = 256  # shortest padded length (fewer buckets: fewer compilations)
    world_size: int = 0  # nanochat DDP ranks whose data order to follow (0: data-parallel devices)
    mesh: str = "1"
    remat: str = "none"
    log_every: int = 1
    # nanochat's later additions to the mixture (tasks.mixtures): "identity", "spelling"
    extra_tasks: str = ""  # comma-separated; "" = 2bc521a's mixture
    spelling_rows: str = ""  # "SIMPLE,BEE" rows of SimpleSpelling, SpellingBee; "" = 300,300


def load_mixtures(
    extra: tuple[str, ...] = (), spelling_rows: tuple[int, int] | None = None
) -> tuple[Any, Any]:
    """nanochat's (train, val) datasets for SFT, with the opt-in extras (tasks.mixtures)."""
    from nanochat_jax.tasks.mixtures import sft_mixtures

    return sft_mixtures(extra, spelling_rows)


def load_metric_tasks() -> dict[str, Any]:
    """The test splits run_chat_eval scores during training, loaded once: {meta key: task}."""
    from nanochat_jax.chat_eval import load_task

    return {key: load_task(name) for key, name in METRIC_TASKS.items()}


def rank_losses(nll_BT: jax.Array, targets_BT: jax.Array, world_size: int) -> jax.Array:
    """(world_size,) mean loss over each rank's supervised targets (its rows are contiguous).

    nanochat's loss is per GPU (a mean over that GPU's micro-batch) and DDP averages the
    gradients over GPUs, so the global loss is the mean of per-rank means, not one mean over all
    rows. A rank without a supervised target counts 0 (nanochat would get NaN).
    """
    nll_RN = nll_BT.reshape(world_size, -1)
    valid_RN = (targets_BT != -1).reshape(world_size, -1)
    return jnp.sum(nll_RN, axis=1) / jnp.maximum(jnp.sum(valid_RN, axis=1), 1)


def _check(cfg: ChatSFTConfig) -> tuple[tuple[str, ...], tuple[int, int] | None]:
    """Every flag, before any work: one error line for the first bad one. Returns the parsed
    --extra_tasks and --spelling_rows."""
    from nanochat_jax.tasks.mixtures import parse_extras

    if cfg.source not in ("base", "mid"):
        sys.exit(f"error: --source must be base or mid, got {cfg.source!r}")
    try:
        extra, spelling_rows = parse_extras(cfg.extra_tasks, cfg.spelling_rows)
    except ValueError as e:
        sys.exit(f"error: {e}")
    positive = ("device_batch_size", "num_epochs", "target_examples_per_step", "eval_steps")
    positive += ("eval_metrics_max_problems", "max_seq_len", "min_bucket_len", "log_every")
    stage.check_flags(cfg, positive=positive)
    if cfg.step < -1 or cfg.world_size < 0 or cfg.max_iterations < -1:
        sys.exit(
            "error: --step and --max_iterations must be >= -1 and --world_size >= 0, got "
            f"{cfg.step}, {cfg.max_iterations} and {cfg.world_size}"
        )
    return extra, spelling_rows


def main(argv: list[str] | None = None) -> None:
    cfg = stage.parse_config(ChatSFTConfig, argv, __doc__.split("\n\n")[0])
    extra, spelling_rows = _check(cfg)
    mesh = stage.setup_devices(cfg.mesh)
    base_dir = get_base_dir()
    world = cfg.world_size or sharding.data_parallel_size(mesh)
    examples_per_step = cfg.device_batch_size * world
    if cfg.target_examples_per_step % examples_per_step:
        sys.exit(
            f"error: --target_examples_per_step={cfg.target_examples_per_step} must be a multiple "
            f"of device_batch_size * world size = {cfg.device_batch_size} * {world}"
        )
    accum = cfg.target_examples_per_step // examples_per_step
    try:
        dtype = stage.compute_dtype(cfg.dtype)
        ranks = stage.local_ranks(world, mesh)
        buckets = length_buckets(cfg.max_seq_len, cfg.min_bucket_len)
        tokenizer = get_tokenizer()
        source = stage.load_source(
            cfg.source, cfg.model_tag or None, None if cfg.step < 0 else cfg.step, tokenizer
        )
    except (FileNotFoundError, checkpoint.CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    config, model_tag = source.config, source.tag
    if cfg.max_seq_len > config.rotary_seq_len:
        sys.exit(
            f"error: --max_seq_len={cfg.max_seq_len} exceeds the {cfg.source} model's rotary "
            f"table ({config.rotary_seq_len} = 10 x its sequence_len)"
        )
    try:
        train_ds, val_ds = load_mixtures(extra, spelling_rows)
    except (ImportError, OSError, ValueError) as e:
        sys.exit(f"error: cannot load the SFT tasks: {e}")

    num_iterations = (len(train_ds) // cfg.target_examples_per_step) * cfg.num_epochs
    if 0 <= cfg.max_iterations < num_iterations:
        print(
            f"Number of iterations is too high ({num_iterations}), capping to {cfg.max_iterations}"
        )
        num_iterations = cfg.max_iterations
    if num_iterations < 1:
        sys.exit(
            f"error: {len(train_ds)} training rows, {cfg.num_epochs} epoch(s) and "
            f"--target_examples_per_step={cfg.target_examples_per_step} (or --max_iterations) "
            "leave no iteration to run"
        )
    print(
        f"{len(train_ds):,} training rows: {num_iterations} iterations of "
        f"{cfg.target_examples_per_step} examples ({accum} micro-batches of "
        f"{cfg.device_batch_size} rows per rank, {world} ranks)"
    )

    opt_cfg = optim.OptimConfig.from_flags(cfg, config.n_embd, muon_momentum=0.95, grad_clip=0.0)
    lr_schedule = optim.linear_decay_schedule(num_iterations, cfg.init_lr_frac)

    def make_optimizer(params):
        return optim.make_optimizer(params, opt_cfg, lr_schedule)

    state, optimizer = train.init_train_state(
        config, make_optimizer, mesh, compute_dtype=dtype, remat=cfg.remat, load=source.load
    )
    log.info("loaded %s model %s step %d", cfg.source, model_tag, source.meta["step"])

    def loss_fn(params, graphdef, rest, inputs_BT, targets_BT):
        nll_BT = nnx.merge(graphdef, params, rest)(inputs_BT, targets_BT, loss_reduction="none")
        return jnp.mean(rank_losses(nll_BT, targets_BT, world))

    @jax.jit
    def val_losses(params, rest, inputs_BT, targets_BT):
        nll_BT = nnx.merge(state.graphdef, params, rest)(
            inputs_BT, targets_BT, loss_reduction="none"
        )
        return rank_losses(nll_BT, targets_BT, world)

    step_fns: dict[int, Any] = {}

    def step_fn(length: int):
        """The train step for rows padded to `length`, compiled the first time it is needed."""
        if length not in step_fns:
            t0 = time.perf_counter()
            step_fns[length] = train.make_train_step(
                state,
                optimizer,
                accum_steps=accum,
                micro_batch_size=examples_per_step,
                sequence_len=length,
                loss=loss_fn,
            )
            log.info(
                "compiled the train step for length %d in %.1fs (%d compiled: %s)",
                length,
                time.perf_counter() - t0,
                len(step_fns),
                sorted(step_fns),
            )
        return step_fns[length]

    pad_id = tokenizer.encode_special("<|assistant_end|>")

    def rank_iters(dataset):
        # every rank's rows, on every process: all must agree on the padded length of a step
        return [
            sft_micro_batches(
                tokenizer,
                dataset,
                batch_size=cfg.device_batch_size,
                rank=rank,
                world_size=world,
                max_tokens=cfg.max_seq_len,
            )
            for rank in range(world)
        ]

    def collate(micro_batches: list[list[list]]) -> tuple[int, np.ndarray, np.ndarray]:
        """[micro-step][rank] row lists -> (bucket, inputs, targets), (A, local rows, bucket):
        every micro-batch padded to the bucket of the longest row among them all."""
        longest = max(
            len(ids) for per_rank in micro_batches for rows in per_rank for ids, _ in rows
        )
        length = bucket_for(longest - 1, buckets)
        pairs = [
            [collate_sft(per_rank[r], pad_id, length) for r in ranks] for per_rank in micro_batches
        ]
        inputs = np.stack([np.concatenate([p[0] for p in micro]) for micro in pairs])
        targets = np.stack([np.concatenate([p[1] for p in micro]) for micro in pairs])
        return length, inputs, targets

    try:
        train_iters, val_iters = rank_iters(train_ds), rank_iters(val_ds)
    except ValueError as e:
        sys.exit(f"error: {e}")
    val_cache: list[tuple[np.ndarray, np.ndarray]] = []

    def val_loss() -> float:
        # The val batches are the same at every eval (nanochat re-renders them): collate once,
        # all to one padded length, so val_losses compiles once (padding changes no loss).
        if not val_cache:
            length, inputs, targets = collate(
                [[next(it) for it in val_iters] for _ in range(cfg.eval_steps)]
            )
            val_cache.extend(zip(inputs, targets, strict=True))
            log.info("validation: %d batches padded to length %d", cfg.eval_steps, length)
        losses = [
            val_losses(state.params, state.rest, *stage_batch)
            for stage_batch in stage.sharded_batches(val_cache, mesh)
        ]
        return float(np.mean([np.asarray(x) for x in losses]))

    metric_tasks: dict[str, Any] = {}

    def chat_metrics() -> dict[str, float]:
        from nanochat_jax.chat_eval import run_chat_eval  # loads task data: only when used

        if not metric_tasks:
            metric_tasks.update(load_metric_tasks())
        model = state.model()
        batch_size = 2 * cfg.device_batch_size  # no gradients: twice the rows fit
        eval_mesh = mesh if batch_size % sharding.data_parallel_size(mesh) == 0 else None
        return {
            key: run_chat_eval(
                METRIC_TASKS[key],
                model,
                tokenizer,
                batch_size=batch_size,
                max_problems=cfg.eval_metrics_max_problems,
                mesh=eval_mesh,
                task=task,
                progress=False,
            )
            for key, task in metric_tasks.items()
        }

    writer = MetricsWriter(base_dir / "runs" / model_tag / "sft")
    val, metrics, train_loss = None, dict.fromkeys(METRIC_TASKS), None
    t_last = time.perf_counter()

    def log_step(step, result, num_tokens, length):
        nonlocal train_loss, t_last
        loss = train.check_step(result, step)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        train_loss = loss
        lrm = 1.0 - step / num_iterations
        if step % cfg.log_every == 0 or step == num_iterations - 2:
            print(
                f"Step {step:05d}/{num_iterations:05d} | Training loss: {loss:.6f}| "
                f"lrm: {lrm:.6f}| num_tokens: {num_tokens:,} | length: {length} | "
                f"dt: {dt * 1000:.0f}ms",
                flush=True,
            )
        writer.scalars(
            step,
            {
                "train/loss": loss,
                "train/lrm": lrm,
                "train/num_tokens": num_tokens,
                "train/length": length,
                "train/dt": dt,
                "train/grad_norm": float(result["grad_norm"]),
            },
        )

    # nanochat's SFT loop, not train.TrainLoop's: a step per padded length, val loss and chat
    # metrics instead of bpb, its own line; one step late and dispatched as TrainLoop does
    late = train.LateMetrics(log_step)
    try:
        for step in range(num_iterations):
            last_step = step == num_iterations - 1
            # as nanochat: both evaluations at the last step whatever eval_every(_metrics) are
            do_eval = last_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
            do_metrics = last_step or (
                cfg.eval_metrics_every > 0 and step > 0 and step % cfg.eval_metrics_every == 0
            )
            if do_eval or do_metrics or last_step:
                late.flush()
            if do_eval:
                val = val_loss()
                print(f"Step {step:05d} | Validation loss: {val:.6f}", flush=True)
                writer.scalars(step, {"val/loss": val})
            if do_metrics:
                metrics = chat_metrics()
                print(
                    f"Step {step:05d} | " + ", ".join(f"{k}: {v:.6f}" for k, v in metrics.items()),
                    flush=True,
                )
                writer.scalars(step, {f"val/{k}": v for k, v in metrics.items()})
            if do_eval or do_metrics:
                t_last = time.perf_counter()  # evaluation time is not training time
            if last_step:
                break

            micro = [[next(it) for it in train_iters] for _ in range(accum)]
            num_tokens = sum(
                sum(mask[1:]) for per_rank in micro for rows in per_rank for _, mask in rows
            )
            length, inputs, targets = collate(micro)
            late.push(step, state.apply_step(step_fn(length), inputs, targets), num_tokens, length)

        meta = {"step": step, "val_loss": val, **metrics, "model_config": config.to_dict()}
        with checkpoint.Checkpointer(checkpoint.checkpoint_dir("sft", model_tag)) as ckpt:
            ckpt.save(step, params=state.params, meta=meta)
    finally:
        writer.close()
    print(
        f"Saved model checkpoint for step {step}; compilations: {len(step_fns)} train steps "
        f"(lengths {sorted(step_fns)}), 1 validation step (length {val_cache[0][0].shape[-1]})"
    )

    report.log_section(
        "Chat SFT",
        [
            dataclasses.asdict(cfg),
            {
                "Training rows": len(train_ds),
                "Number of iterations": num_iterations,
                "Training loss": train_loss,
                "Validation loss": val,
            },
        ],
    )


if __name__ == "__main__":
    main()
