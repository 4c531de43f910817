"""Offline stand-ins for the task datasets: small synthetic ARC, MMLU, GSM8K, HumanEval and
SmolTalk in the real files' layout and parquet schemas, so the task classes load them unchanged.

The CPU demo must run the whole chat pipeline (midtraining, SFT, chat eval, RL) without
internet. The content is simple enough for a tiny model to learn some of it:
- ARC / MMLU: multiple choice generated from facts (which number is largest, the letter after
  K, the capital of Peru, which word is a Python keyword, the plural of mouse, ...); ARC-Easy
  draws the easy kinds, ARC-Challenge the harder ones, MMLU all of them under MMLU subjects.
- GSM8K: arithmetic word problems with `<<6*4=24>>` calculator annotations and `#### answer`
  (socratic: the same problems with a sub-question before each step).
- HumanEval: small Python functions (prompt, canonical solution, `def check(candidate)` tests,
  entry point) whose canonical solutions pass their tests.
- SmolTalk: conversations about the standard library built from its docstrings ("What does
  `textwrap.dedent` do?"), plus small talk, arithmetic and capitals.
- For nanochat's opt-in extras (tasks/mixtures.py): `words_alpha.txt`, a sorted list of a few
  thousand lowercase words (the demo's own words and words of the Python reference's prose,
  made-up English-looking ones only past those) for SpellingBee/SimpleSpelling, and
  `identity_conversations.jsonl`, conversations in which the assistant says what it is
  (nanochat-jax), written here for the demo.

Every dataset has its own seeded random.Random, so the output is the same on every run (for a
given Python build: the docstrings and the reference's prose come from it). A marker file
(`task_data/.demo_tasks.json`) keeps downloads and demo data from mixing.

    python -m nanochat_jax.demo_tasks [--scale 1.0]
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import inspect
import json
import keyword
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from nanochat_jax.common import atomic_write_text, get_logger
from nanochat_jax.hf_data import (
    DEMO_MARKER,
    FILES,
    IDENTITY_FILE,
    SPLITS,
    WORDS_FILE,
    get_split,
    task_data_dir,
    write_split,
)

log = get_logger("nanochat_jax.demo_tasks")


@dataclass(frozen=True)
class DemoTasksConfig:
    """Rows per split (times `scale`); few thousand train rows, a few hundred test rows."""

    seed: int = 42
    scale: float = 1.0
    arc_easy: tuple[int, int, int] = (1000, 150, 300)  # train, validation, test
    arc_challenge: tuple[int, int, int] = (600, 100, 300)
    mmlu: tuple[int, int, int, int] = (500, 150, 100, 1500)  # test, validation, dev, aux train
    gsm8k: tuple[int, int] = (2000, 400)  # train, test
    smoltalk: tuple[int, int] = (2500, 250)  # train, test
    humaneval: int = 164
    words: int = 3000  # words_alpha.txt
    identity: int = 60  # identity_conversations.jsonl

    def rows(self, n: int) -> int:
        return max(1, round(n * self.scale))


# ---- facts ------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip
PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "India": "New Delhi", "China": "Beijing",
    "Russia": "Moscow", "Mexico": "Mexico City", "Australia": "Canberra", "Portugal": "Lisbon",
    "Ireland": "Dublin", "Poland": "Warsaw", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Austria": "Vienna", "Cuba": "Havana", "Thailand": "Bangkok", "Argentina": "Buenos Aires",
    "Turkey": "Ankara", "Vietnam": "Hanoi", "Brazil": "Brasilia", "Hungary": "Budapest",
}  # fmt: skip
ANIMALS = {
    "mammal": ["dog", "cat", "whale", "horse", "bat", "elephant", "mouse", "cow", "dolphin"],
    "bird": ["eagle", "sparrow", "penguin", "owl", "parrot", "duck", "robin", "ostrich"],
    "fish": ["salmon", "shark", "trout", "tuna", "goldfish", "cod"],
    "reptile": ["snake", "lizard", "turtle", "crocodile", "gecko", "iguana"],
    "insect": ["ant", "bee", "beetle", "butterfly", "fly", "grasshopper"],
}
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
    ("happy", "sad"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("wet", "dry"),
    ("loud", "quiet"), ("hard", "soft"), ("old", "young"), ("strong", "weak"), ("high", "low"),
]  # fmt: skip
SHAPES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "heptagon": 7, "octagon": 8}
PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives",
}  # fmt: skip
COLOR_MIXES = [
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "gray"),
]  # fmt: skip
COLORS = ["green", "orange", "purple", "pink", "gray", "brown", "red", "blue", "yellow"]
WORDS = [
    "banana", "apple", "river", "computer", "python", "garden", "window", "pencil", "rocket",
    "turtle", "orange", "planet", "music", "bridge", "island", "dragon", "candle", "forest",
    "mountain", "coffee", "summer", "winter", "castle", "button", "pepper", "silver", "yellow",
]  # fmt: skip
NOT_KEYWORDS = ["apple", "table", "print", "list", "value", "number", "total", "count", "len"]
NAMES = [
    ("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dan", "he"), ("Ella", "she"),
    ("Finn", "he"), ("Grace", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jack", "he"),
    ("Lena", "she"), ("Max", "he"), ("Nora", "she"), ("Omar", "he"), ("Ruby", "she"),
]  # fmt: skip
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "cards", "shells", "books"]


# ---- multiple choice (ARC, MMLU) ---------------------------------------------------------------

# A kind returns (question, correct answer, wrong answers); choose() keeps 2-4 of the wrong ones.
MCKind = Callable[[random.Random], tuple[str, str, list[str]]]


def _numbers(rng: random.Random, k: int, lo: int, hi: int) -> list[int]:
    return rng.sample(range(lo, hi), k)


def _near(rng: random.Random, answer: int, k: int = 4) -> list[str]:
    """Wrong numeric answers close to the right one."""
    wrong = {answer + d for d in (-10, -3, -2, -1, 1, 2, 3, 10)}
    return [str(x) for x in rng.sample(sorted(w for w in wrong if w >= 0), k)]


def _largest(rng):
    nums = _numbers(rng, 5, 0, 1000)
    return "Which number is the largest?", str(max(nums)), [str(n) for n in nums if n != max(nums)]


def _smallest(rng):
    nums = _numbers(rng, 5, 0, 1000)
    return "Which number is the smallest?", str(min(nums)), [str(n) for n in nums if n != min(nums)]


def _add(rng):
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    return f"What is {a} + {b}?", str(a + b), _near(rng, a + b)


def _subtract(rng):
    a, b = sorted((rng.randint(1, 99), rng.randint(1, 99)), reverse=True)
    return f"What is {a} - {b}?", str(a - b), _near(rng, a - b)


def _multiply(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", str(a * b), _near(rng, a * b)


def _square(rng):
    n = rng.randint(2, 25)
    return f"What is {n} squared?", str(n * n), _near(rng, n * n)


def _even(rng):
    odds = rng.sample(range(1, 200, 2), 4)
    return "Which of these numbers is even?", str(rng.randrange(2, 200, 2)), [str(n) for n in odds]


def _cyclic(rng, seq: list[str], step: int, what: str, where: str):
    i = rng.randrange(len(seq))
    answer = seq[(i + step) % len(seq)]
    wrong = [x for x in seq if x not in (answer, seq[i])]
    return f"Which {what} comes right {where} {seq[i]}?", answer, rng.sample(wrong, 4)


def _next_letter(rng):
    i = rng.randrange(25)
    wrong = [LETTERS[j] for j in range(max(0, i - 4), min(26, i + 6)) if j not in (i, i + 1)]
    return f"Which letter comes right after {LETTERS[i]} in the alphabet?", LETTERS[i + 1], wrong


def _previous_letter(rng):
    i = rng.randrange(1, 26)
    wrong = [LETTERS[j] for j in range(max(0, i - 5), min(26, i + 5)) if j not in (i, i - 1)]
    return f"Which letter comes right before {LETTERS[i]} in the alphabet?", LETTERS[i - 1], wrong


def _day_after(rng):
    return _cyclic(rng, DAYS, 1, "day", "after")


def _day_before(rng):
    return _cyclic(rng, DAYS, -1, "day", "before")


def _month_after(rng):
    return _cyclic(rng, MONTHS, 1, "month", "after")


def _animal(rng):
    kind = rng.choice(list(ANIMALS))
    wrong = [rng.choice(ANIMALS[k]) for k in ANIMALS if k != kind]
    article = "an" if kind[0] in "aeiou" else "a"
    return f"Which of these animals is {article} {kind}?", rng.choice(ANIMALS[kind]), wrong


def _capital(rng):
    country = rng.choice(list(CAPITALS))
    wrong = [c for k, c in CAPITALS.items() if k != country]
    return f"What is the capital of {country}?", CAPITALS[country], rng.sample(wrong, 4)


def _opposite(rng):
    pair = rng.choice(OPPOSITES)
    word, answer = pair if rng.random() < 0.5 else pair[::-1]
    wrong = [w for p in OPPOSITES for w in p if w not in pair]
    return f"What is the opposite of {word}?", answer, rng.sample(wrong, 4)


def _shape_sides(rng):
    shape = rng.choice(list(SHAPES))
    wrong = [str(n) for n in range(2, 10) if n != SHAPES[shape]]
    return f"How many sides does a {shape} have?", str(SHAPES[shape]), rng.sample(wrong, 4)


def _planet(rng):
    if rng.random() < 0.2:
        return "Which planet is closest to the Sun?", PLANETS[0], rng.sample(PLANETS[1:], 4)
    i = rng.randrange(len(PLANETS) - 1)
    wrong = [p for p in PLANETS if p not in (PLANETS[i], PLANETS[i + 1])]
    question = f"Which planet comes right after {PLANETS[i]} in order from the Sun?"
    return question, PLANETS[i + 1], rng.sample(wrong, 4)


def _plural(rng):
    word = rng.choice(list(PLURALS))
    wrong = [word + "s", word + "es", PLURALS[word] + "s", word + "en"]
    return f"What is the plural of the word {word}?", PLURALS[word], wrong


def _color_mix(rng):
    a, b, answer = rng.choice(COLOR_MIXES)
    wrong = [c for c in COLORS if c not in (a, b, answer)]
    return f"What color do you get by mixing {a} and {b} paint?", answer, rng.sample(wrong, 4)


def _word_length(rng):
    word = rng.choice(WORDS)
    question = f"How many letters are in the word {word}?"
    return question, str(len(word)), _near(rng, len(word))


def _keyword(rng):
    words = [w for w in keyword.kwlist if w.islower()]
    question = "Which of these words is a Python keyword?"
    return question, rng.choice(words), rng.sample(NOT_KEYWORDS, 4)


def _len_call(rng):
    word = rng.choice(WORDS)
    return f"In Python, what does len('{word}') return?", str(len(word)), _near(rng, len(word))


# (kind, ARC difficulty, MMLU subject)
MC_KINDS: list[tuple[MCKind, str, str]] = [
    (_largest, "easy", "elementary_mathematics"),
    (_smallest, "easy", "elementary_mathematics"),
    (_add, "easy", "elementary_mathematics"),
    (_subtract, "easy", "elementary_mathematics"),
    (_shape_sides, "easy", "elementary_mathematics"),
    (_next_letter, "easy", "miscellaneous"),
    (_day_after, "easy", "miscellaneous"),
    (_month_after, "easy", "miscellaneous"),
    (_opposite, "easy", "miscellaneous"),
    (_color_mix, "easy", "miscellaneous"),
    (_animal, "easy", "high_school_biology"),
    (_capital, "easy", "high_school_geography"),
    (_multiply, "challenge", "high_school_mathematics"),
    (_square, "challenge", "high_school_mathematics"),
    (_even, "challenge", "high_school_mathematics"),
    (_previous_letter, "challenge", "miscellaneous"),
    (_day_before, "challenge", "miscellaneous"),
    (_plural, "challenge", "miscellaneous"),
    (_word_length, "challenge", "miscellaneous"),
    (_planet, "challenge", "astronomy"),
    (_keyword, "challenge", "high_school_computer_science"),
    (_len_call, "challenge", "high_school_computer_science"),
]


def _mc(rng: random.Random, kinds: list[MCKind], num_choices: int):
    """(kind index, question, choices, index of the right one): a random kind, shuffled choices."""
    k = rng.randrange(len(kinds))
    question, answer, wrong = kinds[k](rng)
    wrong = [w for w in dict.fromkeys(wrong) if w != answer]
    choices = [answer, *rng.sample(wrong, num_choices - 1)]
    rng.shuffle(choices)
    return k, question, choices, choices.index(answer)


def _unique(make: Callable[[], tuple], n: int, seen: set, key: Callable[[tuple], object]):
    """n items from make() whose key is not in seen (shared across a dataset's splits, so no
    test item also appears in train)."""
    out = []
    for _ in range(100 * n):
        item = make()
        if key(item) not in seen:
            seen.add(key(item))
            out.append(item)
            if len(out) == n:
                return out
    raise RuntimeError(f"could only make {len(out)} of {n} distinct items; lower the sizes")


def _arc_rows(rng: random.Random, difficulty: str, n: int, seen: set, prefix: str) -> list[dict]:
    kinds = [kind for kind, level, _ in MC_KINDS if level == difficulty]

    def make():
        # like ARC: mostly 4 choices labelled A-D, some 3 or 5, a few labelled 1-4
        num_choices = rng.choices([3, 4, 5], weights=[1, 8, 1])[0]
        _, question, choices, answer = _mc(rng, kinds, num_choices)
        numeric = num_choices == 4 and rng.random() < 0.05
        labels = [str(i + 1) for i in range(4)] if numeric else list(LETTERS[:num_choices])
        return question, choices, labels, labels[answer]

    items = _unique(make, n, seen, key=lambda it: (it[0], frozenset(it[1])))
    return [
        {
            "id": f"{prefix}_{i:05d}",
            "question": question,
            "choices": {"text": choices, "label": labels},
            "answerKey": answer_key,
        }
        for i, (question, choices, labels, answer_key) in enumerate(items)
    ]


def _mmlu_rows(rng: random.Random, n: int, seen: set, *, subject: bool = True) -> list[dict]:
    kinds = [kind for kind, _, _ in MC_KINDS]
    subjects = [s for _, _, s in MC_KINDS]

    def make():
        k, question, choices, answer = _mc(rng, kinds, 4)
        return question, choices, answer, subjects[k] if subject else ""

    items = _unique(make, n, seen, key=lambda it: (it[0], frozenset(it[1])))
    return [
        {"question": q, "subject": s, "choices": choices, "answer": answer}
        for q, choices, answer, s in items
    ]


# ---- GSM8K -------------------------------------------------------------------------------------


def _step(sub_question: str, text: str, expr: str) -> tuple[str, str]:
    """A solution step: `text` with its {} replaced by `expr = <<expr=value>>value` (GSM8K's
    calculator annotation), and the socratic sub-question it answers."""
    value = eval(expr, {"__builtins__": {}})  # our own arithmetic on small integers
    if value != int(value):
        raise ValueError(f"{expr} is not a whole number")
    return sub_question, text.format(f"{expr} = <<{expr}={int(value)}>>{int(value)}")


def _gsm_problem(rng: random.Random) -> tuple[str, list[tuple[str, str]], int]:
    """(question, [(socratic sub-question, step text)], answer) from one of a few templates."""
    (name, he), item = rng.choice(NAMES), rng.choice(ITEMS)
    he_cap = he.capitalize()
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        c = rng.randint(1, a * b - 1)
        question = (
            f"{name} has {a} boxes of {item}. Each box holds {b} {item}. {he_cap} gives away {c} "
            f"{item}. How many {item} does {name} have left?"
        )
        steps = [
            _step(f"How many {item} does {name} have?", f"{name} has {{}} {item}.", f"{a}*{b}"),
            _step(
                f"How many {item} are left?",
                f"After giving away {c}, {he} has {{}} {item} left.",
                f"{a * b}-{c}",
            ),
        ]
        return question, steps, a * b - c
    if kind == 1:
        a, p, q = rng.randint(2, 9), rng.randint(2, 15), rng.randint(5, 40)
        question = (
            f"{name} buys {a} notebooks for ${p} each and a backpack for ${q}. How many dollars "
            f"does {he} spend in total?"
        )
        steps = [
            _step("How much do the notebooks cost?", "The notebooks cost ${}.", f"{a}*{p}"),
            _step("How much does everything cost?", f"In total {he} spends ${{}}.", f"{a * p}+{q}"),
        ]
        return question, steps, a * p + q
    if kind == 2:
        k, each, extra = rng.randint(2, 8), rng.randint(2, 12), rng.randint(1, 9)
        total = k * each + extra
        question = (
            f"{name} has {total} {item}. {he_cap} keeps {extra} and shares the rest equally among "
            f"{k} friends. How many {item} does each friend get?"
        )
        steps = [
            _step(
                f"How many {item} are shared?", f"{name} shares {{}} {item}.", f"{total}-{extra}"
            ),
            _step(
                "How many does each friend get?",
                f"Each friend gets {{}} {item}.",
                f"{k * each}/{k}",
            ),
        ]
        return question, steps, each
    if kind == 3:
        w, h, d = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6)
        question = (
            f"{name} earns ${w} per hour. {he_cap} works {h} hours a day for {d} days. How many "
            f"dollars does {he} earn?"
        )
        steps = [
            _step("How much does one day pay?", "One day pays ${}.", f"{w}*{h}"),
            _step(
                f"How much does {name} earn in all?",
                f"In {d} days {he} earns ${{}}.",
                f"{w * h}*{d}",
            ),
        ]
        return question, steps, w * h * d
    if kind == 4:
        a, b, c = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 10)
        other = rng.choice([n for n, _ in NAMES if n != name])
        question = (
            f"{name} is {a} years old. {other} is {b} years older than {name}. How old will "
            f"{other} be in {c} years?"
        )
        steps = [
            _step(f"How old is {other} now?", f"{other} is {{}} years old.", f"{a}+{b}"),
            _step(
                f"How old will {other} be?", f"In {c} years {other} will be {{}}.", f"{a + b}+{c}"
            ),
        ]
        return question, steps, a + b + c
    trays, per, sold = rng.randint(2, 6), rng.randint(6, 24), rng.randint(1, 5)
    question = (
        f"A baker bakes {trays} trays of {per} muffins. {name} buys {sold} muffins from each "
        "tray. How many muffins are left?"
    )
    steps = [
        _step("How many muffins are baked?", "The baker bakes {} muffins.", f"{trays}*{per}"),
        _step(
            f"How many muffins does {name} buy?", f"{name} buys {{}} muffins.", f"{trays}*{sold}"
        ),
        _step(
            "How many muffins are left?", "{} muffins are left.", f"{trays * per}-{trays * sold}"
        ),
    ]
    return question, steps, trays * (per - sold)


def _gsm_rows(rng: random.Random, n: int, seen: set) -> tuple[list[dict], list[dict]]:
    """(main rows, socratic rows): the same problems with the two answer styles."""
    problems = _unique(lambda: _gsm_problem(rng), n, seen, key=lambda p: p[0])
    main, socratic = [], []
    for question, steps, answer in problems:
        main.append(
            {"question": question, "answer": "\n".join(t for _, t in steps) + f"\n#### {answer}"}
        )
        text = "\n".join(f"{q} ** {t}" for q, t in steps)
        socratic.append({"question": question, "answer": f"{text}\n#### {answer}"})
    return main, socratic


# ---- HumanEval ---------------------------------------------------------------------------------


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _factorial(n: int) -> int:
    return 1 if n < 2 else n * _factorial(n - 1)


_SEPARATORS = {"comma": ",", "dash": "-", "space": " ", "plus": "+", "colon": ":", "slash": "/"}


@dataclass(frozen=True)
class _Family:
    """Problems `name.format(p=p)` for each p in params. The texts may use {p} and {sep} (the
    separator named by p); `reference(p)` computes the expected outputs for `inputs`."""

    name: str
    params: tuple
    signature: str
    doc: str
    body: str
    reference: Callable
    inputs: tuple


_NUMS = ((0,), (5,), (-3,), (11,))
_TEXTS = (("",), ("banana",), ("street artist",), ("ooo",))
_WORD_LISTS = ((["a", "tree", "elephant", "sun"],), (["python", "is", "great"],), ([],))
_HE_FAMILIES = [
    _Family(
        "add_{p}", tuple(range(1, 16)), "(x: int) -> int", "Return x plus {p}.",
        "    return x + {p}\n", lambda p: lambda x: x + p, _NUMS,
    ),
    _Family(
        "times_{p}", tuple(range(2, 13)), "(x: int) -> int", "Return x multiplied by {p}.",
        "    return x * {p}\n", lambda p: lambda x: x * p, _NUMS,
    ),
    _Family(
        "power_of_{p}", (2, 3, 4, 5, 6, 7), "(n: int) -> int", "Return {p} raised to the power n.",
        "    return {p} ** n\n", lambda p: lambda n: p**n, ((0,), (1,), (5,)),
    ),
    _Family(
        "divisible_by_{p}", tuple(range(2, 13)), "(n: int) -> bool",
        "Return True if n is divisible by {p}.", "    return n % {p} == 0\n",
        lambda p: lambda n: n % p == 0, ((0,), (7,), (12,), (45,), (56,)),
    ),
    _Family(
        "subtract_{p}", tuple(range(1, 13)), "(x: int) -> int", "Return x minus {p}.",
        "    return x - {p}\n", lambda p: lambda x: x - p, _NUMS,
    ),
    _Family(
        "remainder_{p}", tuple(range(2, 11)), "(n: int) -> int",
        "Return the remainder of n divided by {p}.", "    return n % {p}\n",
        lambda p: lambda n: n % p, ((0,), (7,), (12,), (45,), (-3,)),
    ),
    _Family(
        "clamp_0_{p}", tuple(range(5, 101, 12)), "(x: int) -> int",
        "Return x limited to the range from 0 to {p}.", "    return max(0, min({p}, x))\n",
        lambda p: lambda x: max(0, min(p, x)), ((-5,), (0,), (3,), (50,), (1000,)),
    ),
    _Family(
        "count_{p}", tuple("aeiorst"), "(text: str) -> int",
        "Return how many times the letter '{p}' appears in text.",
        "    return text.count('{p}')\n", lambda p: lambda s: s.count(p), _TEXTS,
    ),
    _Family(
        "has_letter_{p}", tuple("aeiorst"), "(text: str) -> bool",
        "Return True if the letter '{p}' appears in text.",
        "    return '{p}' in text\n", lambda p: lambda s: p in s, _TEXTS,
    ),
    _Family(
        "star_{p}", tuple("aeiorst"), "(text: str) -> str",
        "Return text with every '{p}' replaced by '*'.",
        "    return text.replace('{p}', '*')\n", lambda p: lambda s: s.replace(p, "*"), _TEXTS,
    ),
    _Family(
        "last_{p}_chars", tuple(range(1, 8)), "(text: str) -> str",
        "Return the last {p} characters of text (all of it if it is shorter).",
        "    return text[-{p}:]\n", lambda p: lambda s: s[-p:], _TEXTS,
    ),
    _Family(
        "first_{p}_chars", tuple(range(1, 8)), "(text: str) -> str",
        "Return the first {p} characters of text (all of it if it is shorter).",
        "    return text[:{p}]\n", lambda p: lambda s: s[:p], _TEXTS,
    ),
    _Family(
        "repeat_{p}", tuple(range(2, 9)), "(text: str) -> str", "Return text repeated {p} times.",
        "    return text * {p}\n", lambda p: lambda s: s * p, (("",), ("ab",), ("x",)),
    ),
    _Family(
        "sum_above_{p}", tuple(range(10)), "(numbers: List[int]) -> int",
        "Return the sum of the numbers that are greater than {p}.",
        "    return sum(n for n in numbers if n > {p})\n",
        lambda p: lambda xs: sum(x for x in xs if x > p),
        (([],), ([1, 2, 3, 10],), ([5, 6, 7, 8, 9],), ([-1, 0, 4],)),
    ),
    _Family(
        "count_multiples_of_{p}", tuple(range(2, 10)), "(numbers: List[int]) -> int",
        "Return how many of the numbers are multiples of {p}.",
        "    return sum(1 for n in numbers if n % {p} == 0)\n",
        lambda p: lambda xs: sum(x % p == 0 for x in xs),
        (([],), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10],), ([0, 12, 35, 49, 64],)),
    ),
    _Family(
        "longer_than_{p}", tuple(range(1, 9)), "(words: List[str]) -> List[str]",
        "Return the words longer than {p} characters, in order.",
        "    return [w for w in words if len(w) > {p}]\n",
        lambda p: lambda ws: [w for w in ws if len(w) > p], _WORD_LISTS,
    ),
    _Family(
        "starts_with_{p}", tuple("abcmpst"), "(words: List[str]) -> List[str]",
        "Return the words that start with the letter '{p}', in order.",
        "    return [w for w in words if w.startswith('{p}')]\n",
        lambda p: lambda ws: [w for w in ws if w.startswith(p)],
        (([],), (["apple", "bear", "cat", "moon", "sun", "tree", "pear"],), (["sky", "art"],)),
    ),
    _Family(
        "join_with_{p}", tuple(_SEPARATORS), "(words: List[str]) -> str",
        "Join the words with a {p} ({sep!r}) between them.", "    return {sep!r}.join(words)\n",
        lambda p: _SEPARATORS[p].join, (([],), (["a"],), (["x", "y", "z"],)),
    ),
]  # fmt: skip
_HE_SINGLES = [
    _Family(
        "reverse_string", (None,), "(text: str) -> str", "Return text reversed.",
        "    return text[::-1]\n", lambda p: lambda s: s[::-1], (("",), ("abc",), ("racecar",)),
    ),
    _Family(
        "is_palindrome", (None,), "(text: str) -> bool",
        "Return True if text reads the same backwards.", "    return text == text[::-1]\n",
        lambda p: lambda s: s == s[::-1], (("",), ("abba",), ("abc",)),
    ),
    _Family(
        "count_vowels", (None,), "(text: str) -> int",
        "Return the number of vowels (aeiou) in text.",
        "    return sum(1 for c in text if c in 'aeiou')\n",
        lambda p: lambda s: sum(c in "aeiou" for c in s), (("",), ("hello",), ("education",)),
    ),
    _Family(
        "max_of_list", (None,), "(numbers: List[int]) -> int",
        "Return the largest number of a non-empty list.", "    return max(numbers)\n",
        lambda p: max, (([1],), ([3, 9, 2],), ([-5, -2, -9],)),
    ),
    _Family(
        "running_sum", (None,), "(numbers: List[int]) -> List[int]",
        "Return the running totals: element i is the sum of numbers[0..i].",
        "    out, total = [], 0\n    for n in numbers:\n        total += n\n"
        "        out.append(total)\n    return out\n",
        lambda p: lambda xs: [sum(xs[: i + 1]) for i in range(len(xs))],
        (([],), ([1, 2, 3],), ([5, -5, 5],)),
    ),
    _Family(
        "unique_sorted", (None,), "(numbers: List[int]) -> List[int]",
        "Return the distinct numbers in increasing order.", "    return sorted(set(numbers))\n",
        lambda p: lambda xs: sorted(set(xs)), (([],), ([3, 1, 3, 2],), ([7, 7, 7],)),
    ),
    _Family(
        "fibonacci", (None,), "(n: int) -> int",
        "Return the n-th Fibonacci number (fibonacci(0) = 0).",
        "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        lambda p: _fib, ((0,), (1,), (2,), (10,), (20,)),
    ),
    _Family(
        "factorial", (None,), "(n: int) -> int", "Return n! for n >= 0.",
        "    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result\n",
        lambda p: _factorial, ((0,), (1,), (5,), (10,)),
    ),
    _Family(
        "sum_digits", (None,), "(n: int) -> int", "Return the sum of the digits of n >= 0.",
        "    return sum(int(d) for d in str(n))\n", lambda p: lambda n: sum(map(int, str(n))),
        ((0,), (7,), (1234,), (909,)),
    ),
    _Family(
        "square_all", (None,), "(numbers: List[int]) -> List[int]",
        "Return the squares of the numbers.", "    return [n * n for n in numbers]\n",
        lambda p: lambda xs: [x * x for x in xs], (([],), ([1, -2, 3],)),
    ),
    _Family(
        "capitalize_words", (None,), "(text: str) -> str",
        "Return text with the first letter of every space-separated word in upper case.",
        "    return ' '.join(w[:1].upper() + w[1:] for w in text.split(' '))\n",
        lambda p: lambda s: " ".join(w[:1].upper() + w[1:] for w in s.split(" ")),
        (("",), ("hello world",), ("a b  c",)),
    ),
]  # fmt: skip


def _humaneval_problem(family: _Family, p) -> dict:
    """A HumanEval row: typing import (for list signatures), a docstring with one doctest, the
    solution body, and `check(candidate)` asserting the reference outputs."""
    fmt = {"p": p, "sep": _SEPARATORS.get(p)}
    name, reference = family.name.format(**fmt), family.reference(p)

    def call(args: tuple) -> str:
        return ", ".join(repr(a) for a in args)

    example = family.inputs[-1]
    header = "from typing import List\n\n\n" if "List[" in family.signature else ""
    prompt = (
        f'{header}def {name}{family.signature}:\n    """ {family.doc.format(**fmt)}\n'
        f'    >>> {name}({call(example)})\n    {reference(*example)!r}\n    """\n'
    )
    asserts = "".join(
        f"    assert candidate({call(args)}) == {reference(*args)!r}\n" for args in family.inputs
    )
    test = (
        "\n\nMETADATA = {'author': 'demo', 'dataset': 'test'}\n\n\n"
        f"def check(candidate):\n{asserts}"
    )
    body = family.body.format(**fmt)
    return {"prompt": prompt, "canonical_solution": body, "test": test, "entry_point": name}


