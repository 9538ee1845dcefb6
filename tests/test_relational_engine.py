"""The relational test and the transfer on the swaps' shared unedited forward (tiny model):
the picked keys are the ones the head attends most on each side, the exchange equals an
explicit in-forward key edit's attention, label exchange negates the effect, transfer rows."""

from __future__ import annotations

import math

import torch

from qkcov.core.relational import pair_partners, relation_patch
from qkcov.core.subspace import random_orthonormal
from qkcov.engine.contrast import resolve_records
from qkcov.engine.relational import (
    relation_inputs,
    relational_result,
    swap_patterns,
    transfer_result,
)
from qkcov.engine.swaps import capture_swap_base
from qkcov.models.loading import model_info
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.tasks.records import ContrastRecord, Span

WORDS = ["red", "cat", "blue", "dog", "green", "cow", "pink", "ant"]


def _records(n: int = 12) -> list[ContrastRecord]:
    recs = []
    for i in range(n):
        items = [WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 4)]
        prompt = "list: " + ", ".join(items) + "."
        spans, cursor = [], 6
        for w in items:
            s = prompt.index(w, cursor)
            spans.append(Span(s, s + len(w), label=w))
            cursor = s + len(w)
        recs.append(ContrastRecord(prompt, tuple(spans[:1]), tuple(spans[1:])))
    return recs


def _base():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    resolved = resolve_records(tok, _records())
    head = (model_info(model).n_layers - 1, 1)
    base = capture_swap_base(model, tok, resolved, [head], batch_size=4, progress=False)
    return model, resolved, head, base


def test_inputs_pick_most_attended_keys_and_patch_is_label_antisymmetric():
    model, resolved, head, base = _base()
    inp = relation_inputs(base.views[head], resolved)
    n, D = inp["q"].shape
    assert n == len(resolved) and model_info(model).head_dim == D
    for j, i in enumerate(inp["rows"]):
        r = resolved[i]
        qp, kp, kn = inp["positions"][j].tolist()
        assert qp == r.query and kp in r.positives and kn in r.negatives
    # the picked keys' logits reproduce p from the full attention row
    v = base.views[head][0]
    q, k = v.query.double(), v.keys.double()
    a = torch.softmax((k @ q[:, :, None])[..., 0] * v.scaling + v.mask, -1)
    b = torch.arange(q.shape[0])
    p_full = a[b, inp["positions"][: q.shape[0], 2]] / (
        a[b, inp["positions"][: q.shape[0], 1]] + a[b, inp["positions"][: q.shape[0], 2]]
    )
    V = random_orthonormal(D, 3, seed=0)
    partner, _ = pair_partners(inp["positions"], seed=0)
    out = relation_patch(inp["q"], inp["k_pos"], inp["k_neg"], partner, V, inp["scaling"])
    torch.testing.assert_close(out["p_before"][: q.shape[0]], p_full, atol=1e-6, rtol=0)
    flipped = relation_patch(inp["q"], inp["k_neg"], inp["k_pos"], partner, V, inp["scaling"])
    torch.testing.assert_close(flipped["effect"], -out["effect"], atol=1e-12, rtol=0)
    res = relational_result(inp, torch.stack([V, random_orthonormal(D, 3, seed=1)]), seed=0)
    assert res["available"] and res["n_pairs"] == n // 2 and res["exact"]
    assert 0 < res["p_value"] <= 1 and res["p_floor"] == 1 / 2 ** res["n_pairs"]
    assert math.isfinite(res["effect"]) and res["permuted"] is not None


def test_swap_patterns_and_transfer_rows():
    model, resolved, head, base = _base()
    pairs = [base.pairs[head][i] for i in range(len(resolved))]
    pats = swap_patterns(pairs)
    # the positive is the first item, so every pair has the positive farther from the query
    assert set(pats) == {"positive-farther"}
    n = 20
    pats = ["positive-farther"] * 10 + ["positive-nearer"] * 10
    far = torch.tensor([0.8] * 10 + [0.1] * 10, dtype=torch.float64)
    near = torch.tensor([0.1] * 10 + [0.7] * 10, dtype=torch.float64)
    res = transfer_result({"positive-farther": far, "positive-nearer": near}, pats,
                          headline=torch.full((n,), 0.5, dtype=torch.float64),
                          random=torch.zeros(3, n, dtype=torch.float64), rank=2)  # fmt: skip
    rows = {(r["built_on"], r["tested_on"]): r for r in res["rows"]}
    assert res["available"] and len(rows) == 4
    assert rows[("positive-farther", "positive-nearer")]["delta_p"] == 0.1
    assert rows[("positive-nearer", "positive-nearer")]["in_distribution"]
    one = transfer_result({"positive-farther": far}, ["positive-farther"] * n, far, far[None], 2)
    assert not one["available"] and "too few held-out swap pairs" in one["reason"]
