"""The agreement task's word orders and same-number control: spans, numbers, balance."""

from __future__ import annotations

import pytest

from qkcov.tasks.agreement import AgreementTaskConfig, build_agreement_records


def _offsets(r):
    """Word distance of subject and attractor from the verb (the prompt's last word)."""
    words = r.prompt.replace(",", " ,").split()
    last = len(words) - 1

    def at(span):
        return len(r.prompt[: span.end].replace(",", " ,").split()) - 1

    return last - at(r.positives[0]), last - at(r.negatives[0])


@pytest.mark.parametrize("order", ["subject-first", "attractor-first"])
def test_orders(order):
    recs = build_agreement_records(AgreementTaskConfig(n=40, seed=1, order=order))
    for r in recs:
        subj, attr = r.span_text(r.positives[0]), r.span_text(r.negatives[0])
        assert subj == r.meta["subject"] and attr == r.meta["attractor"]
        sp, ap = _offsets(r)
        assert (sp > ap) == (order == "subject-first")
        assert r.meta["order"] == order
        word = r.meta["keys"]["positives"][0]["word_order"]
        assert word == ("farther" if order == "subject-first" else "nearer")
        # opposite numbers: the attractor's number differs from the subject's
        k = r.meta["keys"]
        assert k["positives"][0]["number"] != k["negatives"][0]["number"]
        assert k["positives"][0]["number"] == r.group


def test_both_orders_balance_the_offsets():
    recs = build_agreement_records(AgreementTaskConfig(n=200, seed=0))
    first = sum(r.meta["order"] == "subject-first" for r in recs)
    assert 70 <= first <= 130
    # the subject is the nearer noun in about half the records
    nearer = sum(_offsets(r)[0] < _offsets(r)[1] for r in recs)
    assert nearer == 200 - first


def test_same_number_control_and_bad_options():
    recs = build_agreement_records(AgreementTaskConfig(n=30, seed=2, numbers="same"))
    for r in recs:
        k = r.meta["keys"]
        assert k["positives"][0]["number"] == k["negatives"][0]["number"] == r.group
    with pytest.raises(ValueError, match="--order"):
        AgreementTaskConfig(order="random")
    with pytest.raises(ValueError, match="--numbers"):
        AgreementTaskConfig(numbers="mixed")
