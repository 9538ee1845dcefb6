"""Bad numbers never reach the float64 sums; spectra of any scale give the right rank."""

from __future__ import annotations

import pytest
import torch

from qkcov.core.covariance import ContrastiveCovariance
from qkcov.core.subspace import feature_subspace, rank_at_energy


@pytest.mark.parametrize("bad", [True, False, 2.0, "4", None])
def test_constructor_rejects_bool_and_non_int_sizes(bad):
    with pytest.raises(ValueError, match="d_q"):
        ContrastiveCovariance(bad)
    if bad is not None:  # d_k=None means "same as d_q"
        with pytest.raises(ValueError, match="d_k"):
            ContrastiveCovariance(4, bad)


def test_constructor_rejects_bool_groups():
    with pytest.raises(ValueError, match="groups"):
        ContrastiveCovariance(3, groups=True)


@pytest.mark.parametrize("where", ["q", "k_pos", "k_neg", "weight"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_update_rejects_non_finite_and_leaves_state_unchanged(where, value):
    g = torch.Generator().manual_seed(0)
    acc = ContrastiveCovariance(3, 2)
    acc.update(
        torch.randn(4, 3, generator=g),
        torch.randn(4, 2, generator=g),
        torch.randn(4, 2, generator=g),
    )
    before = {k: v.clone() for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor)}
    args = {
        "q": torch.randn(5, 3, generator=g),
        "k_pos": torch.randn(5, 2, generator=g),
        "k_neg": torch.randn(5, 2, generator=g),
        "weight": torch.ones(5, dtype=torch.float64),
    }
    args[where][2] = value  # a row in the middle
    with pytest.raises(ValueError, match="NaN|inf"):
        acc.update(args["q"], args["k_pos"], args["k_neg"], weight=args["weight"])
    after = {k: v for k, v in acc.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and before
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("scale", [1e300, 1e-300, 1.0])
def test_subspace_rank_is_scale_free(scale):
    fs = feature_subspace(scale * torch.eye(4, dtype=torch.float64))
    assert fs.rank == 4
    assert torch.isfinite(fs.energy_curve).all()
    assert torch.allclose(
        fs.energy_curve, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    )
    s = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64) * scale
    assert rank_at_energy(s, 0.5) == 1
    assert rank_at_energy(s, 0.95) == 2
    assert rank_at_energy(torch.zeros(3), 0.9) == 0
