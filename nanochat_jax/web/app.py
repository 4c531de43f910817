"""The chat web app (nanochat's chat_web, on Flask): one page, streamed completions, health, stats.

    GET  /                  the chat page (static/index.html)
    POST /chat/completions  {"messages": [{"role": "user"|"assistant", "content": str}, ...],
                             "temperature"?: float, "top_k"?: int, "max_tokens"?: int}
                            -> text/event-stream: `data: {"token": "<text>", "gpu": <worker>}`
                               per piece of text, then `data: {"done": true}`
    GET  /health            {"status": "ok", "ready", "num_gpus", "available_workers", "defaults"}
    GET  /stats             {"total_workers", "available_workers", "busy_workers", "workers"}

Bad requests get HTTP 400 with {"error": "<what was wrong and what is allowed>"}.

Concurrency: a fixed pool of workers handed out through a queue. A reply holds one worker from
its first streamed byte to its last, so the tokens of two replies can never mix; requests beyond
the pool wait in the queue. Workers on the same device share one Engine: an Engine keeps no
per-request state (each `generate` call makes its own KV cache), and sharing it means its jitted
prefill/decode compile once per device, not once per worker. Serve the app with a threaded
WSGI server (scripts/chat_web.py uses werkzeug's).

Text is streamed UTF-8 safe: a character whose bytes span several tokens is sent once complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flask import Flask, Response, jsonify, request, send_from_directory
from flax import nnx
from werkzeug.exceptions import HTTPException

from nanochat_jax.chat import render_prompt, stream_reply
from nanochat_jax.common import get_logger
from nanochat_jax.engine import Engine

log = get_logger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

# nanochat's request limits.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MAX_TOKENS_RANGE = (1, 4096)
MAX_BODY_BYTES = 1 << 20  # 32000 characters are at most ~200 KB as JSON-escaped text


@dataclass(frozen=True)
class ChatSettings:
    """Server defaults for requests that leave a sampling parameter out (nanochat's flags)."""

    temperature: float = 0.8
    top_k: int = 50
    max_tokens: int = 512

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, TEMPERATURE_RANGE, integer=False)
        _check_range("top_k", self.top_k, TOP_K_RANGE, integer=True)
        _check_range("max_tokens", self.max_tokens, MAX_TOKENS_RANGE, integer=True)


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    temperature: float
    top_k: int
    max_tokens: int


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); the message says what is allowed."""


def _check_range(name: str, value: Any, bounds: tuple, *, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(
            f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}"
        )
    lo, hi = bounds
    if not lo <= value <= hi:  # also refuses NaN
        raise RequestError(f"{name} must be between {lo} and {hi}, got {value!r}")


def parse_chat_request(body: bytes, settings: ChatSettings) -> ChatRequest:
    """The validated request in `body` (JSON); RequestError says what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError('the request body must be a JSON object like {"messages": [...]}')
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise RequestError('\'messages\' must be a list of {"role", "content"} objects')
    if not messages:
        raise RequestError("at least one message is required")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(messages)} (at most {MAX_MESSAGES})")
    total_chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise RequestError(f"messages[{i}].role must be 'user' or 'assistant', got {role!r}")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string")
        if not content:
            raise RequestError(f"messages[{i}].content is empty")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(
                f"messages[{i}].content is {len(content)} characters "
                f"(at most {MAX_MESSAGE_CHARS} per message)"
            )
        total_chars += len(content)
    if total_chars > MAX_TOTAL_CHARS:
        raise RequestError(
            f"the conversation is {total_chars} characters (at most {MAX_TOTAL_CHARS} in all)"
        )
    params = {}
    for name, bounds, integer in (
        ("temperature", TEMPERATURE_RANGE, False),
        ("top_k", TOP_K_RANGE, True),
        ("max_tokens", MAX_TOKENS_RANGE, True),
    ):
        value = data.get(name)
        if value is None:
            value = getattr(settings, name)
        _check_range(name, value, bounds, integer=integer)
        params[name] = value
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return ChatRequest(messages=messages, **params)


# ---- workers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    worker_id: int
    device: str
    engine: Any  # an Engine, or anything with its `config` and `generate`


