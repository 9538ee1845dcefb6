"""Projections onto subspace directions and how well they separate labelled points.

Plain-tensor math (no models): project vectors onto a basis, score clustering by
nearest-centroid accuracy, and a PCA baseline basis (the data's own top directions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["project", "nearest_centroid_accuracy", "pca_basis", "centroids"]


def _check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {shape}")


def project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates of ``x [n, d]`` on the columns of ``basis [d, k]`` → ``[n, k]`` (float64).

    ``basis`` is expected to have orthonormal columns (coordinates = ``x @ basis``).
    """
    _check_2d("x", x)
    _check_2d("basis", basis)
    if x.shape[1] != basis.shape[0]:
        raise ValueError(f"x has dim {x.shape[1]} but basis is [{basis.shape[0]}, k]")
    return x.double() @ basis.double()


def _labels(y: torch.Tensor | Sequence, n: int, name: str) -> list:
    vals = y.tolist() if isinstance(y, torch.Tensor) else list(y)
    if len(vals) != n:
        raise ValueError(f"{name} has {len(vals)} labels for {n} rows")
    return vals


def centroids(x: torch.Tensor, y: torch.Tensor | Sequence) -> tuple[list, torch.Tensor]:
    """Per-label means: ``(labels sorted, [n_labels, d] float64)``."""
    _check_2d("x", x)
    ys = _labels(y, x.shape[0], "y")
    if not ys:
        raise ValueError("centroids needs at least one row")
    labels = sorted(set(ys), key=str)
    xd = x.double()
    cents = torch.stack(
        [xd[torch.tensor([v == lab for v in ys])].mean(0) for lab in labels]
    )  # [L, d]
    return labels, cents


def nearest_centroid_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor | Sequence,
    test_x: torch.Tensor,
    test_y: torch.Tensor | Sequence,
) -> float:
    """Fraction of ``test_x [m, k]`` whose nearest (Euclidean) train centroid has its label.

    Centroids are the per-label means of ``train_x [n, k]``. Test labels never seen in
    training count as errors.
    """
    _check_2d("train_x", train_x)
    _check_2d("test_x", test_x)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_x dim {train_x.shape[1]} != test_x dim {test_x.shape[1]}")
    ty = _labels(test_y, test_x.shape[0], "test_y")
    if not ty:
        raise ValueError("nearest_centroid_accuracy needs at least one test row")
    labels, cents = centroids(train_x, train_y)
    dist = torch.cdist(test_x.double(), cents)  # [m, L]
    pred = [labels[i] for i in dist.argmin(1).tolist()]
    return sum(p == t for p, t in zip(pred, ty, strict=True)) / len(ty)


def pca_basis(x: torch.Tensor, k: int, *, center: bool = True) -> torch.Tensor:
    """Top-``k`` principal directions of ``x [n, d]`` → orthonormal ``[d, k]`` (float64).

    Directions are sign-fixed (largest-magnitude entry positive) for reproducibility.
    """
    _check_2d("x", x)
    n, d = x.shape
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d:
        raise ValueError(f"k must be an integer in [1, {d}], got {k!r}")
    if n < 1:
        raise ValueError("pca_basis needs at least one row")
    xd = x.double()
    if center:
        xd = xd - xd.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(xd, full_matrices=True)
    v = vh[:k].T.contiguous()  # [d, k]
    idx = v.abs().argmax(0)
    sign = torch.sign(v[idx, torch.arange(k)])
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)
