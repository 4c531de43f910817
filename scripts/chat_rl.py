"""Reinforcement learning on GSM8K (nanochat's scripts/chat_rl.py, in JAX).

    python -m scripts.chat_rl                        # from the SFT model
    python -m scripts.chat_rl --source=mid --mesh=8

Simplified GRPO, i.e. on-policy REINFORCE: each step samples num_samples completions of
examples_per_step training questions, rewards them with GSM8K's answer check, and takes one
gradient step on -sum(logp * (reward - mean reward of the question)), normalised per token (see
nanochat_jax/rl.py). pass@1..device_batch_size on the test set every eval_every steps, sampled
as nanochat's run_gsm8k_eval (temperature 1.0, top_k 50, 256 tokens: the --eval_* flags). Saves
phase "rl" (parameters only). Logs go to the console, TensorBoard and metrics.jsonl under
<base_dir>/runs/<model_tag>/rl, and a "Chat RL" report section at the end.

Compilations: the train step is compiled once, for inputs padded to one length (the longest
prompt among the questions this run visits plus max_new_tokens, rounded up to a multiple of 64;
see rl.train_seq_len). The engine compiles prefill/decode once per (prompt, cache) length bucket,
a handful in all; the count is printed at the end. This one process generates the rollouts of
every data-parallel rank: an EnginePool holds one engine replica per local device of the mesh
(--rollout_devices, default all), and the devices generate questions in parallel, as nanochat's
ranks do; pass@k spreads its problems the same way. The rewards do not depend on the device
count (every question seeds its own sampling); --rollout_devices=1 is one engine on the mesh's
parameters, generating every question in turn.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanochat_jax import checkpoint, optim, report, rl, sharding, stage, train
from nanochat_jax.common import get_base_dir, get_logger
from nanochat_jax.engine import Engine, EnginePool
from nanochat_jax.metrics import MetricsWriter
from nanochat_jax.tokenizer import get_tokenizer

log = get_logger("chat_rl")


@dataclasses.dataclass
class ChatRLConfig:
    run: str = "dummy"  # nanochat's wandb run name; kept for flag compatibility
    source: str = "sft"  # mid|sft: which checkpoint to start from
    dtype: str = "auto"  # auto = bf16 on GPU, fp32 on CPU (nanochat: bfloat16)
    device_batch_size: int = 8  # rows per forward pass, and samples per generate_batch call
    examples_per_step: int = 16  # questions per step, all ranks together
    num_samples: int = 16  # completions per question
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    unembedding_lr: float = 0.004
    embedding_lr: float = 0.2
    matrix_lr: float = 0.02
    weight_decay: float = 0.0
    init_lr_frac: float = 0.05
    num_epochs: int = 1
    save_every: int = 60
    eval_every: int = 60
    eval_examples: int = 400
    # ours
    eval_max_new_tokens: int = 256  # pass@k sampling (nanochat's run_gsm8k_eval: 256, 1.0, 50)
    eval_temperature: float = 1.0
    eval_top_k: int = 50
    model_tag: str = ""  # default: the largest dN of the source phase
    model_step: int = -1  # source checkpoint step (-1: latest)
    num_iterations: int = -1  # override the number of steps (-1: num_epochs over the train set)
    mesh: str = "1"
    rollout_devices: int = -1  # engine replicas generating in parallel (-1: every mesh device)


def load_tasks():
    """(train, val) tasks: GSM8K main train / test, as nanochat."""
    from nanochat_jax.tasks import GSM8K

    return GSM8K(subset="main", split="train"), GSM8K(subset="main", split="test")


def _check(cfg: ChatRLConfig, dp: int, num_devices: int) -> None:
    """Every flag, before any work: one error line for the first bad one."""
    if cfg.source not in ("mid", "sft"):
        sys.exit(f"error: --source must be mid or sft, got {cfg.source!r}")
    positive = ("device_batch_size", "examples_per_step", "num_samples", "max_new_tokens")
    positive += ("num_epochs", "top_k", "eval_examples", "eval_max_new_tokens", "eval_top_k")
    stage.check_flags(cfg, positive=positive, non_negative=("temperature", "eval_temperature"))
    if cfg.num_samples % cfg.device_batch_size:
        sys.exit(
            f"error: --num_samples ({cfg.num_samples}) must be a multiple of "
            f"--device_batch_size ({cfg.device_batch_size})"
        )
    if cfg.examples_per_step % dp:
        sys.exit(
            f"error: --examples_per_step ({cfg.examples_per_step}) must be a multiple of the "
            f"{dp} data-parallel devices"
        )
    if cfg.rollout_devices == 0 or not -1 <= cfg.rollout_devices <= num_devices:
        sys.exit(
            f"error: --rollout_devices must be -1 (all) or 1..{num_devices} (the mesh's local "
            f"devices), got {cfg.rollout_devices}"
        )
    if cfg.model_step < -1 or cfg.num_iterations == 0 or cfg.num_iterations < -1:
        sys.exit(
            f"error: --model_step must be >= -1 and --num_iterations -1 or >= 1, got "
            f"{cfg.model_step} and {cfg.num_iterations}"
        )


def main(argv: list[str] | None = None) -> None:
    cfg = stage.parse_config(ChatRLConfig, argv, __doc__.split("\n\n")[0])
    mesh = stage.setup_devices(cfg.mesh)
    if jax.process_count() > 1:
        sys.exit("error: chat_rl runs on one host (its rollouts are generated by this process)")
    dp = sharding.data_parallel_size(mesh)
    local_devices = list(mesh.local_devices)
    _check(cfg, dp, len(local_devices))
    base_dir = get_base_dir()
    try:
        dtype = stage.compute_dtype(cfg.dtype)
        tokenizer = get_tokenizer()
        source_step = None if cfg.model_step < 0 else cfg.model_step
        source = stage.load_source(cfg.source, cfg.model_tag or None, source_step, tokenizer)
    except (FileNotFoundError, checkpoint.CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
    config, model_tag = source.config, source.tag
    try:
        train_task, val_task = load_tasks()
    except (ImportError, OSError) as e:
        sys.exit(f"error: cannot load the GSM8K task: {e}")

    examples_per_rank = cfg.examples_per_step // dp
    num_steps = (len(train_task) // cfg.examples_per_step) * cfg.num_epochs
    if cfg.num_iterations > 0:
        num_steps = cfg.num_iterations
    if num_steps < 1:
        sys.exit(
            f"error: the train task has {len(train_task)} questions, fewer than "
            f"--examples_per_step={cfg.examples_per_step}: no step to take"
        )
    schedule = rl.example_schedule(len(train_task), num_steps, examples_per_rank, dp)
    # The exact questions this run visits, so the compiled step's length covers all of them.
    prompts = {
        int(i): tokenizer.render_for_completion(train_task[int(i)]) for i in np.unique(schedule)
    }
    longest = max(map(len, prompts.values())) + cfg.max_new_tokens
    try:
        seq_len = rl.train_seq_len(longest, config.sequence_len, config.rotary_seq_len)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if cfg.eval_every > 0:  # the engine's limit, checked now rather than at the first eval
        eval_ids = range(min(cfg.eval_examples, len(val_task)))
        eval_prompt = max(
            (len(tokenizer.render_for_completion(val_task[i])) for i in eval_ids), default=0
        )
        if eval_prompt + cfg.eval_max_new_tokens - 1 > config.rotary_seq_len:
            sys.exit(
                f"error: a test prompt plus --eval_max_new_tokens reaches "
                f"{eval_prompt + cfg.eval_max_new_tokens} tokens; the model handles at most "
                f"{config.rotary_seq_len + 1} (lower --eval_max_new_tokens)"
            )
    passes = cfg.num_samples // cfg.device_batch_size
    accum = examples_per_rank * passes
    print(f"Calculated number of steps: {num_steps}")
    print(f"Total sequences per step: {cfg.examples_per_step * cfg.num_samples}")
    print(f"Calculated examples per rank: {examples_per_rank}")

    # nanochat's RL does not clip, and keeps Muon's momentum at 0.95
    opt_cfg = optim.OptimConfig.from_flags(cfg, config.n_embd, grad_clip=0.0)
    lr_schedule = optim.linear_decay_schedule(num_steps, cfg.init_lr_frac)

    def make_optimizer(params):
        return optim.make_optimizer(params, opt_cfg, lr_schedule)

    state, optimizer = train.init_train_state(
        config, make_optimizer, mesh, compute_dtype=dtype, load=source.load
    )
    step_fn = train.make_train_step(
        state,
        optimizer,
        accum_steps=accum,
        micro_batch_size=cfg.device_batch_size * dp,
        sequence_len=seq_len,
        loss=rl.pg_loss,
        extra_dtypes=(jnp.float32,),
    )
    log.info(
        "compiled the RL train step once: %d micro-batches of %d x %d (rollouts of up to %d "
        "tokens)",
        accum,
        cfg.device_batch_size * dp,
        seq_len,
        longest,
    )
    num_replicas = len(local_devices) if cfg.rollout_devices < 0 else cfg.rollout_devices
    engine = (
        Engine(state.model(), tokenizer, compute_dtype=dtype)
        if num_replicas == 1
        else EnginePool(
            state.model(), tokenizer, devices=local_devices[:num_replicas], compute_dtype=dtype
        )
    )
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    writer = MetricsWriter(base_dir / "runs" / model_tag / "rl")
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir("rl", model_tag))
    sample_kw = {
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_k": cfg.top_k,
    }
    passk, mean_reward = None, float("nan")
    rollout_s = train_s = 0.0
    rollout_tokens = 0

    try:
        for step in range(num_steps):
            engine.set_params(state.params)  # copies: the train step donates its arguments
            if cfg.eval_every > 0 and step % cfg.eval_every == 0:
                passk = rl.evaluate_pass_at_k(
                    engine,
                    tokenizer,
                    val_task,
                    max_examples=cfg.eval_examples,
                    num_samples=cfg.device_batch_size,
                    max_new_tokens=cfg.eval_max_new_tokens,
                    temperature=cfg.eval_temperature,
                    top_k=cfg.eval_top_k,
                )
                print(
                    f"Step {step} | "
                    + ", ".join(f"Pass@{k}: {v:.4f}" for k, v in enumerate(passk, 1))
                )
                writer.scalars(step, {f"eval/pass@{k}": v for k, v in enumerate(passk, 1)})

            t0 = time.perf_counter()

            def rollout(replica: Engine, idx: int, step: int = step) -> rl.Rollout:
                return rl.generate_rollout(
                    replica,
                    tokenizer,
                    train_task,
                    idx,
                    step,
                    num_samples=cfg.num_samples,
                    device_batch_size=cfg.device_batch_size,
                    prompt=prompts[idx],
                    **sample_kw,
                )

            # every rank's questions, rank-major, over the replicas; back in this order
            flat = rl.engine_map(engine, rollout, [int(i) for i in schedule[step].reshape(-1)])
            rollouts = [
                flat[r * examples_per_rank : (r + 1) * examples_per_rank] for r in range(dp)
            ]
            t1 = time.perf_counter()
            batch = rl.pack_step(rollouts, cfg.device_batch_size, seq_len, pad_id)
            # waits for the step (one transfer): the next rollouts need its weights anyway
            metrics = jax.device_get(state.apply_step(step_fn, *batch))
            loss = train.check_step(metrics, step)
            t2 = time.perf_counter()

            mean_reward = float(np.mean([r.rewards.mean() for r in flat]))
            mean_len = float(np.mean([len(s) for r in flat for s in r.sequences]))
            generated = sum(r.num_generated_tokens for r in flat)
            rollout_s, train_s = rollout_s + t1 - t0, train_s + t2 - t1
            rollout_tokens += generated
            lrm = 1 - step / num_steps  # times init_lr_frac: the base lrs' multiplier
            print(
                f"Step {step}/{num_steps} | Average reward: {mean_reward} | Average sequence "
                f"length: {mean_len:.2f} | loss: {loss:.6f} | lrm: {lrm:.4f} | rollout: "
                f"{t1 - t0:.2f}s ({generated / (t1 - t0):,.0f} tok/s) | train: {t2 - t1:.2f}s",
                flush=True,
            )
            writer.scalars(
                step,
                {
                    "train/reward": mean_reward,
                    "train/sequence_length": mean_len,
                    "train/loss": loss,
                    "train/lrm": lrm,
                    "train/grad_norm": float(metrics["grad_norm"]),
                    "train/rollout_s": t1 - t0,
                    "train/rollout_tok_per_sec": generated / (t1 - t0),
                    "train/step_s": t2 - t1,
                },
            )
            if (cfg.save_every > 0 and step > 0 and step % cfg.save_every == 0) or (
                step == num_steps - 1
            ):
                meta = {
                    "step": step,
                    "model_config": config.to_dict(),
                    "user_config": dataclasses.asdict(cfg),
                    "source": cfg.source,
                    "mean_reward": mean_reward,
                }
                if passk is not None:
                    meta["pass_at_k"] = [float(v) for v in passk]
                ckpt.save(step, params=state.params, meta=meta)
    finally:  # also on errors and Ctrl-C: let an async save finish
        ckpt.close()
        writer.close()

    print(
        f"Engine compilations: {engine.num_compilations} (rollouts on {num_replicas} "
        f"device{'s' if num_replicas > 1 else ''}); train step compilations: 1; rollouts "
        f"{rollout_tokens / max(rollout_s, 1e-9):,.0f} tok/s; {train_s / num_steps:.3f}s per "
        "train step"
    )
    report.log_section(
        "Chat RL",
        [
            dataclasses.asdict(cfg),
            {
                "Number of steps": num_steps,
                "Final average reward": mean_reward,
                "Train sequence length": seq_len,
                "Engine compilations": engine.num_compilations,
                "Rollout devices": num_replicas,
                "Rollout tokens per second": rollout_tokens / max(rollout_s, 1e-9),
            },
        ],
    )


if __name__ == "__main__":
    main()
