"""Write core_eval_tiny.json: nanochat's own CORE scoring of a small set of items, for parity.

    uv run python tests/golden/make_core_golden.py /path/to/nanochat [--out tests/golden/...]

Runs the PyTorch nanochat checkout's `nanochat.core_eval` (evaluate_example, evaluate_task) on
CPU in fp32 with:
  * the vocab-1024 golden tokenizer (tokenizer.json, wrapped in nanochat's RustBPETokenizer),
  * the vocab-1024 tiny GPT whose weights are in bpb.npz (wte kept in fp32, see README.md),
  * five small tasks of the three CORE types written below (few-shot and zero-shot, the two
    usual delimiters, LM contexts with stray whitespace, a multiple-choice option that is a
    token prefix of another: an empty span, whose NaN mean loss nanochat's min() handles).
For one zero-shot LM task the continuation of some items is set to the model's own greedy
tokens, so that exact match is true for some and false for others.

Two variants: "full" (no cropping: nanochat's GPT has no max_seq_len) and "crop48" (the model
gets `max_seq_len = 48`, so evaluate_example left-crops rows as it does for HF GPT-2).
Per example it records evaluate_example's verdict, the rendered prompts, the [start, end) spans
before cropping and the mean loss of each row over its span, computed from the (losses,
predictions) that nanochat's forward_model returned (captured by wrapping it).
Needs: torch, tiktoken, jinja2, numpy. Nothing from nanochat is copied into this repository.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIG = dict(sequence_len=64, vocab_size=1024, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
CROP = 48

MC_ITEMS = [
    ("What is the capital of France?", ["Paris", "London", "Rome", "Berlin"], 0),
    ("Which animal barks?", ["cat", "dog", "fish"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wax"], 2),
    ("Which planet is red?", ["Mars", "Mars rover"], 0),  # row 0 = the common prefix: NaN first
    ("What is frozen water?", ["ice cream", "ice"], 1),  # row 1 = the common prefix: NaN last
    ("How many days are in a week?", ["five", "six", "seven", "eight"], 2),
    ("What color is grass?", ["green", "blue", "red", "yellow"], 0),
    ("Which is a fruit?", ["carrot", "potato", "apple", "onion"], 2),
    ("What do you use to write?", ["a pen", "a spoon", "a shoe"], 0),
    ("Which season is coldest?", ["summer", "winter", "spring", "autumn"], 1),
]

MC0_ITEMS = [
    ("The sun rises in the", ["east.", "west.", "north.", "south."], 0),
    ("To open a locked door you need a", ["key.", "cake.", "cloud."], 0),
    ("A young cat is called a", ["puppy.", "kitten.", "calf.", "foal."], 1),
    ("Water boils at one hundred degrees", ["Celsius.", "Fahrenheit.", "Kelvin."], 0),
    ("The opposite of up is", ["left.", "down.", "right.", "over."], 1),
    ("Birds can fly because they have", ["wheels.", "fins.", "wings."], 2),
]

SCHEMA_ITEMS = [
    (
        [
            "The trophy did not fit in the suitcase because the trophy",
            "The trophy did not fit in the suitcase because the suitcase",
        ],
        "was too big.",
        0,
    ),
    (
        [
            "The trophy did not fit in the suitcase because the trophy",
            "The trophy did not fit in the suitcase because the suitcase",
        ],
        "was too small.",
        1,
    ),
    (
        ["Anna thanked Maria because Anna", "Anna thanked Maria because Maria"],
        "had helped her with the move.",
        1,
    ),
    (
        [
            "The man could not lift his son because the man",
            "The man could not lift his son because the son",
        ],
        "was so weak.",
        0,
    ),
    (
        [
            "The city council refused the demonstrators a permit because the council",
            "The city council refused the demonstrators a permit because the demonstrators",
        ],
        "feared violence.",
        0,
    ),
    (
        ["Paul tried to call George but Paul", "Paul tried to call George but George"],
        "was not available.",
        1,
    ),
    (
        ["The fish ate the worm because the fish", "The fish ate the worm because the worm"],
        "was hungry.",
        0,
    ),
    (
        [
            "Sam pulled up a chair to the piano, but the chair",
            "Sam pulled up a chair to the piano, but the piano",
        ],
        "was broken, so he had to stand.",
        0,
    ),
]

LM_ITEMS = [
    ("The quick brown fox jumps over the lazy  ", "dog"),
    ("  One, two, three, four,", "five"),
    ("Monday, Tuesday, Wednesday,\n", "Thursday"),
    ("The capital of Italy is", "Rome"),
    ("Roses are red, violets are", "blue"),
    ("A, B, C, D,", "E, F"),
    ("To be or not to be, that is the", "question"),
    ("January, February, March,", "April"),
]

LM0_CONTEXTS = [
    "The history of the city began",
    "Return the number of items in the",
    "This module provides a simple way to",
    "In mathematics, a prime number is",
    "The function returns a new list of",
    "Open the file and read all",
    "He walked to the door and",
    "Values are compared with the",
]


def _provenance(nanochat_dir: Path) -> dict:
    import tiktoken
    import torch

    core_eval = nanochat_dir / "nanochat" / "core_eval.py"
    return {
        "nanochat_checkout": str(nanochat_dir),
        "nanochat_core_eval_sha256": hashlib.sha256(core_eval.read_bytes()).hexdigest(),
        "nanochat_gpt_sha256": hashlib.sha256(
            (nanochat_dir / "nanochat" / "gpt.py").read_bytes()
        ).hexdigest(),
        "generator": "tests/golden/make_core_golden.py",
        "device": "cpu",
        "dtype": "float32",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "tiktoken": tiktoken.__version__,
        "python": platform.python_version(),
    }


def _tokenizer(nanochat_tokenizer_module):
    import tiktoken

    golden = json.loads((HERE / "tokenizer.json").read_text())
    ranks = {base64.b64decode(k): v for k, v in golden["mergeable_ranks_b64"].items()}
    enc = tiktoken.Encoding(
        name="golden1024",
        pat_str=golden["pattern"],
        mergeable_ranks=ranks,
        special_tokens=golden["special_tokens"],
    )
    return nanochat_tokenizer_module.RustBPETokenizer(enc, "<|bos|>")


def _model(gpt_module):
    import torch

    torch.manual_seed(0)
    model = gpt_module.GPT(gpt_module.GPTConfig(**CONFIG))
    model.transformer.wte.to(dtype=torch.float32)  # exact fp32 parity (golden README, change 1)
    npz = np.load(HERE / "bpb.npz")
    state = {
        k.removeprefix("param/"): torch.from_numpy(npz[k]) for k in npz if k.startswith("param/")
    }
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def _tasks(model, tokenizer) -> dict:
    import torch

    mc = [{"query": f"Question: {q}", "choices": c, "gold": g} for q, c, g in MC_ITEMS]
    mc0 = [{"query": q, "choices": c, "gold": g} for q, c, g in MC0_ITEMS]
    schema = [{"context_options": o, "continuation": c, "gold": g} for o, c, g in SCHEMA_ITEMS]
    lm = [{"context": c, "continuation": t} for c, t in LM_ITEMS]
    lm0 = []
    bos = tokenizer.get_bos_token_id()
    for i, context in enumerate(LM0_CONTEXTS):
        continuation = "zebra"  # what a tiny model will not predict
        if i % 2 == 0:  # try the model's greedy next tokens (2, else 1) as the continuation
            prompt = tokenizer.encode(context, prepend=bos)
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(2):
                    ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            for n in (2, 1):
                text = tokenizer.decode(ids[len(prompt) : len(prompt) + n])
                with_ids = tokenizer.encode(context + text, prepend=bos)
                if text.startswith(" ") and text.strip() and with_ids == ids[: len(prompt) + n]:
                    continuation = text[1:]
                    break
        lm0.append({"context": context, "continuation": continuation})
    return {
        "mc_2shot": (
            {
                "task_type": "multiple_choice",
                "num_fewshot": 2,
                "continuation_delimiter": "\nAnswer: ",
            },
            mc,
        ),
        "mc_0shot": (
            {"task_type": "multiple_choice", "num_fewshot": 0, "continuation_delimiter": " "},
            mc0,
        ),
        "schema_1shot": (
            {"task_type": "schema", "num_fewshot": 1, "continuation_delimiter": " "},
            schema,
        ),
        "lm_2shot": (
            {"task_type": "language_modeling", "num_fewshot": 2, "continuation_delimiter": " "},
            lm,
        ),
        "lm_0shot": (
            {"task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": " "},
            lm0,
        ),
    }


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values]


def _run_variant(core_eval, model, tokenizer, tasks: dict, crop: int | None) -> dict:
    """nanochat's evaluate_example on every item (capturing its forward and spans)."""
    captured = {}
    originals = {
        name: getattr(core_eval, name)
        for name in (
            "forward_model",
            "batch_sequences_mc",
            "batch_sequences_schema",
            "batch_sequences_lm",
        )
    }

    def wrap(name):
        def wrapper(*args, **kwargs):
            out = originals[name](*args, **kwargs)
            captured["forward" if name == "forward_model" else "spans"] = out
            return out

        return wrapper

    for name in originals:
        setattr(core_eval, name, wrap(name))
    if crop is not None:
        model.max_seq_len = crop
    try:
        out = {}
        for label, (meta, data) in tasks.items():
            examples = []
            for idx in range(len(data)):
                correct = core_eval.evaluate_example(idx, model, tokenizer, data, "cpu", meta)
                rows, starts, ends = captured["spans"]
                losses = captured["forward"][0]
                mean_losses = []
                for i, (row, s, e) in enumerate(zip(rows, starts, ends, strict=True)):
                    cut = max(0, len(row) - crop) if crop is not None else 0
                    mean_losses.append(float(losses[i, s - cut - 1 : e - cut - 1].mean()))
                examples.append(
                    {
                        "correct": bool(correct),
                        "losses": _nan_to_none(mean_losses),
                        "row_lengths": [len(r) for r in rows],
                        "starts": list(starts),
                        "ends": list(ends),
                    }
                )
            accuracy = core_eval.evaluate_task(model, tokenizer, data, "cpu", meta)
            out[label] = {"accuracy": accuracy, "examples": examples}
        return out
    finally:
        for name, fn in originals.items():
            setattr(core_eval, name, fn)
        if crop is not None:
            del model.max_seq_len


