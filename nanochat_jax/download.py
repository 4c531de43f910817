"""Robust HTTP downloads: timeouts, retries with backoff, Range resume, verify, atomic rename.

Shared by the FineWeb-EDU shards (dataset.py), the CORE eval bundle and the task datasets. A file
is downloaded to `<dest>.tmp`, checked by the caller's `verify(tmp)` (which raises
CorruptDownload), then renamed over `dest`: a killed or failed download never leaves a file that
looks finished, and a partial `.tmp` is continued by the next attempt with an HTTP Range request.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanochat_jax.common import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class DownloadConfig:
    """How hard to try. Defaults follow nanochat (5 attempts, sleeps of 2, 4, 8, 16 s)."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # per blocking read: a stalled transfer fails after this long
    max_attempts: int = 5
    backoff_s: float = 2.0  # sleep backoff_s * 2**(attempt-1) after a failed attempt
    chunk_bytes: int = 1 << 20


class OfflineError(ConnectionError):
    """The server cannot be reached at all (no network, DNS failure, refused)."""


class _PermanentError(Exception):
    """Retrying cannot help (e.g. HTTP 404)."""


def make_opener(read_timeout_s: float) -> urllib.request.OpenerDirector:
    """A urllib opener whose sockets switch from the connect timeout to a read timeout once
    connected (urllib alone uses one timeout for both). Proxies and redirects work as usual."""

    class _HTTPConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            self.sock.settimeout(read_timeout_s)

    class _HTTPSConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            self.sock.settimeout(read_timeout_s)

    class _HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(_HTTPConnection, req)

    class _HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(_HTTPSConnection, req, context=ssl.create_default_context())

    return urllib.request.build_opener(_HTTPHandler(), _HTTPSHandler())


def check_reachable(base_url: str, timeout_s: float, offline_hint: str = "") -> None:
    """Fail fast with one clear line when the server cannot be reached, instead of retrying
    every file for half a minute. Skipped behind a proxy (the proxy decides reachability)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base URL must be http(s)://host/..., got {base_url!r}")
    if urllib.request.getproxies().get(parts.scheme):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise OfflineError(
            f"cannot reach {parts.hostname}:{port} ({e.__class__.__name__}: {e}); are you offline? "
            f"{offline_hint}"
        ) from None


def _fetch(
    url: str,
    tmp: Path,
    cfg: DownloadConfig,
    opener: urllib.request.OpenerDirector,
    on_bytes: Callable[[int], None],
    stop: threading.Event,
) -> None:
    """Download `url` into `tmp`, continuing a partial `tmp` with an HTTP Range request."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    headers = {"User-Agent": "nanochat-jax"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = opener.open(
            urllib.request.Request(url, headers=headers), timeout=cfg.connect_timeout_s
        )
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:  # the partial file is not a prefix we can extend: start over
            tmp.unlink(missing_ok=True)
            raise ConnectionError("HTTP 416 for a resumed download; restarting from 0") from None
        if 400 <= e.code < 500 and e.code not in (408, 429):
            raise _PermanentError(f"HTTP {e.code} {e.reason} for {url}") from None
        raise
    with response:
        resumed = offset > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            tmp.unlink(missing_ok=True)
            raise ConnectionError("server answered the Range request with another range")
        length = response.headers.get("Content-Length")
        written = 0
        with open(tmp, "ab" if resumed else "wb") as f:
            while chunk := response.read1(cfg.chunk_bytes):  # read1: keep what came before a stall
                if stop.is_set():
                    raise InterruptedError("download cancelled")
                f.write(chunk)
                written += len(chunk)
                on_bytes(len(chunk))
        if length is not None and written != int(length):
            raise ConnectionError(f"body ended after {written} of {length} bytes")


class CorruptDownload(Exception):
    """Raised by a `verify` callback: the downloaded bytes are not a valid file.

    permanent=True: the file arrived whole but is the wrong file (e.g. a zip without the
    expected contents), so downloading it again cannot help and is not tried.
    """

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def download_file(
    url: str,
    dest: Path,
    *,
    cfg: DownloadConfig = DownloadConfig(),
    verify: Callable[[Path], None] | None = None,
    opener: urllib.request.OpenerDirector | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
    stop: threading.Event | None = None,
) -> str | None:
    """Fetch `url` to `dest` with retries; None on success, else the last error (one line).

    `verify(path)` runs on the finished temporary file and raises CorruptDownload for bad bytes:
    such a file is deleted (never resumed) and the download retried.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    opener = opener or make_opener(cfg.read_timeout_s)
    stop = stop or threading.Event()
    error = "no attempt made"
    for attempt in range(1, cfg.max_attempts + 1):
        try:
            _fetch(url, tmp, cfg, opener, on_bytes, stop)
            if verify is not None:
                verify(tmp)
            os.replace(tmp, dest)
            return None
        except _PermanentError as e:
            tmp.unlink(missing_ok=True)
            return str(e)
        except CorruptDownload as e:
            tmp.unlink(missing_ok=True)  # never keep (nor resume) a bad file
            error = f"corrupt download: {e}"
            if e.permanent:
                return f"{error} (not retried: a complete file with the wrong contents)"
        except (OSError, http.client.HTTPException) as e:
            # a partial .tmp stays: the next attempt (or run) continues it with a Range request
            error = f"{e.__class__.__name__}: {e}"
        if stop.is_set():
            return "cancelled"
        log.debug("%s attempt %d/%d failed: %s", dest.name, attempt, cfg.max_attempts, error)
        if attempt < cfg.max_attempts:
            stop.wait(cfg.backoff_s * 2 ** (attempt - 1))
    return f"{error} (after {cfg.max_attempts} attempts)"
