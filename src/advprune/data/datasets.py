"""Dataset registry and readers for the official file formats (no torchvision needed).

Every dataset item is ``(x, y)`` with ``x`` a float32 ``(C, H, W)`` tensor in ``[0, 1]`` and
``y`` a Python int. Normalisation is *not* applied here: :class:`DatasetInfo` carries the
per-channel ``mean``/``std`` for the model's own Normalize layer.

Formats read:

- ``digits``: scikit-learn's bundled 8x8 digits (no files needed).
- ``cifar10`` / ``cifar100``: the official "python version" pickle batches, from the extracted
  folder, its parent, or straight out of the ``.tar.gz``; unpickled with a restricted unpickler
  that only rebuilds numpy arrays.
- ``svhn``: the official ``train_32x32.mat`` / ``test_32x32.mat`` (cropped digits).
- ``imagefolder``: ``root/train/<class>/*.png|jpg...`` and ``root/val/<class>/...`` (or
  ``test/``), loaded lazily with Pillow and resized to ``image_size``.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from advprune.data import download as _download
from advprune.errors import ConfigError, DataError, UnknownNameError
from advprune.registry import Registry

__all__ = [
    "DataSplits",
    "DatasetInfo",
    "ImageFolderDataset",
    "TensorImageDataset",
    "default_data_root",
    "list_datasets",
    "load_dataset",
    "make_loader",
    "stratified_split",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel statistics of the digits train split (pixels / 16), rounded to 4 decimals.
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3761,)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: classes, input shape and normalisation constants."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return {
            "name": self.name,
            "num_classes": int(self.num_classes),
            "input_shape": [int(v) for v in self.input_shape],
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                name=str(d["name"]),
                num_classes=int(d["num_classes"]),
                input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed dataset info {d!r}: {exc}") from None


@dataclass
class DataSplits:
    """The splits of one dataset; ``val`` is None unless ``val_fraction > 0``."""

    train: Dataset
    test: Dataset
    val: Dataset | None
    info: DatasetInfo


class TensorImageDataset(Dataset):
    """In-memory images ``(N, C, H, W)``, uint8 (divided by 255 on access) or float in [0, 1]."""

    def __init__(self, images: torch.Tensor | np.ndarray, labels: Any) -> None:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise ConfigError(f"images must be a tensor or array, got {type(images).__name__}")
        if images.dim() != 4:
            raise ConfigError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            pass
        elif images.is_floating_point():
            images = images.to(torch.float32)
            if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
                raise ConfigError(
                    "float images must be in [0, 1] "
                    f"(got min {float(images.min()):.4g}, max {float(images.max()):.4g})"
                )
        else:
            raise ConfigError(f"images must be uint8 or float, got {images.dtype}")
        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu()
        labels_np = np.asarray(labels)
        if labels_np.ndim != 1 or (labels_np.size and labels_np.dtype.kind not in "iub"):
            raise ConfigError(
                f"labels must be a 1-D sequence of integers, got shape {labels_np.shape} "
                f"dtype {labels_np.dtype}"
            )
        if len(labels_np) != images.shape[0]:
            raise ConfigError(
                f"{images.shape[0]} images but {len(labels_np)} labels; they must match"
            )
        if labels_np.size and labels_np.min() < 0:
            raise ConfigError(f"labels must be >= 0, got {int(labels_np.min())}")
        self.images = images
        self.labels = torch.as_tensor(labels_np.astype(np.int64))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _to_float(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._to_float(self.images[index]), int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by DataLoader: one gather instead of one per item."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        xs = self._to_float(self.images[idx])
        return list(zip(xs.unbind(0), self.labels[idx].tolist()))

    def subset(self, indices: Sequence[int] | np.ndarray) -> TensorImageDataset:
        """A new dataset with the items at ``indices`` (in that order)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorImageDataset(self.images[idx], self.labels[idx])


