"""nanochat_jax.hf_data: downloads through the fault server (500, truncation, corrupt bytes, 404,
resume, offline), the cache layout, HF's shuffle order, demo-data separation, the CLI."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax import hf_data
from nanochat_jax.download import DownloadConfig
from nanochat_jax.hf_data import TaskDataError
from tests.fault_server import FaultServer

FAST = DownloadConfig(connect_timeout_s=2.0, read_timeout_s=0.3, max_attempts=3, backoff_s=0.01)
FAST4 = DownloadConfig(connect_timeout_s=2.0, read_timeout_s=0.3, max_attempts=4, backoff_s=0.01)
ARC_FILE = "ARC-Easy/train-00000-of-00001.parquet"


def parquet_bytes(rows: list[dict], row_group_size: int = 4) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=row_group_size)
    return buffer.getvalue()


ROWS = [{"question": f"q{i}", "answerKey": "ABCD"[i % 4]} for i in range(20)]
BODY = parquet_bytes(ROWS)


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    return tmp_path


def serve(files, faults=None) -> FaultServer:
    return FaultServer(files, faults)


def hub_url(server: FaultServer) -> str:
    return server.url.removesuffix("/resolve/main")


def test_real_paths():
    arc = hf_data.get_split("allenai/ai2_arc", "ARC-Challenge", "validation")
    assert arc.files == ("ARC-Challenge/validation-00000-of-00001.parquet",)
    assert hf_data.get_split("cais/mmlu", "auxiliary_train", "train").files == (
        "auxiliary_train/train-00000-of-00001.parquet",
    )
    assert hf_data.get_split("cais/mmlu", "all", "test").files == (
        "all/test-00000-of-00001.parquet",
    )
    assert hf_data.get_split("openai/gsm8k", "socratic", "train").files == (
        "socratic/train-00000-of-00001.parquet",
    )
    humaneval = hf_data.get_split("openai/openai_humaneval", "openai_humaneval", "test")
    assert humaneval.files == ("openai_humaneval/test-00000-of-00001.parquet",)
    smol = hf_data.get_split("HuggingFaceTB/smol-smoltalk", "default", "train")
    assert smol.files[-1] == "data/train-00003-of-00004.parquet" and len(smol.files) == 4
    assert hf_data.file_url(
        "https://huggingface.co", "openai/gsm8k", "main/test-00000-of-00001.parquet"
    ) == (
        "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet"
    )
    with pytest.raises(ValueError, match="unknown dataset split openai/gsm8k/main/validation"):
        hf_data.get_split("openai/gsm8k", "main", "validation")
    for keys in hf_data.GROUPS.values():
        assert all(key in hf_data.SPLITS for key in keys)


def test_shuffle_is_hf_datasets_order():
    # datasets.Dataset.shuffle(seed=42) == select(np.random.default_rng(42).permutation(n))
    assert hf_data.hf_shuffle_permutation(10).tolist() == [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]
    assert hf_data.hf_shuffle_permutation(0).tolist() == []
    perm = hf_data.hf_shuffle_permutation(1000, seed=7)
    assert sorted(perm.tolist()) == list(range(1000))
    assert perm.tolist() == np.random.default_rng(7).permutation(1000).tolist()


def test_download_through_faults_then_load(base_dir):
    faults = {ARC_FILE: ["500", "truncate", "corrupt"]}
    with serve({ARC_FILE: BODY}, faults) as server:
        rows = hf_data.load_rows(
            "allenai/ai2_arc", "ARC-Easy", "train", base_url=hub_url(server), cfg=FAST4
        )
    # 500 -> retried; truncated -> resumed with a Range request; corrupt -> deleted and refetched
    assert server.requests[ARC_FILE] == [None, None, f"bytes={len(BODY) // 2}-", None]
    local = base_dir / "task_data/allenai/ai2_arc/ARC-Easy/train/train-00000-of-00001.parquet"
    assert local.read_bytes() == BODY
    assert not list(base_dir.rglob("*.tmp"))
    assert list(rows) == [ROWS[i] for i in hf_data.hf_shuffle_permutation(20)]
    assert rows[-1] == rows[19] and rows[2:4] == [rows[2], rows[3]]
    with pytest.raises(IndexError):
        rows[20]
    # cached now: no more requests, also unshuffled
    with serve({}) as server:
        again = hf_data.load_rows(
            "allenai/ai2_arc", "ARC-Easy", "train", shuffle_seed=None, base_url=hub_url(server)
        )
        assert not server.requests
    assert list(again) == ROWS


def test_resume_a_partial_file(base_dir):
    tmp = base_dir / "task_data/allenai/ai2_arc/ARC-Easy/train/train-00000-of-00001.parquet.tmp"
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(BODY[:1000])
    with serve({ARC_FILE: BODY}) as server:
        hf_data.load_rows(
            "allenai/ai2_arc", "ARC-Easy", "train", base_url=hub_url(server), cfg=FAST4
        )
    assert server.requests[ARC_FILE] == ["bytes=1000-"]


def test_multi_file_split_fetches_only_missing_files(base_dir):
    split = hf_data.get_split("HuggingFaceTB/smol-smoltalk", "default", "train")
    chunks = [
        [{"messages": [{"content": f"{k}-{i}", "role": "user"}]} for i in range(3)]
        for k in range(4)
    ]
    files = {f: parquet_bytes(rows) for f, rows in zip(split.files, chunks, strict=True)}
    first = split.local_files(base_dir)[0]
    first.parent.mkdir(parents=True)
    first.write_bytes(files[split.files[0]])
    with serve(files) as server:
        rows = hf_data.load_rows(
            *split.key.rsplit("/", 2), shuffle_seed=None, base_url=hub_url(server), cfg=FAST
        )
    assert split.files[0] not in server.requests
    assert all(len(server.requests[f]) == 1 for f in split.files[1:])
    assert [r["messages"][0]["content"] for r in rows] == [
        f"{k}-{i}" for k in range(4) for i in range(3)
    ]


def test_404_is_one_clear_error(base_dir):
    with serve({}) as server, pytest.raises(TaskDataError) as info:
        hf_data.load_rows("openai/gsm8k", "main", "test", base_url=hub_url(server), cfg=FAST)
    message = str(info.value)
    assert "HTTP 404" in message and "main/test-00000-of-00001.parquet" in message
    assert "\n" not in message
    assert len(server.requests["main/test-00000-of-00001.parquet"]) == 1  # not retried


def test_failed_download_names_the_commands(base_dir):
    name = "main/test-00000-of-00001.parquet"
    with serve({name: BODY}, {name: ["500"] * 3}) as server, pytest.raises(TaskDataError) as info:
        hf_data.load_rows("openai/gsm8k", "main", "test", base_url=hub_url(server), cfg=FAST)
    assert "after 3 attempts" in str(info.value) and "python -m nanochat_jax.hf_data" in str(
        info.value
    )


def test_offline_with_nothing_cached(base_dir, monkeypatch):
    monkeypatch.setenv(hf_data.HF_URL_ENV, "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(TaskDataError) as info:
        hf_data.load_rows("openai/gsm8k", "main", "train", cfg=FAST)
    message = str(info.value)
    assert isinstance(info.value, OSError)  # stage scripts catch it with missing files
    assert "\n" not in message and "openai/gsm8k/main/train is not in" in message
    assert "are you offline?" in message
    assert "python -m nanochat_jax.hf_data" in message
    assert "python -m nanochat_jax.demo_tasks" in message


def test_unreadable_cached_file(base_dir):
    split = hf_data.get_split("openai/gsm8k", "main", "test")
    path = split.local_files(base_dir)[0]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1 garbage")
    with pytest.raises(TaskDataError, match="cannot read openai/gsm8k/main/test"):
        hf_data.load_rows("openai/gsm8k", "main", "test")


def test_demo_data_blocks_downloads(base_dir):
    (base_dir / "task_data").mkdir()
    (base_dir / "task_data" / hf_data.DEMO_MARKER).write_text("{}")
    with (
        serve({ARC_FILE: BODY}) as server,
        pytest.raises(TaskDataError, match="offline demo task data"),
    ):
        hf_data.load_rows(
            "allenai/ai2_arc", "ARC-Easy", "train", base_url=hub_url(server), cfg=FAST4
        )
    assert not server.requests


def test_write_split_deals_rows_over_files(base_dir):
    split = hf_data.get_split("HuggingFaceTB/smol-smoltalk", "default", "train")
    table = pa.Table.from_pylist([{"x": i} for i in range(10)])
    paths = hf_data.write_split(split, table, base_dir)
    assert [pq.read_table(p).num_rows for p in paths] == [2, 3, 2, 3]
    assert split.is_cached(base_dir)


def test_cli(base_dir, monkeypatch, capsys):
    files = {f: BODY for key in hf_data.GROUPS["gsm8k"] for f in hf_data.SPLITS[key].files}
    with serve(files) as server:
        monkeypatch.setenv(hf_data.HF_URL_ENV, hub_url(server))
        assert hf_data.main(["gsm8k"]) == 0
        assert hf_data.main(["GSM8K"]) == 0  # cached: nothing fetched twice
    assert all(len(server.requests[f]) == 1 for f in files)
    assert "2 dataset splits ready" in capsys.readouterr().out
    assert hf_data.main(["nope"]) == 2
    assert "unknown dataset name(s) ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hf_data.main([])
    with pytest.raises(SystemExit):
        hf_data.main(["--all", "arc"])


# ---- single files: the word list and the identity conversations ---------------------------

WORDS = b"apple\r\nbanana\r\ncherry\r\n"
IDENTITY = (
    b'[{"role": "user", "content": "Who are you?"}, '
    b'{"role": "assistant", "content": "nanochat-jax."}]\n'
)


def file_urls(server: FaultServer, monkeypatch) -> None:
    for task_file in hf_data.FILES.values():
        monkeypatch.setenv(task_file.url_env, f"{server.url}/{task_file.name}")


def test_file_urls_are_nanochats():
    words, identity = hf_data.FILES["words"], hf_data.FILES["identity"]
    assert words is hf_data.WORDS_FILE and identity is hf_data.IDENTITY_FILE
    # nanochat 8892470 tasks/spellingbee.py, fe5aed9 speedrun.sh
    assert words.url == (
        "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
    )
    assert identity.url == (
        "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
    )
    assert (words.name, identity.name) == ("words_alpha.txt", "identity_conversations.jsonl")
    assert words.local_path("/b") == hf_data.task_data_dir("/b") / "words_alpha.txt"


def test_file_url_override(monkeypatch):
    words = hf_data.WORDS_FILE
    monkeypatch.delenv(words.url_env, raising=False)
    assert words.resolve_url() == words.url
    monkeypatch.setenv(words.url_env, "http://mirror/w.txt")
    assert words.resolve_url() == "http://mirror/w.txt"
    assert words.resolve_url("http://arg/w.txt") == "http://arg/w.txt"


def test_files_download_through_faults(base_dir, monkeypatch):
    files = {"words_alpha.txt": WORDS, "identity_conversations.jsonl": IDENTITY}
    faults = {name: ["500", "truncate", "corrupt"] for name in files}
    with serve(files, faults) as server:
        file_urls(server, monkeypatch)
        for task_file in hf_data.FILES.values():
            path = hf_data.ensure_file(task_file, cfg=FAST4)
            assert path == base_dir / "task_data" / task_file.name
            assert path.read_bytes() == files[task_file.name]
        # 500 -> retried; truncated -> resumed with a Range request; corrupt -> refetched
        for name, body in files.items():
            assert server.requests[name] == [None, None, f"bytes={len(body) // 2}-", None]
        for task_file in hf_data.FILES.values():  # cached: no request
            hf_data.ensure_file(task_file, cfg=FAST4)
    assert all(len(r) == 4 for r in server.requests.values())
    assert not list(base_dir.rglob("*.tmp"))


def test_file_download_failures_are_one_line(base_dir, monkeypatch):
    name = "identity_conversations.jsonl"
    with serve({name: IDENTITY}, {name: ["corrupt"] * 3}) as server:
        file_urls(server, monkeypatch)
        with pytest.raises(TaskDataError) as info:
            hf_data.ensure_file(hf_data.IDENTITY_FILE, cfg=FAST)
        message = str(info.value)
        assert "corrupt download: not a JSONL file of conversations" in message
        assert "after 3 attempts" in message and "\n" not in message
        assert "python -m nanochat_jax.hf_data identity" in message
        with pytest.raises(TaskDataError, match="HTTP 404") as info:  # not served: not retried
            hf_data.ensure_file(hf_data.WORDS_FILE, cfg=FAST)
        assert server.requests["words_alpha.txt"] == [None]
    assert not hf_data.IDENTITY_FILE.is_cached(base_dir)


def test_file_offline_and_bad_url(base_dir, monkeypatch):
    monkeypatch.setenv(hf_data.WORDS_FILE.url_env, "http://127.0.0.1:9/words_alpha.txt")
    with pytest.raises(TaskDataError) as info:
        hf_data.ensure_file(hf_data.WORDS_FILE, cfg=FAST)
    message = str(info.value)
    assert isinstance(info.value, OSError) and "\n" not in message
    assert "words_alpha.txt is not in" in message and "are you offline?" in message
    assert "python -m nanochat_jax.hf_data words" in message
    assert "python -m nanochat_jax.demo_tasks" in message
    monkeypatch.setenv(hf_data.WORDS_FILE.url_env, "ftp://example.com/w.txt")
    with pytest.raises(TaskDataError, match=r"base URL must be http\(s\).*NANOCHAT_JAX_WORDS_URL"):
        hf_data.ensure_file(hf_data.WORDS_FILE, cfg=FAST)


def test_demo_data_blocks_file_downloads(base_dir, monkeypatch):
    (base_dir / "task_data").mkdir()
    (base_dir / "task_data" / hf_data.DEMO_MARKER).write_text("{}")
    with serve({"words_alpha.txt": WORDS}) as server:
        file_urls(server, monkeypatch)
        with pytest.raises(TaskDataError, match="offline demo task data .* without words_alpha"):
            hf_data.ensure_file(hf_data.WORDS_FILE, cfg=FAST)
    assert not server.requests


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"apple\nbanana split\n", "'banana split' is not a single alphabetic word"),
        (b"<html><body>rate limited</body></html>\n", "is not a single alphabetic word"),
        (b"\n\n", "word list has no words"),
        (b"caf\xe9\n", "word list is not UTF-8 text"),
    ],
)
def test_verify_word_list(tmp_path, body, message):
    path = tmp_path / "w.txt"
    path.write_bytes(body)
    with pytest.raises(hf_data.CorruptDownload, match=message):
        hf_data.verify_word_list(path)


def test_verify_word_list_accepts_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"a\r\naardvark\r\n\r\nZebra\r\n")
    hf_data.verify_word_list(path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json\n", "not a JSONL file of conversations"),
        (b'[{"role": "assistant", "content": "hi"}]\n', "line 1: needs at least a user"),
        (
            IDENTITY + b'[{"role": "user", "content": 1}, {"role": "assistant", "content": ""}]\n',
            "line 2: message 0 content must be a string",
        ),  # fmt: skip
        (b"\n", "no conversations"),
    ],
)
def test_verify_conversations(tmp_path, body, message):
    path = tmp_path / "c.jsonl"
    path.write_bytes(body)
    with pytest.raises(hf_data.CorruptDownload, match=message):
        hf_data.verify_conversations(path)
    path.write_bytes(IDENTITY + b"\n" + IDENTITY)
    hf_data.verify_conversations(path)


def test_cli_files(base_dir, monkeypatch, capsys):
    files = {"words_alpha.txt": WORDS, "identity_conversations.jsonl": IDENTITY}
    with serve(files) as server:
        file_urls(server, monkeypatch)
        assert hf_data.main(["words", "identity"]) == 0
        assert "0 dataset splits and 2 files ready" in capsys.readouterr().out
        assert hf_data.main(["WORDS"]) == 0  # cached: nothing fetched twice
    assert all(len(server.requests[name]) == 1 for name in files)
    assert (base_dir / "task_data" / "words_alpha.txt").read_bytes() == WORDS
    assert hf_data.main(["nope"]) == 2
    assert "allowed: ['arc', 'gsm8k', 'humaneval', 'identity', 'mmlu', 'smoltalk', 'words']" in (
        capsys.readouterr().err
    )


def test_cli_all_fetches_the_files_too(base_dir, monkeypatch, capsys):
    asked, real_prefetch = [], hf_data.prefetch

    def prefetch(names, **kwargs):
        asked.extend(names)
        return [hf_data.WORDS_FILE, hf_data.IDENTITY_FILE]

    monkeypatch.setattr(hf_data, "prefetch", prefetch)
    assert hf_data.main(["--all"]) == 0
    assert asked == ["arc", "mmlu", "gsm8k", "humaneval", "smoltalk", "words", "identity"]
    assert "0 dataset splits and 2 files ready" in capsys.readouterr().out
    # a failed file download: one error line, exit status 2
    monkeypatch.setattr(hf_data, "prefetch", real_prefetch)
    monkeypatch.setenv(hf_data.IDENTITY_FILE.url_env, "http://127.0.0.1:9/i.jsonl")
    assert hf_data.main(["identity"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: identity_conversations.jsonl is not in") and err.count("\n") == 1
