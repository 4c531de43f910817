"""eval_bundle: download through injected faults, atomic extraction, the offline demo bundle."""

from __future__ import annotations

import errno
import io
import json
import zipfile
from pathlib import Path

import pytest

from nanochat_jax import eval_bundle
from nanochat_jax.download import CorruptDownload, DownloadConfig
from tests.fault_server import FaultServer

FAST = DownloadConfig(connect_timeout_s=2.0, read_timeout_s=0.5, max_attempts=3, backoff_s=0.01)
CORE_YAML = """icl_tasks:
- label: tiny_mc
  dataset_uri: world/tiny_mc.jsonl
  num_fewshot: [1]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
- label: tiny_lm
  dataset_uri: tiny_lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""
META_CSV = "Eval Task,Task Category,Random baseline,Description\ntiny_mc,x,25.0,a\ntiny_lm,y,0,b\n"
MC = {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0}
LM = {"context": "one two", "continuation": "three"}


def _zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buf.getvalue()


BUNDLE_ZIP = _zip(
    {
        "eval_bundle/core.yaml": CORE_YAML,
        "eval_bundle/eval_meta_data.csv": META_CSV,
        "eval_bundle/eval_data/world/tiny_mc.jsonl": (json.dumps(MC) + "\n") * 3,
        "eval_bundle/eval_data/tiny_lm.jsonl": json.dumps(LM) + "\n",
        "__MACOSX/eval_bundle/._core.yaml": "resource fork",
    }
)


def _leftovers(base: Path) -> list[str]:
    return sorted(p.name for p in base.iterdir() if p.name != "eval_bundle")


def test_download_through_faults_installs_a_complete_bundle(tmp_path):
    with FaultServer(
        {"eval_bundle.zip": BUNDLE_ZIP}, {"eval_bundle.zip": ["500", "truncate"]}
    ) as s:
        url = f"{s.url}/eval_bundle.zip"
        directory = eval_bundle.download_bundle(tmp_path, url=url, cfg=FAST)
        assert directory == tmp_path / "eval_bundle"
        assert _leftovers(tmp_path) == []  # no zip, no .tmp, no staging directory
        assert not (directory / "._core.yaml").exists() and not eval_bundle.is_demo(directory)
        tasks = eval_bundle.read_tasks(directory)
        assert [(t.label, t.task_type, t.num_fewshot) for t in tasks] == [
            ("tiny_mc", "multiple_choice", 1),
            ("tiny_lm", "language_modeling", 0),
        ]
        assert (
            tasks[0].continuation_delimiter == "\nAnswer: "
            and tasks[1].continuation_delimiter == " "
        )
        assert (tasks[0].random_baseline, tasks[1].random_baseline) == (25.0, 0.0)
        assert eval_bundle.load_task_data(directory, tasks[0]) == [MC] * 3
        assert tasks[1].task_meta()["dataset_uri"] == "tiny_lm.jsonl"
        requests = len(s.requests["eval_bundle.zip"])
        eval_bundle.download_bundle(tmp_path, url=url, cfg=FAST)  # present: skipped
        assert len(s.requests["eval_bundle.zip"]) == requests


@pytest.mark.parametrize(
    ("files", "faults", "message"),
    [
        ({"eval_bundle.zip": BUNDLE_ZIP}, ["corrupt"] * 3, "not a readable zip file"),
        ({"eval_bundle.zip": _zip({"other/core.yaml": "x"})}, [], "holds no eval_bundle/core.yaml"),
        ({"eval_bundle.zip": _zip({"eval_bundle/../x": "x"})}, [], "points outside the bundle"),
        ({}, [], "HTTP 404"),
    ],
)
def test_failed_downloads_leave_nothing(tmp_path, files, faults, message):
    with FaultServer(files, {"eval_bundle.zip": faults}) as server:
        with pytest.raises(eval_bundle.BundleError, match=message) as info:
            eval_bundle.download_bundle(tmp_path, url=f"{server.url}/eval_bundle.zip", cfg=FAST)
    assert "--demo" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    # a wrong file that arrived whole (or a 404) is fetched once; only bad bytes are retried
    expected = len(faults) if message == "not a readable zip file" else 1
    assert len(server.requests["eval_bundle.zip"]) == expected


def test_offline_fails_with_one_line_naming_demo(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(eval_bundle.URL_ENV, "http://127.0.0.1:1/eval_bundle.zip")  # refused
    assert eval_bundle.resolve_url() == "http://127.0.0.1:1/eval_bundle.zip"
    assert eval_bundle.main(["--base-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach 127.0.0.1:1") and err.count("\n") == 1, err
    assert "python -m nanochat_jax.eval_bundle --demo" in err
    assert list(tmp_path.iterdir()) == []


def test_extraction_killed_half_way_leaves_no_bundle(tmp_path, monkeypatch):
    zip_path = tmp_path / "eval_bundle.zip"
    zip_path.write_bytes(BUNDLE_ZIP)
    real_extract = zipfile.ZipFile.extract

    def dies_after_two(self, path=None, members=None, pwd=None):
        for member in list(members)[:3]:  # the directory entry... and a couple of files
            real_extract(self, member, path, pwd)
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", dies_after_two)
    with pytest.raises(OSError, match="disk full"):
        eval_bundle._extract(zip_path, tmp_path / "eval_bundle")
    assert not (tmp_path / "eval_bundle").exists()
    assert list((tmp_path / ".eval_bundle.partial").rglob("*.yaml"))  # the half lies elsewhere
    monkeypatch.undo()
    eval_bundle._extract(zip_path, tmp_path / "eval_bundle")  # the next run starts clean
    assert len(eval_bundle.read_tasks(tmp_path / "eval_bundle")) == 2
    assert _leftovers(tmp_path) == ["eval_bundle.zip"]


def test_verify_checks_every_member_crc(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:  # stored: bytes verbatim
        archive.writestr("eval_bundle/core.yaml", CORE_YAML)
        archive.writestr("eval_bundle/eval_data/x.jsonl", "abc" * 100)
    data = bytearray(buf.getvalue())
    path = tmp_path / "b.zip"
    path.write_bytes(bytes(data))
    eval_bundle.verify_bundle_zip(path)
    data[data.index(b"abcabc") + 7] ^= 0x01  # wrong bytes inside a member, directory intact
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDownload, match="fails its CRC check"):
        eval_bundle.verify_bundle_zip(path)


def test_demo_bundle_round_trip(tmp_path, capsys):
    assert eval_bundle.main(["--demo", "--base-dir", str(tmp_path / "a")]) == 0
    assert "demo eval bundle" in capsys.readouterr().out
    directory = tmp_path / "a" / "eval_bundle"
    assert eval_bundle.is_demo(directory)
    tasks = eval_bundle.read_tasks(directory)
    assert {t.task_type for t in tasks} == {"multiple_choice", "schema", "language_modeling"}
    fields = {
        "multiple_choice": {"query", "choices", "gold"},
        "schema": {"context_options", "continuation", "gold"},
        "language_modeling": {"context", "continuation"},
    }
    for task in tasks:
        data = eval_bundle.load_task_data(directory, task)
        assert len(data) == 100 and all(set(item) == fields[task.task_type] for item in data)
        if "gold" in fields[task.task_type]:
            options = "choices" if task.task_type == "multiple_choice" else "context_options"
            assert all(0 <= item["gold"] < len(item[options]) for item in data)
            assert len({item["gold"] for item in data}) > 1, task.label  # not always option 0
        assert task.random_baseline == {"multiple_choice": 25, "schema": 50}.get(task.task_type, 0)
    # deterministic: a second bundle elsewhere has the same bytes
    other = eval_bundle.write_demo_bundle(tmp_path / "b")
    for path in directory.rglob("*"):
        if path.is_file():
            assert (other / path.relative_to(directory)).read_bytes() == path.read_bytes()
    mtime = (directory / "core.yaml").stat().st_mtime_ns
    eval_bundle.write_demo_bundle(tmp_path / "a")  # same demo present: skipped
    assert (directory / "core.yaml").stat().st_mtime_ns == mtime


def test_demo_and_real_bundles_never_mix(tmp_path):
    eval_bundle.write_demo_bundle(tmp_path)
    with pytest.raises(ValueError, match="holds the offline demo bundle"):
        eval_bundle.download_bundle(tmp_path, url="http://127.0.0.1:1/x.zip", cfg=FAST)
    (tmp_path / "eval_bundle" / eval_bundle.DEMO_MARKER).unlink()  # now it looks real
    with pytest.raises(ValueError, match="holds a real eval bundle"):
        eval_bundle.write_demo_bundle(tmp_path)


def test_reading_a_missing_or_broken_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m nanochat_jax.eval_bundle --demo"):
        eval_bundle.read_tasks(tmp_path / "eval_bundle")
    directory = tmp_path / "eval_bundle"
    directory.mkdir()
    (directory / "core.yaml").write_text(CORE_YAML)
    (directory / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ntiny_mc,25\n")
    with pytest.raises(ValueError, match="no row for task 'tiny_lm'"):
        eval_bundle.read_tasks(directory)
    (directory / "core.yaml").write_text(CORE_YAML.replace("multiple_choice", "essay"))
    with pytest.raises(ValueError, match="icl_task_type 'essay'"):
        eval_bundle.read_tasks(directory)


# ---- zips that are the wrong file -----------------------------------------------------------

_OUTSIDE_ABS = "/nanochat_jax_test_escape_abs.txt"


@pytest.mark.parametrize(
    "member", ["../x.txt", "eval_bundle/../../x.txt", _OUTSIDE_ABS, "eval_bundle/a/../../../x.txt"]
)
def test_zip_members_escaping_the_bundle_are_refused(tmp_path, member):
    files = {
        "eval_bundle/core.yaml": CORE_YAML,
        "eval_bundle/eval_meta_data.csv": META_CSV,
        member: "escaped",
    }
    base = tmp_path / "deep" / "base"
    with FaultServer({"eval_bundle.zip": _zip(files)}) as server:
        with pytest.raises(eval_bundle.BundleError, match="points outside the bundle"):
            eval_bundle.download_bundle(base, url=f"{server.url}/eval_bundle.zip", cfg=FAST)
        assert len(server.requests["eval_bundle.zip"]) == 1  # a permanent failure: no retries
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [] and not Path(_OUTSIDE_ABS).exists()
    # extraction on its own refuses the same zip, writing nothing
    zip_path = tmp_path / "evil.zip"
    zip_path.write_bytes(_zip(files))
    with pytest.raises(CorruptDownload, match="points outside"):
        eval_bundle._extract(zip_path, base / "eval_bundle")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [zip_path]


def test_a_zip_without_core_yaml_is_downloaded_once(tmp_path, capsys):
    no_config = _zip({"eval_bundle/eval_meta_data.csv": META_CSV})
    with FaultServer({"eval_bundle.zip": no_config}) as server:
        url = f"{server.url}/eval_bundle.zip"
        assert eval_bundle.main(["--base-dir", str(tmp_path), "--url", url]) == 2
        assert len(server.requests["eval_bundle.zip"]) == 1
    err = capsys.readouterr().err
    assert "holds no eval_bundle/core.yaml" in err and "not retried" in err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


# ---- installing ------------------------------------------------------------------------------


def test_disk_full_while_extracting_is_one_error_line_and_the_zip_is_reused(
    tmp_path, monkeypatch, capsys
):
    def disk_full(self, path=None, members=None, pwd=None):
        (Path(path) / BUNDLE).mkdir(parents=True)
        (Path(path) / BUNDLE / "core.yaml").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with FaultServer({"eval_bundle.zip": BUNDLE_ZIP}) as server:
        argv = ["--base-dir", str(tmp_path), "--url", f"{server.url}/eval_bundle.zip"]
        monkeypatch.setattr(zipfile.ZipFile, "extractall", disk_full)
        assert eval_bundle.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: extracting") and err.count("\n") == 1, err
        assert "No space left on device" in err and "The zip is kept" in err
        assert _leftovers(tmp_path) == ["eval_bundle.zip"]  # no half bundle, no staging
        assert not (tmp_path / BUNDLE).exists()
        monkeypatch.undo()
        assert eval_bundle.main(argv) == 0  # space freed: the kept zip is used, not fetched
        assert len(server.requests["eval_bundle.zip"]) == 1
    assert "eval bundle in" in capsys.readouterr().out
    assert _leftovers(tmp_path) == []


def test_disk_full_while_writing_the_demo_is_one_error_line(tmp_path, monkeypatch, capsys):
    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eval_bundle, "atomic_write_text", disk_full)
    assert eval_bundle.main(["--demo", "--base-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: writing the eval bundle failed") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# ---- validating a bundle ---------------------------------------------------------------------

BUNDLE = "eval_bundle"


def _write_bundle(base: Path) -> Path:
    directory = base / BUNDLE
    files = {
        "core.yaml": CORE_YAML,
        "eval_meta_data.csv": META_CSV,
        "eval_data/world/tiny_mc.jsonl": (json.dumps(MC) + "\n") * 3,
        "eval_data/tiny_lm.jsonl": json.dumps(LM) + "\n",
    }
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def test_validate_accepts_a_whole_bundle(tmp_path):
    directory = _write_bundle(tmp_path)
    tasks = eval_bundle.validate_bundle(directory)
    assert [t.label for t in tasks] == ["tiny_mc", "tiny_lm"]
    assert eval_bundle.validate_bundle(directory, read_data=False) == tasks
    assert [
        t.label for t in eval_bundle.validate_bundle(eval_bundle.write_demo_bundle(tmp_path / "d"))
    ]
    with pytest.raises(FileNotFoundError, match="python -m nanochat_jax.eval_bundle --demo"):
        eval_bundle.validate_bundle(tmp_path / "nothing")


def _break(directory: Path, name: str, text: str | None) -> None:
    if text is None:
        (directory / name).unlink()
    else:
        (directory / name).write_text(text)


@pytest.mark.parametrize(
    ("name", "text", "message", "data_only"),
    [
        ("eval_meta_data.csv", None, r"eval_meta_data.csv is missing; delete .*eval_bundle", False),
        ("eval_data/tiny_lm.jsonl", None, r"'tiny_lm': .*tiny_lm.jsonl is missing; delete", False),
        (
            "eval_data/world/tiny_mc.jsonl",
            json.dumps(MC) + "\n\n" + '{"query": "Q", "choices": [\n',
            r"tiny_mc.jsonl:3: not valid JSON",
            True,
        ),
        (
            "eval_data/world/tiny_mc.jsonl",
            (json.dumps(MC) + "\n") * 2 + json.dumps({"query": "Q", "gold": 0}) + "\n",
            r"tiny_mc.jsonl:3: a multiple_choice example needs .* choices missing",
            True,
        ),
        ("eval_data/tiny_lm.jsonl", "[1, 2]\n", r"tiny_lm.jsonl:1: expected a JSON object", True),
        (
            "eval_data/world/tiny_mc.jsonl",
            json.dumps(MC) + "\n",
            r"'tiny_mc': .* has 1 examples; 1-shot needs at least 2",
            True,
        ),
        ("core.yaml", "icl_tasks: [\n", r"cannot read .*core.yaml", False),
        ("core.yaml", "icl_tasks: []\n", r"lists no tasks", False),
        ("core.yaml", "icl_tasks: [3]\n", r"icl_tasks\[0\] is not a mapping", False),
        (
            "core.yaml",
            CORE_YAML.replace("[1]", "[one]"),
            r"task 'tiny_mc': num_fewshot must be an int",
            False,
        ),
        (
            "core.yaml",
            CORE_YAML.replace("world/tiny_mc.jsonl", "../../x.jsonl"),
            r"points outside",
            False,
        ),
        (
            "eval_meta_data.csv",
            META_CSV.replace("25.0", "n/a"),
            r"eval_meta_data.csv:2: 'Random baseline' must be a number",
            False,
        ),
    ],
)
def test_validate_names_what_is_broken(tmp_path, name, text, message, data_only):
    directory = _write_bundle(tmp_path)
    _break(directory, name, text)
    with pytest.raises(ValueError, match=message) as info:
        eval_bundle.validate_bundle(directory)
    assert "\n" not in str(info.value)
    if data_only:  # only reading the data finds it
        eval_bundle.validate_bundle(directory, read_data=False)
    else:
        with pytest.raises(ValueError, match=message):
            eval_bundle.validate_bundle(directory, read_data=False)


def test_main_reports_a_broken_installed_bundle(tmp_path, capsys):
    directory = _write_bundle(tmp_path)
    (directory / "eval_data" / "tiny_lm.jsonl").unlink()
    # a present core.yaml skips the download (no server needed); the check still runs
    assert eval_bundle.main(["--base-dir", str(tmp_path), "--url", "http://127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task 'tiny_lm'") and err.count("\n") == 1, err
    assert f"delete {directory}" in err
