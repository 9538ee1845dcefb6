"""Core math: contrastive covariance accumulation, subspaces, key swaps, atomic artifacts."""

from __future__ import annotations

import pytest
import torch

from qkcov.artifacts import load_tensors, read_json, save_tensors, write_json
from qkcov.core.covariance import ContrastiveCovariance
from qkcov.core.intervention import swap_in_subspace
from qkcov.core.subspace import feature_subspace, principal_angles, random_orthonormal


def _pairs(n: int, d_q: int = 12, d_k: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d_q, generator=g, dtype=torch.float64),
        torch.randn(n, d_k, generator=g, dtype=torch.float64),
        torch.randn(n, d_k, generator=g, dtype=torch.float64),
    )


def test_planted_low_rank_delta_is_recovered():
    d_q, d_k, r, n = 12, 10, 3, 40_000
    U = random_orthonormal(d_q, r, seed=1)
    V = random_orthonormal(d_k, r, seed=2)
    S = torch.diag(torch.tensor([3.0, 2.0, 1.5], dtype=torch.float64))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, d_q, generator=g, dtype=torch.float64)
    nuisance = torch.randn(n, d_k, generator=g, dtype=torch.float64)  # shared by both keys
    k_pos = q @ U @ S @ V.T + nuisance  # E[q k+ᵀ] − E[q k−ᵀ] = U S Vᵀ
    k_neg = nuisance + 0.1 * torch.randn(n, d_k, generator=g, dtype=torch.float64)
    acc = ContrastiveCovariance(d_q, d_k)
    acc.update(q, k_pos, k_neg)
    fs = feature_subspace(acc.delta(), energy=0.99)
    assert fs.rank == r
    assert principal_angles(fs.query_basis, U).max() < 0.05
    assert principal_angles(fs.key_basis, V).max() < 0.05


def test_merge_of_shards_equals_one_pass():
    q, kp, kn = _pairs(1000)
    whole = ContrastiveCovariance(12, 10)
    whole.update(q, kp, kn)
    shards = [ContrastiveCovariance(12, 10) for _ in range(3)]
    for acc, idx in zip(shards, torch.arange(1000).chunk(3), strict=True):
        acc.update(q[idx], kp[idx], kn[idx])
    merged = shards[0].merge(shards[1]).merge(shards[2])
    torch.testing.assert_close(merged.delta(), whole.delta(), rtol=1e-12, atol=1e-12)
    assert merged.counts() == (1000, 1000)


@pytest.mark.parametrize("batch", [1, 7, 128, 1000])
def test_result_independent_of_batch_size(batch):
    q, kp, kn = _pairs(1000)
    ref = ContrastiveCovariance(12, 10)
    ref.update(q, kp, kn)
    acc = ContrastiveCovariance(12, 10)
    for i in range(0, 1000, batch):
        acc.update(q[i : i + batch], kp[i : i + batch], kn[i : i + batch])
    torch.testing.assert_close(acc.delta(), ref.delta(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        acc.delta(center=True), ref.delta(center=True), rtol=1e-10, atol=1e-12
    )


def test_per_group_accumulation_equals_separate_accumulators():
    q, kp, kn = _pairs(900)
    group = torch.arange(900) % 3
    grouped = ContrastiveCovariance(12, 10, groups=["a", "b", "c"])
    grouped.update(q, kp, kn, group=group)
    for gi, name in enumerate("abc"):
        sep = ContrastiveCovariance(12, 10)
        rows = group == gi
        sep.update(q[rows], kp[rows], kn[rows])
        torch.testing.assert_close(grouped.delta(name), sep.delta(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grouped.delta(gi), sep.delta(), rtol=1e-12, atol=1e-12)
    pooled = ContrastiveCovariance(12, 10)
    pooled.update(q, kp, kn)
    torch.testing.assert_close(grouped.delta(None), pooled.delta(), rtol=1e-12, atol=1e-12)


def test_state_dict_and_save_load_round_trip(tmp_path):
    q, kp, kn = _pairs(300)
    acc = ContrastiveCovariance(12, 10, groups=2, center=True)
    acc.update(q, kp, kn, group=torch.arange(300) % 2)
    clone = ContrastiveCovariance.from_state_dict(acc.state_dict())
    torch.testing.assert_close(clone.deltas(), acc.deltas())
    path = acc.save(tmp_path / "acc.safetensors")
    loaded = ContrastiveCovariance.load(path)
    torch.testing.assert_close(loaded.deltas(), acc.deltas())
    assert loaded.center and loaded.group_names == acc.group_names
    # resuming after a reload gives the same as one pass
    loaded.update(q, kp, kn, group=0)
    acc.update(q, kp, kn, group=0)
    torch.testing.assert_close(loaded.deltas(), acc.deltas())


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_value_errors():
    acc = ContrastiveCovariance(4, 3)
    with pytest.raises(ValueError, match="k_pos"):
        acc.update(torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="rows"):
        acc.update(torch.randn(5, 4), torch.randn(6, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="q must have shape"):
        acc.update(torch.randn(5, 2), torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty"):
        acc.update(torch.randn(0, 4), torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="no positive pairs"):
        acc.delta()
    acc.update(torch.randn(5, 4), torch.randn(5, 3), None)
    with pytest.raises(ValueError, match="no negative pairs"):
        acc.delta()
    with pytest.raises(ValueError, match="d_q"):
        ContrastiveCovariance(0, 3)
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(ContrastiveCovariance(4, 4))


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.01, 2.0])
def test_energy_outside_unit_interval_rejected(energy):
    with pytest.raises(ValueError, match="energy"):
        feature_subspace(torch.eye(4), energy=energy)


def test_energy_one_keeps_full_rank():
    assert feature_subspace(torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0])), energy=1.0).rank == 3