class ImageFolderDataset(Dataset):
    """Images on disk, loaded lazily with Pillow, converted to RGB and resized to a square."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        image_size: int,
    ) -> None:
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.image_size = int(image_size)
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.samples[index]
        size = self.image_size
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
                arr = np.array(rgb, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(
                f"imagefolder: cannot read image {path} ({exc}); remove or replace it"
            ) from None
        x = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return x, label

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFolderDataset:
        """A new dataset with the samples at ``indices`` (in that order)."""
        return ImageFolderDataset(
            [self.samples[int(i)] for i in indices], self.classes, self.image_size
        )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_Loader = Callable[..., tuple[Dataset, Dataset, DatasetInfo]]
_REGISTRY: Registry[_Loader] = Registry("dataset")


def register_dataset(name: str) -> Callable[[_Loader], _Loader]:
    """Decorator registering ``loader(root, download, image_size) -> (train, test, info)``
    under ``name`` (``root`` is a folder or None; see :func:`load_dataset`)."""
    return _REGISTRY.register(name)


_register = register_dataset


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return _REGISTRY.names()


def default_data_root() -> Path:
    """``$ADVPRUNE_DATA_ROOT`` if set, else ``~/.cache/advprune/data``."""
    env = os.environ.get("ADVPRUNE_DATA_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "advprune" / "data"


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_size: int = 64,
) -> DataSplits:
    """Load dataset ``name`` (see :func:`list_datasets`) from ``root``.

    ``download=True`` fetches missing official files into ``root`` (hash-verified).
    ``val_fraction`` in [0, 1) carves a seeded, stratified validation split out of *train*;
    the test split is never touched. ``image_size`` applies to ``imagefolder`` only.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise UnknownNameError("dataset", str(name), list_datasets())
    val_fraction = _check_fraction(val_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or (image_size < 1)
    ):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    root_path = Path(root).expanduser() if root is not None else None
    train, test, info = _REGISTRY[key](
        root=root_path, download=bool(download), image_size=int(image_size)
    )
    val = None
    if val_fraction > 0:
        labels = _labels_of(train)
        train_idx, val_idx = stratified_split(labels, val_fraction, seed=int(seed))
        train, val = _subset(train, train_idx), _subset(train, val_idx)
    return DataSplits(train=train, test=test, val=val, info=info)


def _check_fraction(value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {value!r}")
    try:
        frac = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"val_fraction must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= frac < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {value!r}")
    return frac


def stratified_split(
    labels: Sequence[int] | np.ndarray | torch.Tensor, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of ``range(len(labels))`` into (keep, held_out) sorted indices.

    ``round(fraction * N)`` items are held out, allotted to classes in proportion to their size
    (largest remainder), and drawn per class with ``numpy.random.default_rng(seed)``.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    n = len(y)
    n_out = round(fraction * n)
    if n_out < 1 or n_out >= n:
        raise ConfigError(
            f"val_fraction={fraction} of {n} training samples gives {n_out} validation samples; "
            "choose a fraction that leaves at least one sample on each side"
        )
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * n_out / n
    quota = np.floor(exact).astype(np.int64)
    remaining = n_out - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:remaining]] += 1
    rng = np.random.default_rng(seed)
    held = []
    for cls, q in zip(classes, quota):
        members = np.flatnonzero(y == cls)
        held.append(rng.permutation(members)[:q])
    held_idx = np.sort(np.concatenate(held))
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def _labels_of(ds: Dataset) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


def _subset(ds: Dataset, indices: np.ndarray) -> Dataset:
    if hasattr(ds, "subset"):
        return ds.subset(indices)
    return torch.utils.data.Subset(ds, indices.tolist())


def make_loader(
    dataset: Dataset,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling uses its own ``torch.Generator`` seeded with ``seed``.

    Two loaders made with the same arguments yield the same batches in the same order, epoch
    after epoch; the global RNG state neither affects nor is affected by them.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(shuffle),
        generator=generator,
        num_workers=num_workers,
        drop_last=bool(drop_last),
        persistent_workers=num_workers > 0,
    )


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@_register("digits")
def _load_digits(root: Path | None, download: bool, image_size: int) -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    info = DatasetInfo("digits", 10, (1, 8, 8), DIGITS_MEAN, DIGITS_STD)
    return TensorImageDataset(x_tr, y_tr), TensorImageDataset(x_te, y_te), info


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------


