"""Device-resident data: the batches (order and augmentation) the trainer trains on are those
of the DataLoader path for a given seed and epoch, after a resume too, and shards of several
processes make up one process's batches."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advprune.data import (
    DeviceLoader,
    RandomCropFlip,
    ShardedSampler,
    epoch_permutation,
    fast_loader,
    inputs_checked,
    load_dataset,
    make_loader,
    shard_indices,
)
from advprune.models import create
from advprune.training import Natural, ObjectiveOutput, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_split():
    return load_dataset("digits", val_fraction=0.1, seed=0).train


class Recording(Natural):
    """Natural training that records every batch it is given (after augmentation) and
    crashes when it has recorded ``stop_after`` of them."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stop_after = stop_after

    def __call__(self, model, x, y) -> ObjectiveOutput:
        if len(self.batches) == self.stop_after:
            raise KeyboardInterrupt("simulated crash")
        self.batches.append((x.detach().clone(), y.clone()))
        return super().__call__(model, x, y)


def _train(loader, epochs: int, out: Path | None = None, stop_after: int | None = None):
    """The batches a trainer sees (a crash after ``stop_after`` batches, if given)."""
    torch.manual_seed(0)
    model = create("digits_cnn", width=4)
    objective = Recording(stop_after)
    trainer = Trainer(model, objective, loader, TrainConfig(epochs=epochs, lr=0.01, seed=5),
                      augment=RandomCropFlip(padding=2), out_dir=out, progress=False)  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        trainer.fit()
    return objective.batches


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v)
                                    in zip(a, b))  # fmt: skip


def test_device_loader_trains_on_the_dataloader_batches(train_split, tmp_path) -> None:
    before = _train(make_loader(train_split, 64, shuffle=True, seed=5), epochs=2)
    device = _train(DeviceLoader(train_split, 64, shuffle=True, seed=5), epochs=2)
    assert len(before) == 2 * 21 and _same(before, device)  # order and crop / flip alike
    # another seed is another order: the comparison can fail
    other = _train(DeviceLoader(train_split, 64, shuffle=True, seed=6), epochs=1)
    assert not _same(before[:21], other)
    # after a crash in epoch 2, the resumed run sees epoch 2's batches again
    crashed = _train(DeviceLoader(train_split, 64, shuffle=True, seed=5), 2, tmp_path, 30)
    resumed = _train(DeviceLoader(train_split, 64, shuffle=True, seed=5), 2, tmp_path)
    assert _same(crashed, before[:30]) and _same(resumed, before[21:])


def test_epoch_permutation_is_the_dataloader_order(train_split) -> None:
    loader = make_loader(train_split, 1000, shuffle=True, seed=2)
    for epoch in (0, 3):
        loader.generator.manual_seed(2 * 100_003 + epoch)
        order = torch.cat([y for _, y in loader])
        assert torch.equal(order, train_split.labels[epoch_permutation(len(train_split), 2, epoch)])


def test_shards_make_up_one_process_batches(train_split) -> None:
    one = DeviceLoader(train_split, 64, shuffle=True, seed=1)
    one.set_epoch(4)
    shards = [DeviceLoader(train_split, 32, shuffle=True, seed=1, rank=r, world_size=2)
              for r in range(2)]  # fmt: skip
    for s in shards:
        s.set_epoch(4)
    assert len(shards[0]) == len(shards[1]) == len(one) == 21  # the processes step together
    whole, parts = one.indices(), [s.indices() for s in shards]
    for k in range(21):
        step = set(whole[64 * k : 64 * (k + 1)].tolist())
        together = set(torch.cat([p[32 * k : 32 * (k + 1)] for p in parts]).tolist())
        padding = {int(whole[0])} if k == 20 else set()  # the last step repeats the head's first
        assert together == step | padding
    assert len(parts[0]) + len(parts[1]) == len(whole) + 1
    x, _ = next(iter(shards[1]))
    assert torch.equal(x, train_split.images[parts[1][:32]])
    # DistributedSampler's padding: every rank gets ceil(n / W) indices
    idx = shard_indices(torch.arange(10), 1, 3, pad=True)
    assert idx.tolist() == [1, 4, 7, 0]
    assert shard_indices(torch.arange(10), 1, 3, pad=False).tolist() == [1, 4, 7]


def test_evaluation_shards_count_every_sample_once(train_split) -> None:
    shards = [DeviceLoader(train_split, 50, rank=r, world_size=3) for r in range(3)]
    seen = torch.cat([y for s in shards for _, y in s])
    assert len(seen) == len(train_split)
    assert sorted(torch.cat([s.indices() for s in shards]).tolist()) == list(range(len(seen)))


def test_uint8_images_stay_uint8_on_the_device() -> None:
    from advprune.data import TensorImageDataset

    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    loader = DeviceLoader(TensorImageDataset(images, list(range(10))), 4)
    assert loader.images.dtype == torch.uint8 and inputs_checked(loader)
    x, _y = next(iter(loader))
    assert x.dtype == torch.float32 and torch.equal(x, images[:4].float() / 255)


def test_image_folders_use_a_sharded_dataloader(tmp_path) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = tmp_path / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    splits = load_dataset("imagefolder", tmp_path, image_size=6)
    loaders = [fast_loader(splits.train, 2, shuffle=True, seed=0, rank=r, world_size=2,
                           workers=0) for r in range(2)]  # fmt: skip
    assert all(isinstance(d.sampler, ShardedSampler) and inputs_checked(d) for d in loaders)
    for d in loaders:
        d.sampler.set_epoch(1)
    labels = torch.cat([torch.cat([y for _, y in d]) for d in loaders])
    assert sorted(labels.tolist()) == sorted(splits.train.labels.tolist())
    whole = fast_loader(splits.train, 6, shuffle=True, seed=0, workers=0)
    whole.sampler.set_epoch(1)
    order = epoch_permutation(len(splits.train), 0, 1)
    assert torch.equal(next(iter(whole))[1], splits.train.labels[order])
