"""Relational features on planted tensors: the cross-record exchange and its sign-flip null
(exact symmetry, power on a planted query–key match, calibration on coin-flip labels), the
class test does not claim a relation nor the relational test a class, the build-side share
that picks the test, and the partner matching."""

from __future__ import annotations

import math

import pytest
import torch

from qkcov.core.causal import centroid_patch, class_key_means, relabel_signs
from qkcov.core.relational import (
    pair_partners,
    pick_pair_keys,
    relation_patch,
    relation_share,
    relation_test,
)
from qkcov.core.statistics import RecordStats, random_p_value
from qkcov.core.subspace import feature_subspace

F64 = torch.float64
D, S = 16, 6
REL = [5, 6, 7]  # the relation's key (and query) dimensions


def _draw(g, m: int, kind: str, strength: float):
    """q, k⁺, k⁻ ``[m, D]`` shaped like a real head: a dominant shared query direction and
    keys of unequal variance. ``relation``: query and positive key share a random per-record
    vector ``z`` in the REL dims (the negative key carries an independent one); ``class``: the
    positive keys carry a shared direction the query reads."""
    scale = torch.logspace(0, -1.2, D, dtype=F64)
    q = 0.5 * torch.randn(m, D, generator=g, dtype=F64)
    q[:, 0] += 6.0
    kp = torch.randn(m, D, generator=g, dtype=F64) * scale
    kn = torch.randn(m, D, generator=g, dtype=F64) * scale
    if kind == "relation":
        z = torch.randn(m, len(REL), generator=g, dtype=F64)
        z2 = torch.randn(m, len(REL), generator=g, dtype=F64)
        q[:, REL] += strength * z
        kp[:, REL] += strength * z
        kn[:, REL] += strength * z2
    else:
        q[:, 3] += 2.0
        kp[:, 3] += strength
    return q, kp, kn


def _planted(seed: int, kind: str, *, coin_flip: bool = False, n: int = 120, m: int = 40,
             strength: float = 1.5):  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def flip(q, kp, kn):
        if not coin_flip:
            return kp, kn
        f = torch.rand(q.shape[0], generator=g) < 0.5
        return torch.where(f[:, None], kn, kp), torch.where(f[:, None], kp, kn)

    q, kp, kn = _draw(g, n, kind, strength)
    kp, kn = flip(q, kp, kn)
    ones = torch.ones(n, dtype=torch.bool)
    stats = RecordStats(q, kp, kn, ones, ones, torch.zeros(n, dtype=torch.long))
    hq, hp, hn = _draw(g, m, kind, strength)
    hp, hn = flip(hq, hp, hn)
    return stats, hq, hp, hn


def _relation_p(seed: int, kind: str, coin_flip: bool = False, rank: int = 3):
    stats, q, kp, kn = _planted(seed, kind, coin_flip=coin_flip)
    basis = feature_subspace(stats.delta(), rank=rank).key_basis
    partner, _ = pair_partners(None, n=q.shape[0], seed=seed)
    eff = relation_patch(q, kp, kn, partner, basis)["effect"][0]
    return relation_test(eff, partner, n_draws=999, seed=seed)


def _class_p(seed: int, kind: str, P: int = 20, rank: int = 3) -> float:
    """The centroid patch (class test) on the same planted records, as the pipeline runs it."""
    stats, q, kp, kn = _planted(seed, kind)
    n = q.shape[0]
    keys = torch.randn(n, S, D, generator=torch.Generator().manual_seed(seed), dtype=F64) * 0.1
    keys[:, 1], keys[:, 4] = kp, kn
    orig, target = torch.full((n,), 1), torch.full((n,), 4)
    basis = feature_subspace(stats.delta(), rank=rank).key_basis
    signs = relabel_signs(stats, P, seed=seed + 1)
    mu_p, mu_n = class_key_means(stats)
    pm, pn = class_key_means(stats, signs)
    pb = torch.stack([feature_subspace(stats.delta(signs=s), rank=rank).key_basis for s in signs])
    out = centroid_patch(q, keys, orig, target, torch.cat([basis[None], pb]),
                         torch.cat([mu_p[None], pm]), torch.cat([mu_n[None], pn]))  # fmt: skip
    eff = out["effect"].mean(1)
    return random_p_value(float(eff[0]), eff[1:])


