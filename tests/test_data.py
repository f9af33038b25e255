"""Datasets, splits, loaders and augmentation, on tiny files written in the real formats."""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from advprune.data import (
    DatasetInfo,
    DataSplits,
    RandomCropFlip,
    TensorImageDataset,
    list_datasets,
    load_dataset,
    make_loader,
)
from advprune.errors import ConfigError, DataError, UnknownNameError

PER_BATCH = 4  # images per CIFAR-10 batch file in these tests


# ------------------------------------------------------------------------------------------
# Writers for the official formats
# ------------------------------------------------------------------------------------------


def cifar_rows(n: int, offset: int) -> np.ndarray:
    """(n, 3072) uint8 rows with a value pattern that identifies image, channel and pixel."""
    idx = np.arange(3072)
    rows = [((idx * 7 + (offset + i) * 31) % 256).astype(np.uint8) for i in range(n)]
    return np.stack(rows)


def write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def make_cifar10(parent: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write cifar-10-batches-py under ``parent``; return (folder, all train rows, labels)."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for b in range(1, 6):
        data = cifar_rows(PER_BATCH, offset=10 * b)
        lab = [(b + i) % 10 for i in range(PER_BATCH)]
        write_pickle(
            folder / f"data_batch_{b}",
            {b"batch_label": f"training batch {b} of 5".encode(), b"labels": lab, b"data": data},
        )
        rows.append(data)
        labels += lab
    test = cifar_rows(3, offset=999)
    write_pickle(
        folder / "test_batch",
        {b"batch_label": b"testing batch 1 of 1", b"labels": [9, 0, 5], b"data": test},
    )
    return folder, np.concatenate(rows), np.array(labels)


def make_tarball(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def make_cifar100(parent: Path) -> Path:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    data = cifar_rows(6, offset=3)
    write_pickle(
        folder / "train",
        {
            b"filenames": [b"a.png"] * 6,
            b"batch_label": b"training batch 1 of 1",
            b"fine_labels": np.array([99, 0, 42, 7, 7, 63]),
            b"coarse_labels": [1, 2, 3, 4, 5, 6],
            b"data": data,
        },
    )
    write_pickle(
        folder / "test",
        {b"fine_labels": [5, 55], b"coarse_labels": [0, 0], b"data": cifar_rows(2, offset=50)},
    )
    return folder


def make_svhn(root: Path, n_train: int = 5, n_test: int = 3) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(32, 32, 3, n_train), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [3]], dtype=np.uint8)[:n_train]
    scipy.io.savemat(root / "train_32x32.mat", {"X": x, "y": y})
    xt = rng.integers(0, 256, size=(32, 32, 3, n_test), dtype=np.uint8)
    scipy.io.savemat(root / "test_32x32.mat", {"X": xt, "y": np.array([[2], [10], [4]])})
    return x


# ------------------------------------------------------------------------------------------
# Registry and containers
# ------------------------------------------------------------------------------------------


def test_list_datasets():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagefolder", "svhn"]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownNameError) as err:
        load_dataset("mnist")
    msg = str(err.value)
    assert "mnist" in msg
    for name in list_datasets():
        assert name in msg


def test_dataset_info_to_dict_is_json_able():
    import json

    info = DatasetInfo("x", 3, (1, 2, 2), (0.5,), (0.25,))
    d = info.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert DatasetInfo.from_dict(d) == info
    with pytest.raises(AttributeError):
        info.name = "y"  # type: ignore[misc]


def test_tensor_dataset_uint8_and_float():
    imgs = torch.arange(2 * 1 * 2 * 2, dtype=torch.uint8).reshape(2, 1, 2, 2) * 17
    ds = TensorImageDataset(imgs, [3, 4])
    x, y = ds[1]
    assert x.dtype == torch.float32 and isinstance(y, int) and y == 4
    assert torch.allclose(x, imgs[1].float() / 255)
    assert len(ds) == 2 and ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    fds = TensorImageDataset(np.full((3, 1, 2, 2), 0.5, dtype=np.float64), np.array([0, 1, 2]))
    assert fds[2][0].dtype == torch.float32 and float(fds[2][0][0, 0, 0]) == 0.5


