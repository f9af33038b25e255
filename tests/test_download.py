"""Verified downloads from local ``file://`` URLs: hashing, atomicity, safe extraction."""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from advprune.data import SOURCES, Source, download_and_extract, load_dataset
from advprune.data import download as download_mod
from advprune.errors import ConfigError, DataError


def make_cifar10(parent: Path) -> Path:
    """A tiny cifar-10-batches-py folder (4 images per train batch, 3 test images)."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]
    for name in batches:
        n = 3 if name == "test_batch" else 4
        labels = [9, 0, 5] if name == "test_batch" else [1, 2, 3, 4]
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, fh)
    return folder


def make_tarball(folder: Path, archive: Path) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar_archive(tmp_path) -> Path:
    folder = make_cifar10(tmp_path / "src")
    archive = make_tarball(folder, tmp_path / "mirror" / "cifar-10-python.tar.gz")
    return archive


def test_official_sources_table():
    assert SOURCES["cifar10"][0].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert SOURCES["cifar100"][0].url.endswith("/~kriz/cifar-100-python.tar.gz")
    assert [s.filename for s in SOURCES["svhn"]] == ["train_32x32.mat", "test_32x32.mat"]
    assert SOURCES["cifar10"][0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert SOURCES["cifar100"][0].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    for sources in SOURCES.values():
        for src in sources:
            assert src.sha256 or src.md5
            if src.sha256:
                assert re.fullmatch(r"[0-9a-f]{64}", src.sha256)
            if src.md5:
                assert re.fullmatch(r"[0-9a-f]{32}", src.md5)
    assert "imagefolder" not in SOURCES and "digits" not in SOURCES


def test_download_extract_and_load_then_no_redownload(tmp_path, cifar_archive, monkeypatch):
    monkeypatch.setitem(
        SOURCES,
        "cifar10",
        [
            Source(
                cifar_archive.as_uri(), "cifar-10-python.tar.gz", sha256(cifar_archive), None, True
            )
        ],
    )
    root = tmp_path / "data"
    splits = load_dataset("cifar10", root=root, download=True)
    assert len(splits.train) == 20 and len(splits.test) == 3
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert sorted(p.name for p in root.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]
    # second call: the source is gone, but nothing needs fetching
    cifar_archive.unlink()
    again = load_dataset("cifar10", root=root, download=True)
    assert torch.equal(again.train.images, splits.train.images)
    path = download_and_extract(
        cifar_archive.as_uri(), root, SOURCES["cifar10"][0].sha256, progress=False
    )
    assert path == root / "cifar-10-python.tar.gz"


def test_download_function_directly(tmp_path, cifar_archive):
    root = tmp_path / "dl"
    path = download_and_extract(
        cifar_archive.as_uri(), root, sha256(cifar_archive), filename="c.tar.gz", progress=False
    )
    assert path == root / "c.tar.gz" and sha256(path) == sha256(cifar_archive)
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    # extract=False keeps just the file
    root2 = tmp_path / "dl2"
    download_and_extract(cifar_archive.as_uri(), root2, sha256(cifar_archive), extract=False)
    assert [p.name for p in root2.iterdir()] == ["cifar-10-python.tar.gz"]


def test_wrong_hash_leaves_nothing(tmp_path, cifar_archive, monkeypatch):
    bad = "0" * 64
    monkeypatch.setitem(
        SOURCES,
        "cifar10",
        [Source(cifar_archive.as_uri(), "cifar-10-python.tar.gz", bad, None, True)],
    )
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", root=root, download=True)
    msg = str(err.value)
    assert bad in msg and sha256(cifar_archive) in msg and "\n" not in msg
    assert list(root.iterdir()) == []  # no temp file, no archive, no extracted folder


def test_wrong_md5_leaves_nothing(tmp_path, cifar_archive):
    with pytest.raises(DataError, match=md5(cifar_archive)):
        download_and_extract(cifar_archive.as_uri(), tmp_path / "r", None, md5="1" * 32)
    assert list((tmp_path / "r").iterdir()) == []


def test_corrupt_local_file_is_replaced(tmp_path, cifar_archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"partial download")
    download_and_extract(cifar_archive.as_uri(), root, sha256(cifar_archive), progress=False)
    assert sha256(root / "cifar-10-python.tar.gz") == sha256(cifar_archive)
    assert load_dataset("cifar10", root=root).test.labels.tolist() == [9, 0, 5]


def test_svhn_download_verified_by_md5(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    x = np.arange(32 * 32 * 3 * 2, dtype=np.int64).reshape(32, 32, 3, 2) % 256
    sources = []
    for name in ("train_32x32.mat", "test_32x32.mat"):
        scipy.io.savemat(mirror / name, {"X": x.astype(np.uint8), "y": np.array([[10], [7]])})
        sources.append(Source((mirror / name).as_uri(), name, None, md5(mirror / name), False))
    monkeypatch.setitem(SOURCES, "svhn", sources)
    splits = load_dataset("svhn", root=tmp_path / "svhn", download=True)
    assert splits.train.labels.tolist() == [0, 7] and splits.test.images.shape == (2, 3, 32, 32)
    assert sorted(p.name for p in (tmp_path / "svhn").iterdir()) == [
        "test_32x32.mat",
        "train_32x32.mat",
    ]


def test_missing_url_is_data_error(tmp_path):
    root = tmp_path / "r"
    with pytest.raises(DataError, match="could not download"):
        download_and_extract((tmp_path / "nope.tar.gz").as_uri(), root, "a" * 64)
    assert list(root.iterdir()) == []


def test_hash_required_and_validated(tmp_path):
    with pytest.raises(ConfigError):
        download_and_extract("file:///x.tar.gz", tmp_path, None)
    with pytest.raises(ConfigError):
        download_and_extract("file:///x.tar.gz", tmp_path, "not-a-hash")


def test_imagefolder_has_no_download(tmp_path):
    with pytest.raises(DataError, match="cannot be downloaded"):
        load_dataset("imagefolder", root=tmp_path, download=True)
    with pytest.raises(DataError, match="no download"):
        download_mod.sources_for("imagefolder")


def _tar_with(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return archive


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


@pytest.mark.parametrize(
    "members",
    [
        [_file("ok/a.txt"), _file("../escape.txt")],
        [_file("ok/a.txt"), _file("ok/../../escape.txt")],
        [_file("/tmp/absolute-escape.txt")],
        [_file("ok/a.txt"), _link("ok/link", "/etc/passwd")],
    ],
)
def test_unsafe_archive_rejected_and_nothing_extracted(tmp_path, members):
    archive = _tar_with(tmp_path, members)
    root = tmp_path / "root"
    with pytest.raises(DataError, match="refusing"):
        download_and_extract(archive.as_uri(), root, sha256(archive), progress=False)
    assert [p.name for p in root.iterdir()] == ["evil.tar.gz"]  # verified file only
    assert not (tmp_path / "escape.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()
