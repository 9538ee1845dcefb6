"""Binding task builders (order-ID and lexical designs)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from qkcov.tasks.binding import BindingTaskConfig, binding_prompt, build_binding_records


def _cfg(**kw) -> BindingTaskConfig:
    base = dict(n_pairs=4, n_build=24, n_heldout=8)
    base.update(kw)
    return BindingTaskConfig(**base)


def _check_common(r) -> None:
    m = r.meta
    assert r.query is None and r.prompt.endswith("in? Box")
    for c, letter in zip(m["candidates"], m["letters"], strict=True):
        assert r.prompt[c["start"] : c["end"]] == letter
        assert r.prompt[c["start"] - 4 : c["end"]] == f"Box {letter}"
    for o, obj in zip(m["object_spans"], m["objects"], strict=True):
        assert r.prompt[o["start"] : o["end"]] == obj
    assert f"Which box is the {m['queried_object']} in?" in r.prompt


def test_order_design() -> None:
    build, heldout = build_binding_records(_cfg())
    assert len(build) == 24 and len(heldout) == 8
    families = defaultdict(list)
    for r in build + heldout:
        _check_common(r)
        m = r.meta
        assert [r.span_text(s) for s in r.positives] == [m["answer_letter"]]
        assert sorted(r.span_text(s) for s in r.negatives) == sorted(
            set(m["letters"]) - {m["answer_letter"]}
        )
        assert m["letters"][m["answer_index"]] == m["answer_letter"]
        assert m["objects"][m["answer_index"]] == m["queried_object"]
        assert r.group == str(m["answer_index"])
        families[m["family_id"]].append(r)
    for recs in families.values():
        assert len({r.meta["queried_object"] for r in recs}) == 1
        assert len({r.meta["answer_letter"] for r in recs}) == 1
        assert sorted(r.meta["answer_index"] for r in recs) == [0, 1, 2, 3]
        others = {
            tuple(o for o in r.meta["objects"] if o != r.meta["queried_object"]) for r in recs
        }
        assert len(others) == 1  # the other pairs keep their relative order
    assert set(Counter(r.group for r in build).values()) == {6}
    prompts = [r.prompt for r in build + heldout]
    assert len(set(prompts)) == len(prompts)


def test_order_cut_family_balanced() -> None:
    build, _ = build_binding_records(_cfg(n_build=10, n_heldout=0))
    counts = Counter(r.group for r in build)
    assert sum(counts.values()) == 10 and max(counts.values()) - min(counts.values()) <= 1


def test_lexical_design() -> None:
    build, heldout = build_binding_records(_cfg(design="lexical", include_object_keys=True))
    assert len(build) == 24 and len(heldout) == 8
    pairs = defaultdict(list)
    for r in build + heldout:
        _check_common(r)
        pairs[r.meta["pair_id"]].append(r)
    assert len(pairs) == 16
    for fact, cf in pairs.values():
        assert not fact.meta["counterfactual"] and cf.meta["counterfactual"]
        p = fact.meta["key_index"]
        bound = fact.meta["objects"][p]
        # identical except the queried object
        assert fact.prompt.replace(f"the {bound} in?", "") == cf.prompt.replace(
            f"the {cf.meta['queried_object']} in?", ""
        )
        assert fact.meta["queried_object"] == bound
        assert cf.meta["queried_object"] not in cf.meta["objects"]
        assert fact.negatives == () and cf.positives == ()
        assert fact.positives == cf.negatives
        assert [fact.span_text(s) for s in fact.positives] == [fact.meta["letters"][p], bound]
        assert fact.group == cf.group == bound
        assert fact.meta["answer_letter"] == fact.meta["letters"][p]
        assert cf.meta["answer_letter"] is None
    counts = Counter(r.meta["key_index"] for r in build)
    assert set(counts.values()) == {6}
    prompts = [r.prompt for r in build + heldout]
    assert len(set(prompts)) == len(prompts)


def test_seeded_and_config_round_trip() -> None:
    cfg = _cfg(design="lexical", seed=7)
    assert build_binding_records(cfg) == build_binding_records(cfg)
    assert build_binding_records(cfg) != build_binding_records(_cfg(design="lexical", seed=8))
    assert BindingTaskConfig.from_dict(cfg.to_dict()) == cfg


def test_chat_and_many_pairs() -> None:
    build, _ = build_binding_records(_cfg(n_pairs=9, chat=True, n_build=9, n_heldout=0))
    assert all(r.prompt.endswith("in?") and len(r.negatives) == 8 for r in build)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(n_pairs=1), "n_pairs"),
        (dict(n_pairs=10), "n_pairs"),
        (dict(design="both"), "design"),
        (dict(letters=["A", "B", "C"]), "exceeds the number of letters"),
        (dict(objects=["a", "b", "c", "d"], design="lexical"), "needs 5 objects"),
        (dict(n_build=3), "smaller than n_pairs"),
        (dict(design="lexical", n_build=5), "must be even"),
        (dict(objects=["cup", "Cup", "pen", "hat"]), "duplicate"),
        (dict(objects=["cup", "", "pen", "hat"]), "empty"),
    ],
)
def test_bad_config(kw, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        _cfg(**kw)


def test_object_not_single_span() -> None:
    with pytest.raises(ValueError, match="'box' is not a single span"):
        build_binding_records(_cfg(objects=["box", "cup", "pen", "hat", "egg"]))
    with pytest.raises(ValueError, match="not a single span"):
        binding_prompt(["cup", "cup"], ["A", "B"], "cup")
    with pytest.raises(ValueError, match="appears in the context"):
        binding_prompt(["cup", "pen"], ["A", "B"], "is")