# ------------------------------------------------------------------ swaps
def test_swap_in_subspace_properties():
    g = torch.Generator().manual_seed(0)
    d, r = 16, 5
    k_a = torch.randn(8, d, generator=g, dtype=torch.float64)
    k_b = torch.randn(8, d, generator=g, dtype=torch.float64)
    V = random_orthonormal(d, r, seed=4)
    a1, b1 = swap_in_subspace(k_a, k_b, V)
    # inside the subspace the coordinates are exchanged
    torch.testing.assert_close(a1 @ V, k_b @ V)
    torch.testing.assert_close(b1 @ V, k_a @ V)
    # outside the subspace nothing changes
    P = torch.eye(d, dtype=torch.float64) - V @ V.T
    torch.testing.assert_close(a1 @ P, k_a @ P)
    torch.testing.assert_close(b1 @ P, k_b @ P)
    # swapping twice is the identity
    a2, b2 = swap_in_subspace(a1, b1, V)
    torch.testing.assert_close(a2, k_a)
    torch.testing.assert_close(b2, k_b)
    # full-space swap exchanges the keys; inputs are not modified in place
    af, bf = swap_in_subspace(k_a, k_b, torch.eye(d, dtype=torch.float64))
    torch.testing.assert_close(af, k_b)
    torch.testing.assert_close(bf, k_a)
    with pytest.raises(ValueError):
        swap_in_subspace(k_a, k_b[:, :4], V)
    with pytest.raises(ValueError):
        swap_in_subspace(k_a, k_b, V[:10])


# ------------------------------------------------------------------ atomic artifacts
def test_failed_json_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(path, {"ok": 1})
    with pytest.raises(TypeError):  # fails while serialising
        write_json(path, {"bad": object()})
    assert read_json(path) == {"ok": 1}

    def crash(fd):  # fails after the bytes went to the temp file
        raise OSError("disk full")

    monkeypatch.setattr("qkcov.artifacts.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"ok": 2, "big": list(range(1000))})
    assert read_json(path) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp leftovers


def test_failed_tensor_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"x": torch.ones(3)})

    def partial(tensors, filename, metadata=None):  # half-written file, then a crash
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 10)
        raise RuntimeError("interrupted")

    monkeypatch.setattr("qkcov.artifacts.save_file", partial)
    with pytest.raises(OSError, match="interrupted"):  # one error naming the file
        save_tensors(path, {"x": torch.zeros(5)})
    torch.testing.assert_close(load_tensors(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