def test_label_exchange_negates_the_effect_exactly():
    """Exchanging both partners' labels negates both records' effects (softcap too): the
    symmetry the sign-flip null rests on."""
    stats, q, kp, kn = _planted(0, "relation")
    basis = feature_subspace(stats.delta(), rank=3).key_basis
    partner, _ = pair_partners(None, n=q.shape[0], seed=1)
    for softcap in (None, 2.0):
        a = relation_patch(q, kp, kn, partner, basis, softcap=softcap)
        b = relation_patch(q, kn, kp, partner, basis, softcap=softcap)
        torch.testing.assert_close(b["effect"], -a["effect"], rtol=0, atol=1e-12)
        torch.testing.assert_close(b["effect_pos"], a["effect_neg"], rtol=0, atol=1e-12)


def test_two_logit_shortcut_matches_explicit_patch():
    """``p = a⁻/(a⁺+a⁻)`` from the two logits equals the full softmax with the keys' subspace
    coordinates set explicitly (other keys present)."""
    stats, q, kp, kn = _planted(2, "relation")
    V = feature_subspace(stats.delta(), rank=3).key_basis
    n = q.shape[0]
    partner, _ = pair_partners(None, n=n, seed=0)
    out = relation_patch(q, kp, kn, partner, V)
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(n, S, D, generator=g, dtype=F64)

    def p(pos, neg):
        k = keys.clone()
        k[:, 1], k[:, 4] = pos, neg
        a = torch.softmax((k @ q[:, :, None])[..., 0] / math.sqrt(D), -1)
        return a[:, 4] / (a[:, 1] + a[:, 4])

    def put(k, src):  # k with the subspace coordinates of src
        return k + (src @ V - k @ V) @ V.T

    j = partner
    lab = p(put(kp, kp[j]), put(kn, kp))
    mir = p(kp, put(kn, kp[j]))
    lab_n = p(put(kp, kn[j]), kn)
    mir_n = p(put(kp, kn), put(kn, kn[j]))
    torch.testing.assert_close(out["effect_pos"][0], lab - mir)
    torch.testing.assert_close(out["effect_neg"][0], lab_n - mir_n)
    torch.testing.assert_close(out["delta_p"][0], p(put(kp, kp[j]), kn) - p(kp, kn))
    # a stack of bases gives one row per basis
    two = relation_patch(q, kp, kn, partner, torch.stack([V, V]))
    torch.testing.assert_close(two["effect"][1], out["effect"][0])


def test_planted_relation_is_found_and_not_by_the_class_test():
    """A planted query–key match: relational p < 0.05 in ≥ 95 % of 100 seeds, with a large
    effect and attention falling toward the negative when the match is broken; the centroid
    patch (a class-feature test) claims it in ≤ 10 %."""
    seeds = range(100)
    rel = [_relation_p(s, "relation") for s in seeds]
    hits = sum(t.p_value < 0.05 for t in rel)
    assert hits >= 95, hits
    assert sum(t.effect for t in rel) / len(rel) > 0.2
    cls = sum(_class_p(s, "relation") < 0.05 for s in seeds)
    assert cls <= 10, cls


def test_planted_class_is_not_claimed_as_relation():
    """A class feature (one key direction shared by the positives): the class test finds it
    (≥ 95 %), the relational test claims it in ≤ 10 % of seeds."""
    seeds = range(100)
    assert sum(_class_p(s, "class") < 0.05 for s in seeds) >= 95
    rel = sum(_relation_p(s, "class").p_value < 0.05 for s in seeds)
    assert rel <= 10, rel


def test_coin_flip_false_positive_rate_is_alpha():
    """Coin-flipped labels on the planted relation (the head still matches query and key, the
    labels say nothing): the false-positive rate at α = 0.05 over 400 seeds is in
    [0.02, 0.08]."""
    seeds = range(400)
    false = sum(_relation_p(s, "relation", coin_flip=True).p_value < 0.05 for s in seeds)
    assert 0.02 * 400 <= false <= 0.08 * 400, false