@pytest.mark.parametrize(
    "images, labels",
    [
        (torch.zeros(2, 2, 2, dtype=torch.uint8), [0, 1]),  # not 4-D
        (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), [0]),  # length mismatch
        (torch.full((2, 1, 2, 2), 2.0), [0, 1]),  # float outside [0, 1]
        (torch.zeros(2, 1, 2, 2, dtype=torch.int32), [0, 1]),  # wrong dtype
        (torch.zeros(2, 1, 2, 2), [0.5, 1.0]),  # non-integer labels
        (torch.zeros(2, 1, 2, 2), [-1, 1]),  # negative labels
    ],
)
def test_tensor_dataset_validation(images, labels):
    with pytest.raises(ConfigError):
        TensorImageDataset(images, labels)


# ------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------


def test_digits_sizes_range_and_determinism():
    splits = load_dataset("digits")
    assert isinstance(splits, DataSplits) and splits.val is None
    assert len(splits.train) == 1437 and len(splits.test) == 360
    assert splits.info == DatasetInfo("digits", 10, (1, 8, 8), (0.3054,), (0.3761,))
    x, y = splits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    imgs = splits.train.images
    assert float(imgs.min()) == 0.0 and float(imgs.max()) == 1.0
    assert torch.equal(torch.round(imgs * 16), imgs * 16)  # pixel values are k/16
    again = load_dataset("digits")
    assert torch.equal(again.train.images, imgs)
    assert torch.equal(again.test.labels, splits.test.labels)
    # the constants are the rounded per-channel train statistics
    assert abs(float(imgs.double().mean()) - 0.3054) < 5e-5
    assert abs(float(imgs.double().std(unbiased=False)) - 0.3761) < 5e-5
    # stratified: every class is in both splits in about the right proportion
    counts = torch.bincount(splits.test.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37


# ------------------------------------------------------------------------------------------
# Validation split
# ------------------------------------------------------------------------------------------


def test_val_split_sizes_stratification_disjointness():
    full = load_dataset("digits")
    splits = load_dataset("digits", val_fraction=0.2, seed=3)
    assert len(splits.val) == round(0.2 * 1437)
    assert len(splits.train) + len(splits.val) == 1437
    assert torch.equal(splits.test.images, full.test.images)  # test set untouched
    # disjoint and covering: match rows of train/val back to the full train set

    def row(ds, i):
        return (*ds.images[i].flatten().tolist(), int(ds.labels[i]))

    key = {row(full.train, i): i for i in range(len(full.train))}
    assert len(key) == 1437  # all rows distinct, so the mapping is exact
    tr = {key[row(splits.train, i)] for i in range(len(splits.train))}
    va = {key[row(splits.val, i)] for i in range(len(splits.val))}
    assert not tr & va and len(tr | va) == 1437
    full_counts = torch.bincount(full.train.labels, minlength=10).double()
    val_counts = torch.bincount(splits.val.labels, minlength=10).double()
    assert torch.all((val_counts - 0.2 * full_counts).abs() <= 1.0)


def test_val_split_is_seeded():
    a = load_dataset("digits", val_fraction=0.1, seed=1)
    b = load_dataset("digits", val_fraction=0.1, seed=1)
    c = load_dataset("digits", val_fraction=0.1, seed=2)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, "abc", True])
def test_val_fraction_out_of_range(fraction):
    with pytest.raises(ConfigError):
        load_dataset("digits", val_fraction=fraction)


# ------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------


def _labels_in_order(loader) -> list[int]:
    return [int(v) for _, y in loader for v in y]


