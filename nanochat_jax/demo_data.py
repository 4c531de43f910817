"""Offline demo shards in FineWeb-EDU's format, made from text that ships with every Python.

The CPU demo must run without internet, yet through the same pipeline as the real run. This
writes `shard_00000.parquet`, ... into `<base_dir>/base_data/` exactly like the downloaded shards
(one `text` column, row groups of 1024 documents, zstd level 3, no dictionary, no statistics), so
tokenizer training and the dataloader cannot tell the difference; the last shard is the val split.
The documents come from the standard library's sources: the docstrings of each module as prose
("json.decoder.JSONDecoder.decode\\n\\nReturn the Python representation of ..."), and the code with
its docstrings removed (so no text appears twice), cut into documents of a few thousand
characters and shuffled with a fixed seed. Same Python build + pyarrow version -> same bytes.

    python -m nanochat_jax.demo_data --num-shards 3 --chars-per-shard 4000000
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat_jax.common import atomic_write_text, get_logger
from nanochat_jax.dataset import DEMO_MARKER, get_data_dir, list_parquet_files, shard_name

MAX_DOC_CHARS = 4000  # FineWeb-EDU documents are a few thousand characters long
MIN_DOC_CHARS = 64  # drop empty-ish leftovers (bare __init__.py files, lone imports)
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)

log = get_logger("nanochat_jax.demo_data")


@dataclass(frozen=True)
class DemoDataConfig:
    num_shards: int = 3
    chars_per_shard: int = 4_000_000
    rows_per_group: int = 1024  # nanochat's row group size
    seed: int = 42


def _source_files(root: Path) -> list[Path]:
    """Every .py file under root outside test and third-party dirs, in a fixed order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _split_module(source: str, module: str) -> tuple[list[str], str]:
    """(prose, code): the module's docstrings, one section per documented object headed by its
    qualified name, and the source with those docstrings cut out."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return [], source
    sections: list[str] = []
    dropped_lines: set[int] = set()

    def visit(node: ast.AST, qualname: str) -> None:
        if isinstance(node, (ast.Module, *_DEFS)) and (doc := ast.get_docstring(node)):
            first = node.body[0]
            # only docstrings on lines of their own can be cut without cutting code with them
            own_lines = isinstance(node, ast.Module) or first.lineno > node.lineno
            if own_lines and (len(node.body) == 1 or node.body[1].lineno > first.end_lineno):
                sections.append(f"{qualname}\n\n{doc}\n\n")
                dropped_lines.update(range(first.lineno - 1, first.end_lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, f"{qualname}.{child.name}" if isinstance(child, _DEFS) else qualname)

    visit(tree, module)
    lines = source.splitlines(keepends=True)
    code = "".join(line for i, line in enumerate(lines) if i not in dropped_lines)
    return sections, code


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    """Greedily join consecutive pieces into documents of at most max_chars (a longer piece
    stays whole)."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for piece in pieces:
        if current and size + len(piece) > max_chars:
            docs.append("".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    if current:
        docs.append("".join(current))
    return docs


def _module_documents(path: Path, root: Path) -> list[str]:
    parts = path.relative_to(root).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
    prose, code = _split_module(path.read_text(encoding="utf-8", errors="replace"), module)
    docs = _pack(prose, MAX_DOC_CHARS) + _pack(code.splitlines(keepends=True), MAX_DOC_CHARS)
    return [doc.strip() for doc in docs if len(doc.strip()) >= MIN_DOC_CHARS]


def stdlib_documents(total_chars: int, seed: int = 42, root: Path | None = None) -> list[str]:
    """Shuffled documents from the standard library (or `root`) totalling >= total_chars when
    the library has that much, fewer otherwise. Files are visited in a seeded random order and
    the documents shuffled again, so train and val shards come from the same mix."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    rng = random.Random(seed)
    files = _source_files(root)
    rng.shuffle(files)
    docs: list[str] = []
    size = 0
    for path in files:
        if size >= total_chars:
            break
        for doc in _module_documents(path, root):
            docs.append(doc)
            size += len(doc)
    rng.shuffle(docs)
    return docs


def _assign_shards(docs: list[str], cfg: DemoDataConfig) -> list[list[str]]:
    """Cut the document list into num_shards consecutive shards of >= chars_per_shard each, or,
    when there is not that much text, into num_shards shards of about equal size (warning)."""
    shards: list[list[str]] = [[]]
    size = 0
    for doc in docs:
        if size >= cfg.chars_per_shard:
            if len(shards) == cfg.num_shards:
                break
            shards.append([])
            size = 0
        shards[-1].append(doc)
        size += len(doc)
    if len(shards) == cfg.num_shards and size >= cfg.chars_per_shard:
        return shards
    total = sum(map(len, docs))
    log.warning(
        "found %.2fM chars of documents, less than the %.2fM asked for; writing %d shards of "
        "~%.2fM chars",
        total / 1e6,
        cfg.num_shards * cfg.chars_per_shard / 1e6,
        cfg.num_shards,
        total / cfg.num_shards / 1e6,
    )
    shards = [[] for _ in range(cfg.num_shards)]
    position = 0
    for doc in docs:  # a document goes to the shard where its middle character falls
        shards[(position + len(doc) // 2) * cfg.num_shards // total].append(doc)
        position += len(doc)
    if not all(shards):
        raise ValueError(
            f"only {len(docs)} documents ({total} chars) of text found: not enough for "
            f"{cfg.num_shards} shards; ask for fewer shards"
        )
    return shards


def _write_shard(path: Path, docs: list[str], rows_per_group: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # the same writer settings as nanochat's repackaging of FineWeb-EDU
    pq.write_table(
        pa.table({"text": pa.array(docs, type=pa.string())}),
        tmp,
        row_group_size=rows_per_group,
        use_dictionary=False,
        compression="zstd",
        compression_level=3,
        write_statistics=False,
    )
    os.replace(tmp, path)


def write_demo_shards(
    cfg: DemoDataConfig = DemoDataConfig(),
    data_dir: str | Path | None = None,
    stdlib_root: Path | None = None,
) -> list[Path]:
    """Write the demo shards (skipped when the same ones are already there); returns their paths.

    Refuses to write into a directory holding downloaded FineWeb-EDU shards.
    """
    if cfg.num_shards < 2:
        raise ValueError(f"num_shards must be >= 2 (train + val), got {cfg.num_shards}")
    if cfg.chars_per_shard < 1 or cfg.rows_per_group < 1:
        raise ValueError(
            f"chars_per_shard and rows_per_group must be >= 1, got {cfg.chars_per_shard}, "
            f"{cfg.rows_per_group}"
        )
    data_dir = get_data_dir(data_dir)
    marker_path = data_dir / DEMO_MARKER
    paths = [data_dir / shard_name(i) for i in range(cfg.num_shards)]
    marker = {
        "config": asdict(cfg),
        "python": platform.python_version(),
        "shards": [p.name for p in paths],
    }
    if marker_path.exists():
        old = json.loads(marker_path.read_text())
        if old == marker and all(p.exists() for p in paths):
            log.info("demo shards already in %s", data_dir)
            return paths
        for name in old.get("shards", []):  # another demo config: replace its shards
            (data_dir / name).unlink(missing_ok=True)
    elif list_parquet_files(data_dir):
        raise ValueError(
            f"{data_dir} already holds parquet shards that are not demo data (no {DEMO_MARKER}); "
            "demo shards must not mix with them. Point NANOCHAT_JAX_BASE_DIR elsewhere."
        )
    # the marker goes first: a crash half-way leaves it with missing shards -> rewritten next time
    atomic_write_text(marker_path, json.dumps(marker, indent=1))
    # 20% more than asked: each shard overshoots its size by up to one document
    wanted_chars = int(1.2 * cfg.num_shards * cfg.chars_per_shard) + 4 * MAX_DOC_CHARS
    docs = stdlib_documents(wanted_chars, cfg.seed, stdlib_root)
    for path, shard_docs in zip(paths, _assign_shards(docs, cfg), strict=True):
        _write_shard(path, shard_docs, cfg.rows_per_group)
        log.info(
            "%s: %d documents, %.2fM chars",
            path.name,
            len(shard_docs),
            sum(map(len, shard_docs)) / 1e6,
        )
    return paths


def main(argv: list[str] | None = None) -> int:
    defaults = DemoDataConfig()
    parser = argparse.ArgumentParser(
        description="Write offline FineWeb-EDU-style parquet shards from the Python stdlib."
    )
    parser.add_argument("--num-shards", type=int, default=defaults.num_shards)
    parser.add_argument("--chars-per-shard", type=int, default=defaults.chars_per_shard)
    parser.add_argument("--rows-per-group", type=int, default=defaults.rows_per_group)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data-dir", default=None, help="default <base_dir>/base_data")
    args = parser.parse_args(argv)
    cfg = DemoDataConfig(args.num_shards, args.chars_per_shard, args.rows_per_group, args.seed)
    try:
        paths = write_demo_shards(cfg, args.data_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(paths)} demo shards in {paths[0].parent} (val split: {paths[-1].name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
