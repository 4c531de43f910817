"""Pretrain the base model (nanochat's scripts/base_train.py, in JAX).

    python -m scripts.base_train --depth=20                      # one GPU / CPU
    python -m scripts.base_train --depth=20 --mesh=8             # 8 GPUs, data parallel
    python -m scripts.base_train --depth=32 --mesh=fsdp=8 --device_batch_size=8
    python -m scripts.base_train ... --resume=1                  # continue from the last save

Everything is derived from --depth (width 64*depth, heads of 128); the number of steps from
--num_iterations, else --target_flops, else --target_param_data_ratio (Chinchilla's 20 tokens
per parameter). Logs go to the console, to TensorBoard event files and metrics.jsonl under
<base_dir>/runs/<model_tag>/base, and a report section at the end.
"""

from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
from flax import nnx

from nanochat_jax import checkpoint, optim, report, sharding, stage, train
from nanochat_jax.common import get_base_dir, get_logger
from nanochat_jax.config import GPTConfig
from nanochat_jax.core_eval import evaluate_core
from nanochat_jax.eval_bundle import bundle_dir, validate_bundle
from nanochat_jax.loss_eval import evaluate_bpb
from nanochat_jax.metrics import H100_BF16_PEAK_FLOPS, MetricsWriter, flops_per_token, param_count
from nanochat_jax.model import GPT
from nanochat_jax.tokenizer import get_token_bytes, get_tokenizer

log = get_logger("base_train")


@dataclasses.dataclass
class BaseTrainConfig:
    run: str = "dummy"  # nanochat's wandb run name; kept for flag compatibility
    depth: int = 20
    max_seq_len: int = 2048
    num_iterations: int = -1
    target_flops: float = -1.0
    target_param_data_ratio: int = 20
    device_batch_size: int = 32
    total_batch_size: int = 524288
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    matrix_lr: float = 0.02
    grad_clip: float = 1.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    eval_every: int = 250
    eval_tokens: int = 20 * 524288
    core_metric_every: int = 2000
    core_metric_max_per_task: int = 500
    sample_every: int = 2000
    model_tag: str = ""
    # ours
    mesh: str = "1"
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    remat: str = "none"  # activation checkpointing per block: none | dots | full
    resume: bool = False
    save_every: int = -1  # also save every N steps (-1: only at the end)
    keep_checkpoints: int = 2
    seed: int = 0
    log_every: int = 1
    peak_flops: float = H100_BF16_PEAK_FLOPS  # per device, the MFU denominator (nanochat: H100)


def num_iterations(cfg: BaseTrainConfig, config: GPTConfig, num_params: int) -> int:
    """nanochat's precedence: explicit steps, else a FLOPs budget, else a tokens:params ratio."""
    if cfg.num_iterations > 0:
        return cfg.num_iterations
    if cfg.target_flops > 0:
        return round(cfg.target_flops / (flops_per_token(config) * cfg.total_batch_size))
    if cfg.target_param_data_ratio > 0:
        return cfg.target_param_data_ratio * num_params // cfg.total_batch_size
    raise ValueError("set one of --num_iterations, --target_flops, --target_param_data_ratio")


