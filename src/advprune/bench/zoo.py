"""The model zoo: a registry of hashed checkpoints, downloaded into a cache and verified.

A registry (YAML) maps model keys (:func:`advprune.bench.keys.parse_key`) to entries::

    HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90:
      url: https://example.org/hydra_r18_90.safetensors   # file://, http:// or https://
      sha256: 3f2a...                                      # of that .safetensors file
      card: {...}    # the checkpoint's JSON card (what save_checkpoint writes beside it)

The card's ``tensors.sha256`` must equal the entry's ``sha256`` and its architecture the key's.
The registry is the ``registry`` argument, else ``$ADVPRUNE_ZOO``, else the packaged
``data/zoo.yaml`` (empty: advprune hosts no weights yet). A malformed registry is a one-line
:class:`~advprune.errors.ConfigError` naming the entry.

:func:`load_model` keeps one folder per key in the cache (``cache_dir``, else
``$ADVPRUNE_CACHE``, else ``~/.cache/advprune/zoo``): ``KEY/model.safetensors`` and
``KEY/model.json``. A download streams into a temporary file in that folder; its length
(against ``Content-Length``, when the server sends one) and sha256 are checked, and only then is
it renamed into place, and the card written beside it (both atomically). Any mismatch deletes
the temporary file and is a one-line :class:`~advprune.errors.CheckpointError` (expected vs
got); nothing partial is left in the cache. A cached file is hashed again before every use; a
corrupted one is deleted and downloaded again. Files are loaded by
:func:`advprune.checkpoint.load_checkpoint`: safetensors only, strict, the card's own hash check;
nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from advprune._validation import first_validation_error
from advprune.errors import CheckpointError, ConfigError, UnknownNameError
from advprune.progress import ProgressSetting
from advprune.progress import progress as progress_of

__all__ = [
    "SCHEMES",
    "ZooEntry",
    "add_to_registry",
    "default_cache_dir",
    "fetch",
    "load_model",
    "load_registry",
    "registry_path",
]

SCHEMES = ("file", "http", "https")
TENSORS = "model.safetensors"
CARD = "model.json"
_CHUNK = 1 << 20
_HEADER = """\
# advprune model zoo registry (advprune.bench.zoo). One entry per model key:
#
# KEY:                      # e.g. HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90 (advprune.bench.keys)
#   url: URL                # of the .safetensors file: file://, http:// or https://
#   sha256: HEX             # sha256 of that file (64 lower-case hex digits)
#   card: {...}             # the checkpoint's JSON card; card.tensors.sha256 == sha256
#
# Write entries with `advprune zoo add KEY CHECKPOINT --url URL --registry FILE`.
"""


class ZooEntry(BaseModel):
    """One registry entry: where the tensor file is, its sha256, and its checkpoint card."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    url: str
    sha256: str
    card: dict[str, Any]

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme.lower() not in SCHEMES or not (parts.netloc or parts.path):
            raise ValueError(f"must be a {', '.join(s + '://' for s in SCHEMES)} URL")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be 64 hex digits")
        return value

    @field_validator("card")
    @classmethod
    def _card(cls, value: dict[str, Any]) -> dict[str, Any]:
        from advprune.checkpoint import FORMAT

        arch = value.get("architecture")
        if value.get("format") != FORMAT or not isinstance(arch, dict) or "name" not in arch:
            raise ValueError(
                f"must be an advprune checkpoint card (format {FORMAT!r}, architecture)"
            )
        if not isinstance(value.get("tensors"), dict) or "sha256" not in value["tensors"]:
            raise ValueError("records no tensors.sha256")
        return value

    @model_validator(mode="after")
    def _same_file(self) -> ZooEntry:
        card_hash = self.card["tensors"]["sha256"]
        if card_hash != self.sha256:
            raise ValueError(
                f"the card's tensors.sha256 {str(card_hash)[:12]}... is not the entry's "
                f"sha256 {self.sha256[:12]}... (the card is of another file)"
            )
        return self


def registry_path(registry: str | Path | None = None) -> Path:
    """The registry file: ``registry``, else ``$ADVPRUNE_ZOO``, else the packaged one."""
    if registry is not None:
        return Path(registry)
    if os.environ.get("ADVPRUNE_ZOO"):
        return Path(os.environ["ADVPRUNE_ZOO"])
    from importlib import resources

    return Path(str(resources.files("advprune.bench") / "data" / "zoo.yaml"))


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$ADVPRUNE_CACHE``, else ``~/.cache/advprune/zoo``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ADVPRUNE_CACHE"):
        return Path(os.environ["ADVPRUNE_CACHE"]).expanduser()
    return Path.home() / ".cache" / "advprune" / "zoo"


