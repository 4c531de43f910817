"""chat_web: every endpoint and validation rule through Flask's test client, SSE framing, UTF-8
safety, worker release, and several simultaneous clients against a real threaded server.

Most tests drive the app with a scripted engine (exact token streams, recorded arguments); the
end-to-end ones use a tiny random GPT loaded from a real base checkpoint.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import jax
import pytest
from werkzeug.serving import make_server

from nanochat_jax.web.app import (
    ChatSettings,
    RequestError,
    Worker,
    WorkerPool,
    create_app,
    make_workers,
    render_prompt,
)
from scripts import chat_web
from scripts.chat_cli import load_chat_model
from tests.test_chat_cli import greedy_reply, make_tiny_base, user_turn

SETTINGS = ChatSettings(temperature=0.8, top_k=50, max_tokens=512)


class ScriptedEngine:
    """Yields a fixed token stream and records how it was called."""

    def __init__(self, tokens: list[int], sequence_len: int = 1_000_000, fail_after: int = -1):
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.tokens, self.fail_after, self.calls = tokens, fail_after, []

    def generate(
        self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42
    ):
        self.calls.append(
            {"tokens": list(tokens), "num_samples": num_samples, "max_tokens": max_tokens,
             "temperature": temperature, "top_k": top_k, "seed": seed}
        )  # fmt: skip
        for i, token in enumerate(self.tokens[:max_tokens]):
            if i == self.fail_after:
                raise RuntimeError("device fell over")
            yield [token], [1]


class GatedEngine:
    """Holds every stream before its first token until `gate` is set."""

    def __init__(self, engine, gate: threading.Event):
        self.engine, self.gate, self.config = engine, gate, engine.config

    def generate(self, *args, **kwargs):
        assert self.gate.wait(timeout=120), "the test never opened the gate"
        yield from self.engine.generate(*args, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("web_base")
    model, tokenizer = make_tiny_base(base)
    return base, model, tokenizer


@pytest.fixture(scope="module")
def real_pool(tiny):
    _, model, tokenizer = tiny
    return WorkerPool(make_workers(model, tokenizer, 2))


def scripted_app(tokenizer, tokens, settings=SETTINGS, **engine_kwargs):
    engine = ScriptedEngine(tokens, **engine_kwargs)
    pool = WorkerPool([Worker(0, "scripted", engine)])
    app = create_app(pool, tokenizer, settings)
    return app.test_client(), engine, pool


def sse_events(body: str) -> list[dict]:
    """The payloads of an SSE body, checking the framing: `data: <json>` blocks, each ended by
    a blank line, nothing else."""
    assert body.endswith("\n\n"), body[-50:]
    blocks = body.split("\n\n")[:-1]
    for block in blocks:
        assert block.startswith("data: ") and "\n" not in block, block
    return [json.loads(block.removeprefix("data: ")) for block in blocks]


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text` (the tokenizer's 256 byte tokens)."""
    ranks = tokenizer.get_mergeable_ranks()
    return [ranks[bytes([b])] for b in text.encode()]


def post(client, payload, **kwargs):
    body = payload if isinstance(payload, bytes) else json.dumps(payload)
    return client.post("/chat/completions", data=body, content_type="application/json", **kwargs)


HELLO = {"messages": [{"role": "user", "content": "hello"}]}


# ---- pages and info endpoints ---------------------------------------------------------------


def test_page_and_logo_are_served(tiny):
    client, _, _ = scripted_app(tiny[2], [])
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for needle in ('id="input"', "chat/completions", 'fetch("health")', "/temperature", "/topk"):
        assert needle in html
    logo = client.get("/logo.svg")
    assert logo.status_code == 200 and logo.get_data(as_text=True).lstrip().startswith("<svg")


def test_health_and_stats(tiny):
    client, _, _ = scripted_app(tiny[2], [])
    health = client.get("/health").get_json()
    assert health == {
        "status": "ok",
        "ready": True,
        "num_gpus": 1,
        "available_workers": 1,
        "defaults": {"temperature": 0.8, "top_k": 50, "max_tokens": 512},
    }
    assert client.get("/stats").get_json() == {
        "total_workers": 1,
        "available_workers": 1,
        "busy_workers": 0,
        "workers": [{"gpu_id": 0, "device": "scripted", "busy": False}],
    }


