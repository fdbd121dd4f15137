"""Evaluation: distribution statistics of generated vs real images.

* :func:`evaluate` - FID, sFID, IS, precision/recall (ADM evaluator definitions) of a sample
  ``.npz`` against a reference (ADM reference batch, ``.npz`` of images, or image folder).
* Feature spaces: :class:`InceptionFeatures` (torch-fidelity, optional) and
  :class:`ClassifierFeatures` (a small classifier from :func:`train_classifier`; its metrics are
  named ``FD_classifier`` etc., never FID).
* The statistics themselves: :func:`frechet_distance`, :func:`inception_score`,
  :func:`precision_recall`, :func:`knn_radii`.
* Text-to-image: :func:`clip_score` (CLIP score through transformers, :class:`CLIPScorer`) and
  :func:`category_accuracy` (share of images classified as their prompt's category, with its
  chance level and a Wilson 95 % interval).
"""

from .category import CategoryAccuracy, category_accuracy, category_accuracy_from_predictions, wilson_interval
from .classifier import ClassifierConfig, SmallClassifier, load_classifier, save_classifier, train_classifier
from .clip_score import DEFAULT_CLIP, CLIPScorer, clip_score
from .evaluate import METRICS, evaluate, extract_features, format_results, parse_metrics
from .features import (
    ClassifierFeatures,
    FeatureExtractor,
    InceptionFeatures,
    build_feature_extractor,
    random_inception_weights,
)
from .frechet import feature_statistics, frechet_distance, frechet_distance_from_features
from .metrics import frechet_distance_to_stats, inception_score, knn_radii, precision_recall, within_manifold
from .reference import EvaluationError, ImageSet, open_images, resize_images

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "frechet_distance_to_stats",
    "inception_score",
    "knn_radii",
    "within_manifold",
    "precision_recall",
    "EvaluationError",
    "ImageSet",
    "open_images",
    "resize_images",
    "FeatureExtractor",
    "InceptionFeatures",
    "ClassifierFeatures",
    "build_feature_extractor",
    "random_inception_weights",
    "ClassifierConfig",
    "SmallClassifier",
    "train_classifier",
    "save_classifier",
    "load_classifier",
    "METRICS",
    "parse_metrics",
    "extract_features",
    "evaluate",
    "format_results",
    "DEFAULT_CLIP",
    "CLIPScorer",
    "clip_score",
    "CategoryAccuracy",
    "category_accuracy",
    "category_accuracy_from_predictions",
    "wilson_interval",
]