def test_make_loader_deterministic_per_seed():
    ds = load_dataset("digits").train
    a = _labels_in_order(make_loader(ds, batch_size=100, shuffle=True, seed=5))
    torch.manual_seed(123)  # the global RNG must not matter
    b = _labels_in_order(make_loader(ds, batch_size=100, shuffle=True, seed=5))
    c = _labels_in_order(make_loader(ds, batch_size=100, shuffle=True, seed=6))
    assert a == b and a != c
    plain = _labels_in_order(make_loader(ds, batch_size=100))
    assert plain == ds.labels.tolist()
    x, y = next(iter(make_loader(ds, batch_size=32, shuffle=True, seed=0)))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    batches = list(make_loader(ds, batch_size=100, drop_last=True))
    assert len(batches) == 14 and all(len(b[1]) == 100 for b in batches)


def test_make_loader_validates():
    ds = load_dataset("digits").test
    with pytest.raises(ConfigError):
        make_loader(ds, batch_size=0)
    with pytest.raises(ConfigError):
        make_loader(ds, num_workers=-1)


# ------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------


def _check_cifar10(splits: DataSplits, rows: np.ndarray, labels: np.ndarray) -> None:
    tr = splits.train
    assert tr.images.shape == (5 * PER_BATCH, 3, 32, 32) and tr.images.dtype == torch.uint8
    assert tr.labels.tolist() == labels.tolist()
    assert splits.test.labels.tolist() == [9, 0, 5] and len(splits.test) == 3
    assert splits.info.num_classes == 10 and splits.info.input_shape == (3, 32, 32)
    assert splits.info.mean == (0.4914, 0.4822, 0.4465)
    # row-major channel layout: the first 1024 bytes are red, then green, then blue
    n = 6  # image 2 of data_batch_2
    for c, h, w in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 5, 17)]:
        assert int(tr.images[n, c, h, w]) == int(rows[n, c * 1024 + h * 32 + w])
    x, y = tr[n]
    assert x.dtype == torch.float32 and y == int(labels[n])
    assert float(x[2, 31, 31]) == pytest.approx(rows[n, 3071] / 255)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_cifar10_from_folder_parent_and_tarball(tmp_path):
    folder, rows, labels = make_cifar10(tmp_path / "data")
    _check_cifar10(load_dataset("cifar10", root=folder), rows, labels)
    _check_cifar10(load_dataset("cifar10", root=str(tmp_path / "data")), rows, labels)
    archive = make_tarball(folder, tmp_path / "cifar-10-python.tar.gz")
    _check_cifar10(load_dataset("cifar10", root=archive), rows, labels)
    only_tar = tmp_path / "only_tar"
    only_tar.mkdir()
    archive.rename(only_tar / archive.name)
    _check_cifar10(load_dataset("cifar10", root=only_tar), rows, labels)
    assert not (only_tar / "cifar-10-batches-py").exists()  # read in place, not extracted


def test_cifar100_fine_labels(tmp_path):
    folder = make_cifar100(tmp_path)
    for root in (tmp_path, folder):
        splits = load_dataset("cifar100", root=root)
        assert splits.info.num_classes == 100
        assert splits.train.labels.tolist() == [99, 0, 42, 7, 7, 63]
        assert splits.test.labels.tolist() == [5, 55]
        assert int(splits.train.images[2, 1, 0, 3]) == int(cifar_rows(6, 3)[2, 1024 + 3])
    archive = make_tarball(folder, tmp_path / "cifar-100-python.tar.gz")
    assert load_dataset("cifar100", root=archive).test.labels.tolist() == [5, 55]


def test_cifar_missing_folder_names_expected_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", root=tmp_path)
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg
    assert str(tmp_path) in msg and "download=True" in msg and "\n" not in msg
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path / "does-not-exist")


def test_cifar_partial_folder_names_missing_batch(tmp_path):
    folder, _, _ = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", root=folder)
    (folder / "data_batch_1").unlink()
    with pytest.raises(DataError, match="data_batch_1, data_batch_3"):
        load_dataset("cifar10", root=folder)


