"""Hash-verified, atomic downloads of the official dataset files.

Every file is fetched with :mod:`urllib.request` (so ``file://`` URLs work too) into a temporary
file inside ``root``; its hash is checked *before* the file is renamed into place or anything is
extracted. Archives are extracted into a temporary folder first (rejecting absolute paths, ``..``
and links) and only then moved into ``root``, so a failure leaves nothing half-written behind.

:data:`SOURCES` holds the official URL and hash of every downloadable dataset; tests and mirrors
may replace its entries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from advprune.errors import ConfigError, DataError
from advprune.progress import ProgressSetting
from advprune.progress import progress as progress_of

__all__ = ["SOURCES", "Source", "download_and_extract", "file_hash", "sources_for"]

_CHUNK = 1 << 20
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class Source:
    """One downloadable file: where it lives and how to verify it.

    ``sha256`` is preferred; where no sha256 is known for certain only the published ``md5``
    is stored (hashes are never guessed). At least one of the two must be given.
    """

    url: str
    filename: str
    sha256: str | None = None
    md5: str | None = None
    extract: bool = False


# Official locations. The CIFAR sha256 values are the ones Keras pins; the md5 values are the
# ones published on the dataset pages (and pinned by torchvision).
SOURCES: dict[str, list[Source]] = {
    "cifar10": [
        Source(
            url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            filename="cifar-10-python.tar.gz",
            sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            md5="c58f30108f718f92721af3b95e74349a",
            extract=True,
        )
    ],
    "cifar100": [
        Source(
            url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            filename="cifar-100-python.tar.gz",
            sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
            md5="eb9058c3a382ffc7106e4002c42a8d85",
            extract=True,
        )
    ],
    "svhn": [
        Source(
            url="http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            filename="train_32x32.mat",
            md5="e26dedcc434d2e4c54c9b2d4a06d8373",
        ),
        Source(
            url="http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            filename="test_32x32.mat",
            md5="eb5a983be6a315427106f1b164d9cef3",
        ),
    ],
}


def sources_for(name: str) -> list[Source]:
    """Return the download sources of dataset ``name`` (looked up in :data:`SOURCES` now)."""
    try:
        return list(SOURCES[name])
    except KeyError:
        raise DataError(f"{name}: no download is available for this dataset") from None


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's contents."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_hashes(sha256: str | None, md5: str | None) -> dict[str, str]:
    expected = {}
    for algo, value in (("sha256", sha256), ("md5", md5)):
        if value is None:
            continue
        value = str(value).strip().lower()
        size = hashlib.new(algo).digest_size * 2
        if len(value) != size or any(c not in "0123456789abcdef" for c in value):
            raise ConfigError(f"{algo} must be {size} hex digits, got {value!r}")
        expected[algo] = value
    if not expected:
        raise ConfigError("download_and_extract needs a sha256 or md5 to verify the download")
    return expected


def _hashes_match(path: Path, expected: dict[str, str]) -> bool:
    return all(file_hash(path, algo) == want for algo, want in expected.items())


def _fetch(url: str, dest: Path, expected: dict[str, str], progress: ProgressSetting) -> None:
    """Download ``url`` to a temp file next to ``dest``, verify it, then rename into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digests = {algo: hashlib.new(algo) for algo in expected}
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                length = resp.headers.get("Content-Length") if resp.headers else None
                total = int(length) if length and length.isdigit() else None
                with progress_of(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    mode=progress,
                ) as bar:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        out.write(chunk)
                        for d in digests.values():
                            d.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DataError(
                f"could not download {url}: {reason}; check the network or place "
                f"{dest.name} in {dest.parent} by hand"
            ) from None
        for algo, want in expected.items():
            got = digests[algo].hexdigest()
            if got != want:
                raise DataError(
                    f"{dest.name} from {url} failed the {algo} check (expected {want}, got {got}); "
                    "the download is corrupt or the file has changed, nothing was kept"
                )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DataError(
            f"{archive} contains an unsafe path {member.name!r}; refusing to extract it"
        )
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"{archive} contains {member.name!r}, which is a link or special file; "
            "refusing to extract it"
        )


def _safe_extract(archive: Path, root: Path) -> list[Path]:
    """Extract ``archive`` into ``root`` via a temporary folder; return the top-level paths."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            tmp_dir = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
            try:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp_dir, members=members, filter="data")
                else:  # pragma: no cover - Python without extraction filters
                    tar.extractall(tmp_dir, members=members)  # members checked above
                placed = []
                for entry in sorted(tmp_dir.iterdir()):
                    target = root / entry.name
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
                    os.replace(entry, target)
                    placed.append(target)
                return placed
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)
    except DataError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(
            f"{archive} is not a readable tar archive ({exc}); delete it and retry"
        ) from None


def download_and_extract(
    url: str,
    root: str | os.PathLike,
    sha256: str | None,
    filename: str | None = None,
    extract: bool = True,
    *,
    md5: str | None = None,
    progress: ProgressSetting = True,
) -> Path:
    """Download ``url`` into ``root`` (verified by ``sha256`` and/or ``md5``) and extract it.

    A file already in ``root`` with the right hash is not downloaded again; one with the wrong
    hash is replaced. ``.tar.gz``/``.tgz``/``.tar`` archives are extracted into ``root`` when
    ``extract`` is true. Returns the path of the downloaded file.
    """
    expected = _expected_hashes(sha256, md5)
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"download folder {root} is a file; pass a folder as the data root")
    if filename is None:
        filename = PurePosixPath(urllib.parse.urlparse(url).path).name
    if not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
        raise ConfigError(f"cannot derive a plain file name from {url!r}; pass filename=")
    root.mkdir(parents=True, exist_ok=True)
    dest = root / filename
    if not (dest.is_file() and _hashes_match(dest, expected)):
        _fetch(url, dest, expected, progress)
    if extract and filename.lower().endswith(_ARCHIVE_SUFFIXES):
        _safe_extract(dest, root)
    return dest
