"""A local HTTP server that injects download failures, for testing every downloader offline."""

from __future__ import annotations

import http.server
import threading
import time
from collections import defaultdict


class FaultServer:
    """Serves `files` under `<url>/<name>` (name may contain "/"); `faults[name]` lists what the
    next requests for it get: "500", "stall", "truncate", "corrupt", "404"; once the list is used
    up, the real file (Range requests answered with 206). `requests[name]` records the Range
    header of every request."""

    def __init__(
        self,
        files: dict[str, bytes],
        faults: dict[str, list[str]] | None = None,
        *,
        stall_s: float = 1.0,
    ):
        self.files = files
        self.stall_s = stall_s
        self.faults = {name: list(kinds) for name, kinds in (faults or {}).items()}
        self.requests: dict[str, list[str | None]] = defaultdict(list)  # name -> Range headers
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.split("/resolve/main/", 1)[-1]
                server.requests[name].append(self.headers.get("Range"))
                pending = server.faults.get(name, [])
                fault = pending.pop(0) if pending else None
                body = server.files.get(name)
                if fault == "404" or body is None:
                    self.send_error(404)
                elif fault == "500":
                    self.send_error(500)
                elif fault == "corrupt":
                    self._send(200, b"this is not parquet" * 20)
                elif fault == "truncate":  # promise the whole body, send half, hang up
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                elif fault == "stall":  # send a little, then go quiet past the read timeout
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    time.sleep(server.stall_s)
                    self.close_connection = True
                else:
                    self._send_file(body)

            def _send_file(self, body: bytes) -> None:
                ranged = self.headers.get("Range")
                if ranged:
                    start = int(ranged.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    self.send_header("Content-Length", str(len(body) - start))
                    self.end_headers()
                    self.wfile.write(body[start:])
                else:
                    self._send(200, body)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resolve/main"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self) -> FaultServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