def test_cifar_truncated_pickle(tmp_path):
    folder, _, _ = make_cifar10(tmp_path)
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset("cifar10", root=folder)


@pytest.mark.parametrize(
    "content",
    [
        {b"labels": [0] * PER_BATCH},  # no data
        {b"data": np.zeros((PER_BATCH, 100), np.uint8), b"labels": [0] * PER_BATCH},
        {b"data": np.zeros((PER_BATCH, 3072), np.float32), b"labels": [0] * PER_BATCH},
        {b"data": np.zeros((PER_BATCH, 3072), np.uint8), b"labels": [0]},
        {b"data": np.zeros((PER_BATCH, 3072), np.uint8), b"labels": [10] * PER_BATCH},
        [1, 2, 3],  # not a dict
    ],
)
def test_cifar_wrong_content(tmp_path, content):
    folder, _, _ = make_cifar10(tmp_path)
    write_pickle(folder / "data_batch_4", content)
    with pytest.raises(DataError):
        load_dataset("cifar10", root=folder)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_with_disallowed_global_is_not_executed(tmp_path):
    folder, _, _ = make_cifar10(tmp_path / "data")
    marker = tmp_path / "pwned"
    write_pickle(folder / "data_batch_1", {b"data": _Evil(marker), b"labels": [0]})
    assert b"system" in (folder / "data_batch_1").read_bytes()
    with pytest.raises(DataError, match="system"):
        load_dataset("cifar10", root=folder)
    assert not marker.exists()


