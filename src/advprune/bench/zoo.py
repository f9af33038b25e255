"""The model zoo: a registry of hashed checkpoints, downloaded into a cache and verified.

A registry (YAML) maps model keys to an entry::

    HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90:
      url: https://example.org/hydra_r18_90.safetensors   # or file://, http://
      sha256: 3f2a...                                      # of that file
      card: {...}                                          # the checkpoint's JSON card

:func:`load_model` downloads the file into the cache (``$ADVPRUNE_CACHE``, else
``~/.cache/advprune/zoo``) as a temporary file, checks its length and sha256, and only then
renames it into place; a truncated or altered download is deleted and is an error. Files are
safetensors, loaded by :func:`advprune.checkpoint.load_checkpoint` (strict, hash-checked); nothing
is ever unpickled. The registry is the ``registry`` argument, else ``$ADVPRUNE_ZOO``, else the
packaged ``data/zoo.yaml``.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from advprune.errors import CheckpointError, ConfigError

__all__ = ["ZooEntry", "add_to_registry", "cache_dir", "fetch", "load_model", "load_registry"]

_CHUNK = 1 << 20


class ZooEntry(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid")
    url: str
    sha256: str
    card: dict[str, Any]

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("sha256 must be 64 lower-case hex digits")
        return value

    @field_validator("card")
    @classmethod
    def _card(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("format") != "advprune-checkpoint" or "architecture" not in value:
            raise ValueError("card must be an advprune checkpoint card (format, architecture)")
        return value


def _registry_path(registry: str | Path | None) -> Path:
    if registry is not None:
        return Path(registry)
    if os.environ.get("ADVPRUNE_ZOO"):
        return Path(os.environ["ADVPRUNE_ZOO"])
    from importlib import resources

    return Path(str(resources.files("advprune.bench") / "data" / "zoo.yaml"))


def load_registry(registry: str | Path | None = None) -> dict[str, ZooEntry]:
    """The registry's entries by model key (validated; a bad entry is a one-line error)."""
    import yaml

    from advprune.bench.keys import parse_key

    path = _registry_path(registry)
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read zoo registry {path} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"zoo registry {path} must map model keys to entries")
    entries = {}
    for key, item in data.items():
        parse_key(str(key))
        try:
            entry = ZooEntry(**(item or {}))
        except (ValidationError, TypeError) as exc:
            msg = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            where = ""
            if isinstance(exc, ValidationError):
                where = ".".join(str(p) for p in exc.errors()[0]["loc"]) + ": "
            raise ConfigError(f"zoo registry {path}: entry {key}: {where}{msg}") from None
        card_hash = (entry.card.get("tensors") or {}).get("sha256")
        if card_hash != entry.sha256:
            raise ConfigError(
                f"zoo registry {path}: entry {key}: the card's tensor sha256 {card_hash} "
                f"is not the entry's {entry.sha256}"
            )
        entries[str(key)] = entry
    return entries


def cache_dir(cache: str | Path | None = None) -> Path:
    """The cache folder: ``cache``, else ``$ADVPRUNE_CACHE``, else ``~/.cache/advprune/zoo``."""
    if cache is not None:
        return Path(cache)
    if os.environ.get("ADVPRUNE_CACHE"):
        return Path(os.environ["ADVPRUNE_CACHE"])
    return Path.home() / ".cache" / "advprune" / "zoo"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, sha256: str) -> None:
    """Stream ``url`` into a temporary file beside ``dest``, renamed onto ``dest`` only if its
    length and sha256 match; any failure leaves nothing behind."""
    from tqdm import tqdm

    from advprune.checkpoint import atomic_path

    h = hashlib.sha256()
    got = 0
    if url.split(":", 1)[0].lower() not in ("file", "http", "https"):
        raise CheckpointError(f"zoo URLs are file://, http:// or https://, got {url!r}")
    with atomic_path(dest) as tmp:
        try:
            response = urllib.request.urlopen(url, timeout=60)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot download {url} ({exc})") from None
        with response, open(tmp, "wb") as fh:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False,
                       disable=total is None or total < 10 * _CHUNK)  # fmt: skip
            with bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    fh.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise CheckpointError(f"download of {url} truncated: {got} of {total} bytes")
        if h.hexdigest() != sha256:
            raise CheckpointError(
                f"download of {url} has sha256 {h.hexdigest()}, expected {sha256} "
                f"({got} bytes; truncated or altered)"
            )


def fetch(key: str, *, registry: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """The verified local checkpoint of ``key`` (downloaded into the cache if needed)."""
    from advprune.checkpoint import write_json_atomic
    from advprune.errors import UnknownNameError

    entries = load_registry(registry)
    if key not in entries:
        raise UnknownNameError("zoo model", key, list(entries) or ["(the registry is empty)"])
    entry = entries[key]
    folder = cache_dir(cache) / key
    path = folder / "model.safetensors"
    if path.exists() and _sha256(path) != entry.sha256:
        path.unlink()  # a corrupted or stale cache file is replaced
    if not path.exists():
        _download(entry.url, path, entry.sha256)
    write_json_atomic(folder / "model.json", entry.card)
    return path


def load_model(
    key: str,
    *,
    registry: str | Path | None = None,
    cache: str | Path | None = None,
    map_location: str = "cpu",
) -> tuple[Any, dict[str, Any]]:
    """Download (if needed), verify and load the zoo model ``key``; return ``(model, card)``."""
    from advprune.checkpoint import load_checkpoint

    return load_checkpoint(fetch(key, registry=registry, cache=cache), map_location=map_location)


def add_to_registry(registry: str | Path, key: str, checkpoint: str | Path, url: str) -> ZooEntry:
    """Add (or replace) ``key`` in the registry file, for the advprune checkpoint served at
    ``url``; the file is rewritten atomically."""
    import yaml

    from advprune.bench.keys import parse_key
    from advprune.checkpoint import atomic_path, read_card, sha256_file, tensor_path

    key = str(parse_key(key))
    path = tensor_path(checkpoint)
    card = read_card(path)
    entry = ZooEntry(url=url, sha256=sha256_file(path), card=card)
    registry = Path(registry)
    data = {}
    if registry.exists():
        load_registry(registry)  # refuse to extend a broken registry
        data = yaml.safe_load(registry.read_text("utf-8")) or {}
    data[key] = entry.model_dump()
    with atomic_path(registry) as tmp:
        Path(tmp).write_text(
            "# advprune model zoo registry (see advprune.bench.zoo)\n"
            + yaml.safe_dump(data, sort_keys=True, allow_unicode=True),
            encoding="utf-8",
        )
    return entry
