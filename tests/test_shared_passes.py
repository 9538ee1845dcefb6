"""One pass per record per role: the swaps' shared unedited forward (all heads, any layers)
and the held-out collection that also yields the attribution's full keys."""

from __future__ import annotations

import pytest
import torch

from qkcov.core.subspace import random_orthonormal
from qkcov.engine.contrast import collect_qk, resolve_records
from qkcov.engine.scan import attention_rows
from qkcov.engine.swaps import capture_swap_base, run_swaps, swap_pairs
from qkcov.engine.tokenview import collect_token_view
from qkcov.models.loading import model_info
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from test_swap_engine import _assert_same, _records

HEADS = [(1, 0), (1, 1), (0, 2)]  # two heads on one layer, one on another


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    resolved = resolve_records(tok, _records(10))
    rows = attention_rows(model, tok, resolved, batch_size=4, progress=False)
    return model, tok, resolved, rows


def test_shared_base_pairs_are_the_models_most_attended_positives(setup):
    model, tok, resolved, rows = setup
    base = capture_swap_base(model, tok, resolved, HEADS, seed=3, batch_size=4, progress=False)
    for layer, head in HEADS:
        assert base.pairs[(layer, head)] == swap_pairs(resolved, rows[:, layer, head], seed=3)
    # distinct heads pick distinct keys somewhere (else the test could not tell them apart)
    assert len({tuple(base.pairs[h]) for h in HEADS}) > 1


def test_shared_base_swaps_equal_per_head_swaps(setup):
    model, tok, resolved, _ = setup
    D = model_info(model).head_dim
    bases = {"a": random_orthonormal(D, 3, seed=1), "full": torch.eye(D)}  # full = ceiling edit
    kw = dict(n_random=3, n_random_downstream=2, seed=4, batch_size=4, progress=False)
    shared = capture_swap_base(model, tok, resolved, HEADS, seed=0, batch_size=4, progress=False)
    for layer, head in HEADS:
        pairs = shared.pairs[(layer, head)]
        alone = run_swaps(model, tok, resolved, layer, head, pairs, bases, **kw)
        got = run_swaps(model, tok, resolved, layer, head, pairs, bases, base=shared, **kw)
        _assert_same(got, alone, 2)
        # the full-rank condition reuses the ceiling's downstream pass: the same numbers
        full = got["conditions"]["full"]["logprob_shift"]
        assert full == pytest.approx(got["ceiling"]["logprob_shift"], abs=1e-12)
        assert abs(got["ceiling"]["logprob_shift"]) > 1e-5  # the edit moved the output


def test_shared_base_refuses_another_batch_size(setup):
    model, tok, resolved, _ = setup
    D = model_info(model).head_dim
    shared = capture_swap_base(model, tok, resolved, HEADS[:1], batch_size=4, progress=False)
    with pytest.raises(ValueError, match="another batch_size"):
        run_swaps(model, tok, resolved, 1, 0, shared.pairs[(1, 0)],
                  {"a": random_orthonormal(D, 2, seed=1)}, batch_size=3, base=shared,
                  progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="no batches of head"):
        run_swaps(model, tok, resolved, 0, 2, shared.pairs[(1, 0)],
                  {"a": random_orthonormal(D, 2, seed=1)}, batch_size=4, base=shared,
                  progress=False)  # fmt: skip


def test_token_view_from_the_shared_base_equals_its_own_forward(setup):
    model, tok, resolved, _ = setup
    D = model_info(model).head_dim
    shared = capture_swap_base(model, tok, resolved, HEADS, batch_size=4, progress=False)
    kb, qb = random_orthonormal(D, 2, seed=5), {"f": random_orthonormal(D, 2, seed=6)}
    for layer, head in HEADS:
        pairs = shared.pairs[(layer, head)]
        a_info, a = collect_token_view(model, tok, resolved, pairs, layer, head, kb, qb,
                                       condition="f", batch_size=3)  # fmt: skip
        b_info, b = collect_token_view(model, tok, resolved, pairs, layer, head, kb, qb,
                                       condition="f", batches=shared.views[(layer, head)])  # fmt: skip
        assert a_info == b_info and a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


