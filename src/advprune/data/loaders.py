"""Fast, seeded, resumable batches for training and evaluation, on one process or many.

- :class:`DeviceLoader`: a dataset that fits in device memory (digits, CIFAR-10/100, SVHN:
  under 250 MB as uint8) is copied to the device once, in its own dtype (uint8 images stay
  uint8), and every batch is one gather there plus the conversion to float in [0, 1]. No
  worker processes, no host-to-device copy per batch. Random crop and flip then run on the
  device, in batches (:class:`~advprune.data.RandomCropFlip`, applied by the trainer).
- Image folders (and any other dataset) go through a ``DataLoader`` with worker processes and
  pinned memory (:func:`fast_loader`), sharded by :class:`ShardedSampler`.

Order: epoch ``e`` of a loader seeded ``s`` visits :func:`epoch_permutation` ``(n, s, e)``, the
very order a ``make_loader(..., shuffle=True)`` DataLoader yields when its generator is
seeded with ``s * 100_003 + e`` (what the trainer does every epoch), so one process sees the
same batches as before, and a resumed run the same as an uninterrupted one. With ``W``
processes the permutation is padded to a multiple of ``W`` (repeating its head, as
``DistributedSampler`` does) and rank ``r`` takes every ``W``-th index from ``r``: step ``k``
of the ``W`` processes together sees the samples of step ``k`` of one process with ``W`` times
the batch size. Evaluation loaders are sharded without padding, so counts summed over the
processes count every sample once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from advprune.data.datasets import ImageFolderDataset, TensorImageDataset
from advprune.errors import ConfigError

__all__ = [
    "EPOCH_SEED_STRIDE",
    "DeviceLoader",
    "ShardedSampler",
    "epoch_permutation",
    "fast_loader",
    "fits_on_device",
    "inputs_checked",
    "shard_indices",
]

EPOCH_SEED_STRIDE = 100_003  # epoch e of seed s draws its order from seed s * stride + e
DEVICE_MEMORY_FRACTION = 0.25  # a dataset goes to a GPU if it takes at most this share of it


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch`` (int64, on the CPU).

    Exactly what a DataLoader with ``shuffle=True`` and its generator seeded with
    ``seed * 100_003 + epoch`` yields: the iterator first draws its workers' base seed from
    the generator, then the sampler draws ``randperm(n)``.
    """
    g = torch.Generator()
    g.manual_seed(int(seed) * EPOCH_SEED_STRIDE + int(epoch))
    torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader's base seed
    return torch.randperm(n, generator=g)


def shard_indices(indices: torch.Tensor, rank: int, world_size: int, *, pad: bool) -> torch.Tensor:
    """Rank ``rank``'s share of ``indices``: every ``world_size``-th from ``rank``. ``pad``
    repeats the head first so every rank gets as many (training: the processes step together);
    without it the shares differ by at most one (evaluation: every sample counted once)."""
    if world_size <= 1:
        return indices
    if pad and len(indices) % world_size:
        extra = math.ceil(len(indices) / world_size) * world_size - len(indices)
        reps = math.ceil(extra / len(indices))
        indices = torch.cat([indices, indices.repeat(reps)[:extra]])
    return indices[rank::world_size]


