"""Projection math: coordinates, nearest-centroid accuracy, PCA baseline."""

import pytest
import torch

from qkcov.core.projection import centroids, nearest_centroid_accuracy, pca_basis, project
from qkcov.core.subspace import random_orthonormal


def test_project_is_coordinates_on_orthonormal_basis():
    basis = random_orthonormal(8, 3, seed=1)
    coords = torch.randn(5, 3, dtype=torch.float64)
    x = coords @ basis.T  # points inside the span
    torch.testing.assert_close(project(x, basis), coords)
    assert project(x.float(), basis).dtype == torch.float64
    with pytest.raises(ValueError, match="dim"):
        project(torch.randn(5, 7), basis)
    with pytest.raises(ValueError, match="2-D"):
        project(torch.randn(5), basis)


def test_nearest_centroid_accuracy_separable_and_chance():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    y = [i % 3 for i in range(90)]
    x = means[y] + 0.3 * torch.randn(90, 2, generator=g)
    assert nearest_centroid_accuracy(x[:60], y[:60], x[60:], y[60:]) == 1.0
    labels, c = centroids(x[:60], y[:60])
    assert labels == [0, 1, 2] and c.shape == (3, 2)
    # unseen test label counts as an error
    assert nearest_centroid_accuracy(x[:60], y[:60], x[60:61], ["other"]) == 0.0
    # no structure: around chance
    noise = torch.randn(3000, 2, generator=g)
    yn = [i % 3 for i in range(3000)]
    acc = nearest_centroid_accuracy(noise[:1500], yn[:1500], noise[1500:], yn[1500:])
    assert 0.25 < acc < 0.42
    with pytest.raises(ValueError, match="labels"):
        nearest_centroid_accuracy(x, y[:5], x, y)


def test_pca_basis_finds_the_high_variance_directions():
    g = torch.Generator().manual_seed(0)
    basis = random_orthonormal(10, 2, seed=3, dtype=torch.float32)
    x = (torch.randn(400, 2, generator=g) * torch.tensor([10.0, 5.0])) @ basis.T
    x = x + 0.01 * torch.randn(400, 10, generator=g) + 3.0  # offset removed by centring
    pb = pca_basis(x, 2)
    assert pb.shape == (10, 2)
    torch.testing.assert_close(pb.T @ pb, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)
    overlap = torch.linalg.svdvals(pb.T @ basis.double())
    assert overlap.min() > 0.999
    with pytest.raises(ValueError, match="k must"):
        pca_basis(x, 11)