def _humaneval_rows(rng: random.Random, n: int) -> list[dict]:
    problems = [
        _humaneval_problem(family, p)
        for family in _HE_FAMILIES + _HE_SINGLES
        for p in family.params
    ]
    rng.shuffle(problems)
    return [{"task_id": f"HumanEval/{i}", **p} for i, p in enumerate(problems[:n])]


# ---- SmolTalk ----------------------------------------------------------------------------------

_DOC_MODULES = [
    "textwrap", "string", "json", "os.path", "math", "random", "itertools", "functools",
    "collections", "statistics", "fractions", "re", "shutil", "pathlib", "datetime", "calendar",
    "heapq", "bisect", "difflib", "base64", "html", "csv", "copy", "pprint", "operator", "glob",
    "fnmatch", "zlib", "gzip", "secrets", "uuid", "time", "struct", "keyword", "colorsys",
    "urllib.parse", "shlex", "decimal", "contextlib", "dataclasses", "enum", "inspect", "hashlib",
]  # fmt: skip
SYSTEM_PROMPT = "You are a helpful assistant who knows the Python standard library well."
GREETINGS = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello there.", "Hi! What would you like to talk about?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Who are you?", "I am a small chat model trained offline as a demo. Ask me about Python!"),
    ("Thanks!", "You're welcome!"),
    ("Can you help me with Python?", "Of course. Which module or function are you curious about?"),
]


