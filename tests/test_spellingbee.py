"""nanochat_jax.tasks.spellingbee: the conversations equal nanochat's own (golden rows made by
tests/golden/make_spelling_golden.py from nanochat's tasks/spellingbee.py), the tool calls give
the right counts through the engine's calculator, grading, the word list's download."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanochat_jax import hf_data
from nanochat_jax.config import GPTConfig
from nanochat_jax.download import DownloadConfig
from nanochat_jax.engine import Engine, use_calculator
from nanochat_jax.tasks import SimpleSpelling, SpellingBee, TaskDataError
from nanochat_jax.tasks.spellingbee import USER_MSG_TEMPLATES, load_words
from nanochat_jax.tokenizer import Tokenizer
from tests.fault_server import FaultServer

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = json.loads((GOLDEN_DIR / "spelling_rows.json").read_text(encoding="utf-8"))
CLASSES = {"SpellingBee": SpellingBee, "SimpleSpelling": SimpleSpelling}
_CALL_RE = re.compile(r"'([a-z]+)'\.count\('([a-z])'\)")
FAST = DownloadConfig(connect_timeout_s=2.0, read_timeout_s=0.3, max_attempts=3, backoff_s=0.01)


@pytest.fixture(scope="module")
def words_path(tmp_path_factory) -> Path:
    """The golden word list, with CRLF line ends like the real words_alpha.txt."""
    path = tmp_path_factory.mktemp("words") / "words_alpha.txt"
    path.write_bytes("".join(f"{w}\r\n" for w in GOLDEN["words"]).encode())
    return path


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NANOCHAT_JAX_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(hf_data.WORDS_FILE.url_env, "http://127.0.0.1:9/words_alpha.txt")
    return tmp_path


def test_golden_provenance():
    provenance = GOLDEN["_provenance"]
    # nanochat's last fix of the file (8892470 + 05a051d + c72b8b2 + 9777070)
    assert provenance["nanochat_commit"].startswith("9777070")
    # the word list nanochat asks for is the one we download
    assert provenance["word_list_requests"] == [[hf_data.WORDS_FILE.url, hf_data.WORDS_FILE.name]]
    assert len(GOLDEN["rows"]) == 4 and all(len(r) == 40 for r in GOLDEN["rows"].values())


@pytest.mark.parametrize("key", sorted(GOLDEN["rows"]))
def test_rows_equal_nanochat(words_path, key):
    name, split = key.split("/")
    indices = GOLDEN["indices"]
    task = CLASSES[name](size=max(indices) + 1, split=split, words_path=words_path)
    ours = [task.get_example(i) for i in indices]
    mismatched = [i for i, a, b in zip(indices, ours, GOLDEN["rows"][key], strict=True) if a != b]
    assert not mismatched, f"{key}: rows {mismatched} differ from nanochat's"
    assert [task[i] for i in indices[:5]] == ours[:5]  # through the sliced view too


def test_evaluate_and_reward_equal_nanochat(words_path):
    grades = GOLDEN["evaluate"]["grades"]
    task = SpellingBee(size=GOLDEN["evaluate"]["test_rows"], split="test", words_path=words_path)
    for grade in grades:
        conversation = task[grade["index"]]
        assert task.evaluate(conversation, grade["response"]) == bool(grade["evaluate"]), grade
        assert task.reward(conversation, grade["response"]) == grade["reward"], grade
    assert 0 < sum(g["evaluate"] for g in grades) < len(grades)  # right and wrong ones


def test_tool_calls_through_the_calculator(words_path):
    """Every row's python part, run by the engine's calculator, gives its python_output, which
    is the true count, the manual count and the graded answer."""
    task = SpellingBee(size=600, split="train", words_path=words_path)
    counts = set()
    for conversation in task:
        user, assistant = conversation["messages"]
        parts = assistant["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = _CALL_RE.fullmatch(parts[2]["text"]).groups()
        count = word.count(letter)
        assert use_calculator(parts[2]["text"]) == count
        assert parts[3]["text"] == str(use_calculator(parts[2]["text"]))
        assert parts[0]["text"].endswith(f"This gives us {count}.")
        assert parts[0]["text"].count(" hit! count=") == count
        assert f"{word}:{','.join(word)}\n" in parts[0]["text"]
        assert word in user["content"] and letter in user["content"]
        assert task.reward(conversation, parts[-1]["text"]) == 1.0
        counts.add(count)
    assert 0 in counts and max(counts) >= 3  # random letters (count 0) and repeated ones


def test_prompt_variety(words_path):
    task = SpellingBee(size=2000, split="test", words_path=words_path)
    questions = [c["messages"][0]["content"] for c in task]
    calls = [_CALL_RE.fullmatch(c["messages"][1]["content"][2]["text"]).groups() for c in task]
    absent = sum(letter not in word for word, letter in calls)
    assert 0.04 < absent / len(task) < 0.11  # 10% random letters, some of them in the word
    assert 0.4 < sum(q.endswith("?") for q in questions) / len(questions) < 0.7
    assert any("¿Cuántas" in q for q in questions) and any("有多少" in q for q in questions)
    assert len(USER_MSG_TEMPLATES) == 51
    assert len(set(questions)) > 1900


def test_simple_spelling(words_path):
    task = SimpleSpelling(size=50, split="train", words_path=words_path)
    # shuffled: another order than SpellingBee's
    assert task.words != GOLDEN["words"] and sorted(task.words) == sorted(GOLDEN["words"])
    for conversation in task:
        user, assistant = conversation["messages"]
        word = user["content"].removeprefix("Spell the word: ")
        # no space after the colon (nanochat 05a051d): the first letter tokenizes like the rest
        assert assistant["content"] == word + ":" + ",".join(word)
    with pytest.raises(NotImplementedError):
        task.evaluate(task[0], "x")


def test_sizes_splits_and_slices(words_path):
    train = SpellingBee(size=30, words_path=words_path)
    test = SpellingBee(size=30, split="test", words_path=words_path)
    assert len(train) == 30 and len(SpellingBee(size=30, stop=10, words_path=words_path)) == 10
    assert SpellingBee(size=30, start=4, step=3, words_path=words_path)[2] == train[10]
    # test seeds are 10M + index: no test example repeats a train one (nanochat 9777070)
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in test}
    assert len(SpellingBee(size=0, words_path=words_path)) == 0
    with pytest.raises(IndexError):
        train[30]
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="size must be an int >= 0"):
            SpellingBee(size=bad, words_path=words_path)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
        SimpleSpelling(size=3, split="validation", words_path=words_path)


def test_evaluate_rejects_bad_input(words_path):
    task = SpellingBee(size=3, words_path=words_path)
    conversation = task[0]
    answer = conversation["messages"][-1]["content"][-1]["text"]
    assert task.evaluate(conversation, answer) is True
    assert task.evaluate(conversation, "I don't know") is False
    with pytest.raises(ValueError, match="response must be a str"):
        task.evaluate(conversation, None)
    plain = {"messages": [conversation["messages"][0], {"role": "assistant", "content": "3"}]}
    with pytest.raises(ValueError, match="must end with the assistant's list of parts"):
        task.evaluate(plain, answer)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    with gzip.open(GOLDEN_DIR / "tok_corpus.txt.gz", "rt", encoding="utf-8") as f:
        docs = f.read().split("\x1e")[:200]
    return Tokenizer.train_from_iterator(iter(docs), 300)


def test_renders_with_tool_tokens(tokenizer):
    tok = tokenizer
    rows = GOLDEN["rows"]["SpellingBee/train"][0]
    ids, mask = tok.render_conversation(rows)
    python_start = tok.encode_special("<|python_start|>")
    output_start = tok.encode_special("<|output_start|>")
    assert mask[ids.index(python_start)] == 1 and mask[ids.index(output_start)] == 0
    spelled = GOLDEN["rows"]["SimpleSpelling/train"][0]
    ids, mask = tok.render_conversation(spelled)
    supervised = [i for i, m in zip(ids, mask, strict=True) if m][:-1]
    assert tok.decode(supervised) == spelled["messages"][1]["content"]


class _Replay(nnx.Module):
    """A scripted "model": the logits at absolute position p are a row of a (positions, V) table,
    so a table with a one-hot at seq[p + 1] in row p makes greedy decoding replay `seq`."""

    def __init__(self, table_SV: np.ndarray):
        S, V = table_SV.shape
        self.config = GPTConfig(sequence_len=S, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1,
                                n_embd=2)  # fmt: skip
        self.table = nnx.Param(jnp.asarray(table_SV))

    def forward_cached(self, idx_BT, cache):
        B, T = idx_BT.shape
        logits_TV = jnp.take(self.table[...], cache.pos + jnp.arange(T), axis=0, mode="clip")
        return jnp.broadcast_to(logits_TV, (B, *logits_TV.shape)), cache.replace(pos=cache.pos + T)


def test_golden_rows_replay_through_the_engine(tokenizer):
    """A model scripted to write a golden SpellingBee row's assistant tokens, run through
    Engine.generate_batch with a trained tokenizer, reproduces the rendered row: the python call
    triggers the calculator, whose output (not the model's) fills the python_output part."""
    tok = tokenizer
    rows = GOLDEN["rows"]["SpellingBee/train"][:6] + GOLDEN["rows"]["SpellingBee/test"][:6]
    rendered = [tok.render_conversation(row) for row in rows]
    S = 64 * -(-max(len(ids) for ids, _ in rendered) // 64)
    assistant_end = tok.encode_special("<|assistant_end|>")
    engine = None
    for row, (ids, mask) in zip(rows, rendered, strict=True):
        prompt = tok.render_for_completion(row)
        assert ids[: len(prompt)] == prompt and ids[-1] == assistant_end
        table_SV = np.full((S, tok.get_vocab_size()), -30.0, np.float32)
        for p in range(len(prompt) - 1, len(ids) - 1):
            # Where the calculator's output is due (mask 0), the model would end the answer:
            # only a forced token gets past these positions.
            table_SV[p, ids[p + 1] if mask[p + 1] else assistant_end] = 30.0
        if engine is None:  # one engine: the tables swap in without recompiling
            engine = Engine(_Replay(table_SV), tok)
        else:
            engine.set_params(_Replay(table_SV))
        (result,), (got_mask,) = engine.generate_batch(
            prompt, max_tokens=S - len(prompt), temperature=0.0
        )
        generated = result[len(prompt) :]
        assert generated == ids[len(prompt) : -1]  # the engine stops at <|assistant_end|>
        assert got_mask[len(prompt) :] == mask[len(prompt) : -1]
        forced = [t for t, m in zip(generated, got_mask[len(prompt) :], strict=True) if not m]
        count = row["messages"][1]["content"][3]["text"]
        assert tok.decode(forced) == f"<|output_start|>{count}<|output_end|>"
    assert engine.num_compilations <= 8


def test_word_list_lines_are_stripped(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"apple\r\n  pear \n\nplum\n")
    assert load_words(path) == ["apple", "pear", "", "plum"]  # blank lines kept, as nanochat


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\n\n", "word list has no words"),
        (b"apple\r\n<html>\r\n", "word list line 2: '<html>' is not a single alphabetic word"),
        (b"apple\ncaf\xe9\n", "is not UTF-8 text ('utf-8' codec can't decode byte 0xe9"),
    ],
)
def test_a_bad_word_list_is_one_clear_error(base_dir, body, problem):
    """A bad file placed by hand: TaskDataError naming the file, the problem and the fix."""
    default = base_dir / "task_data" / "words_alpha.txt"
    default.parent.mkdir()
    for path, fix in [
        (default, "delete it and run `python -m nanochat_jax.hf_data words` to fetch it again"),
        (base_dir / "mine.txt", "pass a UTF-8 text file of one alphabetic word per line"),
    ]:
        path.write_bytes(body)
        with pytest.raises(TaskDataError) as info:
            SpellingBee(size=3, words_path=None if path == default else path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message
        assert problem in message and fix in message
    with pytest.raises(TaskDataError, match="cannot read word list .*missing.txt"):
        load_words(base_dir / "missing.txt")


def test_word_list_is_downloaded_on_first_use(base_dir, monkeypatch, caplog):
    body = b"alpha\r\nbeta\r\ngamma\r\n"
    with FaultServer({"words_alpha.txt": body}, {"words_alpha.txt": ["500"]}) as server:
        monkeypatch.setenv(hf_data.WORDS_FILE.url_env, f"{server.url}/words_alpha.txt")
        monkeypatch.setattr(hf_data, "DownloadConfig", lambda: FAST)
        with caplog.at_level(logging.INFO, logger="nanochat_jax.hf_data"):
            task = SpellingBee(size=4)
        assert server.requests["words_alpha.txt"] == [None, None]  # a 500, then the file
        assert SimpleSpelling(size=4).words  # cached now: no more requests
        assert len(server.requests["words_alpha.txt"]) == 2
    assert task.words == ["alpha", "beta", "gamma"]
    assert (base_dir / "task_data" / "words_alpha.txt").read_bytes() == body
    # the URL follows dwyl's master branch: the log says which list arrived
    assert f"words_alpha.txt: 3 words, sha256 {hashlib.sha256(body).hexdigest()}" in caplog.text


def test_offline_without_the_word_list_is_one_clear_error(base_dir):
    with pytest.raises(TaskDataError) as info:
        SpellingBee(size=4)
    message = str(info.value)
    assert "\n" not in message and "words_alpha.txt is not in" in message
    assert "python -m nanochat_jax.hf_data words" in message
    assert "python -m nanochat_jax.demo_tasks" in message
    assert "NANOCHAT_JAX_WORDS_URL" in message


def test_chat_eval_reports_a_bad_word_list_in_one_line(base_dir):
    """scripts/chat_eval: a word list placed by hand that is not one (here Latin-1 bytes) stops
    it with one error line, before any model is loaded."""
    from scripts import chat_eval as chat_eval_script

    path = base_dir / "task_data" / "words_alpha.txt"
    path.parent.mkdir()
    path.write_bytes(b"apple\r\ncaf\xe9\r\n")
    with pytest.raises(SystemExit) as info:
        chat_eval_script.main(["-i", "sft", "-a", "SpellingBee", "--mesh", "1"])
    message = str(info.value.code)
    assert message.startswith(f"error: word list {path} is not UTF-8 text") and "\n" not in message
    assert "python -m nanochat_jax.hf_data words" in message
