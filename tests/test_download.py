"""download.download_file: the generic fetch used for shards, the eval bundle and task data."""

from __future__ import annotations

import threading

from nanochat_jax.download import CorruptDownload, DownloadConfig, download_file
from tests.fault_server import FaultServer

FAST = DownloadConfig(connect_timeout_s=2.0, read_timeout_s=0.3, max_attempts=3, backoff_s=0.01)
BODY = b"0123456789" * 1000


def test_nested_name_with_faults_then_success(tmp_path):
    name = "ARC-Easy/test-00000-of-00001.parquet"
    with FaultServer({name: BODY}, {name: ["500", "truncate"]}) as server:
        error = download_file(f"{server.url}/{name}", tmp_path / "a" / "b.bin", cfg=FAST)
    assert error is None
    assert (tmp_path / "a" / "b.bin").read_bytes() == BODY
    assert not list(tmp_path.rglob("*.tmp"))
    # the truncated attempt was continued with a Range request, not restarted
    assert server.requests[name][-1] == f"bytes={len(BODY) // 2}-"


def test_verify_rejects_and_nothing_is_left(tmp_path):
    calls = []

    def verify(path):
        calls.append(path.read_bytes())
        raise CorruptDownload("not what we wanted")

    with FaultServer({"x.zip": BODY}) as server:
        error = download_file(f"{server.url}/x.zip", tmp_path / "x.zip", cfg=FAST, verify=verify)
    assert error == "corrupt download: not what we wanted (after 3 attempts)"
    assert len(calls) == 3 and calls[0] == BODY
    assert list(tmp_path.iterdir()) == []


def test_404_is_not_retried(tmp_path):
    with FaultServer({}) as server:
        error = download_file(f"{server.url}/missing.json", tmp_path / "m.json", cfg=FAST)
    assert error.startswith("HTTP 404")
    assert len(server.requests["missing.json"]) == 1


def test_cancelled(tmp_path):
    stop = threading.Event()
    stop.set()
    with FaultServer({"y": BODY}, {"y": ["500"]}) as server:
        error = download_file(f"{server.url}/y", tmp_path / "y", cfg=FAST, stop=stop)
    assert error == "cancelled"
    assert not (tmp_path / "y").exists()


def test_permanent_corruption_is_not_retried(tmp_path):
    def verify(path):
        raise CorruptDownload("the zip holds no eval_bundle/core.yaml", permanent=True)

    with FaultServer({"b.zip": BODY}) as server:
        error = download_file(f"{server.url}/b.zip", tmp_path / "b.zip", cfg=FAST, verify=verify)
    assert error.startswith("corrupt download: the zip holds no eval_bundle/core.yaml (not retried")
    assert len(server.requests["b.zip"]) == 1
    assert list(tmp_path.iterdir()) == []