def _first_paragraph(doc: str, limit: int = 600) -> str:
    paragraph = doc.strip().split("\n\n")[0].strip()
    return paragraph if len(paragraph) <= limit else paragraph[:limit].rsplit(" ", 1)[0] + " ..."


def _doc_items(per_module: int = 20) -> list[tuple[str, str, str, str | None, bool]]:
    """(module, qualified name, first paragraph of its own docstring, signature or None, is a
    class) for up to `per_module` public functions and classes of each of _DOC_MODULES."""
    items = []
    for module_name in _DOC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a stripped-down Python build may lack one (zlib, say)
            continue
        public = getattr(module, "__all__", None) or dir(module)
        found = []
        for name in sorted(n for n in public if not n.startswith("_")):
            obj = getattr(module, name, None)
            is_class = inspect.isclass(obj)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or is_class):
                continue
            if is_class and issubclass(obj, BaseException):
                continue  # exception docstrings say little
            # the object's own docstring: inspect.getdoc would borrow a base class's
            doc = inspect.cleandoc(obj.__doc__) if isinstance(obj.__doc__, str) else ""
            if len(doc) < 20:
                continue
            try:
                signature = f"{module_name}.{name}{inspect.signature(obj)}"
            except (TypeError, ValueError):  # some C functions have no signature
                signature = None
            # long ones, and ones whose defaults print a memory address ("<function copy2 at
            # 0x7f...>": different in every process), would make the demo data vary
            if signature and (len(signature) > 120 or " at 0x" in signature):
                signature = None
            qualname = f"{module_name}.{name}"
            found.append((module_name, qualname, _first_paragraph(doc), signature, is_class))
        items.extend(found[:per_module])
    return items


