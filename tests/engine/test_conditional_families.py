"""engine.conditional: a head's conditional null families from build-record vectors — row 0
is the real labels through the pipeline's estimator, the strata (offset × attributes × group)
fix what they explain, and per-group ΔC / centroids exist where a group holds both labels."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from qkcov.core.position import record_delta
from qkcov.engine.conditional import ConditionalFamily, conditional_families, key_columns
from qkcov.engine.contrast import HeadVectors, KeySite
from qkcov.tasks.records import ContrastRecord, Span


def _fixture(n: int = 24, D: int = 6, confounded: bool = False):
    g = torch.Generator().manual_seed(0)
    resolved, keys, rec, pos = [], [], [], []
    for i in range(n):
        # two keys per record at token 2 and 5 (query at 9): the positive's slot alternates
        # unless the design is confounded (positive always at 2: offset 7)
        p_first = confounded or i % 2 == 0
        roles = ("subject", "attractor")
        prompt = "a b c d e f g h i j"
        sp = Span(2, 3, attrs={"role": roles[0]}), Span(4, 5, attrs={"role": roles[1]})
        r = ContrastRecord(prompt, (sp[0],), (sp[1],), group="x" if i < n // 2 else "y")
        slots = (2, 5) if p_first else (5, 2)
        resolved.append(SimpleNamespace(record=r, query=9,
                                        keys=[KeySite(slots[0], slots[0], True), KeySite(slots[1], slots[1], False)]))  # fmt: skip
        keys += [torch.randn(D, generator=g, dtype=torch.float64) for _ in range(2)]
        rec += [i, i]
        pos += [True, False]
    q = torch.randn(n, D, generator=g, dtype=torch.float64)
    vecs = HeadVectors(q, torch.stack(keys), torch.tensor(rec), torch.tensor(pos), [None] * 2 * n,
                       [r.record.group for r in resolved])  # fmt: skip
    return vecs, resolved


def test_families_real_row_strata_and_groups():
    vecs, resolved = _fixture()
    cols = key_columns(resolved, ["offset", "role"])
    assert cols["offset"][:4] == [7, 4, 4, 7] and cols["role"][:2] == ["subject", "attractor"]
    fams = conditional_families(vecs, resolved, ["f"] * len(resolved), ["offset"], 30, seed=1)
    fam = fams["f"]
    assert isinstance(fam, ConditionalFamily) and fam.deltas.shape == (31, 6, 6)
    real = record_delta(vecs.q, vecs.keys, vecs.key_record, vecs.key_positive)
    torch.testing.assert_close(fam.deltas[0], real)
    assert fam.confounding["mixed_fraction"] == 1.0 and not fam.confounding["confounded"]
    assert not torch.allclose(fam.deltas[1], fam.deltas[0])  # the draws move labels
    assert set(fam.group_deltas) == {"x", "y"} and set(fam.means) == {None, "x", "y"}
    # the role always names the positive: conditioned on it, nothing moves
    fams = conditional_families(vecs, resolved, ["f"] * len(resolved), ["offset", "role"], 10, 1)
    fam = fams["f"]
    assert fam.confounding["confounded"] and fam.confounding["fixed_by"] == ["role"]
    assert torch.allclose(fam.deltas, fam.deltas[:1].expand_as(fam.deltas))


def test_offset_confounded_records_are_fixed_by_the_offset():
    vecs, resolved = _fixture(confounded=True)
    fam = conditional_families(vecs, resolved, ["f"] * len(resolved), ["offset"], 10, 2)["f"]
    assert fam.confounding["mixed_fraction"] == 0.0 and fam.confounding["fixed_by"] == ["offset"]
    few = conditional_families(vecs, resolved[:3], ["f"] * 3, ["offset"], 5, 0)
    assert few == {"f": "3 build records with vectors (need 4)"}