def _prompts(core_eval, tasks: dict) -> dict:
    """The rendered prompts and few-shot indices of every example (nanochat's renderers)."""
    import random

    render = {
        "multiple_choice": core_eval.render_prompts_mc,
        "schema": core_eval.render_prompts_schema,
        "language_modeling": core_eval.render_prompts_lm,
    }
    out = {}
    for label, (meta, data) in tasks.items():
        rows = []
        for idx in range(len(data)):
            fewshot = []
            if meta["num_fewshot"] > 0:
                available = [i for i in range(len(data)) if i != idx]
                fewshot = random.Random(1234 + idx).sample(available, meta["num_fewshot"])
            prompts = render[meta["task_type"]](
                data[idx], meta["continuation_delimiter"], [data[i] for i in fewshot]
            )
            rows.append({"fewshot": fewshot, "prompts": prompts})
        out[label] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nanochat_dir", type=Path, help="a checkout of karpathy/nanochat")
    parser.add_argument("--out", type=Path, default=HERE / "core_eval_tiny.json")
    args = parser.parse_args()
    nanochat_dir = args.nanochat_dir.resolve()
    sys.path.insert(0, str(nanochat_dir))
    import torch

    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(2)
    from nanochat import core_eval, gpt
    from nanochat import tokenizer as nanochat_tokenizer

    tokenizer = _tokenizer(nanochat_tokenizer)
    model = _model(gpt)
    tasks = _tasks(model, tokenizer)
    result = {
        "_provenance": _provenance(nanochat_dir),
        "model": {"config": CONFIG, "params": "bpb.npz (param/*), wte in fp32"},
        "tokenizer": "tokenizer.json (vocab 1024)",
        "note": (
            "losses: mean next-token loss of each row over its span, null for an empty span "
            "(torch's NaN); starts/ends: [start, end) before cropping; row_lengths before "
            "cropping; variants: full = no cropping, crop48 = rows left-cropped to 48 tokens"
        ),
        "tasks": {
            label: {"task_meta": meta, "data": data} for label, (meta, data) in tasks.items()
        },
        "prompts": _prompts(core_eval, tasks),
        "variants": {
            "full": {
                "max_seq_len": None,
                "tasks": _run_variant(core_eval, model, tokenizer, tasks, None),
            },
            f"crop{CROP}": {
                "max_seq_len": CROP,
                "tasks": _run_variant(core_eval, model, tokenizer, tasks, CROP),
            },
        },
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, variant in result["variants"].items():
        accs = {k: round(v["accuracy"], 3) for k, v in variant["tasks"].items()}
        print(name, accs)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