def _doc_conversation(rng: random.Random, item) -> list[dict]:
    module, qualname, paragraph, signature, is_class = item
    asks = ["What is `{}`?", "What is the `{}` class for?"] if is_class else [
        "What does `{}` do?", "Can you explain `{}`?", "What is `{}` for?"
    ]  # fmt: skip
    turns = [
        (
            rng.choice(asks).format(qualname),
            f"`{qualname}` is in the `{module}` module. {paragraph}",
        )
    ]
    if signature and rng.random() < 0.6:
        turns.append(("How do I call it?", f"Call it like this: `{signature}`."))
    if rng.random() < 0.3:
        answer = f"Import the `{module}` module: `import {module}`."
        turns.append(("Which module do I import for it?", answer))
    return _messages(rng, turns)


def _small_talk(rng: random.Random) -> list[dict]:
    """One of: a greeting, arithmetic, a capital, spelling, counting, sorting, reversing."""
    kind = rng.choices(range(7), weights=[1, 4, 1, 2, 2, 2, 2])[0]
    if kind == 0:
        return _messages(rng, [rng.choice(GREETINGS)])
    if kind == 1:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        turns = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")]
        if rng.random() < 0.5:
            turns.append((f"And {a} times {b}?", f"{a} times {b} is {a * b}."))
        return _messages(rng, turns)
    if kind == 2:
        country = rng.choice(list(CAPITALS))
        answer = f"The capital of {country} is {CAPITALS[country]}."
        return _messages(rng, [(f"What is the capital of {country}?", answer)])
    if kind == 3:
        word = rng.choice(WORDS)
        return _messages(
            rng, [(f"How do you spell {word}?", f"{word} is spelled {'-'.join(word)}.")]
        )
    if kind == 4:
        a = rng.randint(0, 50)
        b = a + rng.randint(2, 9)
        counted = ", ".join(str(i) for i in range(a, b + 1))
        return _messages(rng, [(f"Count from {a} to {b}.", f"{counted}.")])
    if kind == 5:
        nums = rng.sample(range(100), rng.randint(3, 7))
        question = f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}."
        return _messages(rng, [(question, ", ".join(map(str, sorted(nums))) + ".")])
    word = rng.choice(WORDS)
    return _messages(rng, [(f"Write the word {word} backwards.", f"{word[::-1]}")])


