"""The chat page in a real headless browser: Debian's chromium, driven from Python over the
DevTools protocol, loads the page from a live server, sends messages and watches the streamed
replies of a tiny random model.

No browser-automation package is needed: chromium's `--remote-debugging-pipe` speaks the DevTools
protocol as NUL-separated JSON on file descriptors 3 (commands in) and 4 (replies and events out).
Without chromium the tests are skipped; install it with

    apt-get install -y --no-install-recommends chromium

Also a tool for the docs screenshot, against any saved model:

    python -m tests.test_chat_web_browser --screenshot docs/chat_web.png -i base "Hello!" ...
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from nanochat_jax.web.app import (
    ChatSettings,
    Worker,
    WorkerPool,
    create_app,
    make_workers,
    render_prompt,
)
from tests.test_chat_cli import greedy_reply, make_tiny_base

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# argv: fd to become 3, fd to become 4, program, args...
_TRAMPOLINE = (
    "import os, sys\n"
    "for new, old in ((3, int(sys.argv[1])), (4, int(sys.argv[2]))):\n"
    "    if old != new:\n"
    "        os.dup2(old, new)\n"
    "        os.close(old)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)
INSTALL_HINT = "apt-get install -y --no-install-recommends chromium"
MAX_TOKENS = 16
TOKEN_DELAY_S = 0.04  # slows the tiny model down so the test can watch a reply grow


def find_browser() -> str | None:
    return next((path for name in _BROWSERS if (path := shutil.which(name))), None)


class Browser:
    """One headless chromium page, driven over the DevTools protocol on a pipe."""

    def __init__(self, binary: str, width: int = 1100, height: int = 760, mobile: bool = False):
        self._profile = tempfile.TemporaryDirectory(prefix="chat_web_browser_")
        commands_r, self._commands_w = os.pipe()
        self._replies_r, replies_w = os.pipe()
        flags = [
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-sandbox",  # CI containers run as root, where the sandbox cannot start
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            f"--user-data-dir={self._profile.name}",
            "about:blank",
        ]
        # A small trampoline moves our pipe ends to the descriptor numbers chromium expects.
        with open(Path(self._profile.name) / "stderr.log", "wb") as stderr:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _TRAMPOLINE, str(commands_r), str(replies_w), binary]
                + flags,
                pass_fds=(commands_r, replies_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        os.close(commands_r)
        os.close(replies_w)
        self._buffer, self._next_id, self.events = b"", 0, []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}
        self.call("Emulation.setDeviceMetricsOverride", metrics)
        self.call("Page.enable")

    def close(self) -> None:
        try:
            self._call("Browser.close", timeout_s=5)
        except (OSError, TimeoutError, RuntimeError):
            pass
        os.close(self._commands_w)
        os.close(self._replies_r)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._profile.cleanup()

    # ---- protocol ---------------------------------------------------------------------------

    def call(self, method: str, params: dict | None = None, timeout_s: float = 30) -> dict:
        """A command to the page; its result."""
        return self._call(method, params, timeout_s, session=self._session)

    def _call(self, method, params=None, timeout_s=30.0, session=None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._replies_r, 1 << 20)
            if not chunk:
                log = (Path(self._profile.name) / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"chromium exited; its last words:\n{log[-3000:]}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    # ---- page helpers -----------------------------------------------------------------------

    def eval(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def wait_for(self, expression: str, timeout_s: float = 60, every_s: float = 0.02) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(every_s)
        raise AssertionError(f"timed out waiting for {expression}")

    def type_and_enter(self, text: str) -> None:
        """Types into the message box as a user would, then presses Enter."""
        self.eval("document.getElementById('input').focus()")
        self.call("Input.insertText", {"text": text})
        key = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
        self.call("Input.dispatchKeyEvent", {"type": "keyDown", **key})
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **key})

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        box = self.eval(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            event = {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            self.call("Input.dispatchMouseEvent", event)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def texts(self, selector: str) -> list[str]:
        return self.eval(
            f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.textContent)"
        )


class SlowEngine:
    """An engine whose tokens trickle out, so that streaming can be watched."""

    def __init__(self, engine, delay_s: float):
        self.engine, self.delay_s, self.config = engine, delay_s, engine.config

    def generate(self, *args, **kwargs):
        for column in self.engine.generate(*args, **kwargs):
            time.sleep(self.delay_s)
            yield column


@contextmanager
def serving(pool: WorkerPool, tokenizer, settings: ChatSettings):
    server = make_server("127.0.0.1", 0, create_app(pool, tokenizer, settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        thread.join(timeout=10)


# ---- tests ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_binary():
    binary = find_browser()
    if binary is None:
        message = f"chromium not found; install it to run the browser tests: {INSTALL_HINT}"
        print(message)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="module")
def live(tmp_path_factory, browser_binary):
    """A live server with one slowed-down worker on a tiny random model, and a browser."""
    # a longer context than the other tests: random replies re-encode to many tokens
    model, tokenizer = make_tiny_base(tmp_path_factory.mktemp("browser_base"), sequence_len=256)
    (worker,) = make_workers(model, tokenizer, 1)
    pool = WorkerPool([Worker(0, worker.device, SlowEngine(worker.engine, TOKEN_DELAY_S))])
    with serving(pool, tokenizer, ChatSettings(max_tokens=MAX_TOKENS)) as url:
        browser = Browser(browser_binary)
        try:
            yield Live(url, browser, worker.engine, tokenizer)
        finally:
            browser.close()


@dataclass
class Live:
    url: str
    browser: Browser
    engine: Any
    tokenizer: Any

    def expected(self, *user_and_assistant: str) -> str:
        """The greedy reply the page must show after these alternating messages."""
        messages = [
            {"role": ("user", "assistant")[i % 2], "content": content}
            for i, content in enumerate(user_and_assistant)
        ]
        prompt = render_prompt(self.tokenizer, messages)
        room = self.engine.config.sequence_len - len(prompt)
        return greedy_reply(self.engine, self.tokenizer, prompt, min(MAX_TOKENS, room))


IDLE = "document.body.dataset.busy === 'false'"


def test_page_streams_a_reply_and_keeps_the_conversation(live):
    b = live.browser
    b.open(live.url)
    assert b.wait_for("document.getElementById('status').dataset.state === 'ready'")
    assert "1 worker" in b.eval("document.getElementById('status-text').textContent")
    assert b.eval("document.getElementById('settings').textContent") == "temperature 0.8 · top-k 50"

    b.type_and_enter("/temperature 0")  # greedy, so the reply is known in advance
    b.wait_for("document.querySelector('.note') !== null")
    assert b.texts(".note") == ["temperature set to 0"]
    assert b.eval("document.getElementById('settings').textContent") == "temperature 0 · top-k 50"

    b.type_and_enter("hello")
    b.wait_for("document.body.dataset.busy === 'true'", every_s=0.005)
    seen = set()
    while b.eval("document.body.dataset.busy") == "true":
        seen.update(b.texts(".msg.streaming"))
        time.sleep(0.005)
    want = live.expected("hello")
    assert want
    assert b.texts(".msg") == ["hello", want]
    partial = {text for text in seen if text and text != want}
    assert partial and all(want.startswith(text) for text in partial), (seen, want)
    assert b.eval("document.getElementById('input').value") == ""

    b.type_and_enter("and then?")  # a second turn sends the whole history
    b.wait_for(IDLE + " && document.querySelectorAll('.msg').length === 4")
    assert b.texts(".msg") == [
        "hello",
        want,
        "and then?",
        live.expected("hello", want, "and then?"),
    ]

    b.open(live.url)  # a reload keeps the conversation (localStorage)
    b.wait_for("document.querySelectorAll('.msg').length === 4")
    assert b.texts(".msg.user") == ["hello", "and then?"]


def test_edit_regenerate_and_new_conversation(live):
    b = live.browser
    want = live.expected("hello")
    saved = {  # a conversation as the page stores it, with a wrong first reply
        "messages": [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "(an old reply)"},
            {"role": "user", "content": "more"},
            {"role": "assistant", "content": "(another)"},
        ],
        "temperature": 0,
        "topK": None,
    }
    b.eval(f"localStorage.setItem('nanochat-jax-chat', {json.dumps(json.dumps(saved))})")
    b.open(live.url)
    b.wait_for("document.querySelectorAll('.msg').length === 4")

    b.click(".msg.assistant")  # regenerate the first reply: what follows it is dropped
    b.wait_for(IDLE + " && document.querySelectorAll('.msg').length === 2")
    assert b.texts(".msg") == ["hello", want]

    b.click(".msg.user")  # edit: the message goes back into the box, the conversation is cut
    assert b.eval("document.getElementById('input').value") == "hello"
    assert b.texts(".msg") == []
    b.eval("document.getElementById('input').value = ''")
    b.type_and_enter("the fox")
    b.wait_for(IDLE + " && document.querySelectorAll('.msg').length === 2")
    assert b.texts(".msg") == ["the fox", live.expected("the fox")]

    b.type_and_enter("/help")
    assert "/topk" in b.texts(".note")[-1]
    b.type_and_enter("/topk 500")
    assert b.texts(".note.error")[-1] == "top-k must be an integer from 1 to 200"
    b.click("#new-chat")
    assert b.texts(".msg") == [] and b.eval("!document.getElementById('empty').hidden")


def test_page_fits_a_phone_screen(live, browser_binary):
    phone = Browser(browser_binary, width=390, height=844, mobile=True)
    try:
        phone.open(live.url)
        phone.wait_for("document.getElementById('status').dataset.state === 'ready'")
        wide = phone.eval("document.documentElement.scrollWidth")
        assert wide <= 390, f"the page is {wide}px wide on a 390px screen"
        box = phone.eval(
            "(() => { const r = document.getElementById('input').getBoundingClientRect();"
            " return [r.left, r.right, r.bottom]; })()"
        )
        assert 0 <= box[0] and box[1] <= 390 and box[2] <= 844
        assert phone.eval("getComputedStyle(document.getElementById('input')).fontSize") == "16px"
    finally:
        phone.close()


# ---- the docs screenshot ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Serve a saved model, hold a short conversation in the browser, save a screenshot."""
    from scripts.chat_cli import add_model_flags, load_chat_model

    parser = argparse.ArgumentParser(description="screenshot of the chat page")
    add_model_flags(parser)
    parser.add_argument("--screenshot", type=Path, required=True)
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=760)
    parser.add_argument("--mobile", action="store_true")
    parser.add_argument("-t", "--temperature", type=float, default=0.8)
    parser.add_argument("-m", "--max-tokens", type=int, default=64)
    parser.add_argument("messages", nargs="+", help="user messages to send, in order")
    args = parser.parse_args(argv)
    binary = find_browser()
    if binary is None:
        raise SystemExit(f"chromium not found; install it: {INSTALL_HINT}")
    model, tokenizer, _ = load_chat_model(args)
    pool = WorkerPool(make_workers(model, tokenizer, 1))
    settings = ChatSettings(temperature=args.temperature, max_tokens=args.max_tokens)
    with serving(pool, tokenizer, settings) as url:
        browser = Browser(binary, args.width, args.height, args.mobile)
        try:
            browser.open(url)
            browser.wait_for("document.getElementById('status').dataset.state === 'ready'")
            count = "document.querySelectorAll('.msg, .note').length"
            for text in args.messages:
                before = browser.eval(count)
                browser.type_and_enter(text)  # a reply starts synchronously: busy at once
                browser.wait_for(f"{IDLE} && {count} > {before}", timeout_s=300)
            time.sleep(0.3)  # let the last paint settle
            browser.screenshot(args.screenshot)
        finally:
            browser.close()
    print(f"wrote {args.screenshot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