def main(argv: list[str] | None = None) -> None:
    cfg = stage.parse_config(BaseTrainConfig, argv, __doc__.split("\n\n")[0])
    mesh = stage.setup_devices(cfg.mesh)
    dtype = stage.compute_dtype(cfg.dtype)
    base_dir = get_base_dir()

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes()
    config = GPTConfig.from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.max_seq_len)
    model_tag = cfg.model_tag or f"d{cfg.depth}"
    num_params = param_count(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    steps_total = num_iterations(cfg, config, num_params)
    core_bundle = bundle_dir() if cfg.core_metric_every > 0 else None
    if core_bundle is not None:
        try:  # decided now, not at the first CORE step hours into the run
            validate_bundle(core_bundle)
        except (FileNotFoundError, ValueError) as e:
            log.warning("%s The CORE metric is skipped in this run.", e)
            core_bundle = None
    dp = sharding.data_parallel_size(mesh)
    accum = train.grad_accum_steps(cfg.total_batch_size, cfg.device_batch_size, cfg.max_seq_len, dp)
    flops_per_tok = flops_per_token(config)
    log.info(
        "%s: %d params, %.3e FLOPs/token, %d steps of %d tokens (%d micro-batches of %dx%d per "
        "device, %d data-parallel devices), tokens:params %.2f",
        model_tag,
        num_params,
        flops_per_tok,
        steps_total,
        cfg.total_batch_size,
        accum,
        cfg.device_batch_size,
        cfg.max_seq_len,
        dp,
        steps_total * cfg.total_batch_size / num_params,
    )

    opt_cfg = optim.OptimConfig.from_flags(cfg, config.n_embd, grad_clip=cfg.grad_clip)
    lr_schedule = optim.lr_multiplier_schedule(
        steps_total, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac
    )
    # for logging: computed once, so the host never waits on the device for it during training
    lrm_by_step = np.asarray(jax.jit(jax.vmap(lr_schedule))(np.arange(steps_total + 1)))

    def make_optimizer(params):
        return optim.make_optimizer(params, opt_cfg, lr_schedule, optim.muon_momentum_schedule())

    rows, seq_len = cfg.device_batch_size, cfg.max_seq_len
    train_loader = stage.data_loader(tokenizer, mesh, rows, seq_len, "train")

    ckpt_dir = checkpoint.checkpoint_dir("base", model_tag)
    ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=cfg.keep_checkpoints)
    start_step, restored = 0, None

    def load(params_target, opt_target):
        nonlocal restored
        restored = ckpt.restore(params_target=params_target, opt_state_target=opt_target)
        return restored.params, restored.opt_state

    resuming = cfg.resume and ckpt.latest_step() is not None
    if cfg.resume and not resuming:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", ckpt_dir)
    state, optimizer = train.init_train_state(
        config,
        make_optimizer,
        mesh,
        seed=cfg.seed,
        compute_dtype=dtype,
        remat=cfg.remat,
        load=load if resuming else None,
    )
    if restored is not None:
        saved = (restored.meta.get("num_iterations"), restored.meta["model_config"])
        if saved != (steps_total, config.to_dict()):
            sys.exit(
                f"error: checkpoint step {restored.step} in {ckpt_dir} was made with another "
                "model or number of iterations; rerun with the same flags, or without --resume"
            )
        if restored.data_state is None:
            sys.exit(
                f"error: checkpoint step {restored.step} in {ckpt_dir} has no data-loader state "
                "(e.g. converted from nanochat), so training cannot resume it exactly"
            )
        train_loader.set_state(restored.data_state)
        start_step = restored.step
        log.info("resumed from step %d of %s", start_step, ckpt_dir)

    writer = MetricsWriter(base_dir / "runs" / model_tag / "base")
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * dp))

    def val_bpb() -> float:
        loader = stage.data_loader(tokenizer, mesh, rows, seq_len, "val")
        batches = stage.sharded_batches(loader, mesh)
        return evaluate_bpb(state.model(), batches, eval_steps, token_bytes)

    def save(step: int, val: float | None) -> None:
        meta = {
            "step": step,
            "val_bpb": val,
            "model_config": config.to_dict(),
            "user_config": dataclasses.asdict(cfg),
            "device_batch_size": cfg.device_batch_size,
            "max_seq_len": cfg.max_seq_len,
            "num_iterations": steps_total,
        }
        ckpt.save(
            step,
            params=state.params,
            opt_state=state.opt_state,
            data_state=train_loader.get_state(),
            meta=meta,
        )

    sampler = stage.Sampler(tokenizer)
    core_metric = None

    def core(step: int) -> None:
        nonlocal core_metric
        results = evaluate_core(
            state.model(), tokenizer, core_bundle, max_per_task=cfg.core_metric_max_per_task
        )
        core_metric = results["core_metric"]
        print(f"step {step:05d} | CORE metric: {core_metric:.4f}", flush=True)
        centered = {f"centered_results/{k}": v for k, v in results["centered_results"].items()}
        writer.scalars(step, {"core_metric": core_metric, **centered})

    def sample(step: int) -> None:
        samples = sampler(state.model())
        for text in samples:
            print(text, flush=True)
        writer.text(step, "samples", "\n\n".join(samples))

    periodic = []  # after the val bpb, in nanochat's order
    if core_bundle is not None:
        periodic.append(train.Periodic(cfg.core_metric_every, core))
    periodic.append(train.Periodic(cfg.sample_every, sample))
    try:  # the loop compiles the train step when made: inside, so errors there close too
        loop = train.TrainLoop(
            state,
            optimizer,
            cfg,
            writer,
            micro_batch=lambda step, m: next(train_loader),  # in the loader's (restored) order
            world_size=dp,
            steps_total=steps_total,
            lrm_by_step=lrm_by_step,
            start_step=start_step,
            val_bpb=val_bpb,
            periodic=periodic,
            save=save,
        )
        result = loop.run()
    finally:  # also on errors and Ctrl-C: let an async save finish
        ckpt.close()
        writer.close()

    total_flops = flops_per_tok * cfg.total_batch_size * steps_total
    report.log_section(
        "Base model training",
        [
            dataclasses.asdict(cfg),
            {
                "Number of parameters": num_params,
                "Number of FLOPs per token": f"{flops_per_tok:e}",
                "Calculated number of iterations": steps_total,
                "Number of training tokens": steps_total * cfg.total_batch_size,
                "Tokens : Params ratio": steps_total * cfg.total_batch_size / num_params,
                "DDP world size": dp,
                "warmup_ratio": cfg.warmup_ratio,
                "warmdown_ratio": cfg.warmdown_ratio,
                "final_lr_frac": cfg.final_lr_frac,
            },
            {
                "Minimum validation bpb": result.min_val_bpb,
                "Final validation bpb": result.val_bpb,
                "CORE metric estimate": core_metric,
                "MFU %": f"{result.mfu:.2f}%",
                "Total training flops": f"{total_flops:e}",
                "Total training time": f"{result.total_time_s / 60:.2f}m",
            },
        ],
    )
    print(result.final_line())


if __name__ == "__main__":
    main()