def test_heldout_pass_full_keys_match_the_models_attention(setup):
    model, tok, resolved, rows = setup
    heads = [(1, 1), (0, 2)]
    wide = [0, 3, 7]
    vecs, full = collect_qk(model, tok, resolved, heads, batch_size=4, progress=False,
                            full_keys=wide)  # fmt: skip
    plain = collect_qk(model, tok, resolved, heads, batch_size=4, progress=False)
    for layer, head in heads:
        # the key sites are the same vectors with or without the extra rows
        torch.testing.assert_close(vecs[(layer, head)].keys, plain[(layer, head)].keys)
        torch.testing.assert_close(vecs[(layer, head)].q, plain[(layer, head)].q)
        f = full[(layer, head)]
        for j, i in enumerate(wide):
            r = resolved[i]
            keys = f["keys"][j]
            assert keys.shape[0] == r.query + 1
            # softmax of the captured logits is the model's own attention row at the query
            row = torch.softmax(keys @ f["q"][j] * f["scaling"], dim=0)
            torch.testing.assert_close(row, rows[i, layer, head, : r.query + 1].double(),
                                       atol=1e-5, rtol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="distinct positions"):
        collect_qk(model, tok, resolved, heads, progress=False, full_keys=[0, 0])


def test_contrast_pass_keeps_the_centroid_vectors_collect_would_give(setup):
    from qkcov.engine.contrast import run_contrast

    model, tok, resolved, _ = setup
    heads = [(1, 1), (0, 2)]
    want = [6, 1, 4]  # any order: the vectors come back in this order
    part = resolved[2:]  # positions in the list passed differ from the records' indices
    res = run_contrast(model, tok, part, heads, batch_size=4, progress=False,
                       vectors_for=want)  # fmt: skip
    ref = collect_qk(model, tok, [part[i] for i in want], heads, batch_size=4, progress=False)
    for h in heads:
        got, exp = res.vectors[h], ref[h]
        torch.testing.assert_close(got.q, exp.q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.keys, exp.keys, atol=1e-6, rtol=1e-6)
        assert got.key_record.tolist() == exp.key_record.tolist()
        assert got.key_positive.tolist() == exp.key_positive.tolist()
        assert got.key_labels == exp.key_labels and got.record_groups == exp.record_groups
    assert run_contrast(model, tok, resolved, heads, progress=False).vectors is None


@pytest.mark.parametrize("frame", ["post", "query"])
def test_heldout_pass_takes_the_swap_records_from_the_swap_base(setup, frame, monkeypatch):
    """The swap records' unedited forward is their held-out forward: the collection takes
    their vectors (projections and full attribution keys) from the swap base instead of
    forwarding them again, and gets the same vectors."""
    import qkcov.engine.contrast as contrast
    from qkcov.models.rotary import rotary_specs
    from qkcov.pipeline import RunConfig
    from qkcov.pipeline.steps.collect import _collect_step
    from qkcov.runtime import Timer

    model, tok, resolved, _ = setup
    heads = [(1, 1), (0, 2)]
    held = list(range(1, 10))
    swap_idx = [7, 2, 5, 9]  # swap records: held-out ones, in the swap subset's own order
    attr = [2, 4]  # one attribution record in the swap base, one forwarded
    specs = rotary_specs(model, [0, 1]) if frame == "query" else None
    base = capture_swap_base(model, tok, [resolved[i] for i in swap_idx], heads, batch_size=3,
                             progress=False, specs=specs)  # fmt: skip
    assert len(base.keep) >= 2  # the base holds records the collection can skip
    texts: list[str] = []
    orig = contrast.capture_prompts

    def counting(model, tokenizer, batch_texts, *a, **kw):
        texts.extend(batch_texts)
        return orig(model, tokenizer, batch_texts, *a, **kw)

    monkeypatch.setattr(contrast, "capture_prompts", counting)
    cfg = RunConfig(frame=frame, batch_size=4)
    timer = Timer("t", quiet=True)
    fused = _collect_step(model, tok, resolved, heads, [], held, attr, None, cfg, timer, None,
                          base, swap_idx)  # fmt: skip
    in_base = {swap_idx[k] for k in base.keep}
    assert sorted(texts) == sorted(resolved[i].text for i in held if i not in in_base)
    texts.clear()
    plain = _collect_step(model, tok, resolved, heads, [], held, attr, None, cfg, timer, None)
    assert sorted(texts) == sorted(resolved[i].text for i in held)
    for h in heads:
        a, b = fused.vecs[h], plain.vecs[h]
        torch.testing.assert_close(a.q, b.q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        assert a.key_record.tolist() == b.key_record.tolist()
        assert a.key_positive.tolist() == b.key_positive.tolist()
        fa, fb = fused.full[h], plain.full[h]
        assert fa["scaling"] == fb["scaling"]
        torch.testing.assert_close(fa["q"], fb["q"], atol=1e-5, rtol=1e-5)
        for ka, kb in zip(fa["keys"], fb["keys"], strict=True):
            torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
    assert fused.tokens == plain.tokens