def test_unknown_paths_and_methods_get_json_errors(tiny):
    client, _, _ = scripted_app(tiny[2], [])
    assert client.get("/nope").status_code == 404
    wrong = client.get("/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.get_json()


def test_cors_allows_any_origin(tiny):
    client, _, _ = scripted_app(tiny[2], [])
    preflight = client.options("/chat/completions")
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


# ---- streaming ------------------------------------------------------------------------------


def test_stream_framing_tokens_and_done(tiny):
    tokenizer = tiny[2]
    end = tokenizer.encode_special("<|assistant_end|>")
    reply = tokenizer.encode("Hello there, fox!")
    client, engine, _ = scripted_app(tokenizer, [*reply, end, *reply])
    response = post(client, HELLO)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    events = sse_events(response.get_data(as_text=True))
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token", "gpu"} and e["gpu"] == 0 for e in events[:-1])
    assert "".join(e["token"] for e in events[:-1]) == "Hello there, fox!"  # stopped at the end
    assert len(events) - 1 == len(reply)  # one event per token of plain text


def test_bos_also_stops_the_reply(tiny):
    tokenizer = tiny[2]
    reply = tokenizer.encode("fox")
    client, _, _ = scripted_app(tokenizer, [*reply, tokenizer.get_bos_token_id(), *reply])
    events = sse_events(post(client, HELLO).get_data(as_text=True))
    assert "".join(e.get("token", "") for e in events) == "fox"


def test_multibyte_characters_split_across_tokens_are_sent_whole(tiny):
    tokenizer = tiny[2]
    text = "né日😀!"
    client, _, _ = scripted_app(tokenizer, byte_tokens(tokenizer, text))
    events = sse_events(post(client, HELLO).get_data(as_text=True))
    tokens = [e["token"] for e in events[:-1]]
    assert tokens == ["n", "é", "日", "😀", "!"]
    assert events[-1] == {"done": True}


def test_a_trailing_incomplete_character_is_not_sent(tiny):
    tokenizer = tiny[2]
    client, _, _ = scripted_app(tokenizer, byte_tokens(tokenizer, "ok日")[:-1])
    events = sse_events(post(client, HELLO).get_data(as_text=True))
    assert [e.get("token") for e in events] == ["o", "k", None]


def test_prompt_layout_and_sampling_parameters(tiny):
    tokenizer = tiny[2]
    client, engine, _ = scripted_app(tokenizer, [])
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "how are you"},
    ]
    assert post(client, {"messages": messages}).status_code == 200
    special = tokenizer.encode_special
    expected = [
        tokenizer.get_bos_token_id(),
        *user_turn(tokenizer, "hello")[:-1],
        special("<|assistant_start|>"),
        *tokenizer.encode("hi there"),
        special("<|assistant_end|>"),
        *user_turn(tokenizer, "how are you"),
    ]
    call = engine.calls[-1]
    assert call["tokens"] == expected == render_prompt(tokenizer, messages)
    assert (call["temperature"], call["top_k"], call["max_tokens"]) == (0.8, 50, 512)
    assert call["num_samples"] == 1
    assert 0 <= call["seed"] < 2**31
    request = {"messages": messages, "temperature": 0.0, "top_k": 3, "max_tokens": 7}
    post(client, request).get_data()
    call = engine.calls[-1]
    assert (call["temperature"], call["top_k"], call["max_tokens"]) == (0.0, 3, 7)
    post(client, {"messages": messages, "temperature": None, "top_k": None}).get_data()
    assert (engine.calls[-1]["temperature"], engine.calls[-1]["top_k"]) == (0.8, 50)
    seeds = {engine.calls[i]["seed"] for i in range(3)}
    assert len(seeds) == 3  # a fresh seed per request


def test_reply_length_is_capped_by_the_context(tiny):
    tokenizer = tiny[2]
    client, engine, _ = scripted_app(tokenizer, [], sequence_len=40)
    post(client, {**HELLO, "max_tokens": 4096}).get_data()
    assert engine.calls[-1]["max_tokens"] == 40 - len(engine.calls[-1]["tokens"])
    too_long = {"messages": [{"role": "user", "content": "the quick brown fox " * 30}]}
    response = post(client, too_long)
    assert response.status_code == 400
    assert "model's context is 40" in response.get_json()["error"]


def test_generation_error_is_reported_in_the_stream_and_frees_the_worker(tiny):
    tokenizer = tiny[2]
    client, _, pool = scripted_app(tokenizer, tokenizer.encode("fox fox"), fail_after=1)
    events = sse_events(post(client, HELLO).get_data(as_text=True))
    assert "device fell over" in events[-2]["error"]
    assert events[-1] == {"done": True}
    assert pool.stats()["available_workers"] == 1


def test_a_client_that_goes_away_frees_its_worker(tiny):
    tokenizer = tiny[2]
    client, _, pool = scripted_app(tokenizer, tokenizer.encode("fox " * 50))
    response = post(client, HELLO, buffered=False)
    first = next(iter(response.response))
    assert first.startswith(b"data: ")
    assert pool.stats()["busy_workers"] == 1
    response.close()  # what the server does when the socket breaks
    stats = pool.stats()
    assert (stats["busy_workers"], stats["available_workers"]) == (0, 1)


