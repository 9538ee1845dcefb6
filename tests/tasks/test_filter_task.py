"""Categorical (filter-head) task builder."""

from __future__ import annotations

from collections import Counter

import pytest

from qkcov.tasks.filter import (
    FilterTaskConfig,
    build_filter_records,
    check_words_tokenize,
    make_filter_record,
)
from qkcov.tasks.vocab import BINDING_OBJECTS, CATEGORIES


def test_vocabulary_is_large_and_unambiguous() -> None:
    assert len(CATEGORIES) >= 8
    words = []
    for cat in CATEGORIES.values():
        assert len(cat.words) >= 16, cat.name
        assert cat.singular and cat.plural and cat.singular != cat.plural
        words += [w.lower() for w in cat.words]
    assert len(words) == len(set(words)), "a word is in two categories"
    for a in words:
        for b in words:
            assert a == b or a not in b, (a, b)
    objs = [o.lower() for o in BINDING_OBJECTS]
    assert len(objs) >= 20 and len(set(objs)) == len(objs)


def _cfg(**kw) -> FilterTaskConfig:
    base = dict(n_build=48, n_heldout=24, n_categories_per_prompt=3, items_per_category=2)
    base.update(kw)
    return FilterTaskConfig(**base)


@pytest.mark.parametrize("template", ["all", "first", "last"])
def test_spans_point_at_items(template) -> None:
    build, heldout = build_filter_records(_cfg(template=template))
    for r in build + heldout:
        items = r.meta["items"]
        assert len(items) == 6
        for it in items:
            assert r.prompt[it["start"] : it["end"]] == it["word"]
        pos = [r.span_text(s) for s in r.positives]
        neg = [r.span_text(s) for s in r.negatives]
        asked = r.meta["category"]
        assert r.group == asked
        assert pos == [it["word"] for it in items if it["category"] == asked]
        assert neg == [it["word"] for it in items if it["category"] != asked]
        assert all(w in CATEGORIES[asked].words for w in pos)
        assert all(w not in CATEGORIES[asked].words for w in neg)
        assert r.prompt.endswith("Answer:")
        assert r.meta["answer"] == r.meta["answer_items"][0]
        if template == "first":
            assert r.meta["answer_items"] == pos[:1]
            assert f"first {CATEGORIES[asked].singular}" in r.prompt
        elif template == "last":
            assert r.meta["answer_items"] == pos[-1:]
        else:
            assert r.meta["answer_items"] == pos
            assert f"What are the {CATEGORIES[asked].plural} in the list?" in r.prompt
        assert r.query is None


def test_no_duplicate_prompts_and_balance() -> None:
    cfg = _cfg()
    build, heldout = build_filter_records(cfg)
    assert len(build) == 48 and len(heldout) == 24
    pb, ph = [r.prompt for r in build], [r.prompt for r in heldout]
    assert len(set(pb)) == len(pb) and len(set(ph)) == len(ph)
    assert not set(pb) & set(ph)
    for recs, n in ((build, 48), (heldout, 24)):
        counts = Counter(r.group for r in recs)
        assert set(counts) == set(CATEGORIES)
        assert set(counts.values()) == {n // len(CATEGORIES)}
    uneven = build_filter_records(_cfg(n_build=13, n_heldout=0))
    counts = Counter(r.group for r in uneven[0]).values()
    assert max(counts) - min(counts) <= 1 and uneven[1] == []


def test_seeded() -> None:
    a = build_filter_records(_cfg(seed=3))
    assert a == build_filter_records(_cfg(seed=3))
    assert a != build_filter_records(_cfg(seed=4))


def test_chat_mode_and_subset() -> None:
    cfg = _cfg(
        chat=True,
        categories=["fruits", "animals"],
        n_categories_per_prompt=2,
        n_build=4,
        n_heldout=2,
    )
    build, _ = build_filter_records(cfg)
    assert {r.group for r in build} == {"fruits", "animals"}
    assert all(r.prompt.endswith("in the list?") and r.meta["chat"] for r in build)
    assert FilterTaskConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(categories=["fruits", "dinosaurs"]), "unknown category"),
        (dict(categories=["fruits"]), "at least 2 categories"),
        (dict(n_build=5), "smaller than the number of categories"),
        (dict(n_heldout=3), "smaller than the number of categories"),
        (dict(items_per_category=99), "items_per_category"),
        (dict(n_categories_per_prompt=13), "exceeds the number of categories"),
        (dict(n_categories_per_prompt=1), "n_categories_per_prompt"),
        (dict(template="middle"), "template"),
        (dict(categories=["fruits", "fruits"]), "more than once"),
        (
            dict(
                vocabulary={
                    "a": {"singular": "a", "plural": "as", "words": ["x", ""]},
                    "b": {"singular": "b", "plural": "bs", "words": ["y"]},
                },
                items_per_category=1,
                n_categories_per_prompt=2,
                n_build=2,
                n_heldout=0,
            ),
            "empty word",
        ),
        (
            dict(
                vocabulary={
                    "a": {"singular": "a", "plural": "as", "words": ["x"]},
                    "b": {"singular": "b", "plural": "bs", "words": ["x"]},
                },
                items_per_category=1,
                n_categories_per_prompt=2,
                n_build=2,
                n_heldout=0,
            ),
            "in both",
        ),
    ],
)
def test_bad_config(kw, fragment) -> None:
    with pytest.raises(ValueError, match=fragment) as exc:
        _cfg(**kw)
    if fragment == "unknown category":
        assert "dinosaurs" in str(exc.value) and "animals" in str(exc.value)


def test_record_checks_substrings_and_single_spans() -> None:
    cats = dict(CATEGORIES)
    with pytest.raises(ValueError, match="substring"):
        make_filter_record([("pear", "fruits"), ("pearl", "animals")], "fruits", cats)
    vocab = {
        "a": {"singular": "thing", "plural": "things", "words": ["list", "box"]},
        "b": {"singular": "cat", "plural": "cats", "words": ["dog", "cow"]},
    }
    cfg = _cfg(
        vocabulary=vocab, n_categories_per_prompt=2, items_per_category=2, n_build=2, n_heldout=0
    )
    with pytest.raises(ValueError, match="'list' is not a single span"):
        build_filter_records(cfg)


class _FakeTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text if c != "~"]


class _CallTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1] * len(text.split())}


def test_check_words_tokenize() -> None:
    assert check_words_tokenize(_FakeTokenizer(), ["ab", "c"]) == {"ab": 2, "c": 1}
    with pytest.raises(ValueError, match="'~~'") as exc:
        check_words_tokenize(_FakeTokenizer(), ["ok", "~~", ""])
    assert "''" in str(exc.value)
    with pytest.raises(ValueError, match="longer than 1"):
        check_words_tokenize(_FakeTokenizer(), ["abc"], max_tokens=1)
    assert check_words_tokenize(_CallTokenizer(), ["a b"]) == {"a b": 2}