def _messages(rng: random.Random, turns: list[tuple[str, str]]) -> list[dict]:
    """Alternating user/assistant messages, sometimes after a system message."""
    messages = [{"content": SYSTEM_PROMPT, "role": "system"}] if rng.random() < 0.2 else []
    for user, assistant in turns:
        messages += [{"content": user, "role": "user"}, {"content": assistant, "role": "assistant"}]
    return messages


def _smoltalk_rows(rng: random.Random, n_train: int, n_test: int) -> tuple[list, list]:
    """About half docstring conversations (each object asked about twice, in different
    words), the rest small talk."""
    docs = _doc_items()
    conversations = [(_doc_conversation(rng, item), "demo-stdlib-docs") for item in docs + docs][
        : (n_train + n_test) // 2
    ]
    while len(conversations) < n_train + n_test:
        conversations.append((_small_talk(rng), "demo-small-talk"))
    rng.shuffle(conversations)
    rows = [{"messages": m, "source": s} for m, s in conversations]
    return rows[n_test:], rows[:n_test]


# ---- word list (SpellingBee, SimpleSpelling) -------------------------------------------------

# English-looking syllables: onset + vowel + coda, and common endings
_ONSETS = (
    "", "", "b", "bl", "br", "c", "ch", "cl", "cr", "d", "dr", "f", "fl", "fr", "g", "gl", "gr",
    "h", "j", "k", "l", "m", "n", "p", "pl", "pr", "qu", "r", "s", "sc", "sh", "sl", "sm", "sn",
    "sp", "st", "str", "sw", "t", "th", "tr", "v", "w", "wh", "y", "z",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ee", "oa", "oo", "ou", "ie")
_CODAS = (
    "", "", "", "b", "ck", "d", "ft", "g", "l", "ll", "m", "mp", "n", "nd", "ng", "nk", "nt", "p",
    "r", "rd", "rk", "rn", "rt", "s", "sh", "ss", "st", "t", "th", "x",
)  # fmt: skip
_ENDINGS = (
    "", "", "", "", "", "", "", "", "s", "s", "ed", "er", "ers", "ing", "ly", "ness", "ful",
    "less", "able", "tion", "ment", "ish", "ous", "y",
)  # fmt: skip
_MORE_WORDS = (
    "strawberry", "mississippi", "bookkeeper", "rhythm", "queue", "balloon", "committee",
    "coffee", "letter", "parallel", "occurrence", "assessment", "necessary", "hippopotamus",
)  # fmt: skip


def _made_up_word(rng: random.Random) -> str:
    """One to three syllables (inner ones end simply, "ban-dor"), maybe an ending."""
    syllables = rng.choices((1, 2, 3), weights=(4, 5, 1))[0]
    inner = "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(("", "", "n", "r", "l", "s", "t"))
        for _ in range(syllables - 1)
    )
    last = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
    return inner + last + rng.choice(_ENDINGS)


