"""The verdict uses the label-sensitive test that fits the feature (tiny model): a declared
relational feature is judged by the cross-record exchange and says so, an undeclared one by
the detected kind; run.json keeps the relational test, the transfer and the rank guard;
records whose kinds disagree are refused before any model work."""

from __future__ import annotations

import dataclasses
import json

import pytest

from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import RunConfig, analyze, plan_records
from qkcov.results import AnalysisResult
from qkcov.tasks.builtin import build_task_records

FAST = dict(n_permutations=20, n_random=20, n_bootstrap=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    recs = build_task_records("agreement", n=56)
    out = {}
    for label, rs in (
        ("detected", recs),
        ("relation", [dataclasses.replace(r, kind="relation") for r in recs]),
    ):
        res = analyze(model, tok, rs, heads="L1H0,L1H1", progress=False, **FAST)
        path = tmp_path_factory.mktemp("run") / label
        res.save(path)
        out[label] = (res, path)
    return out


def test_declared_relation_uses_the_exchange(runs):
    res, path = runs["relation"]
    for h in res.heads:
        ev = h.verdict.evidence
        assert ev["kind"] == "relation" and ev["kind_source"] == "declared"
        assert ev["test"] == "cross-record exchange"
        rel = h.swaps.relation_test
        assert rel["available"] and rel["declared_kind"] == "relation"
        assert 0 < rel["p_floor"] <= rel["p_value"] <= 1
        if (
            h.verdict.status in ("reads-feature", "separates-keys-not-feature")
            or ev.get("p_vs_random", 1) < 0.05
        ):
            assert "declared relation feature" in h.verdict.sentence
        # the compact table's label columns show the test the verdict used (× marks it)
        row = next(r for r in res.summary_rows() if r[0].rstrip("*") == h.name)
        col = res.SUMMARY_COLUMNS.index("label")
        assert row[col] == f"{rel['effect']:.3f}×"
    back = AnalysisResult.load(path)
    for a, b in zip(res.heads, back.heads, strict=True):
        assert b.swaps.relation_test == json.loads(json.dumps(a.swaps.relation_test))
        assert b.swaps.transfer == json.loads(json.dumps(a.swaps.transfer))
        assert (b.swaps.causal_rank or {}).get("guard") == (a.swaps.causal_rank or {}).get("guard")


def test_detected_kind_and_transfer(runs):
    res, _ = runs["detected"]
    for h in res.heads:
        ev = h.verdict.evidence
        assert ev["kind_source"] == "detected"
        share = ev["relation_share"]
        assert ev["kind"] == ("relation" if share is not None and share > 0.5 else "class")
        tr = h.swaps.transfer
        # agreement in both orders: both patterns among the build records
        assert tr["available"] or "too few held-out" in tr["reason"], tr
        guard = h.swaps.causal_rank["guard"]
        assert guard["max_random_share"] == 0.25 and guard["unguarded"] >= 1


def test_mixed_kinds_refused_before_the_model():
    recs = build_task_records("agreement", n=6)
    recs[2] = dataclasses.replace(recs[2], kind="class")
    with pytest.raises(ValueError, match="more than one kind"):
        plan_records(recs, RunConfig(heads="L0H0"))
