"""Shard download against a local HTTP server that injects faults; reading splits in order."""

from __future__ import annotations

import io
import socket
import urllib.error
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax import dataset, download
from nanochat_jax.dataset import DownloadConfig, shard_name
from tests.fault_server import FaultServer

FAST = DownloadConfig(connect_timeout_s=2.0, read_timeout_s=0.3, max_attempts=3, backoff_s=0.01)


def _parquet_bytes(texts: list[str], rows_per_group: int = 2) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), sink, row_group_size=rows_per_group)
    return sink.getvalue()


def _texts(index: int) -> list[str]:
    return [f"shard {index} doc {i} " + "lorem ipsum " * i for i in range(5)]


@pytest.fixture
def shards() -> dict[str, bytes]:
    return {shard_name(i): _parquet_bytes(_texts(i)) for i in range(6)}


def _assert_valid_shards(data_dir: Path, indices: list[int]) -> None:
    for i in indices:
        assert pq.read_table(data_dir / shard_name(i)).column("text").to_pylist() == _texts(i)
    assert not list(data_dir.glob("*.tmp"))


def test_retries_through_injected_faults(tmp_path, shards):
    faults = {
        shard_name(0): ["500", "500"],
        shard_name(1): ["stall"],
        shard_name(2): ["truncate"],
        shard_name(3): ["corrupt"],
    }
    with FaultServer(shards, faults, stall_s=FAST.read_timeout_s * 3) as server:
        result = dataset.download(
            5, 3, data_dir=tmp_path, base_url=server.url, cfg=FAST, progress=False
        )
    assert result.ok, result.failed
    assert result.downloaded == [0, 1, 2, 3, 4]
    _assert_valid_shards(tmp_path, [0, 1, 2, 3, 4])
    assert len(server.requests[shard_name(0)]) == 3  # two 500s, then success
    assert len(server.requests[shard_name(4)]) == 1
    # the truncated and stalled bodies were continued with a Range request, not restarted
    half = len(shards[shard_name(2)]) // 2
    assert server.requests[shard_name(2)] == [None, f"bytes={half}-"]
    assert server.requests[shard_name(1)] == [None, "bytes=100-"]
    # the corrupt body was thrown away and fetched again from the start
    assert server.requests[shard_name(3)] == [None, None]


def test_persistent_failure_gives_up_after_max_attempts(tmp_path, shards):
    with FaultServer(shards, {shard_name(1): ["500"] * 10}) as server:
        result = dataset.download(
            2, 2, data_dir=tmp_path, base_url=server.url, cfg=FAST, progress=False
        )
    assert result.downloaded == [0]
    assert list(result.failed) == [1]
    assert "500" in result.failed[1] and "3 attempts" in result.failed[1]
    assert len(server.requests[shard_name(1)]) == FAST.max_attempts
    assert not (tmp_path / shard_name(1)).exists()


def test_corrupt_file_is_never_kept(tmp_path, shards):
    with FaultServer(shards, {shard_name(0): ["corrupt"] * 10}) as server:
        result = dataset.download(
            1, 1, data_dir=tmp_path, base_url=server.url, cfg=FAST, progress=False
        )
    assert "corrupt download" in result.failed[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_404_without_retrying(tmp_path, shards, monkeypatch, capsys):
    del shards[shard_name(2)]
    with FaultServer(shards, {}) as server:
        monkeypatch.setenv(dataset.BASE_URL_ENV, server.url)  # the env var override
        code = dataset.main(["-n", "3", "-w", "2", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "shard_00002.parquet: HTTP 404" in err
    assert len(server.requests[shard_name(2)]) == 1
    _assert_valid_shards(tmp_path, [0, 1])


def test_resume_skips_finished_and_continues_partial(tmp_path, shards):
    (tmp_path / shard_name(0)).write_bytes(shards[shard_name(0)])
    partial = shards[shard_name(1)][:300]
    (tmp_path / (shard_name(1) + ".tmp")).write_bytes(partial)
    (tmp_path / (shard_name(2) + ".tmp")).write_bytes(b"garbage left by someone else")
    with FaultServer(shards, {}) as server:
        result = dataset.download(
            3, 2, data_dir=tmp_path, base_url=server.url, cfg=FAST, progress=False
        )
    assert result.skipped == [0] and result.downloaded == [1, 2] and result.ok
    assert shard_name(0) not in server.requests
    assert server.requests[shard_name(1)] == ["bytes=300-"]
    # a .tmp that is not a prefix of the file yields a corrupt result: discarded, refetched
    assert server.requests[shard_name(2)] == ["bytes=28-", None]
    _assert_valid_shards(tmp_path, [0, 1, 2])


def test_offline_is_one_clear_line(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = dataset.main(
        ["-n", "2", "--data-dir", str(tmp_path), "--base-url", f"http://127.0.0.1:{port}/x"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot reach 127.0.0.1") and "offline" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_refuses_to_mix_with_demo_data(tmp_path):
    (tmp_path / dataset.DEMO_MARKER).write_text("{}")
    with pytest.raises(ValueError, match="demo shards"):
        dataset.download(2, data_dir=tmp_path, progress=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_files"):
        dataset.download(0, progress=False)
    with pytest.raises(ValueError, match="split"):
        list(dataset.parquets_iter_batched("test"))


def test_splits_and_row_group_order(tmp_path, shards):
    for i in range(3):
        (tmp_path / shard_name(i)).write_bytes(shards[shard_name(i)])
    (tmp_path / (shard_name(3) + ".tmp")).write_bytes(b"partial")
    files = dataset.list_parquet_files(tmp_path)
    assert [f.name for f in files] == [shard_name(i) for i in range(3)]
    # 5 docs in row groups of 2: [d0 d1] [d2 d3] [d4]; rank 1 of 2 reads row group 1 of each file
    got = list(dataset.parquets_iter_batched("train", start=1, step=2, data_dir=tmp_path))
    assert got == [_texts(0)[2:4], _texts(1)[2:4]]
    val = list(dataset.parquets_iter_batched("val", data_dir=tmp_path))
    assert val == [_texts(2)[0:2], _texts(2)[2:4], _texts(2)[4:]]


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nanochat_jax.dataset -n"):
        dataset.split_files("train", tmp_path)
    (tmp_path / shard_name(0)).write_bytes(_parquet_bytes(["a"]))
    with pytest.raises(ValueError, match="at least 2 shards"):
        dataset.split_files("train", tmp_path)


def test_https_connections_are_built_with_both_timeouts():
    with socket.socket() as s:  # a port nobody listens on: the TLS connection class is built
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opener = download.make_opener(read_timeout_s=1.0)
    with pytest.raises(urllib.error.URLError, match="refused"):
        opener.open(f"https://127.0.0.1:{port}/shard_00000.parquet", timeout=1.0)