def test_cifar_pickle_protocols_and_str_keys(tmp_path):
    folder, rows, labels = make_cifar10(tmp_path)
    for proto in (2, 5):
        with open(folder / "data_batch_1", "wb") as fh:
            pickle.dump(
                {"data": rows[:PER_BATCH], "labels": labels[:PER_BATCH]}, fh, protocol=proto
            )
        splits = load_dataset("cifar10", root=folder)
        assert torch.equal(
            splits.train.images[:PER_BATCH].reshape(PER_BATCH, -1),
            torch.from_numpy(rows[:PER_BATCH]),
        )


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 ``str`` (BINSTRING), as the official batches do."""

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def test_cifar_python2_style_pickle(tmp_path):
    folder, rows, _ = make_cifar10(tmp_path)
    buf = io.BytesIO()
    batch = {"batch_label": "training batch 1 of 5", "labels": [7, 6, 5, 4], "data": rows[:4]}
    _Py2Pickler(buf, protocol=2).dump(batch)
    raw = buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    (folder / "data_batch_1").write_bytes(raw)
    splits = load_dataset("cifar10", root=folder)
    assert splits.train.labels[:4].tolist() == [7, 6, 5, 4]
    assert torch.equal(splits.train.images[:4].reshape(4, -1), torch.from_numpy(rows[:4]))


def test_cifar_bad_tarball(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError, match=re.escape("cifar-10-python.tar.gz")):
        load_dataset("cifar10", root=bad)
    with pytest.raises(DataError):
        load_dataset("cifar10", root=tmp_path)
    # a valid tarball without the batches
    other = tmp_path / "x"
    other.mkdir()
    (other / "readme").write_text("hi")
    make_tarball(other, bad)
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", root=bad)


# ------------------------------------------------------------------------------------------
# SVHN
# ------------------------------------------------------------------------------------------


def test_svhn_layout_and_label_10_is_0(tmp_path):
    x = make_svhn(tmp_path)
    splits = load_dataset("svhn", root=tmp_path)
    tr = splits.train
    assert tr.images.shape == (5, 3, 32, 32) and tr.images.dtype == torch.uint8
    assert tr.labels.tolist() == [0, 1, 9, 0, 3]
    assert splits.test.labels.tolist() == [2, 0, 4]
    for n, c, h, w in [(0, 0, 0, 0), (1, 2, 3, 4), (4, 1, 31, 0), (2, 0, 7, 30)]:
        assert int(tr.images[n, c, h, w]) == int(x[h, w, c, n])
    assert splits.info.num_classes == 10 and splits.info.input_shape == (3, 32, 32)


def test_svhn_missing_and_wrong_format(tmp_path):
    with pytest.raises(DataError, match=re.escape("train_32x32.mat")):
        load_dataset("svhn", root=tmp_path)
    make_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"images": np.zeros((2, 2))})
    with pytest.raises(DataError, match="'X'"):
        load_dataset("svhn", root=tmp_path)
    (tmp_path / "train_32x32.mat").write_bytes(b"garbage, not MATLAB")
    with pytest.raises(DataError, match=re.escape("train_32x32.mat")):
        load_dataset("svhn", root=tmp_path)
    scipy.io.savemat(
        tmp_path / "train_32x32.mat",
        {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [2], [3]])},
    )
    with pytest.raises(DataError, match="labels"):
        load_dataset("svhn", root=tmp_path)


# ------------------------------------------------------------------------------------------
# Image folder
# ------------------------------------------------------------------------------------------


def _img(path: Path, color, size=(10, 6), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def make_imagefolder(root: Path, eval_name: str = "val") -> None:
    _img(root / "train" / "zebra" / "a.png", (255, 0, 0))
    _img(root / "train" / "zebra" / "b.jpg", (0, 255, 0), size=(20, 30))
    _img(root / "train" / "ant" / "c.png", 128, mode="L")  # grayscale -> RGB
    _img(root / "train" / "mole" / "d.PNG", (0, 0, 255))
    (root / "train" / "mole" / "notes.txt").write_text("ignored")
    _img(root / eval_name / "zebra" / "e.png", (10, 20, 30), size=(3, 3))
    _img(root / eval_name / "mole" / "f.png", (0, 0, 255))


def test_imagefolder_mapping_and_resize(tmp_path):
    make_imagefolder(tmp_path)
    splits = load_dataset("imagefolder", root=tmp_path, image_size=16)
    tr, te = splits.train, splits.test
    assert tr.classes == ["ant", "mole", "zebra"]
    assert splits.info.num_classes == 3 and splits.info.input_shape == (3, 16, 16)
    assert splits.info.mean == (0.485, 0.456, 0.406)
    assert [(p.name, y) for p, y in tr.samples] == [
        ("c.png", 0),
        ("d.PNG", 1),
        ("a.png", 2),
        ("b.jpg", 2),
    ]
    assert [(p.name, y) for p, y in te.samples] == [("f.png", 1), ("e.png", 2)]  # same mapping
    x, y = tr[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    assert torch.allclose(x, torch.full_like(x, 128 / 255))
    x, y = tr[2]
    assert y == 2 and torch.allclose(x[0], torch.ones(16, 16)) and float(x[1:].max()) == 0.0
    x, _ = tr[3]  # JPEG: approximately green
    assert float(x[1].mean()) > 0.9 and float(x[0].mean()) < 0.1
    x, y = te[1]
    assert y == 2 and x.shape == (3, 16, 16)
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 20, 30]) / 255)
    xb, yb = next(iter(make_loader(tr, batch_size=4)))
    assert xb.shape == (4, 3, 16, 16) and yb.tolist() == [0, 1, 2, 2]
    assert load_dataset("imagefolder", root=tmp_path).train[0][0].shape == (3, 64, 64)


def test_imagefolder_test_dir_and_val_split(tmp_path):
    make_imagefolder(tmp_path, eval_name="test")
    splits = load_dataset("imagefolder", root=tmp_path, image_size=8, val_fraction=0.25)
    assert len(splits.test) == 2 and len(splits.val) == 1 and len(splits.train) == 3
    assert splits.val.classes == splits.train.classes


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="train"):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(DataError, match="root"):
        load_dataset("imagefolder")
    make_imagefolder(tmp_path)
    _img(tmp_path / "val" / "unicorn" / "u.png", (1, 2, 3))
    with pytest.raises(DataError, match="unicorn"):
        load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "val" / "unicorn" / "u.png").unlink()
    (tmp_path / "val" / "unicorn").rmdir()
    (tmp_path / "train" / "ant" / "broken.png").write_bytes(b"not a png")
    splits = load_dataset("imagefolder", root=tmp_path, image_size=8)
    with pytest.raises(DataError, match=re.escape("broken.png")):
        splits.train[0]
    with pytest.raises(ConfigError):
        load_dataset("imagefolder", root=tmp_path, image_size=0)
    missing_val = tmp_path / "other"
    _img(missing_val / "train" / "a" / "x.png", (0, 0, 0))
    with pytest.raises(DataError, match="val"):
        load_dataset("imagefolder", root=missing_val)


# ------------------------------------------------------------------------------------------
# RandomCropFlip
# ------------------------------------------------------------------------------------------


def _batch(n=16, c=3, h=8, w=8) -> torch.Tensor:
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0)) + 0.01


def test_crop_flip_matches_hand_computation():
    x = _batch()
    p = 3
    out = RandomCropFlip(padding=p, flip=True)(x, generator=torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 2 * p + 1, (16,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = torch.zeros(16, 3, 8 + 2 * p, 8 + 2 * p)
    padded[:, :, p : p + 8, p : p + 8] = x
    for n in range(16):
        want = padded[n, :, dy[n] : dy[n] + 8, dx[n] : dx[n] + 8]
        if flip[n]:
            want = want.flip(-1)
        assert torch.equal(out[n], want), n
    assert flip.any() and (~flip).any() and (dy != p).any()


def test_crop_actually_shifts_and_pads_with_zeros():
    x = _batch(n=64)
    out = RandomCropFlip(padding=4, flip=False)(x, generator=torch.Generator().manual_seed(1))
    changed = [not torch.equal(out[n], x[n]) for n in range(64)]
    assert sum(changed) > 48
    assert (out == 0).any()  # zero padding shows up at the borders
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    windows = [(dy, dx) for dy in range(9) for dx in range(9)]
    for n in range(64):  # every output is exactly one window of the zero-padded input
        hits = [
            w
            for w in windows
            if torch.equal(out[n], padded[n, :, w[0] : w[0] + 8, w[1] : w[1] + 8])
        ]
        assert len(hits) == 1


def test_flip_only_and_identity():
    x = _batch(n=32)
    out = RandomCropFlip(padding=0, flip=True)(x, generator=torch.Generator().manual_seed(2))
    flipped = [torch.equal(out[n], x[n].flip(-1)) for n in range(32)]
    same = [torch.equal(out[n], x[n]) for n in range(32)]
    assert all(a or b for a, b in zip(flipped, same))
    assert any(flipped) and any(same)
    ident = RandomCropFlip(padding=0, flip=False)
    assert torch.equal(ident(x), x)
    assert RandomCropFlip(padding=2)(x[0]).shape == x[0].shape  # single image
    u8 = (x * 255).to(torch.uint8)
    assert RandomCropFlip(padding=2)(u8).dtype == torch.uint8


def test_crop_flip_default_rng_and_validation():
    x = _batch()
    torch.manual_seed(0)
    a = RandomCropFlip()(x)
    torch.manual_seed(0)
    b = RandomCropFlip()(x)
    assert torch.equal(a, b)
    with pytest.raises(ConfigError):
        RandomCropFlip(padding=-1)
    with pytest.raises(ConfigError):
        RandomCropFlip()(torch.zeros(8, 8))


def test_tensor_dataset_getitems_matches_getitem():
    ds = load_dataset("digits").test
    items = ds.__getitems__([5, 0, 7])
    for (x, y), i in zip(items, [5, 0, 7]):
        x2, y2 = ds[i]
        assert torch.equal(x, x2) and y == y2
