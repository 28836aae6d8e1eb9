"""Data: what a model knows about its inputs (``spec``), pixels to inputs (``transforms``), named
datasets (``sources``), train/val/test splits (``splits``), your own image folders
(``imagefolder``, the ``imagefolder:PATH`` family) and out-of-distribution sets (``ood``).

The names most callers need are importable from here; ``images`` finds and decodes image files for
every command.
"""

from ssvi_cli.data.imagefolder import data_config_for, scan_folder  # also registers imagefolder:PATH
from ssvi_cli.data.ood import OOD_SETS, build_ood, ood_names
from ssvi_cli.data.sources import (CIFAR100_NAMES, DATASET_FAMILIES, DATASETS, DIGITS_MEAN, DIGITS_STD, DatasetSource,
                                   UnknownDataset, check_dataset_name, dataset_names, default_data_dir, get_spec,
                                   load_raw, reads_data_dir)
from ssvi_cli.data.spec import DataError, DatasetUnavailable, DataSpec, DataSplits, RawImages
from ssvi_cli.data.splits import build_dataset, stratified_split
from ssvi_cli.data.transforms import PreparedDataset, TensorImageDataset, preprocess, random_crop_flip, seeded_augmentation

__all__ = [
    "CIFAR100_NAMES", "DATASET_FAMILIES", "DATASETS", "DIGITS_MEAN", "DIGITS_STD", "OOD_SETS", "DataError",
    "DataSpec", "DataSplits", "DatasetSource", "DatasetUnavailable", "PreparedDataset", "RawImages", "TensorImageDataset", "UnknownDataset",
    "build_dataset", "build_ood", "check_dataset_name", "data_config_for", "dataset_names", "default_data_dir",
    "get_spec", "load_raw", "reads_data_dir", "scan_folder",
    "ood_names", "preprocess", "random_crop_flip", "seeded_augmentation", "stratified_split",
]