# Prose of the Python reference that `help()` shows (pydoc_data.topics), read for its words: a
# paragraph is prose when it starts like a sentence and has no grammar rule, prompt or operator
# in it; quoted and parenthesized names (`"__init__"`, `*fillchar*`, `(x.y=1)`) are cut first.
_NOT_PROSE = ("::=", ">>>", "==", "->")
_SENTENCE_END = re.compile(r"[a-z][.:;,]\s")
_QUOTED = re.compile(r'"[^"\n]*"|\*[^*\n]*\*|“[^”]*”|`[^`]*`|\([^()\n]*[=_.][^()\n]*\)')
# two or more lowercase letters that are not part of a dotted, hyphenated or called name
_PROSE_WORD = re.compile(r"(?<![\w.\-'’/])[a-z]{2,}(?![\w(’'/]|\.\w|-)")


def _prose_words() -> list[str]:
    """The distinct lowercase words of pydoc_data.topics' prose, sorted, without Python's
    keywords and builtin names: real English words (with some of Python's jargon: "iterable",
    "docstring"), about 2,000 of them, the same on every run of a given Python build. Empty if
    the build lacks pydoc_data."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    names = set(keyword.kwlist) | set(dir(builtins))
    words: set[str] = set()
    for topic in topics.values():
        for paragraph in re.split(r"\n\s*\n", topic):
            start = paragraph.strip().removeprefix("* ")[:1]
            if not start.isupper() or any(mark in paragraph for mark in _NOT_PROSE):
                continue
            if _SENTENCE_END.search(paragraph + " "):
                words.update(_PROSE_WORD.findall(_QUOTED.sub(" ", paragraph)))
    return sorted(words - names)


def _demo_words(rng: random.Random, n: int) -> list[str]:
    """`n` distinct lowercase words, sorted like words_alpha.txt: the words of the demo's facts
    first (those the other demo tasks use, "strawberry" and co.), then a seeded sample of the
    Python reference's prose words (_prose_words), then made-up English-looking ones only if
    those run out (n above ~2,300)."""
    facts = [*WORDS, *COLORS, *ITEMS, *NOT_KEYWORDS, *PLURALS, *PLURALS.values(), *_MORE_WORDS]
    facts += [*SHAPES, *(x.lower() for x in (*DAYS, *MONTHS, *PLANETS))]
    facts += [w for pair in OPPOSITES for w in pair] + [w for ws in ANIMALS.values() for w in ws]
    words = dict.fromkeys(w for w in facts if re.fullmatch("[a-z]+", w))
    prose = [w for w in _prose_words() if w not in words]
    words.update(dict.fromkeys(rng.sample(prose, min(len(prose), max(0, n - len(words))))))
    while len(words) < n:
        words.setdefault(_made_up_word(rng))
    return sorted(list(words)[:n])


# ---- identity conversations (CustomJSON) ------------------------------------------------------

# (ways a user asks, what the assistant answers): the assistant knows what it is
_IDENTITY_QA = [
    (
        ["Who are you?", "What are you?", "Introduce yourself.", "who r u"],
        "I'm nanochat-jax, a small chat model. I was trained from scratch with nanochat-jax, a "
        "JAX reimplementation of Andrej Karpathy's nanochat, and this copy of me is a tiny "
        "offline demo.",
    ),
    (
        ["What's your name?", "Do you have a name?", "What should I call you?"],
        "You can call me nanochat-jax. The name comes from the project that trained me: "
        "nanochat, rewritten in JAX.",
    ),
    (
        ["Who made you?", "Who built you?", "Who created you?"],
        "I was built with nanochat-jax, an open-source JAX port of nanochat, the minimal "
        "end-to-end chat model project by Andrej Karpathy. Whoever ran its scripts trained me.",
    ),
    (
        ["Are you ChatGPT?", "Are you Claude?", "Are you made by OpenAI?"],
        "No. I'm nanochat-jax, a much smaller model trained with the nanochat-jax code. I'm not "
        "a product of any large AI lab.",
    ),
    (
        ["How were you trained?", "How did you learn to chat?"],
        "In stages: first a tokenizer was trained, then I was pretrained on web text to predict "
        "the next token, then midtrained and finetuned on conversations, and optionally "
        "reinforced on math problems.",
    ),
    (
        ["What is JAX?", "Why JAX?"],
        "JAX is a Python library for array computing with automatic differentiation and XLA "
        "compilation. nanochat-jax uses it, with Flax and Optax, to train me on CPUs, GPUs or "
        "TPUs.",
    ),
    (
        ["How big are you?", "How many parameters do you have?"],
        "I'm small. The demo version of me has only a few million parameters, far fewer than "
        "the large assistants you may know, so please check anything important I say.",
    ),
    (
        ["What can you do?", "What are you good at?", "How can you help me?"],
        "I can chat, answer simple questions, do some arithmetic with a calculator tool, spell "
        "words and count letters in them. I'm a small model, so I make mistakes.",
    ),
    (
        ["Can you count letters?", "How do you count letters in a word?"],
        "Yes. I spell the word out letter by letter, count as I go, and then double check the "
        "count with a small Python expression like 'banana'.count('a').",
    ),
    (
        ["Can you use tools?", "Do you have a calculator?"],
        "I can call a small Python calculator for arithmetic and for counting letters; its "
        "answer is written back into our conversation.",
    ),
    (
        ["Do you have feelings?", "Are you conscious?", "Are you alive?"],
        "No. I'm a language model: I predict text one token at a time. I don't have feelings or "
        "experiences.",
    ),
    (
        ["Can you browse the internet?", "Do you know today's news?"],
        "No, I can't browse the web, and I only know what was in my training data.",
    ),
    (
        ["What languages do you speak?", "Do you speak French?"],
        "I mostly speak English. I saw a little of other languages in training, but I'm not "
        "reliable in them.",
    ),
    (
        ["Are you open source?", "Can I see your code?"],
        "Yes. The code that trained me, nanochat-jax, is open source, and so is nanochat, the "
        "PyTorch project it follows.",
    ),
    (
        ["Can I train my own version of you?", "How do I make a model like you?"],
        "Yes! Run the nanochat-jax scripts: train the tokenizer, pretrain, midtrain, finetune, "
        "then chat. The offline demo runs on a CPU in minutes; a real run needs GPUs.",
    ),
    (
        ["Do you make mistakes?", "Can I trust your answers?"],
        "I do make mistakes, and fairly often, since I'm a small model. Please double check "
        "anything that matters.",
    ),
    (
        ["What is nanochat?", "Tell me about nanochat."],
        "nanochat is Andrej Karpathy's minimal, hackable project that trains a ChatGPT-like "
        "model end to end on a budget. nanochat-jax, which trained me, reimplements it in JAX.",
    ),
    (
        ["What is your architecture?", "What kind of model are you?"],
        "I'm a decoder-only Transformer with rotary position embeddings, RMSNorm and a ReLU "
        "squared MLP, trained with the Muon and AdamW optimizers, like nanochat's GPT.",
    ),
]
_IDENTITY_GREETINGS = [
    ("Hi!", "Hello! I'm nanochat-jax. What can I do for you?"),
    ("Hello", "Hi there! I'm nanochat-jax, a small chat model. How can I help?"),
    ("Hey, how are you?", "I'm a language model, so I'm always ready. How can I help you?"),
]
_IDENTITY_FOLLOW_UPS = [
    ("Thanks!", "You're welcome!"),
    ("Cool.", "Glad you think so! Anything else you'd like to know?"),
    ("Interesting, thanks.", "My pleasure. Ask me anything else you like."),
]


def _identity_rows(rng: random.Random, n: int) -> list[list[dict]]:
    """`n` distinct conversations: an optional greeting, one to three questions about the
    assistant itself, an optional thanks; roles alternate, user first (CustomJSON's format)."""
    rows: list[list[dict]] = []
    seen: set[str] = set()
    while len(rows) < n:
        turns = [rng.choice(_IDENTITY_GREETINGS)] if rng.random() < 0.3 else []
        for asks, answer in rng.sample(_IDENTITY_QA, rng.randint(1, 3)):
            turns.append((rng.choice(asks), answer))
        if rng.random() < 0.3:
            turns.append(rng.choice(_IDENTITY_FOLLOW_UPS))
        messages = []
        for user, assistant in turns:
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            rows.append(messages)
    return rows


def generate_files(cfg: DemoTasksConfig = DemoTasksConfig()) -> dict[str, str]:
    """The extras' files, {file name in task_data/: text}; same config -> same text."""
    words = _demo_words(random.Random(f"{cfg.seed}-words"), cfg.rows(cfg.words))
    identity = _identity_rows(random.Random(f"{cfg.seed}-identity"), cfg.rows(cfg.identity))
    return {
        # CRLF like the real words_alpha.txt (readers strip each line)
        WORDS_FILE.name: "".join(f"{w}\r\n" for w in words),
        IDENTITY_FILE.name: "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in identity),
    }


# ---- writing -----------------------------------------------------------------------------------

_STR = pa.string()
_MMLU_ROW = pa.struct(
    [("question", _STR), ("subject", _STR), ("choices", pa.list_(_STR)), ("answer", pa.int64())]
)
# the schemas of the real parquet files
SCHEMAS = {
    "allenai/ai2_arc": pa.schema(
        [
            ("id", _STR),
            ("question", _STR),
            ("choices", pa.struct([("text", pa.list_(_STR)), ("label", pa.list_(_STR))])),
            ("answerKey", _STR),
        ]
    ),
    "cais/mmlu": pa.schema(list(_MMLU_ROW)),
    "cais/mmlu/auxiliary_train": pa.schema([("train", _MMLU_ROW)]),
    "openai/gsm8k": pa.schema([("question", _STR), ("answer", _STR)]),
    "openai/openai_humaneval": pa.schema(
        [(c, _STR) for c in ("task_id", "prompt", "canonical_solution", "test", "entry_point")]
    ),
    "HuggingFaceTB/smol-smoltalk": pa.schema(
        [
            ("messages", pa.list_(pa.struct([("content", _STR), ("role", _STR)]))),
            ("source", _STR),
        ]
    ),
}


def generate(cfg: DemoTasksConfig = DemoTasksConfig()) -> dict[tuple[str, str, str], list[dict]]:
    """Every split's rows, keyed like hf_data.SPLITS; same config -> same rows."""

    def rng(name: str) -> random.Random:
        return random.Random(f"{cfg.seed}-{name}")

    r = cfg.rows
    out: dict[tuple[str, str, str], list[dict]] = {}
    for subset, sizes, level in (
        ("ARC-Easy", cfg.arc_easy, "easy"),
        ("ARC-Challenge", cfg.arc_challenge, "challenge"),
    ):
        gen, seen = rng(subset), set()
        # test first: it is never shortened by collisions with train
        for split, size in zip(("test", "validation", "train"), sizes[::-1], strict=True):
            prefix = f"Demo{subset}_{split}"
            out[("allenai/ai2_arc", subset, split)] = _arc_rows(gen, level, r(size), seen, prefix)

    gen, seen = rng("mmlu"), set()
    test, validation, dev, aux = cfg.mmlu
    for split, size in (("test", test), ("validation", validation), ("dev", dev)):
        out[("cais/mmlu", "all", split)] = _mmlu_rows(gen, r(size), seen)
    aux_rows = _mmlu_rows(gen, r(aux), seen, subject=False)  # the real aux rows have no subject
    out[("cais/mmlu", "all", "auxiliary_train")] = aux_rows
    out[("cais/mmlu", "auxiliary_train", "train")] = [{"train": row} for row in aux_rows]

    gen, seen = rng("gsm8k"), set()
    for split, size in (("test", cfg.gsm8k[1]), ("train", cfg.gsm8k[0])):
        main, socratic = _gsm_rows(gen, r(size), seen)
        out[("openai/gsm8k", "main", split)] = main
        out[("openai/gsm8k", "socratic", split)] = socratic

    out[("openai/openai_humaneval", "openai_humaneval", "test")] = _humaneval_rows(
        rng("humaneval"), r(cfg.humaneval)
    )
    train, test = _smoltalk_rows(rng("smoltalk"), r(cfg.smoltalk[0]), r(cfg.smoltalk[1]))
    out[("HuggingFaceTB/smol-smoltalk", "default", "train")] = train
    out[("HuggingFaceTB/smol-smoltalk", "default", "test")] = test
    missing = set(SPLITS) - set(out)
    assert not missing, f"demo data misses {missing}"
    return out


def _schema(repo: str, config: str) -> pa.Schema:
    return SCHEMAS.get(f"{repo}/{config}", SCHEMAS[repo])


def write_demo_tasks(
    cfg: DemoTasksConfig = DemoTasksConfig(), base_dir: str | Path | None = None
) -> dict[str, int]:
    """Write every demo split into `<base_dir>/task_data/`; returns rows per split. Skips the
    work when the same demo data is already there; refuses to mix with downloaded data."""
    root = task_data_dir(base_dir)
    marker_path = root / DEMO_MARKER
    # through JSON, so that it compares equal to the marker read back (tuples become lists)
    marker = json.loads(json.dumps({"config": asdict(cfg), "python": sys.version.split()[0]}))
    if marker_path.exists():
        old = json.loads(marker_path.read_text())
        if old.get("config") == marker["config"] and old.get("python") == marker["python"]:
            cached = [*SPLITS.values(), *FILES.values()]
            if all(item.is_cached(base_dir) for item in cached):
                log.info("demo task data already in %s", root)
                return old["rows"]
    elif root.exists() and (
        any(root.rglob("*.parquet")) or any(f.is_cached(base_dir) for f in FILES.values())
    ):
        raise ValueError(
            f"{root} already holds downloaded task data (no {DEMO_MARKER}); demo data must not "
            "mix with it. Delete that directory or point NANOCHAT_JAX_BASE_DIR elsewhere."
        )
    start_s = time.monotonic()
    splits = generate(cfg)
    files = generate_files(cfg)
    rows = {"/".join(key): len(value) for key, value in splits.items()}
    rows.update({name: text.count("\n") for name, text in files.items()})
    # the marker goes first: a crash half-way leaves it with missing files -> rewritten next time
    atomic_write_text(marker_path, json.dumps({**marker, "rows": rows}, indent=1))
    for (repo, config, split), split_rows in splits.items():
        table = pa.Table.from_pylist(split_rows, schema=_schema(repo, config))
        write_split(get_split(repo, config, split), table, base_dir)
    for name, text in files.items():
        atomic_write_text(root / name, text)
    elapsed_s = time.monotonic() - start_s
    log.info(
        "wrote %d demo splits and %d files to %s in %.1f s",
        len(splits),
        len(files),
        root,
        elapsed_s,
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write small synthetic task datasets (ARC, MMLU, GSM8K, HumanEval, "
        "SmolTalk, and the word list and identity conversations of the opt-in extras) into "
        "<base_dir>/task_data for the offline demo."
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every split's size")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 10:
        parser.error(f"--scale must be in (0, 10], got {args.scale}")
    try:
        rows = write_demo_tasks(DemoTasksConfig(seed=args.seed, scale=args.scale))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, count in rows.items():
        print(f"{count:6d}  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
