"""Sample-quality metrics: FID (the clean-fid way), CLIP score, downstream accuracy."""

from dpldm.metrics.clip_score import CLIPScore
from dpldm.metrics.downstream import ClassifierFeatures, SmallCNN, downstream_accuracy, load_images, train_classifier
from dpldm.metrics.fid import (
    FID,
    FeatureExtractor,
    FeatureStats,
    InceptionFeatures,
    InceptionUnavailableError,
    ReferenceStatsUnavailableError,
    features_of,
    folder_images,
    frechet_distance,
    named_reference_stats,
)
from dpldm.metrics.public_features import LabelledImages, PublicClassifierFeatures, data_fingerprint

__all__ = [
    "CLIPScore", "ClassifierFeatures", "LabelledImages", "PublicClassifierFeatures", "SmallCNN", "data_fingerprint",
    "downstream_accuracy", "load_images",
    "train_classifier", "FID", "FeatureExtractor", "FeatureStats", "InceptionFeatures", "InceptionUnavailableError",
    "ReferenceStatsUnavailableError", "features_of", "folder_images", "frechet_distance", "named_reference_stats",
]