def _latin1_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding.lower().replace("-", "") not in ("latin1", "utf8"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return obj.encode(encoding)


_NP_RECONSTRUCT = np.array([0]).__reduce__()[0]
_NP_SCALAR = np.float64(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_mod, "_reconstruct")] = _NP_RECONSTRUCT
    _ALLOWED_GLOBALS[(_mod, "scalar")] = _NP_SCALAR
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED_GLOBALS[(_mod, "_frombuffer")] = _NP_FROMBUFFER


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays, dtypes and plain containers."""

    source = "pickle"

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source} references {module}.{name}, which a CIFAR batch never does; "
                "refusing to load it (the file is not an official CIFAR pickle)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source} uses persistent ids; it is not an official CIFAR pickle")


def _unpickle(data: bytes, source: str) -> dict[str, Any]:
    unpickler = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes")
    unpickler.source = source
    try:
        obj = unpickler.load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{source} is not a valid CIFAR pickle ({type(exc).__name__}: {exc}); "
            "delete it and download again"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{source} holds a {type(obj).__name__}, expected a CIFAR batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    expected: str  # human description of the folder contents


_CIFAR10 = _CifarSpec(
    "cifar10",
    "cifar-10-batches-py",
    "cifar-10-python.tar.gz",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "labels",
    10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    "data_batch_1..5 and test_batch",
)
_CIFAR100 = _CifarSpec(
    "cifar100",
    "cifar-100-python",
    "cifar-100-python.tar.gz",
    ("train",),
    ("test",),
    "fine_labels",
    100,
    CIFAR100_MEAN,
    CIFAR100_STD,
    "train and test",
)


def _is_archive_name(path: Path) -> bool:
    return path.name.lower().endswith((".tar.gz", ".tgz", ".tar"))


def _locate_cifar(spec: _CifarSpec, root: Path) -> tuple[str, Path] | str:
    """Return ("dir", folder) or ("tar", archive), or a hint string saying what is missing."""
    files = spec.train_files + spec.test_files
    if root.is_file():
        if _is_archive_name(root):
            return ("tar", root)
        return f"{root} is a file, not the folder or .tar.gz archive"
    hint = ""
    for folder in (root, root / spec.folder):
        looks_like = folder.name == spec.folder or any((folder / f).exists() for f in files)
        if folder.is_dir() and looks_like:
            missing = [f for f in files if not (folder / f).is_file()]
            if not missing:
                return ("dir", folder)
            hint = f"{folder} lacks {', '.join(missing)}"
    if (root / spec.archive).is_file():
        return ("tar", root / spec.archive)
    return hint


def _cifar_missing(spec: _CifarSpec, root: Path, hint: str) -> DataError:
    detail = f" ({hint})" if hint else ""
    return DataError(
        f"{spec.name}: expected folder '{spec.folder}' with {spec.expected}, or {spec.archive}, "
        f"under {root}{detail}; pass --download (download=True) or --data-root DIR"
    )


def _read_cifar_members(spec: _CifarSpec, archive: Path) -> dict[str, bytes]:
    wanted = spec.train_files + spec.test_files
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = member.name.replace("\\", "/").lstrip("./").split("/")
                if (
                    member.isfile()
                    and len(parts) == 2
                    and parts[0] == spec.folder
                    and parts[1] in wanted
                ):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        out[parts[1]] = fh.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(
            f"{spec.name}: {archive} is not a readable .tar.gz ({exc}); "
            "delete it and pass --download (download=True)"
        ) from None
    missing = [f for f in wanted if f not in out]
    if missing:
        raise DataError(
            f"{spec.name}: {archive} has no {', '.join(spec.folder + '/' + m for m in missing)}; "
            f"expected the official {spec.archive}"
        )
    return out


def _parse_cifar_batch(spec: _CifarSpec, raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(raw, source)
    if "data" not in batch or spec.label_key not in batch:
        raise DataError(
            f"{source} has keys {sorted(batch)}, expected 'data' and '{spec.label_key}' "
            f"(is it a {spec.name} batch?)"
        )
    data = batch["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * 32 * 32)
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{source}: 'data' is a {desc}, expected uint8 of shape (N, 3072)")
    try:
        labels = np.asarray(batch[spec.label_key]).astype(np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{source}: '{spec.label_key}' is not a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise DataError(
            f"{source}: {data.shape[0]} images but '{spec.label_key}' has shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(
            f"{source}: labels must be in [0, {spec.num_classes}), got "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(spec: _CifarSpec, root: Path | None, download: bool) -> tuple:
    root = root if root is not None else default_data_root()
    found = _locate_cifar(spec, root)
    if isinstance(found, str) and download:
        for src in _download.sources_for(spec.name):
            _download.download_and_extract(
                src.url, root, src.sha256, filename=src.filename, extract=src.extract, md5=src.md5
            )
        found = _locate_cifar(spec, root)
    if isinstance(found, str):
        raise _cifar_missing(spec, root, found)
    kind, path = found
    if kind == "tar":
        raw = _read_cifar_members(spec, path)
    else:
        raw = {}
        for f in spec.train_files + spec.test_files:
            try:
                raw[f] = (path / f).read_bytes()
            except OSError as exc:
                raise DataError(f"{spec.name}: cannot read {path / f} ({exc})") from None

    def gather(files: tuple[str, ...]) -> TensorImageDataset:
        parts = [_parse_cifar_batch(spec, raw[f], f"{spec.name} file {path}:{f}") for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return TensorImageDataset(images, labels)

    info = DatasetInfo(spec.name, spec.num_classes, (3, 32, 32), spec.mean, spec.std)
    return gather(spec.train_files), gather(spec.test_files), info


@_register("cifar10")
def _load_cifar10(root: Path | None, download: bool, image_size: int) -> tuple:
    return _load_cifar(_CIFAR10, root, download)


@_register("cifar100")
def _load_cifar100(root: Path | None, download: bool, image_size: int) -> tuple:
    return _load_cifar(_CIFAR100, root, download)


# --------------------------------------------------------------------------------------------
# SVHN
# --------------------------------------------------------------------------------------------

_SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def _read_svhn(path: Path) -> TensorImageDataset:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises ValueError, MatReadError, NotImplementedError, ...
        raise DataError(
            f"svhn: {path} is not a readable MATLAB file ({type(exc).__name__}: {exc}); "
            "expected the official file from ufldl.stanford.edu/housenumbers"
        ) from None
    if "X" not in mat or "y" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"svhn: {path} has variables {keys}, expected 'X' and 'y'")
    x, y = mat["X"], mat["y"]
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[2] != 3:
        raise DataError(
            f"svhn: {path}: 'X' has shape {getattr(x, 'shape', None)}, expected (32, 32, 3, N)"
        )
    if x.dtype != np.uint8:
        if x.dtype.kind not in "iu" or (x.size and (x.min() < 0 or x.max() > 255)):
            raise DataError(f"svhn: {path}: 'X' is {x.dtype}, expected uint8 pixels")
        x = x.astype(np.uint8)
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise DataError(f"svhn: {path}: {x.shape[3]} images but {y.shape[0]} labels")
    try:
        y = y.astype(np.int64)
    except (TypeError, ValueError):
        raise DataError(f"svhn: {path}: 'y' is not numeric") from None
    y[y == 10] = 0
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"svhn: {path}: labels must be 1..10, got {y.min()}..{y.max()}")
    return TensorImageDataset(np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y)


@_register("svhn")
def _load_svhn(root: Path | None, download: bool, image_size: int) -> tuple:
    root = root if root is not None else default_data_root()
    if root.is_file():
        raise DataError(f"svhn: {root} is a file; pass the folder holding train_32x32.mat")
    paths = {split: root / fname for split, fname in _SVHN_FILES.items()}
    missing = [p for p in paths.values() if not p.is_file()]
    if missing and download:
        for src in _download.sources_for("svhn"):
            if not (root / src.filename).is_file():
                _download.download_and_extract(
                    src.url,
                    root,
                    src.sha256,
                    filename=src.filename,
                    extract=src.extract,
                    md5=src.md5,
                )
        missing = [p for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(
            f"svhn: expected {' and '.join(p.name for p in missing)} under {root}; "
            "pass --download (download=True) or --data-root DIR"
        )
    info = DatasetInfo("svhn", 10, (3, 32, 32), SVHN_MEAN, SVHN_STD)
    return _read_svhn(paths["train"]), _read_svhn(paths["test"]), info


# --------------------------------------------------------------------------------------------
# Image folder (ImageNet-100 style)
# --------------------------------------------------------------------------------------------


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


@_register("imagefolder")
def _load_imagefolder(root: Path | None, download: bool, image_size: int) -> tuple:
    layout = "root/train/<class>/*.jpg|png and root/val/<class>/... (or test/)"
    if root is None:
        raise DataError(f"imagefolder: needs a root folder laid out as {layout}; pass --data-root")
    note = " (imagefolder data cannot be downloaded)" if download else ""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"imagefolder: expected folder {train_dir} laid out as {layout}{note}")
    eval_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if eval_dir is None:
        raise DataError(
            f"imagefolder: expected folder {root / 'val'} (or {root / 'test'}) "
            f"next to {train_dir}, laid out as {layout}{note}"
        )
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"imagefolder: {train_dir} has no class folders; expected {layout}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in _class_dirs(eval_dir) if c not in class_to_idx]
    if unknown:
        raise DataError(
            f"imagefolder: {eval_dir} has classes not in {train_dir}: {', '.join(unknown[:5])}; "
            "train and val must share class folders"
        )

    def scan(split_dir: Path, require_all: bool) -> list[tuple[Path, int]]:
        samples = []
        for cls in _class_dirs(split_dir):
            files = _images_in(split_dir / cls)
            if not files and require_all:
                raise DataError(
                    f"imagefolder: class folder {split_dir / cls} has no images "
                    f"({', '.join(IMAGE_EXTENSIONS)})"
                )
            samples.extend((f, class_to_idx[cls]) for f in files)
        if not samples:
            raise DataError(f"imagefolder: {split_dir} contains no images; expected {layout}")
        return samples

    train = ImageFolderDataset(scan(train_dir, True), classes, image_size)
    test = ImageFolderDataset(scan(eval_dir, False), classes, image_size)
    info = DatasetInfo(
        "imagefolder", len(classes), (3, image_size, image_size), IMAGENET_MEAN, IMAGENET_STD
    )
    return train, test, info