def _read_yaml(path: Path) -> Any:
    """The YAML document of ``path``; a key given twice in one mapping is an error."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        keys = [loader.construct_object(k) for k, _ in node.value]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            line = node.start_mark.line + 1
            raise ConfigError(f"zoo registry {path}: {twice[0]} is given twice (line {line})")
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(path.read_text("utf-8"), Loader=Loader)  # a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot read zoo registry {path} ({first})") from None


def _entry(path: Path, key: Any, item: Any) -> ZooEntry:
    from advprune.bench.keys import parse_key

    where = f"zoo registry {path}: entry {key}"
    try:
        parsed = parse_key(str(key))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if str(parsed) != key:
        raise ConfigError(f"{where}: write the key as {str(parsed)!r}")
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: must be a mapping of url, sha256 and card")
    try:
        entry = ZooEntry(**item)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {first_validation_error(exc)}") from None
    arch = entry.card["architecture"]["name"]
    if arch != parsed.architecture:
        raise ConfigError(
            f"{where}: the card holds a {arch!r} model but the key's architecture "
            f"{parsed.arch} is {parsed.architecture!r}"
        )
    return entry


def load_registry(registry: str | Path | None = None) -> dict[str, ZooEntry]:
    """The registry's entries by model key, validated (see the module docstring)."""
    path = registry_path(registry)
    data = _read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"zoo registry {path} must map model keys to entries")
    return {str(key): _entry(path, key, item) for key, item in sorted(data.items(), key=str)}


def _download(url: str, dest: Path, sha256: str, *, progress: ProgressSetting) -> None:
    """Stream ``url`` into a temporary file beside ``dest``; rename it onto ``dest`` only if its
    length and sha256 match. On any failure the temporary file is deleted."""
    from advprune.io import atomic_path

    digest, got, total = hashlib.sha256(), 0, None
    with atomic_path(dest) as tmp:
        try:
            response = urllib.request.urlopen(url, timeout=60)
        except (OSError, ValueError, HTTPException) as exc:
            raise CheckpointError(f"cannot download {url} ({exc})") from None
        with response, open(tmp, "wb") as fh:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.strip().isdigit() else None
            bar = progress_of(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"{dest.parent.name}", mode=progress if total is not None else "off",
            )  # fmt: skip
            try:
                with bar:
                    while chunk := response.read(_CHUNK):
                        fh.write(chunk)
                        digest.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            except (OSError, HTTPException) as exc:
                raise CheckpointError(
                    f"download of {url} failed after {got} bytes ({exc}); nothing was cached"
                ) from None
        if total is not None and got != total:
            raise CheckpointError(
                f"download of {url} truncated: expected {total} bytes, got {got}; "
                "nothing was cached"
            )
        if digest.hexdigest() != sha256:
            raise CheckpointError(
                f"download of {url} has the wrong sha256: expected {sha256}, got "
                f"{digest.hexdigest()} ({got} bytes; truncated or altered); nothing was cached"
            )


def fetch(
    key: str,
    *,
    registry: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: ProgressSetting = True,
) -> Path:
    """The verified local tensor file of zoo model ``key`` (downloaded into the cache if its
    cached copy is missing or does not hash to the registry's sha256)."""
    from advprune.io import sha256_file, write_json_atomic

    entries = load_registry(registry)
    if key not in entries:
        where = f"in {registry_path(registry)}"
        raise UnknownNameError("zoo model", key, list(entries) or [f"(none {where})"])
    entry = entries[key]
    folder = default_cache_dir(cache_dir) / key
    path = folder / TENSORS
    if path.is_file() and sha256_file(path) != entry.sha256:
        path.unlink()  # corrupted, or an older file of this key: download it again
    if not path.is_file():
        existed = folder.is_dir()
        try:
            _download(entry.url, path, entry.sha256, progress=progress)
        except BaseException:
            if not existed:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty: leave the cache as it was
            raise
    card_file = folder / CARD
    try:
        current = json.loads(card_file.read_text("utf-8"))
    except (OSError, ValueError):
        current = None
    if current != entry.card:
        write_json_atomic(card_file, entry.card)
    return path


def load_model(
    key: str,
    *,
    registry: str | Path | None = None,
    cache_dir: str | Path | None = None,
    map_location: str = "cpu",
    progress: ProgressSetting = True,
) -> tuple[Any, dict[str, Any]]:
    """Download (if needed), verify and load zoo model ``key``; return ``(model, card)``.

    See the module docstring for the registry, the cache and the checks.
    """
    from advprune.checkpoint import load_checkpoint

    path = fetch(key, registry=registry, cache_dir=cache_dir, progress=progress)
    return load_checkpoint(path, map_location=map_location)


def add_to_registry(
    registry_path: str | Path, key: str, checkpoint_path: str | Path, url: str
) -> ZooEntry:
    """Add (or replace) ``key`` in the registry file for the advprune checkpoint
    ``checkpoint_path``, to be served at ``url``; return the entry.

    The checkpoint must load (strict, hash-checked) and be of the key's architecture. The sha256
    is computed and the card embedded; the registry file is rewritten atomically, and an existing
    one must be valid.
    """
    import yaml

    from advprune.bench.keys import parse_key
    from advprune.checkpoint import atomic_path, load_checkpoint, read_card, sha256_file
    from advprune.checkpoint import tensor_path as _tensor_path

    key = str(parse_key(key))
    tensors = _tensor_path(checkpoint_path)
    load_checkpoint(tensors)  # refuses a corrupt, hash-mismatched or unloadable checkpoint
    card = read_card(tensors)
    registry = Path(registry_path)
    entry = _entry(registry, key, {"url": url, "sha256": sha256_file(tensors), "card": card})
    data: dict[str, Any] = {}
    if registry.exists():
        load_registry(registry)  # refuse to extend a broken registry
        data = _read_yaml(registry) or {}
    data[key] = entry.model_dump()
    text = _HEADER + yaml.safe_dump(data, sort_keys=True, allow_unicode=True)
    with atomic_path(registry) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return entry
