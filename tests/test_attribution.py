"""Exact logit attribution: parts sum to the total, no double counting on overlap."""

import pytest
import torch

from qkcov import attribute, orthonormalize, random_orthonormal, sequential_bases


def _planted(d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = random_orthonormal(d, 3, seed=1)
    # b shares one direction with a (overlapping subspaces)
    b = orthonormalize(torch.cat([a[:, :1], random_orthonormal(d, 2, seed=2)], dim=1))
    q = torch.randn(5, d, generator=g, dtype=torch.float64)
    K = torch.randn(5, 12, d, generator=g, dtype=torch.float64)
    return a, b, q, K


@pytest.mark.parametrize("n_bases", [0, 1, 2, 3, 5])
def test_parts_sum_to_total_for_any_number_of_bases(n_bases):
    d = 16
    bases = [random_orthonormal(d, 2 + i % 3, seed=10 + i) for i in range(n_bases)]
    q = torch.randn(d, generator=torch.Generator().manual_seed(3))
    K = torch.randn(9, d, generator=torch.Generator().manual_seed(4))
    att = attribute(q.float(), K.float(), bases, scaling=0.25)
    assert att.parts.shape == (n_bases + 1, 9)
    torch.testing.assert_close(att.parts.sum(0), att.total, atol=1e-5, rtol=0)
    torch.testing.assert_close(att.total, (K.double() @ q.double()) * 0.25, atol=1e-9, rtol=0)


def test_overlap_is_not_double_counted():
    a, b, q, K = _planted()
    att = attribute(q, K, {"order": a, "lexical": b})
    torch.testing.assert_close(att.parts.sum(0), att.total, atol=1e-10, rtol=0)
    # the shared direction belongs to "order" only: lexical's basis is orthogonal to it
    oa, ob = att.bases
    assert oa.shape[1] == 3 and ob.shape[1] == 2  # the overlap removed from b
    assert float((oa.T @ ob).abs().max()) < 1e-10
    # naive (non-orthogonalised) projections count the shared direction twice: with the
    # true residual (outside the union) they overshoot the total
    union = orthonormalize(torch.cat([a, b], dim=1))
    resid = q - q @ union @ union.T
    naive = sum(torch.einsum("nd,nsd->ns", q @ p @ p.T, K) for p in (a, b, torch.eye(16).double()))
    naive = naive - torch.einsum("nd,nsd->ns", q - resid, K)  # eye-term minus union = residual
    assert float((naive - att.total).abs().max()) > 1e-3
    torch.testing.assert_close(
        att.residual, torch.einsum("nd,nsd->ns", resid, K), atol=1e-10, rtol=0
    )


def test_priority_changes_which_basis_owns_the_overlap():
    a, b, q, K = _planted()
    first = attribute(q, K, {"order": a, "lexical": b}, priority=["order", "lexical"])
    second = attribute(q, K, {"order": a, "lexical": b}, priority=["lexical", "order"])
    assert second.names == ["lexical", "order", "residual"]
    torch.testing.assert_close(first.residual, second.residual, atol=1e-10, rtol=0)
    assert float((first.part("order") - second.part("order")).abs().max()) > 1e-6


def test_explained_fraction_full_space_is_one_and_empty_is_zero():
    d = 8
    q = torch.randn(3, d, dtype=torch.float64)
    K = torch.randn(3, 5, d, dtype=torch.float64)
    assert attribute(
        q, K, [torch.eye(d, dtype=torch.float64)]
    ).explained_fraction() == pytest.approx(1.0)
    assert attribute(q, K, []).explained_fraction() == pytest.approx(0.0)


def test_sequential_bases_are_mutually_orthonormal():
    bases = sequential_bases([random_orthonormal(10, 4, seed=s) for s in range(3)])
    stacked = torch.cat(bases, dim=1)
    torch.testing.assert_close(
        stacked.T @ stacked, torch.eye(stacked.shape[1], dtype=torch.float64), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bases": [torch.zeros(5, 2)]}, "basis 'basis_0' must be"),
        ({"bases": {"a": torch.eye(8)}, "priority": ["b"]}, "priority names"),
        ({"bases": [torch.eye(8)], "priority": ["a"]}, "dict"),
    ],
)
def test_bad_bases_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attribute(torch.randn(8), torch.randn(4, 8), **kwargs)