class WorkerPool:
    """Workers handed out one request at a time through a queue."""

    def __init__(self, workers: list[Worker]):
        if not workers:
            raise ValueError("a worker pool needs at least one worker")
        self.workers = list(workers)
        self._idle: queue.Queue[Worker] = queue.Queue()
        for worker in self.workers:
            self._idle.put(worker)
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    def acquire(self) -> Worker:
        """The next free worker; blocks until one is released."""
        worker = self._idle.get()
        with self._lock:
            self._busy.add(worker.worker_id)
        return worker

    def release(self, worker: Worker) -> None:
        with self._lock:
            self._busy.discard(worker.worker_id)
        self._idle.put(worker)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            busy = set(self._busy)
        return {
            "total_workers": len(self.workers),
            "available_workers": len(self.workers) - len(busy),
            "busy_workers": len(busy),
            "workers": [
                {"gpu_id": w.worker_id, "device": w.device, "busy": w.worker_id in busy}
                for w in self.workers
            ],
        }


def make_workers(
    model: nnx.Module, tokenizer, num_workers: int, devices: list[jax.Device] | None = None
) -> list[Worker]:
    """`num_workers` workers spread round-robin over `devices` (default: every local
    accelerator, or the first CPU device: CPU "devices" share the same cores). One Engine per
    device, with its own copy of the parameters; workers on the same device share it."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if devices is None:
        devices = jax.local_devices()
        if devices[0].platform == "cpu":
            devices = devices[:1]
    engines: dict[jax.Device, Engine] = {}
    workers = []
    for i in range(num_workers):
        device = devices[i % len(devices)]
        if device not in engines:
            graphdef, state = nnx.split(model)
            engines[device] = Engine(nnx.merge(graphdef, jax.device_put(state, device)), tokenizer)
        workers.append(Worker(worker_id=i, device=str(device), engine=engines[device]))
    return workers


# ---- the app ---------------------------------------------------------------------------------


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _stream_reply(
    pool: WorkerPool, tokenizer, prompt: list[int], req: ChatRequest
) -> Iterator[str]:
    """SSE events of one reply. The worker is taken when streaming starts and given back in
    `finally`, which also runs when the client goes away (the server closes this generator)."""
    worker = pool.acquire()
    pieces: list[str] = []
    try:
        reply = stream_reply(
            worker.engine,
            tokenizer,
            prompt,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            seed=secrets.randbelow(2**31),
        )
        with contextlib.closing(reply):  # also when the client goes away mid-reply
            for _, text in reply:
                if text:  # empty while a multi-byte character is incomplete
                    pieces.append(text)
                    yield _event({"token": text, "gpu": worker.worker_id})
        log.info("response (worker %d): %r", worker.worker_id, "".join(pieces))
        yield _event({"done": True})
    except Exception as e:  # the stream has started: report in-band, keep serving
        log.exception("generation failed on worker %d", worker.worker_id)
        yield _event({"error": f"generation failed: {e}"})
        yield _event({"done": True})
    finally:
        pool.release(worker)


def create_app(pool: WorkerPool, tokenizer, settings: ChatSettings | None = None) -> Flask:
    """The Flask app serving `pool`'s workers; `settings` are the sampling defaults."""
    settings = settings or ChatSettings()
    context_len = pool.workers[0].engine.config.sequence_len
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        return jsonify(error=e.description), e.code

    @app.after_request
    def allow_any_origin(response: Response) -> Response:
        # nanochat's server allows every origin, so pages served elsewhere can call the API.
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        return response

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    @app.get("/logo.svg")
    def logo():
        return send_from_directory(STATIC_DIR, "logo.svg")

    @app.get("/health")
    def health():
        stats = pool.stats()
        return jsonify(
            status="ok",
            ready=True,
            num_gpus=stats["total_workers"],
            available_workers=stats["available_workers"],
            defaults=dataclasses.asdict(settings),  # the page shows them
        )

    @app.get("/stats")
    def stats():
        return jsonify(pool.stats())

    @app.post("/chat/completions")
    def chat_completions():
        try:
            req = parse_chat_request(request.get_data(), settings)
        except RequestError as e:
            log.info("refused request: %s", e)
            return jsonify(error=str(e)), 400
        prompt = render_prompt(tokenizer, req.messages)
        if len(prompt) >= context_len:
            message = (
                f"the conversation is {len(prompt)} tokens but the model's context is "
                f"{context_len}: start a new conversation or shorten it"
            )
            return jsonify(error=message), 400
        log.info(
            "request: %d messages, temperature=%s, top_k=%s, max_tokens=%s",
            len(req.messages),
            req.temperature,
            req.top_k,
            req.max_tokens,
        )
        for message in req.messages:
            log.info("  %s: %r", message["role"], message["content"])
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(
            _stream_reply(pool, tokenizer, prompt, req),
            mimetype="text/event-stream",
            headers=headers,
        )

    return app