def test_requests_and_responses_are_logged(tiny):
    tokenizer = tiny[2]
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("nanochat_jax.web.app")
    logger.addHandler(handler)
    try:
        client, _, _ = scripted_app(tokenizer, tokenizer.encode("Hello there"))
        post(client, {"messages": [{"role": "user", "content": "what is up"}]}).get_data()
    finally:
        logger.removeHandler(handler)
    joined = "\n".join(records)
    assert "user: 'what is up'" in joined
    assert "response (worker 0): 'Hello there'" in joined


# ---- validation -----------------------------------------------------------------------------


def _msgs(n: int, content: str = "hi") -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": content} for i in range(n)]


BAD_REQUESTS = [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    ({}, "'messages' must be a list"),
    ({"messages": "hello"}, "'messages' must be a list"),
    ({"messages": []}, "at least one message is required"),
    ({"messages": _msgs(501)}, "too many messages: 501 (at most 500)"),
    ({"messages": ["hello"]}, "messages[0] must be an object"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role must be 'user' or 'assistant', got None"),
    ({"messages": [{"role": "system", "content": "hi"}]}, "got 'system'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "user"}]}, "messages[0].content must be a string"),
    ({"messages": [*_msgs(2), {"role": "user", "content": ""}]}, "messages[2].content is empty"),
    ({"messages": _msgs(1, "x" * 8001)}, "is 8001 characters (at most 8000 per message)"),
    ({"messages": _msgs(5, "x" * 7000)}, "is 35000 characters (at most 32000 in all)"),
    ({**HELLO, "temperature": -0.1}, "temperature must be between 0.0 and 2.0, got -0.1"),
    ({**HELLO, "temperature": 2.01}, "temperature must be between 0.0 and 2.0"),
    ({**HELLO, "temperature": "hot"}, "temperature must be a number, got 'hot'"),
    ({**HELLO, "temperature": True}, "temperature must be a number"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "between 0.0 and"),
    ({**HELLO, "top_k": 0}, "top_k must be between 1 and 200, got 0"),
    ({**HELLO, "top_k": 201}, "top_k must be between 1 and 200, got 201"),
    ({**HELLO, "top_k": 1.5}, "top_k must be an integer, got 1.5"),
    ({**HELLO, "max_tokens": 0}, "max_tokens must be between 1 and 4096, got 0"),
    ({**HELLO, "max_tokens": 4097}, "max_tokens must be between 1 and 4096, got 4097"),
    ({**HELLO, "max_tokens": "10"}, "max_tokens must be an integer, got '10'"),
]


@pytest.mark.parametrize(("payload", "message"), BAD_REQUESTS)
def test_bad_requests_get_400_with_a_clear_message(tiny, payload, message):
    client, engine, pool = scripted_app(tiny[2], [])
    response = post(client, payload)
    assert response.status_code == 400
    assert message in response.get_json()["error"]
    assert engine.calls == [] and pool.stats()["available_workers"] == 1


GOOD_EDGES = [
    {"messages": _msgs(500)},
    {"messages": _msgs(1, "x" * 8000)},
    {"messages": _msgs(4, "x" * 8000)},  # exactly 32000 characters
    {"messages": _msgs(1, " ")},  # whitespace is content
    {**HELLO, "temperature": 0, "top_k": 1, "max_tokens": 1},
    {**HELLO, "temperature": 2.0, "top_k": 200, "max_tokens": 4096},
    {**HELLO, "model": "nanochat", "stream": True},  # OpenAI-style extras are ignored
]


@pytest.mark.parametrize("payload", GOOD_EDGES)
def test_limits_are_inclusive(tiny, payload):
    client, engine, _ = scripted_app(tiny[2], [])
    response = post(client, payload)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert sse_events(response.get_data(as_text=True)) == [{"done": True}]
    assert len(engine.calls) == 1


def test_oversized_body_is_refused_with_json(tiny):
    client, engine, _ = scripted_app(tiny[2], [])
    response = post(client, b"x" * (2 << 20))
    assert response.status_code == 413 and "error" in response.get_json()
    assert engine.calls == []


def test_settings_are_checked():
    with pytest.raises(RequestError, match="top_k must be between 1 and 200"):
        ChatSettings(top_k=0)
    with pytest.raises(ValueError, match="at least one worker"):
        WorkerPool([])


def test_chat_web_flags_are_checked(tiny, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tiny[0]))
    for argv in (["-t", "3"], ["-k", "0"], ["-m", "5000"], ["--workers", "0"], ["-p", "70000"]):
        with pytest.raises(SystemExit) as e:
            chat_web.main(["-i", "base", *argv])
        assert e.value.code == 2
    with pytest.raises(SystemExit, match="no sft checkpoint"):
        chat_web.main(["-i", "sft"])


# ---- the real model -------------------------------------------------------------------------


def test_real_model_reply_is_the_greedy_continuation(tiny, real_pool):
    _, _, tokenizer = tiny
    client = create_app(real_pool, tokenizer, SETTINGS).test_client()
    response = post(client, {**HELLO, "temperature": 0, "max_tokens": 12})
    events = sse_events(response.get_data(as_text=True))
    engine = real_pool.workers[0].engine
    prompt = render_prompt(tokenizer, HELLO["messages"])
    expected = greedy_reply(engine, tokenizer, prompt, 12)
    assert expected and "".join(e.get("token", "") for e in events) == expected
    assert events[-1] == {"done": True}


def test_checkpoint_loads_into_workers_per_device(tiny, monkeypatch):
    """What chat_web does on a multi-GPU host, on two fake CPU devices: one Engine (and one copy
    of the parameters) per device, workers round-robin over them, same greedy replies."""
    base, _, tokenizer = tiny
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(base))
    args = SimpleNamespace(source="base", model_tag=None, step=None, dtype="float32")
    model, tokenizer, meta = load_chat_model(args)
    assert meta["step"] == 0
    devices = jax.devices()[:2]
    workers = make_workers(model, tokenizer, 3, devices=devices)
    assert [w.device for w in workers] == [str(devices[0]), str(devices[1]), str(devices[0])]
    assert workers[0].engine is workers[2].engine is not workers[1].engine
    leaf = jax.tree.leaves(workers[1].engine._params)[0]
    assert leaf.devices() == {devices[1]}
    prompt = render_prompt(tokenizer, HELLO["messages"])
    replies = {greedy_reply(w.engine, tokenizer, prompt, 8) for w in workers[:2]}
    assert len(replies) == 1


