"""Datasets with fixed, seeded train/val/test splits, preprocessed the way the model expects."""

from craft_deploy.data.datasets import DATASETS, Splits, calibration_subset, load_splits, splits_for_manifest

__all__ = ["DATASETS", "Splits", "calibration_subset", "load_splits", "splits_for_manifest"]
