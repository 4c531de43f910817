import json
import math
from pathlib import Path

import numpy as np

from nanochat_jax.config import GPTConfig
from nanochat_jax.convert import from_nanochat_state_dict
from nanochat_jax.loss_eval import evaluate_bpb

GOLDEN = Path(__file__).parent / "golden"


def test_bpb_matches_nanochat():
    meta = json.loads((GOLDEN / "bpb.json").read_text())
    data = np.load(GOLDEN / "bpb.npz")
    params = {k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")}
    model = from_nanochat_state_dict(params, GPTConfig(**meta["model"]["config"]))
    batches = [(data["x0"], data["y0"]), (data["x1"], data["y1"])]
    # the fixture exercises both exclusions: a BOS target (0 bytes) and ignored (-1) targets
    assert data["token_bytes"][data["y0"][0, 5]] == 0 and (data["y1"][1, -8:] == -1).all()
    bpb = evaluate_bpb(model, batches, steps=2, token_bytes=data["token_bytes"])
    np.testing.assert_allclose(bpb, meta["bpb"], rtol=1e-5)  # measured: equal to all printed digits


def test_bpb_is_inf_without_counted_bytes():
    meta = json.loads((GOLDEN / "bpb.json").read_text())
    data = np.load(GOLDEN / "bpb.npz")
    params = {k.removeprefix("param/"): data[k] for k in data.files if k.startswith("param/")}
    model = from_nanochat_state_dict(params, GPTConfig(**meta["model"]["config"]))
    ignored = np.full_like(data["y0"], -1)
    assert math.isinf(evaluate_bpb(model, [(data["x0"], ignored)], 1, data["token_bytes"]))


def test_unigram_bpb_is_the_entropy_of_token_frequencies():
    from nanochat_jax.loss_eval import unigram_bpb

    token_bytes = np.array([0, 1, 2, 1])  # id 0 is a special token (0 bytes)
    targets = np.array([[0, 1, 1, 2, 3, 3, 3, 3]])
    batch = (targets, targets)
    # counts with add-one: [2, 3, 2, 5] / 12; scored tokens 1,1,2,3,3,3,3 (bytes 1+1+2+4)
    p = np.array([2, 3, 2, 5]) / 12
    bits = -(2 * np.log2(p[1]) + np.log2(p[2]) + 4 * np.log2(p[3]))
    assert np.isclose(unigram_bpb([batch], [batch], 1, token_bytes), bits / 8)
