"""Evaluate a chat model on nanochat's chat tasks (nanochat's scripts/chat_eval.py).

    python -m scripts.chat_eval -i sft                          # all five tasks, and ChatCORE
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100
    python -m scripts.chat_eval -i sft -a HumanEval -n 10 -t 0.8   # pass@10
    python -m scripts.chat_eval -i sft -a SpellingBee           # nanochat's later extra task

ARC-Easy, ARC-Challenge and MMLU are multiple choice (the letter with the largest logit, no
sampling); GSM8K, HumanEval and SpellingBee generate answers (greedy by default) that are
graded. ChatCORE, the mean accuracy above chance, is reported when all five default tasks ran
(over six when SpellingBee, only run when named, ran too). Results go to the console and to
the report section "Chat evaluation <source>".

Devices (`--mesh`, default: every local device, data parallel; `--mesh 1`: one device): the
multiple-choice batches are split over the mesh (`-b` rows per device, as nanochat's per rank),
and the generated answers are spread over one Engine replica per device (as nanochat strides
problems over its ranks). The accuracies do not depend on the number of devices.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from nanochat_jax import report, sharding, stage
from nanochat_jax.chat_eval import BASELINE_ACCURACY, chatcore_metric, load_task, run_chat_eval
from nanochat_jax.common import get_logger
from nanochat_jax.hf_data import is_demo
from nanochat_jax.tasks import TASK_NAMES

log = get_logger("chat_eval")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-i", "--source", required=True, choices=["mid", "sft", "rl"], help="model to evaluate"
    )
    parser.add_argument(
        "-a",
        "--task-name",
        default=None,
        help=f"tasks separated by '|', of {', '.join(BASELINE_ACCURACY)} (default: "
        f"{', '.join(TASK_NAMES)})",
    )
    parser.add_argument(
        "-d",
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="compute dtype (auto: bfloat16 on GPU, as nanochat; float32 on CPU)",
    )
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512)
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="pass@n")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="0 = no top-k")
    parser.add_argument(
        "-b",
        "--batch-size",
        type=int,
        default=8,
        help="batch size of the categorical tasks, per device",
    )
    parser.add_argument("-g", "--model-tag", default=None, help="model tag, e.g. d20")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: latest)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="per task")
    parser.add_argument(
        "--mesh",
        default=None,
        help="devices: N, or axes like data=4,fsdp=2 (default: every local device, data "
        "parallel; 1 = one device)",
    )
    args = parser.parse_args(argv)
    for name, low in (("max_new_tokens", 1), ("num_samples", 1), ("top_k", 0), ("batch_size", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_problems is not None and args.max_problems < 1:
        parser.error(f"--max-problems must be >= 1, got {args.max_problems}")
    return args


def task_names(spec: str | None) -> list[str]:
    """'|'-separated names -> the list; None -> the five default tasks, in nanochat's order.
    SystemExit on an unknown name."""
    if spec is None:
        return list(TASK_NAMES)
    names = [name.strip() for name in spec.split("|") if name.strip()]
    unknown = [name for name in names if name not in BASELINE_ACCURACY]
    if unknown or not names:
        raise SystemExit(
            f"error: unknown task {', '.join(map(repr, unknown)) or repr(spec)}; "
            f"allowed: {', '.join(BASELINE_ACCURACY)} (several separated by '|')"
        )
    return names


def setup_mesh(spec: str | None) -> jax.sharding.Mesh:
    """stage.setup_devices, where no spec means every local device, data parallel."""
    if spec is None:
        if os.environ.get("JAX_PLATFORMS", "") != "cpu":
            from nanochat_jax.train import configure_gpu_performance

            configure_gpu_performance()  # before the device count below starts the backend
        spec = str(jax.local_device_count())
    return stage.setup_devices(spec)


def main(argv: list[str] | None = None) -> int:
    from nanochat_jax.engine import EnginePool
    from nanochat_jax.tasks import TaskDataError
    from scripts.chat_cli import load_chat_model

    args = parse_args(argv)
    names = task_names(args.task_name)
    mesh = setup_mesh(args.mesh)
    args.mesh = args.mesh or str(mesh.size)  # the report says what ran
    try:  # every dataset first: a missing one should not cost a model load
        tasks = {name: load_task(name) for name in names}
    except TaskDataError as e:
        raise SystemExit(f"error: {e}") from None
    model, tokenizer, _ = load_chat_model(args)

    engine = None
    if any(task.eval_type == "generative" for task in tasks.values()):
        # one replica per device, shared so that the generative tasks reuse the compilations
        engine = EnginePool(model, tokenizer, devices=mesh.local_devices)
        log.info("generating on %d device(s)", len(engine))
    results: dict[str, float] = {}
    for name, task in tasks.items():
        accuracy = run_chat_eval(
            name,
            model,
            tokenizer,
            batch_size=args.batch_size * sharding.data_parallel_size(mesh),
            mesh=mesh,
            max_problems=args.max_problems,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            engine=engine,
            task=task,
        )
        results[name] = accuracy
        print(f"{name} accuracy: {100 * accuracy:.2f}%", flush=True)

    chatcore = chatcore_metric(results)
    chatcore_item = {}
    if chatcore is not None:
        # The metric's own line keeps its name: report.py reads the summary table's ChatCORE by
        # that exact key. How many tasks it averages (5, or 6 with SpellingBee) goes beside it.
        chatcore_item = {"ChatCORE metric": chatcore, "ChatCORE tasks": len(results)}
        print(f"ChatCORE metric: {chatcore:.4f} (over {len(results)} tasks)")
    demo = {"Task data": "offline demo (not comparable with nanochat)"} if is_demo() else {}
    path = report.log_section(
        f"Chat evaluation {args.source}", [vars(args), demo, results, chatcore_item]
    )
    log.info("report section written to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
