"""Serve a chat page for a model (nanochat's scripts/chat_web.py, on Flask).

    python -m scripts.chat_web                        # the latest SFT model on http://0.0.0.0:8000
    python -m scripts.chat_web -i base -p 8080        # the base model, another port
    python -m scripts.chat_web --workers 8            # 8 concurrent replies (one per GPU on 8 GPUs)

The API (POST /chat/completions streaming server-sent events, GET /health, GET /stats) is
described in nanochat_jax/web/app.py. Requests and replies are logged.
"""

from __future__ import annotations

import argparse
import sys

from werkzeug.serving import make_server

from nanochat_jax.common import get_logger
from nanochat_jax.web.app import (
    MAX_TOKENS_RANGE,
    TEMPERATURE_RANGE,
    TOP_K_RANGE,
    ChatSettings,
    WorkerPool,
    create_app,
    make_workers,
)
from scripts.chat_cli import add_model_flags, load_chat_model

log = get_logger("chat_web")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(parser)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("-p", "--port", type=int, default=8000)
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default reply length")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="replies generated at once; spread round-robin over the GPUs (default 1)",
    )
    args = parser.parse_args(argv)
    for name, value, (lo, hi) in (
        ("--temperature", args.temperature, TEMPERATURE_RANGE),
        ("--top-k", args.top_k, TOP_K_RANGE),
        ("--max-tokens", args.max_tokens, MAX_TOKENS_RANGE),
    ):
        if not lo <= value <= hi:
            parser.error(f"{name} must be between {lo} and {hi}, got {value}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535], got {args.port}")

    model, tokenizer, _ = load_chat_model(args)
    pool = WorkerPool(make_workers(model, tokenizer, args.workers))
    settings = ChatSettings(args.temperature, args.top_k, args.max_tokens)
    app = create_app(pool, tokenizer, settings)
    try:
        server = make_server(args.host, args.port, app, threaded=True)
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port}: {e}") from None
    for worker in pool.workers:
        log.info("worker %d on %s", worker.worker_id, worker.device)
    shown = "localhost" if args.host in ("0.0.0.0", "::") else args.host
    log.info("chat page on http://%s:%d/ (Ctrl-C to stop)", shown, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
