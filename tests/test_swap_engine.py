"""Fast swap engine (offline attention + resumed downstream) vs the full-forward reference."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from _swap_reference import _run_swaps_reference
from qkcov.core.intervention import attention_weights, swap_in_subspace, swapped_attention
from qkcov.core.subspace import random_orthonormal
from qkcov.engine import swaps as swaps_mod
from qkcov.engine.contrast import resolve_records
from qkcov.engine.scan import attention_rows
from qkcov.engine.swaps import run_swaps, swap_pairs
from qkcov.models.capture import tokenize_batch
from qkcov.models.intervene import (
    KeySwap,
    can_resume,
    capture_layer_input,
    swap_keys_forward,
)
from qkcov.models.loading import model_info
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.tasks.records import ContrastRecord, Span

WORDS = ["red", "cat", "blue", "dog", "green", "cow", "pink", "ant"]
COLOURS = {"red", "blue", "green", "pink"}
ATTN_TOL, LOGP_TOL = 1e-5, 1e-4


def _records(n: int = 10) -> list[ContrastRecord]:
    """Mixed-length prompts (3-7 items, two question forms) so left padding varies."""
    recs = []
    for i in range(n):
        items = [WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 5)]
        prompt = "list: " + ", ".join(items) + (". colours?" if i % 2 else ". any animals!")
        spans, cursor = [], 6
        for w in items:
            s = prompt.index(w, cursor)
            spans.append((Span(s, s + len(w), label=w), w in COLOURS))
            cursor = s + len(w)
        pos = tuple(s for s, c in spans if c == bool(i % 2))
        neg = tuple(s for s, c in spans if c != bool(i % 2))
        if pos and neg:
            recs.append(ContrastRecord(prompt, pos, neg))
    return recs


@functools.cache
def _setup(arch: str, layer: int | None = None, vocab_size: int | None = None):
    model, tok = tiny_model(arch, vocab_size=vocab_size), tiny_tokenizer()
    info = model_info(model)
    layer = info.n_layers - 1 if layer is None else layer
    resolved = resolve_records(tok, _records(10))
    rows = attention_rows(model, tok, resolved, batch_size=4, progress=False)
    pairs = swap_pairs(resolved, rows[:, layer, 1], seed=0)
    D = info.head_dim
    bases = {"a": random_orthonormal(D, 3, seed=1), "b": random_orthonormal(D, D // 2, seed=2)}
    return model, tok, resolved, layer, pairs, bases


def _tol(metric: str) -> float:
    return LOGP_TOL if metric == "logprob_shift" else ATTN_TOL


def _assert_same(new: dict, old: dict, n_down: int) -> None:
    for key in ("null", "ceiling"):
        for m, v in old[key].items():
            assert new[key][m] == pytest.approx(v, abs=_tol(m)), (key, m)
    for name, cond in old["conditions"].items():
        for m, v in cond.items():
            assert new["conditions"][name][m] == pytest.approx(v, abs=_tol(m)), (name, m)
        for m, summ in old["random"][name].items():
            draws = summ["draws"][:n_down] if m == "logprob_shift" else summ["draws"]
            got = new["random"][name][m]["draws"]
            assert len(got) == len(draws), (name, m)
            assert got == pytest.approx(draws, abs=_tol(m)), (name, m)


CASES = [(a, "left", None) for a in ("llama", "mistral", "qwen3", "gemma2", "gemma3", "gpt2")]
CASES += [("llama", "right", None), ("gemma3", "left", 1), ("llama", "left", 0)]


@pytest.mark.parametrize(("arch", "side", "layer"), CASES)
def test_matches_full_forward_reference(arch, side, layer):
    model, tok, resolved, layer, pairs, bases = _setup(arch, layer)
    kw = dict(n_random=3, seed=4, batch_size=4, padding_side=side, progress=False)
    new = run_swaps(model, tok, resolved, layer, 1, pairs, bases, n_random_downstream=3, **kw)
    old = _run_swaps_reference(model, tok, resolved, layer, 1, pairs, bases, **kw)
    _assert_same(new, old, 3)
    assert new["n"] == old["n"] and new["ranks"] == old["ranks"]
    # the swap did something measurable, so agreement is not vacuous
    if (arch, layer) in (("mistral", 1), ("gemma3", 1)):  # sliding window hides the keys
        assert new["null"]["attn_orig_before"] == 0.0 == old["null"]["attn_orig_before"]
        return
    assert abs(new["ceiling"]["delta_p"]) > 1e-3
    assert any(abs(new["conditions"][n]["logprob_shift"]) > 1e-5 for n in bases)


def test_fewer_downstream_draws_and_per_prompt():
    model, tok, resolved, layer, pairs, bases = _setup("qwen3")
    kw = dict(n_random=5, seed=0, batch_size=3, progress=False)
    new = run_swaps(model, tok, resolved, layer, 1, pairs, bases, n_random_downstream=2, **kw)
    old = _run_swaps_reference(model, tok, resolved, layer, 1, pairs, bases, **kw)
    _assert_same(new, old, 2)
    assert new["n_random"] == 5 and new["n_random_downstream"] == 2
    assert len(new["random"]["a"]["logprob_shift"]["draws"]) == 2
    assert len(new["random"]["a"]["delta_p"]["draws"]) == 5
    per = new["per_prompt"]
    assert set(per) == {"null", "ceiling", *bases}
    for key, metrics in per.items():
        ref = new[key] if key in ("null", "ceiling") else new["conditions"][key]
        assert set(metrics) == set(ref)
        for m, vals in metrics.items():
            assert len(vals) == new["n"]
            assert sum(vals) / len(vals) == pytest.approx(ref[m], abs=1e-12)
    assert all(v == 0.0 for v in per["null"]["logprob_shift"])
    assert all(v == 0.0 for v in per["null"]["delta_p"])
    # n_random_downstream is capped at n_random
    capped = run_swaps(model, tok, resolved, layer, 1, pairs, bases, n_random=2, progress=False)
    assert capped["n_random_downstream"] == 2


def test_full_forward_fallback_agrees(monkeypatch):
    model, tok, resolved, layer, pairs, bases = _setup("gemma2")
    kw = dict(n_random=2, batch_size=4, progress=False)
    fast = run_swaps(model, tok, resolved, layer, 1, pairs, bases, **kw)
    monkeypatch.setattr(swaps_mod, "can_resume", lambda *_: False)
    full = run_swaps(model, tok, resolved, layer, 1, pairs, bases, **kw)
    for key in ("null", "ceiling"):
        for m, v in full[key].items():
            assert fast[key][m] == pytest.approx(v, abs=_tol(m))
    for name in bases:
        for m, v in full["conditions"][name].items():
            assert fast["conditions"][name][m] == pytest.approx(v, abs=_tol(m))


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_resumed_forward_equals_full_and_skips_early_layers(arch):
    model, tok, resolved, layer, pairs, bases = _setup(arch)
    assert can_resume(model, layer)
    texts = [r.text for r in resolved[:5]]
    ids, mask = tokenize_batch(tok, texts, "left")
    lens = mask.sum(1).tolist()
    swaps = [KeySwap(1, n - 3, bases["a"]) if b % 2 else None for b, n in enumerate(lens)]
    tokens = torch.tensor([[5, 9]] * len(texts))
    cap = capture_layer_input(model, ids, mask, layer, 1, answer_tokens=tokens)
    full = swap_keys_forward(model, ids, mask, layer, 1, swaps)
    calls = []
    early = [m for n, m in model.named_modules() if n.endswith(("layers.0.mlp", "h.0.mlp"))]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in early]
    try:
        resumed = swap_keys_forward(model, ids, mask, layer, 1, swaps, hidden_in=cap.hidden)
    finally:
        for h in handles:
            h.remove()
    assert early and not calls  # layer 0 did not run
    torch.testing.assert_close(resumed.logits, full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(resumed.attention, full.attention, atol=1e-6, rtol=0)
    # offline attention from the captured row equals the in-forward edited head's row
    b = 1
    k = cap.keys[b, : lens[b]].double()
    k[1], k[lens[b] - 3] = swap_in_subspace(k[1], k[lens[b] - 3], bases["a"].double())
    ref = attention_weights(cap.query[b].double()[None], k, cap.mask[b, : lens[b]][None],
                            cap.scaling, cap.softcap)[0]  # fmt: skip
    torch.testing.assert_close(full.attention[b, : lens[b]].double(), ref, atol=1e-6, rtol=0)


def test_swapped_attention_matches_explicit_key_swap():
    g = torch.Generator().manual_seed(0)
    n, S, d = 3, 7, 8
    q, k = torch.randn(n, d, generator=g), torch.randn(n, S, d, generator=g)
    orig, target = torch.tensor([0, 2, 6]), torch.tensor([3, 5, 1])
    mask = torch.ones(n, S, dtype=torch.bool)
    mask[0, 6] = False
    bases = [None, random_orthonormal(d, 2, seed=3), torch.eye(d, dtype=torch.float64)]
    got = swapped_attention(q, k, orig, target, bases, mask, 0.4, softcap=2.0)
    for c, v in enumerate(bases):
        for i in range(n):
            kk = k[i].double().clone()
            if v is not None:
                kk[orig[i]], kk[target[i]] = swap_in_subspace(kk[orig[i]], kk[target[i]], v)
            ref = attention_weights(q[i].double()[None], kk, mask[i][None], 0.4, 2.0)[0]
            torch.testing.assert_close(got[c, i], ref, atol=1e-12, rtol=0)
    # the full swap exchanges the two logits (no softcap): attention on orig and target swaps
    full = swapped_attention(q, k, orig, target, bases[2:], None, 0.4)[0]
    plain = swapped_attention(q, k, orig, target, [None], None, 0.4)[0]
    rows = torch.arange(n)
    torch.testing.assert_close(full[rows, orig], plain[rows, target], atol=1e-12, rtol=0)


def test_kept_state_has_no_vocab_dimension(monkeypatch):
    """Per condition only [B] per-prompt values survive a batch, whatever the vocabulary."""
    sizes = {}
    for vocab in (103, 4099):
        model, tok, resolved, layer, pairs, bases = _setup("llama", vocab_size=vocab)
        assert model_info(model).vocab_size == vocab
        kept = []
        real = swaps_mod._swap_batch

        def spy(*args, _real=real, _kept=kept, **kwargs):
            out = _real(*args, **kwargs)
            _kept.extend(v for m in out.values() for v in m.values())
            return out

        monkeypatch.setattr(swaps_mod, "_swap_batch", spy)
        res = run_swaps(model, tok, resolved, layer, 1, pairs, bases, n_random=3, batch_size=4,
                        progress=False)  # fmt: skip
        monkeypatch.undo()
        assert kept and all(t.ndim == 1 and t.shape[0] <= 4 for t in kept)
        assert res["ceiling"]["logprob_shift"] != 0.0
        sizes[vocab] = sum(t.numel() * t.element_size() for t in kept)
    assert sizes[103] == sizes[4099]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_random_downstream": 0}, "n_random_downstream must be >= 1"),
        ({"n_random": 0}, "n_random must be >= 1"),
        ({"bases": {"ceiling": None}}, "reserved"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_input(kwargs, message):
    model, tok, resolved, layer, pairs, bases = _setup("llama")
    if "bases" in kwargs:
        D = model_info(model).head_dim
        kwargs = {"bases": {"ceiling": torch.eye(D)[:, :2]}}
    args = dict(bases=bases) | kwargs
    with pytest.raises(ValueError, match=message):
        run_swaps(model, tok, resolved, layer, 1, pairs, progress=False, **args)


@pytest.mark.slow
def test_default_model_matches_reference():
    from qkcov.models.loading import load_model
    from qkcov.tasks import build_filter_records
    from qkcov.tasks.filter import FilterTaskConfig

    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    cfg = FilterTaskConfig(categories=("fruits", "animals", "colours"), n_build=12, n_heldout=0)
    build, _ = build_filter_records(cfg)
    resolved = resolve_records(tok, build)
    layer, head = 22, 3
    rows = attention_rows(model, tok, resolved, batch_size=6, progress=False)
    pairs = swap_pairs(resolved, rows[:, layer, head], seed=0)
    D = loaded.info.head_dim
    bases = {"a": random_orthonormal(D, 4, seed=1), "b": random_orthonormal(D, 12, seed=2)}
    kw = dict(n_random=3, batch_size=6, progress=False)
    new = run_swaps(model, tok, resolved, layer, head, pairs, bases, n_random_downstream=3, **kw)
    old = _run_swaps_reference(model, tok, resolved, layer, head, pairs, bases, **kw)
    _assert_same(new, old, 3)
    assert abs(new["ceiling"]["logprob_shift"]) > 1e-4


def test_answer_token_scoring_and_accuracy():
    """Records with an ``answer``: the shift is −Δ log p(answer) (checked against an explicit
    edited forward) and the unedited model's top-1 / mean rank of the answer are reported."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    recs = [
        dataclasses.replace(r, answer=" cat" if i % 2 else "red")
        for i, r in enumerate(_records(10))
    ]
    resolved = resolve_records(tok, recs)
    assert all(r.answer_id is not None for r in resolved)
    layer = model_info(model).n_layers - 1
    rows = attention_rows(model, tok, resolved, batch_size=4, progress=False)
    pairs = swap_pairs(resolved, rows[:, layer, 1], seed=0)
    D = model_info(model).head_dim
    res = run_swaps(model, tok, resolved, layer, 1, pairs, {"a": random_orthonormal(D, 3, seed=1)},
                    n_random=2, batch_size=4, progress=False)  # fmt: skip
    keep = [i for i, p in enumerate(pairs) if p is not None]
    ids, mask = tokenize_batch(tok, [resolved[i].text for i in keep], "left")
    ans = torch.tensor([[resolved[i].answer_id] for i in keep])
    eye = torch.eye(D, dtype=torch.float64)
    swaps = [KeySwap(pairs[i][0], pairs[i][1], eye) for i in keep]
    after = swap_keys_forward(model, ids, mask, layer, 1, swaps,
                              query_positions=[resolved[i].query for i in keep])  # fmt: skip
    before = capture_layer_input(model, ids, mask, layer, 1, answer_tokens=ans,
                                 query_positions=[resolved[i].query for i in keep])  # fmt: skip
    from qkcov.models.intervene import answer_logprobs

    want = before.answer_logprobs[:, 0] - answer_logprobs(after.logits, ans)[:, 0]
    got = torch.tensor(res["per_prompt"]["ceiling"]["logprob_shift"], dtype=torch.float64)
    torch.testing.assert_close(got, want.double(), atol=LOGP_TOL, rtol=0)
    a = res["answers"]
    ranks = before.answer_ranks[:, 0].double()
    assert a["n"] == len(keep) and a["top1"] == float((ranks == 0).double().mean())
    assert a["mean_rank"] == pytest.approx(float(ranks.mean()) + 1)
    # without answers nothing is reported
    model, tok, resolved, layer, pairs, bases = _setup("llama")
    assert run_swaps(model, tok, resolved, layer, 1, pairs, bases, n_random=2,
                     progress=False)["answers"] is None  # fmt: skip