def test_relation_share_picks_the_test():
    """Build-side share: > 0.5 for a planted relation, < 0.5 for a planted class feature, in
    ≥ 95 % of seeds; per group, a categorical class feature (the query's group decides which
    key direction marks the positives) stays a class."""
    rel, cls = [], []
    for s in range(60):
        for kind, into in (("relation", rel), ("class", cls)):
            stats, *_ = _planted(s, kind)
            fs = feature_subspace(stats.delta(), rank=3)
            into.append(relation_share(stats, fs.key_basis))  # U = orth(ΔC V)
    assert sum(x > 0.5 for x in rel) >= 57, rel
    assert sum(x < 0.5 for x in cls) >= 57, cls
    # categorical: group g's queries read direction u_g and its positives carry u_g
    g = torch.Generator().manual_seed(0)
    n = 200
    grp = torch.arange(n) % 2
    q = torch.randn(n, D, generator=g, dtype=F64) * 0.3
    kp = torch.randn(n, D, generator=g, dtype=F64) * 0.3
    kn = torch.randn(n, D, generator=g, dtype=F64) * 0.3
    q[:, 2] += torch.where(grp == 0, 2.0, 0.0)
    q[:, 9] += torch.where(grp == 1, 2.0, 0.0)
    kp[:, 2] += torch.where(grp == 0, 1.5, 0.0)
    kp[:, 9] += torch.where(grp == 1, 1.5, 0.0)
    ones = torch.ones(n, dtype=torch.bool)
    st = RecordStats(q, kp, kn, ones, ones, grp, ["a", "b"])
    fs = feature_subspace(st.delta(), rank=2)
    assert relation_share(st, fs.key_basis, fs.query_basis, by_group=True) < 0.2
    assert relation_share(st, fs.key_basis, fs.query_basis, by_group=False) > 0.3


def test_pair_partners():
    pos = torch.tensor([[10, 6, 9], [12, 8, 11], [10, 6, 9], [12, 8, 11], [20, 3, 19], [7, 1, 5],
                        [30, 26, 29]])  # fmt: skip
    partner, shares = pair_partners(pos, seed=0)
    ok = partner >= 0
    assert int(ok.sum()) == 6 and int((~ok).sum()) == 1
    idx = torch.arange(7)[ok]
    assert (partner[partner[idx]] == idx).all() and (partner[idx] != idx).all()
    assert int(partner[0]) == 2 and int(partner[1]) == 3  # same positions first
    # records 6 and one of 0..3 share offsets (4, 1) only if unpaired; here 6 pairs by offsets
    assert shares["same_positions"] == pytest.approx(4 / 6)
    assert shares["same_offsets"] >= shares["same_positions"]
    with pytest.raises(ValueError, match="positions"):
        pair_partners(torch.zeros(3, 2))
    # groups: pairs stay inside a group while it has a partner left, before positions
    grp = ["a", "b", "a", "b", "a", "b", "a"]
    partner, shares = pair_partners(pos, seed=0, groups=grp)
    ok = (partner >= 0).nonzero().flatten().tolist()
    inside = sum(grp[i] == grp[int(partner[i])] for i in ok)
    assert inside >= 4 and shares["same_group"] == pytest.approx(inside / len(ok))
    assert all(grp[i] == grp[int(partner[i])] for i in (0, 2) if int(partner[i]) in (0, 2))


def test_relation_test_exact_and_floor():
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    eff = torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0], dtype=F64)
    t = relation_test(eff, partner)
    assert t.exact and t.n_pairs == 3 and t.p_floor == pytest.approx(1 / 8)
    assert t.p_value == pytest.approx(1 / 8) and t.effect == pytest.approx(2.0)
    t = relation_test(-eff, partner)
    assert t.p_value == pytest.approx(1.0)
    big = torch.arange(60) ^ 1  # pairs (0,1), (2,3), ...
    t = relation_test(torch.ones(60, dtype=F64), big, n_draws=499, seed=0)
    assert not t.exact and t.p_floor == pytest.approx(1 / 500) and t.p_value == t.p_floor
    with pytest.raises(ValueError, match="pair"):
        relation_test(torch.ones(3, dtype=F64), torch.tensor([-1, -1, -1]))


def test_pick_pair_keys_is_symmetric():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.3, 0.1, 0.4, 0.0]])
    pos, neg = [[0, 1], [3]], [[2, 3], [0, 1]]
    kp, kn = pick_pair_keys(scores, pos, neg)
    assert kp.tolist() == [1, 3] and kn.tolist() == [3, 0]
    kp2, kn2 = pick_pair_keys(scores, neg, pos)
    assert kp2.tolist() == kn.tolist() and kn2.tolist() == kp.tolist()
