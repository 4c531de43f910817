"""Offline demo shards: FineWeb-EDU's parquet layout, determinism, splits, safety."""

from __future__ import annotations

import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_jax import dataset, demo_data
from nanochat_jax.demo_data import DemoDataConfig, write_demo_shards

SMALL = DemoDataConfig(num_shards=3, chars_per_shard=30_000, rows_per_group=8)


def test_shards_have_fineweb_layout(tmp_path):
    paths = write_demo_shards(SMALL, tmp_path)
    assert [p.name for p in paths] == [f"shard_{i:05d}.parquet" for i in range(3)]
    for path in paths:
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow == pa.schema([("text", pa.string())])
        meta = pf.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert meta.num_row_groups >= 2 and set(sizes[:-1]) == {8} and 1 <= sizes[-1] <= 8
        column = meta.row_group(0).column(0)
        assert column.compression == "ZSTD"
        assert not column.is_stats_set
        assert not any("DICTIONARY" in e for e in column.encodings)
        docs = pf.read().column("text").to_pylist()
        assert sum(map(len, docs)) >= SMALL.chars_per_shard
        assert all(len(d) >= demo_data.MIN_DOC_CHARS for d in docs)
        assert sum(len(d) <= demo_data.MAX_DOC_CHARS for d in docs) >= 0.9 * len(docs)


def test_same_bytes_every_time(tmp_path):
    a = write_demo_shards(SMALL, tmp_path / "a")
    b = write_demo_shards(SMALL, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    other_seed = write_demo_shards(DemoDataConfig(3, 30_000, 8, seed=1), tmp_path / "c")
    assert other_seed[0].read_bytes() != a[0].read_bytes()


def test_last_shard_is_the_val_split(tmp_path):
    paths = write_demo_shards(SMALL, tmp_path)
    assert dataset.split_files("val", tmp_path) == paths[-1:]
    assert dataset.split_files("train", tmp_path) == paths[:-1]
    val_docs = [d for rg in dataset.parquets_iter_batched("val", data_dir=tmp_path) for d in rg]
    train_docs = {d for rg in dataset.parquets_iter_batched("train", data_dir=tmp_path) for d in rg}
    assert val_docs and not train_docs.intersection(val_docs)


def test_rerun_skips_and_new_config_replaces(tmp_path):
    paths = write_demo_shards(SMALL, tmp_path)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert write_demo_shards(SMALL, tmp_path) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    write_demo_shards(DemoDataConfig(2, 20_000, 8), tmp_path)
    assert [p.name for p in dataset.list_parquet_files(tmp_path)] == [p.name for p in paths[:2]]


def test_refuses_to_mix_with_downloaded_shards(tmp_path):
    pq.write_table(pa.table({"text": ["a real shard"]}), tmp_path / "shard_00000.parquet")
    with pytest.raises(ValueError, match="not demo data"):
        write_demo_shards(SMALL, tmp_path)


def test_docstrings_become_prose_and_leave_the_code():
    source = textwrap.dedent('''\
        """Module doc."""
        import os


        class Thing:
            """A thing."""

            def run(self):
                """Run it.

                Really.
                """
                return 1

            def quick(self): "same-line docstrings stay in the code"
    ''')
    prose, code = demo_data._split_module(source, "pkg.mod")
    assert prose == [
        "pkg.mod\n\nModule doc.\n\n",
        "pkg.mod.Thing\n\nA thing.\n\n",
        "pkg.mod.Thing.run\n\nRun it.\n\nReally.\n\n",
    ]
    assert '"""' not in code and "return 1" in code and "class Thing:" in code
    assert 'def quick(self): "same-line docstrings stay in the code"' in code


def test_short_corpus_is_spread_evenly_or_refused(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(12):
        (root / f"m{i:02d}.py").write_text(f"# module {i}\n" + f"x_{i} = {i}  # filler\n" * 20)
    (root / "tests").mkdir()
    (root / "tests" / "t.py").write_text("never = 'read'\n" * 50)
    docs = demo_data.stdlib_documents(10**9, root=root)
    assert len(docs) == 12 and not any("never" in d for d in docs)
    paths = write_demo_shards(DemoDataConfig(3, 10**9, 8), tmp_path / "d", stdlib_root=root)
    counts = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    assert counts == [4, 4, 4]
    with pytest.raises(ValueError, match="not enough"):
        write_demo_shards(DemoDataConfig(20, 10, 8), tmp_path / "e", stdlib_root=root)


def test_cli(tmp_path, capsys):
    args = ["--num-shards", "2", "--chars-per-shard", "5000", "--data-dir", str(tmp_path)]
    assert demo_data.main(args) == 0
    assert "val split: shard_00001.parquet" in capsys.readouterr().out
    assert demo_data.main(["--num-shards", "1", "--data-dir", str(tmp_path)]) == 2
