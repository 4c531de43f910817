"""Write spelling_rows.json: conversations made by nanochat's own tasks/spellingbee.py, for parity.

    uv run python tests/golden/make_spelling_golden.py [--git-dir DIR] [--commit REV] [--out F]

Extracts `tasks/spellingbee.py` and `tasks/common.py` of a nanochat commit from its git history
(`git archive`, into a temporary directory; default: the mirror /work/.mirror/karpathy+nanochat
and commit 9777070, nanochat's last fix of the file: 8892470 plus 05a051d's SimpleSpelling answer
and 9777070's test seeds), and runs them on a small fixed word list written with CRLF line ends
(as the real words_alpha.txt). `nanochat.common` is replaced by a stand-in whose
`download_file_with_lock` returns that list (and records the URL asked for), so neither torch
nor the network is needed. Records, for SpellingBee and SimpleSpelling and both splits, the
conversation of each index in INDICES, and nanochat's SpellingBee.evaluate/reward on a few
responses. Nothing from nanochat is copied into this repository.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_GIT_DIR = "/work/.mirror/karpathy+nanochat/repo"
DEFAULT_COMMIT = "9777070"
INDICES = [*range(36), 100, 4321, 99_999, 370_104]
# responses graded against each of the first EVAL_ROWS test conversations ({n}: its answer)
RESPONSES = [
    "#### {n}",
    "Counting gives {n}.\n\n#### {n}",
    "#### {m}",
    "the answer is {n}",
    "####{n}",
    "#### -{n}",
    "#### {n}.0",
    "#### 0{n}",
    "#### {n},",
    "",
]
EVAL_ROWS = 6


def word_list() -> list[str]:
    """A few hundred lowercase words: some real ones (repeated letters, one letter) and random
    strings of 1 to 14 letters, so both letter draws and every count occur."""
    rng = random.Random(1234)
    words = ["strawberry", "a", "mississippi", "banana", "bookkeeper", "rhythm", "queue", "zz"]
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    while len(words) < 300:
        words.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))))
    return words


def load_nanochat(git_dir: str, commit: str, root: Path, words_path: Path) -> tuple:
    archive = subprocess.run(
        [
            "git",
            f"--git-dir={git_dir}",
            "archive",
            commit,
            "tasks/spellingbee.py",
            "tasks/common.py",
        ],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    requested: list[tuple[str, str]] = []

    def download_file_with_lock(url, filename):
        requested.append((url, filename))
        return str(words_path)

    package = types.ModuleType("nanochat")
    package.__path__ = []
    stand_in = types.ModuleType("nanochat.common")
    stand_in.download_file_with_lock = download_file_with_lock
    sys.modules.update({"nanochat": package, "nanochat.common": stand_in})
    sys.path.insert(0, str(root))
    from tasks import spellingbee  # nanochat's

    return spellingbee, requested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--git-dir", default=DEFAULT_GIT_DIR)
    parser.add_argument("--commit", default=DEFAULT_COMMIT)
    parser.add_argument("--out", default=str(HERE / "spelling_rows.json"))
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", f"--git-dir={args.git_dir}", "rev-parse", args.commit],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    words = word_list()
    with tempfile.TemporaryDirectory() as tmp:
        words_path = Path(tmp) / "words_alpha.txt"
        words_path.write_bytes("".join(f"{w}\r\n" for w in words).encode())
        spellingbee, requested = load_nanochat(args.git_dir, commit, Path(tmp), words_path)
        rows = {}
        for cls in (spellingbee.SpellingBee, spellingbee.SimpleSpelling):
            for split in ("train", "test"):
                task = cls(size=max(INDICES) + 1, split=split)
                rows[f"{cls.__name__}/{split}"] = [task.get_example(i) for i in INDICES]
        bee = spellingbee.SpellingBee(size=EVAL_ROWS, split="test")
        grades = []
        for i in range(EVAL_ROWS):
            conversation = bee.get_example(i)
            n = int(spellingbee.extract_answer(conversation["messages"][-1]["content"][-1]["text"]))
            for template in RESPONSES:
                response = template.format(n=n, m=n + 1)
                grades.append(
                    {
                        "index": i,
                        "response": response,
                        "evaluate": int(bee.evaluate(conversation, response)),
                        "reward": bee.reward(conversation, response),
                    }
                )
    golden = {
        "_provenance": {
            "nanochat_commit": commit,
            "files": ["tasks/spellingbee.py", "tasks/common.py"],
            "python": platform.python_version(),
            "generator": "tests/golden/make_spelling_golden.py",
            "word_list_requests": sorted(set(requested)),
        },
        "words": words,
        "indices": INDICES,
        "rows": rows,
        "evaluate": {"test_rows": EVAL_ROWS, "grades": grades},
    }
    Path(args.out).write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: {sum(len(v) for v in rows.values())} rows from nanochat {commit[:7]}")


if __name__ == "__main__":
    main()