def _stream(url: str, prompt: str) -> tuple[int, str]:
    payload = {
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 12,
    }
    request = urllib.request.Request(
        url + "/chat/completions",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, response.read().decode()


def test_simultaneous_clients_get_complete_separate_streams(tiny, real_pool):
    """6 clients at once against a real threaded server with 2 workers: while the first two
    streams are held, /stats shows both workers busy; then every client gets exactly its own
    greedy reply, framed correctly, and the workers are all free again."""
    _, _, tokenizer = tiny
    gate = threading.Event()
    gated = WorkerPool(
        [Worker(w.worker_id, w.device, GatedEngine(w.engine, gate)) for w in real_pool.workers]
    )
    server = make_server("127.0.0.1", 0, create_app(gated, tokenizer, SETTINGS), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    prompts = ["hello", "the fox", "how are you", "café", "日本語", "12, 345"]
    engine = real_pool.workers[0].engine
    expected = [
        greedy_reply(
            engine, tokenizer, render_prompt(tokenizer, [{"role": "user", "content": p}]), 12
        )
        for p in prompts
    ]
    try:
        with ThreadPoolExecutor(len(prompts)) as clients:
            futures = [clients.submit(_stream, url, p) for p in prompts]
            stats = _wait_for(url, lambda s: s["busy_workers"] == 2)
            assert stats["available_workers"] == 0 and stats["total_workers"] == 2
            assert all(w["busy"] for w in stats["workers"])
            health = json.loads(urllib.request.urlopen(url + "/health", timeout=10).read())
            assert health["available_workers"] == 0
            gate.set()
            results = [f.result(timeout=240) for f in futures]
        for (status, body), want in zip(results, expected, strict=True):
            assert status == 200
            events = sse_events(body)
            assert events[-1] == {"done": True} and all("token" in e for e in events[:-1])
            assert "".join(e["token"] for e in events[:-1]) == want
        gpus = {e["gpu"] for _, body in results for e in sse_events(body)[:-1]}
        assert gpus <= {0, 1}
        assert _stats(url)["busy_workers"] == 0
    finally:
        gate.set()
        server.shutdown()
        thread.join(timeout=10)


def _stats(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/stats", timeout=10).read())


def _wait_for(url: str, ready, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = _stats(url)
        if ready(stats):
            return stats
        time.sleep(0.05)
    raise AssertionError(f"/stats never reached the expected state: {_stats(url)}")


def test_server_reports_http_errors_to_real_clients(tiny, real_pool):
    _, _, tokenizer = tiny
    server = make_server("127.0.0.1", 0, create_app(real_pool, tokenizer), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.server_port}/chat/completions", data=b"{}"
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 400
        assert "'messages' must be a list" in json.loads(e.value.read())["error"]
    finally:
        server.shutdown()
        thread.join(timeout=10)
