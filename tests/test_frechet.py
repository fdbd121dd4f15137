"""Fréchet distance: identities and closed forms."""

import numpy as np
import pytest
import torch

from patchforcing.evaluation import feature_statistics, frechet_distance, frechet_distance_from_features


def test_same_set_is_zero():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_gaussians_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_general_covariances_match_commuting_formula():
    """Rotating both covariances by the same orthogonal matrix keeps FD (commuting case)."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    a, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    expected = float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance(torch.zeros(5), s1, torch.zeros(5), s2) == pytest.approx(expected, rel=1e-8)


def test_statistics_and_shape_errors():
    f = np.random.default_rng(0).normal(size=(1000, 3))
    mu, s = feature_statistics(f)
    np.testing.assert_allclose(s.numpy(), np.cov(f, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="features must be"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
