"""feature_subspaces (one batched SVD; feature_subspace is its one-matrix case) equals an SVD
of each matrix on its own."""

from __future__ import annotations

import pytest
import torch

from qkcov.core.subspace import feature_subspace, feature_subspaces


@pytest.mark.parametrize("rank", [None, 2])
def test_batched_subspaces_equal_one_at_a_time(rank):
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(5, 8, 6, generator=g, dtype=torch.float64)
    deltas[2] = 0.0  # an all-zero ΔC: rank 0 by energy
    got = feature_subspaces(deltas, 0.9, rank=rank)
    assert len(got) == 5
    for d, b in zip(deltas, got, strict=True):
        u, sv, vh = torch.linalg.svd(d)  # each matrix alone
        r = b.rank
        torch.testing.assert_close(b.singular_values, sv, atol=1e-12, rtol=0)
        if rank is None and sv[0] > 0:  # the energy rule: the smallest r reaching 0.9
            e = (sv**2).cumsum(0) / (sv**2).sum()
            assert e[r - 1] >= 0.9 - 1e-12 and (r == 1 or e[r - 2] < 0.9)
        # the kept subspaces (signs of singular vectors are free): equal projectors
        for basis, ref in ((b.query_basis, u[:, :r]), (b.key_basis, vh[:r].T)):
            torch.testing.assert_close(basis @ basis.T, ref @ ref.T, atol=1e-10, rtol=0)
        assert feature_subspace(d, 0.9, rank=rank).rank == r
    assert got[2].rank == (0 if rank is None else 2)


def test_batched_subspaces_refuse_bad_input():
    with pytest.raises(ValueError, match="3-D"):
        feature_subspaces(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        feature_subspaces(torch.full((2, 3, 3), float("nan")))
    with pytest.raises(ValueError, match="rank must be"):
        feature_subspaces(torch.ones(2, 3, 3), rank=4)