class ShardedSampler(DistributedSampler):
    """``DistributedSampler`` with advprune's order (:func:`epoch_permutation`): the same
    batches on one process as an unsharded loader, resumable by :meth:`set_epoch`."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        pad: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed)  # fmt: skip
        self.pad = pad
        if not pad:
            self.num_samples = len(range(rank, len(dataset), num_replicas))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        return iter(shard_indices(order, self.rank, self.num_replicas, pad=self.pad).tolist())


def _tensor_dataset(dataset: Dataset) -> TensorImageDataset | None:
    """The in-memory dataset behind ``dataset`` (a ``Subset`` of one included), or None."""
    if isinstance(dataset, TensorImageDataset):
        return dataset
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorImageDataset):
        return dataset.dataset.subset(list(dataset.indices))
    return None


def fits_on_device(dataset: Dataset, device: torch.device | str) -> bool:
    """Whether ``dataset`` is held in memory and small enough to live on ``device`` (any
    in-memory dataset on the CPU; at most a quarter of a GPU's memory)."""
    tensors = _tensor_dataset(dataset)
    if tensors is None:
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return True
    size = tensors.images.numel() * tensors.images.element_size() + tensors.labels.numel() * 8
    total = torch.cuda.get_device_properties(device).total_memory
    return size <= DEVICE_MEMORY_FRACTION * total


class DeviceLoader:
    """Batches ``(x, y)`` of an in-memory dataset kept on ``device``.

    ``x`` is float32 in [0, 1] (uint8 images divided by 255 on the device), ``y`` int64, both
    on ``device``. With ``shuffle``, epoch ``e`` (:meth:`set_epoch`) follows
    :func:`epoch_permutation` ``(n, seed, e)``; ``rank`` / ``world_size`` shard it (see the
    module docstring). The images were range-checked when the dataset was built, so the
    trainer does not check batches again (:attr:`inputs_checked`).
    """

    inputs_checked = True

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        tensors = _tensor_dataset(dataset)
        if tensors is None:
            raise ConfigError(
                f"DeviceLoader needs an in-memory image dataset, got {type(dataset).__name__}"
            )
        _check_batch_size(batch_size)
        self.dataset = tensors
        self.device = torch.device(device)
        self.images = tensors.images.to(self.device)
        self.labels = tensors.labels.to(self.device)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` from now on."""
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This process's sample indices of the current epoch, in order (CPU int64)."""
        n = len(self.dataset)
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        return shard_indices(order, self.rank, self.world_size, pad=self.shuffle)

    def __len__(self) -> int:
        n = len(self.indices()) if self.world_size > 1 else len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices().to(self.device, non_blocking=True)
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            batch = idx[start : start + self.batch_size]
            x = self.images.index_select(0, batch)
            if x.dtype == torch.uint8:
                x = x.to(torch.float32).div_(255.0)
            yield x, self.labels.index_select(0, batch)


def inputs_checked(loader: object) -> bool:
    """Whether every input ``loader`` yields is known to be in [0, 1] without looking: a
    :class:`DeviceLoader`, or a DataLoader over a dataset that checked its range when it was
    built (:class:`TensorImageDataset`, :class:`ImageFolderDataset`, subsets of them)."""
    if getattr(loader, "inputs_checked", False):
        return True
    dataset = getattr(loader, "dataset", None)
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, (TensorImageDataset, ImageFolderDataset))


def default_workers(local_world_size: int = 1) -> int:
    """DataLoader workers per process for datasets read from disk: the cores of this machine
    shared among its processes, one left for the training loop, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(8, (cores or 1) // max(local_world_size, 1) - 1))


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


def fast_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
) -> DeviceLoader | DataLoader:
    """The fastest loader for ``dataset`` on ``device``, sharded for ``rank`` of
    ``world_size`` processes (see the module docstring).

    A :class:`DeviceLoader` when the dataset is in memory and fits the device
    (:func:`fits_on_device`); else a ``DataLoader`` with ``workers`` worker processes (default
    :func:`default_workers`), pinned memory on CUDA and a :class:`ShardedSampler` whose
    :meth:`~ShardedSampler.set_epoch` the trainer calls.
    """
    _check_batch_size(batch_size)
    device = torch.device(device)
    if fits_on_device(dataset, device):
        return DeviceLoader(dataset, batch_size, shuffle=shuffle, seed=seed, device=device,
                            rank=rank, world_size=world_size)  # fmt: skip
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    workers = default_workers(local) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an integer >= 0, got {workers!r}")
    sampler = ShardedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed, pad=shuffle)
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
