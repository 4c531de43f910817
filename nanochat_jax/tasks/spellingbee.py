"""SpellingBee and SimpleSpelling: synthetic spelling and letter-counting conversations (nanochat's
tasks/spellingbee.py, added in 8892470; opt-in here, see tasks/mixtures.py).

SpellingBee asks how many times a letter occurs in a word ("How many r are in strawberry?") and
answers in two ways: by spelling the word out and counting position by position, then with a
python tool call `'strawberry'.count('r')` whose output the engine's calculator supplies, ending
with `#### 3`, graded like GSM8K. SimpleSpelling only spells words ("Spell the word: apple" ->
"apple:a,p,p,l,e"): the part that is hard for a model that sees tokens rather than letters.

Example `index` of a split is generated from `random.Random(seed)` with seed = index (train) or
10_000_000 + index (test), over the word list `<base_dir>/task_data/words_alpha.txt` (downloaded
on first use, see hf_data.WORDS_FILE), so the conversations are the ones nanochat's code makes
for the same index, split and word list: the same random draws in the same order, the same
templates and texts. Later nanochat fixes that are followed: 05a051d (no space after the colon in
SimpleSpelling's answer, which tokenized the first letter differently), c72b8b2 (the list is read
as UTF-8), 9777070 (test seeds offset by 10M: random.Random(-n) seeds like random.Random(n), so
8892470's test seeds -(index + 1) repeated train examples).
"""

from __future__ import annotations

import random
from pathlib import Path

from nanochat_jax.hf_data import WORDS_FILE, TaskDataError, ensure_file, word_list_problem
from nanochat_jax.tasks.common import Conversation, Task
from nanochat_jax.tasks.gsm8k import extract_answer

SPLITS = ("train", "test")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEST_SEED_OFFSET = 10_000_000  # more than the 370K words: train and test seeds never meet
SHUFFLE_SEED = 42  # SimpleSpelling's word order differs from SpellingBee's

# nanochat's user prompts, reproduced exactly for parity (the order matters: rng.choice)
USER_MSG_TEMPLATES = (
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
)
_QUOTES = ("", "'", '"')


def load_words(path: str | Path | None = None) -> list[str]:
    """The word list, one word per line, each line stripped (nanochat keeps blank lines as
    empty words; so do we, for the same random draws). path: default the task_data copy,
    downloaded first if missing. TaskDataError (one line: the file, what is wrong, what to run)
    when it cannot be had or is not UTF-8 text of one alphabetic word per line."""
    default = path is None
    path = ensure_file(WORDS_FILE) if default else Path(path)
    if default:
        fix = (
            f"delete it and run `python -m nanochat_jax.hf_data {WORDS_FILE.group}` to fetch it "
            "again (or `python -m nanochat_jax.demo_tasks` for offline demo data)"
        )
    else:
        fix = "pass a UTF-8 text file of one alphabetic word per line"
    try:
        with open(path, encoding="utf-8") as f:
            words = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise TaskDataError(f"word list {path} is not UTF-8 text ({e}); {fix}") from None
    except OSError as e:
        raise TaskDataError(f"cannot read word list {path} ({e}); {fix}") from None
    problem = word_list_problem(words)
    if problem is not None:
        raise TaskDataError(f"{path}: {problem}; {fix}")
    return words


def _check(size: int, split: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _rng(split: str, index: int) -> random.Random:
    return random.Random(index if split == "train" else TEST_SEED_OFFSET + index)


def _spelled(word: str) -> str:
    return ",".join(word)


class _WordTask(Task):
    """`size` examples of a split, drawn from the word list (what both tasks share)."""

    eval_type = "generative"

    def __init__(
        self,
        size: int = 1000,
        split: str = "train",
        *,
        words_path: str | Path | None = None,
        **kwargs,
    ):
        _check(size, split)
        super().__init__(**kwargs)
        self.size, self.split = size, split
        self.words = load_words(words_path)

    def num_examples(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, split={self.split!r}, start={self.start})"


class SpellingBee(_WordTask):
    """`size` letter-counting problems; generative, graded by the `#### N` answer (GSM8K's
    extraction), reward 1.0 if right else 0.0."""

    def get_example(self, index: int) -> Conversation:
        rng = _rng(self.split, index)
        # The draws, in nanochat's order: word, letter (from the word 90% of the time, else any
        # letter, so some answers are 0), template, lowercase it (30%), quotes around letter
        # and word, question mark (50%).
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        template = rng.choice(USER_MSG_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        letter_quote, word_quote = rng.choice(_QUOTES), rng.choice(_QUOTES)
        question = template.format(
            letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}"
        )
        if rng.random() < 0.5:
            question += "?"

        count = word.count(letter)
        # The worked count, one line per position with a running total on every hit. "3:r"
        # stays unspaced: "3: r" would hand the model the letter as another token, " r".
        steps, hits = [], 0
        for position, char in enumerate(word, start=1):
            if char == letter:
                hits += 1
                steps.append(f"{position}:{char} hit! count={hits}\n")
            else:
                steps.append(f"{position}:{char}\n")
        by_hand = (
            f"We are asked to find the number '{letter}' in the word '{word}'. "
            "Let me try a manual approach first.\n\n"
            f"First spell the word out:\n{word}:{_spelled(word)}\n\n"
            f"Then count the occurrences of '{letter}':\n"
            + "".join(steps)
            + f"\nThis gives us {hits}."
        )
        parts = [
            {"type": "text", "text": by_hand},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {
                "type": "text",
                "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}",
            },
        ]
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": parts},
            ]
        }

    def evaluate(self, conversation: Conversation, response: str) -> bool:
        """Right when the response's `#### N` equals the reference's (the last text part)."""
        if not isinstance(response, str):
            raise ValueError(f"response must be a str, got {type(response).__name__}")
        reply = conversation["messages"][-1]
        if reply["role"] != "assistant" or not isinstance(reply["content"], list):
            raise ValueError("the conversation must end with the assistant's list of parts")
        reference = extract_answer(reply["content"][-1]["text"])
        predicted = extract_answer(response)
        return predicted is not None and predicted == reference

    def reward(self, conversation: Conversation, response: str) -> float:
        return float(self.evaluate(conversation, response))


class SimpleSpelling(_WordTask):
    """`size` spelling exercises over the word list shuffled with random.Random(42); only for
    training (nanochat never evaluates it)."""

    def __init__(self, size: int = 1000, split: str = "train", **kwargs):
        super().__init__(size, split, **kwargs)
        random.Random(SHUFFLE_SEED).shuffle(self.words)

    def get_example(self, index: int) -> Conversation:
        word = _rng(self.split, index).choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": f"Spell the word: {word}"},
                {"role": "assistant", "content": f"{word}:{_spelled(word)}"},
            ]
        }
