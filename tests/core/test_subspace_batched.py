"""The batched feature_subspaces equals feature_subspace on each matrix."""

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
        a = feature_subspace(d, 0.9, rank=rank)
        assert a.rank == b.rank and a.energy == b.energy
        for name in ("singular_values", "query_basis", "key_basis", "energy_curve"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-12, rtol=0)
    assert got[2].rank == (0 if rank is None else 2)


def test_batched_subspaces_refuse_bad_input():
    with pytest.raises(ValueError, match="3-D"):
        feature_subspaces(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="NaN"):
        feature_subspaces(torch.full((2, 3, 3), float("nan")))
    with pytest.raises(ValueError, match="rank must be"):
        feature_subspaces(torch.ones(2, 3, 3), rank=4)
