"""The shared experiment layer on tiny random models: runner, head scan, swaps."""

import pytest
import torch

from qkcov.engine.contrast import ContrastResult, collect_qk, resolve_records, run_contrast
from qkcov.engine.scan import attention_rows, scan_heads, select_heads
from qkcov.engine.swaps import run_swaps, swap_pairs
from qkcov.models.capture import tokenize_batch
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.models.verify import _eager_attentions
from qkcov.tasks.records import ContrastRecord, Span

WORDS = ["red", "cat", "blue", "dog", "green", "cow", "pink", "ant"]
COLOURS = {"red", "blue", "green", "pink"}


def _records(n: int = 10) -> list[ContrastRecord]:
    recs = []
    for i in range(n):
        items = [WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 3)]
        prompt = "list: " + ", ".join(items) + (". colours?" if i % 2 else ". animals!")
        spans, cursor = [], 6
        for w in items:
            s = prompt.index(w, cursor)
            spans.append((Span(s, s + len(w), label=w), w in COLOURS))
            cursor = s + len(w)
        asked_colour = bool(i % 2)
        pos = tuple(s for s, c in spans if c == asked_colour)
        neg = tuple(s for s, c in spans if c != asked_colour)
        if pos and neg:
            recs.append(
                ContrastRecord(prompt, pos, neg, group="colour" if asked_colour else "animal")
            )
    return recs


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    return model, tok, resolve_records(tok, _records(12))


def test_resolve_maps_spans_to_the_span_tokens(setup):
    _, tok, resolved = setup
    for r in resolved:
        assert r.query == len(r.input_ids) - 1
        for k in r.keys:
            assert tok.decode([r.input_ids[k.pos]]) == k.label[-1]  # char-level: last char


def test_delta_matches_hand_computation(setup):
    model, tok, resolved = setup
    heads = [(0, 1), (1, 3)]
    result = run_contrast(model, tok, resolved, heads, batch_size=4, progress=False)
    vecs = collect_qk(model, tok, resolved, heads, batch_size=5, progress=False)
    for h in heads:
        v = vecs[h]
        q, keys = v.q.double(), v.keys.double()
        c_pos = torch.zeros(q.shape[1], q.shape[1], dtype=torch.float64)
        c_neg = torch.zeros_like(c_pos)
        for i in range(len(resolved)):
            rows = v.key_record == i
            kp = keys[rows & v.key_positive].mean(0)
            kn = keys[rows & ~v.key_positive].mean(0)
            c_pos += torch.outer(q[i], kp) / len(resolved)
            c_neg += torch.outer(q[i], kn) / len(resolved)
        torch.testing.assert_close(result.delta(h), c_pos - c_neg, rtol=1e-5, atol=1e-6)


def test_delta_independent_of_batching_and_padding(setup):
    _, tok, resolved = setup
    # float64 weights: batching/padding may then change nothing beyond float64 rounding
    model = tiny_model("llama").to(torch.float64)
    heads = [(1, 2)]
    ref = run_contrast(model, tok, resolved, heads, batch_size=1, progress=False).delta(heads[0])
    for bs, side in [(4, "left"), (5, "right"), (12, "right")]:
        other = run_contrast(
            model, tok, resolved, heads, batch_size=bs, padding_side=side, progress=False
        )
        rel = (other.delta(heads[0]) - ref).norm() / ref.norm()
        assert rel < 1e-9, (bs, side, float(rel))


def test_contrast_result_round_trip(setup, tmp_path):
    model, tok, resolved = setup
    res = run_contrast(model, tok, resolved, [(0, 0), (1, 1)], progress=False)
    res.save(tmp_path / "c.safetensors")
    back = ContrastResult.load(tmp_path / "c.safetensors")
    assert back.groups == res.groups == ["animal", "colour"]
    for h in res.heads:
        torch.testing.assert_close(back.delta(h, "colour"), res.delta(h, "colour"))
    subs = back.subspaces((1, 1))
    assert set(subs) == {"animal", "colour", "pooled"}


def test_attention_rows_equal_eager_attention(setup):
    model, tok, resolved = setup
    rows = attention_rows(model, tok, resolved, batch_size=5, padding_side="right", progress=False)
    ids, mask = tokenize_batch(tok, [r.text for r in resolved], "right")
    eager_all = _eager_attentions(model, ids, mask)  # per layer [B, H, S, S]
    for i, r in enumerate(resolved):
        n = len(r.input_ids)
        eager = torch.stack([a[i, :, r.query, :n] for a in eager_all])  # [L, H, n]
        torch.testing.assert_close(rows[i, :, :, :n], eager, atol=1e-5, rtol=0)
        assert rows[i, :, :, n:].abs().sum() == 0


def test_scan_ranks_and_selects(setup):
    model, tok, resolved = setup
    rows = attention_rows(model, tok, resolved, progress=False)
    scan = scan_heads(rows, resolved, n_boot=200)
    assert len(scan) == 2 * 4
    assert [s["diff"] for s in scan] == sorted((s["diff"] for s in scan), reverse=True)
    for s in scan:
        assert s["diff_ci"][0] <= s["diff"] + 1e-12 <= s["diff_ci"][1] + 2e-12
    assert select_heads("auto:2", scan, 2, 4) == [
        (scan[0]["layer"], scan[0]["head"]),
        (scan[1]["layer"], scan[1]["head"]),
    ]
    assert select_heads("L1H3,L0H0", scan, 2, 4) == [(1, 3), (0, 0)]
    with pytest.raises(ValueError, match="auto"):
        select_heads("auto:x", scan, 2, 4)


def test_swaps_null_ceiling_and_random(setup):
    model, tok, resolved = setup
    layer, head = 1, 2
    rows = attention_rows(model, tok, resolved, progress=False)
    pairs = swap_pairs(resolved, rows[:, layer, head], seed=0)
    D = model.config.hidden_size // model.config.num_attention_heads
    basis = torch.linalg.qr(torch.randn(D, 3, dtype=torch.float64))[0]
    out = run_swaps(
        model,
        tok,
        resolved,
        layer,
        head,
        pairs,
        {"sub": basis},
        n_random=3,
        batch_size=4,
        progress=False,
    )
    assert out["null"]["delta_p"] == 0.0 and out["null"]["logprob_shift"] == 0.0
    # a full-key swap exchanges the two logits exactly: attention moves orig <-> target
    ceiling = out["ceiling"]
    assert ceiling["attn_target_after"] == pytest.approx(ceiling["attn_orig_before"], abs=1e-5)
    assert ceiling["attn_orig_after"] == pytest.approx(ceiling["attn_target_before"], abs=1e-5)
    assert len(out["random"]["sub"]["delta_p"]["draws"]) == 3
    with pytest.raises(ValueError, match="basis 'bad'"):
        run_swaps(model, tok, resolved, layer, head, pairs, {"bad": torch.eye(5)}, progress=False)