def test_offline_families_patches_and_late_pass():
    """Offline families equal the same bases run as conditions; a late condition (chosen
    after the pass over the batches, no new forward) equals the same condition given up front."""
    model, tok, resolved, layer, pairs, bases = _setup("llama")
    D = model_info(model).head_dim
    extra = random_orthonormal(D, 2, seed=9)
    kw = dict(n_random=3, batch_size=4, progress=False)
    up_front = run_swaps(model, tok, resolved, layer, 1, pairs, {**bases, "x": extra}, **kw)
    mu = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = {}

    def late(out):
        seen["offline"] = set(out["offline"])
        return {"bases": {"x": extra}, "patches": {"p": (extra, mu, -mu)}}

    res = run_swaps(model, tok, resolved, layer, 1, pairs, bases,
                    offline={"fam": [bases["a"], extra]}, late=late, **kw)  # fmt: skip
    assert seen["offline"] == {"fam"}
    fam = res["offline"]["fam"]["delta_p"]  # [2 draws, n]
    assert fam.shape == (2, res["n"])
    for j, name in ((0, "a"), (1, "x")):
        torch.testing.assert_close(
            fam[j], torch.tensor(up_front["per_prompt"][name]["delta_p"], dtype=torch.float64),
            atol=ATTN_TOL, rtol=0,
        )  # fmt: skip
    for m, v in up_front["conditions"]["x"].items():
        assert res["conditions"]["x"][m] == pytest.approx(v, abs=_tol(m)), m
    assert res["random"]["x"]["delta_p"]["draws"] == pytest.approx(
        up_front["random"]["x"]["delta_p"]["draws"], abs=ATTN_TOL
    )
    assert "logprob_shift" not in res["random"]["x"]  # late random draws: attention side only
    eff = res["patches"]["p"]["effect"]
    assert eff.shape == (3, res["n"]) and eff.abs().max() > 1e-6
