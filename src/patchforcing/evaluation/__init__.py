"""Evaluation: distribution statistics of generated vs real images."""

from .frechet import feature_statistics, frechet_distance, frechet_distance_from_features

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features"]
