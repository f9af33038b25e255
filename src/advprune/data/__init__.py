"""Datasets, loaders, augmentation and verified downloads.

>>> splits = load_dataset("digits", val_fraction=0.1)
>>> loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
>>> fast = fast_loader(splits.train, 64, shuffle=True, seed=0, device="cuda")  # on the GPU
"""

from __future__ import annotations

from advprune.data.augment import RandomCropFlip
from advprune.data.datasets import (
    DatasetInfo,
    DataSplits,
    ImageFolderDataset,
    TensorImageDataset,
    default_data_root,
    list_datasets,
    load_dataset,
    make_loader,
    register_dataset,
    stratified_split,
)
from advprune.data.download import SOURCES, Source, download_and_extract
from advprune.data.loaders import (
    DeviceLoader,
    ShardedSampler,
    epoch_permutation,
    fast_loader,
    fits_on_device,
    inputs_checked,
    shard_indices,
)

__all__ = [
    "SOURCES",
    "DataSplits",
    "DatasetInfo",
    "DeviceLoader",
    "ImageFolderDataset",
    "RandomCropFlip",
    "ShardedSampler",
    "Source",
    "TensorImageDataset",
    "default_data_root",
    "download_and_extract",
    "epoch_permutation",
    "fast_loader",
    "fits_on_device",
    "inputs_checked",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "register_dataset",
    "shard_indices",
    "stratified_split",
]
