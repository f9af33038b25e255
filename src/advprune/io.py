"""File I/O every layer shares: atomic writes, JSON, sha256, safetensors + JSON-card files,
nested training states, and the one guard that refuses to resume a folder of other settings.

Nothing here knows about models, masks or methods: :mod:`advprune.checkpoint` builds model
checkpoints on top of :func:`write_tensor_files` / :func:`read_tensor_file`, and the trainer,
the evaluation and the grid resume through :func:`check_same_settings`.

Every write is atomic (temporary file in the target's folder, fsync, rename); nothing is ever
unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from advprune.errors import CheckpointError, ConfigError

__all__ = [
    "FORMAT",
    "atomic_path",
    "card_path",
    "changed_keys",
    "check_same_settings",
    "check_tensor_file",
    "from_jsonable",
    "json_default",
    "jsonable",
    "load_state",
    "package_version",
    "read_card_file",
    "read_json_record",
    "read_tensor_file",
    "save_state",
    "sha256_file",
    "tensor_path",
    "write_json_atomic",
    "write_tensor_files",
]

FORMAT = "advprune-checkpoint"  # the "format" field of every card (checkpoints and states)

RESUME_HINT = "rerun with the same settings to resume it, or pass a new --out folder"


def package_version() -> str:
    """advprune's version (from the installed distribution, else the source tree's)."""
    from advprune._version import __version__

    return __version__


# ---------------------------------------------------------------------------- atomic files


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it onto ``target`` on success.

    On an exception the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: tuples / sets as lists, paths as text, 1-element tensors as
    numbers, objects with ``to_dict()`` as their dict."""
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=json_default) + "\n")


def jsonable(obj: Any) -> Any:
    """Plain JSON types; +-inf and nan become the strings "inf", "-inf", "nan" (valid JSON)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`jsonable` (the strings "inf", "-inf", "nan" become floats)."""
    if isinstance(obj, dict):
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    if isinstance(obj, str) and obj in _NON_FINITE:
        return _NON_FINITE[obj]
    return obj


# ---------------------------------------------------------------------------- resumable folders


def changed_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two nested mappings."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            keys += changed_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def read_json_record(path: str | Path, *, what: str, hint: str = RESUME_HINT) -> Any:
    """The JSON at ``path`` (None when absent); an unreadable file is a one-line error."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path} ({what}) is unreadable; {hint}") from None


def check_same_settings(
    where: str | Path,
    before: Any,
    now: Mapping[str, Any],
    *,
    what: str,
    hint: str = RESUME_HINT,
) -> None:
    """The resumable-folder guard: refuse to continue work recorded with other settings.

    ``before`` is the record found in the folder (``None``: nothing recorded, nothing to
    check), ``now`` the settings of this run. A record that is not a mapping, or differs, is a
    :class:`~advprune.errors.ConfigError` naming the keys that differ, e.g. ``runs/x holds a
    pretrain run with other settings (eps, eps_value differ); rerun with ...``.
    """
    if before is None:
        return
    if not isinstance(before, Mapping):
        raise ConfigError(f"{where} holds {what} of an unknown run (no readable record); {hint}")
    changed = changed_keys(before, now)
    if changed:
        raise ConfigError(
            f"{where} holds {what} with other settings ({', '.join(changed)} differ); {hint}"
        )


# ---------------------------------------------------------------------------- tensor files + card


def card_path(path: str | Path) -> Path:
    """The JSON card beside a tensor file (``x.safetensors`` -> ``x.json``)."""
    return Path(path).with_suffix(".json")


def tensor_path(path: str | Path) -> Path:
    """The tensor file of a checkpoint given as ``x``, ``x.safetensors`` or ``x.json``."""
    return Path(path).with_suffix(".safetensors")


def write_tensor_files(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    card: dict[str, Any],
    *,
    writer: Callable[[Mapping[str, torch.Tensor], Path], Any] | None = None,
    encoding: str | None = None,
) -> None:
    """Write tensors (safetensors) and their JSON card (with the tensors' sha256) atomically.

    Both files are complete before either is renamed, so a crash leaves at worst the old pair,
    or a new tensor file whose hash the old card rejects, never a truncated file. ``writer``
    (``writer(tensors, path)``) writes another encoding of the tensors instead of a plain
    safetensors file, recorded as ``card["tensors"]["encoding"]``; the sha256 always covers
    the bytes on disk.
    """
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp_tensors:
        if writer is None:
            save_file(clean, str(tmp_tensors), metadata={"format": "pt"})
        else:
            writer(clean, tmp_tensors)
        card["tensors"] = {"file": path.name, "sha256": sha256_file(tmp_tensors)}
        if encoding is not None:
            card["tensors"]["encoding"] = encoding
        write_json_atomic(card_path(path), card)


def check_tensor_file(path: Path, card: Mapping[str, Any]) -> None:
    """Check that ``path`` exists and its sha256 is the one ``card`` records."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint tensor file {path} is missing")
    expected = (card.get("tensors") or {}).get("sha256")
    if not isinstance(expected, str):
        raise CheckpointError(f"{card_path(path)} records no sha256 of {path.name}; not loading it")
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 {actual[:12]}... does not match the card's "
            f"{expected[:12]}...; the file is corrupt or was replaced"
        )


def read_tensor_file(path: Path, card: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, after checking their sha256 against ``card`` (a plain
    safetensors file; another ``encoding`` is read by the layer that wrote it)."""
    check_tensor_file(path, card)
    encoding = (card.get("tensors") or {}).get("encoding")
    if encoding is not None:
        raise CheckpointError(
            f"{path} holds {encoding} tensors, not plain safetensors; load it with "
            "advprune.checkpoint.load_checkpoint"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def read_card_file(path: Path) -> dict[str, Any]:
    """The validated JSON card beside the tensor file ``path``."""
    cpath = card_path(path)
    if not cpath.is_file():
        raise CheckpointError(
            f"checkpoint card {cpath} is missing; a checkpoint is NAME.safetensors + NAME.json"
        )
    try:
        card = json.loads(cpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint card {cpath} is not valid JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise CheckpointError(f"{cpath} is not an advprune checkpoint card")
    return card


# ---------------------------------------------------------------------------- training state


def _flatten(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested structure into ``tensors``; return a JSON-able skeleton."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        return {
            "__dict__": [[_key(k), _flatten(f"{prefix}.{k}", v, tensors)] for k, v in obj.items()]
        }
    if isinstance(obj, (list, tuple)):
        return [_flatten(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
    return obj


def _key(k: Any) -> Any:
    return {"__int__": k} if isinstance(k, int) else k


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {
            (k["__int__"] if isinstance(k, dict) else k): _unflatten(v, tensors)
            for k, v in obj["__dict__"]
        }
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Save a nested state (dicts, lists, tensors, JSON scalars) as safetensors + JSON."""
    path = tensor_path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten("s", dict(state), tensors)
    card = {
        "format": FORMAT,
        "kind": "training-state",
        "advprune_version": package_version(),
        "state": skeleton,
    }
    write_tensor_files(path, tensors, card)
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a state saved by :func:`save_state` (hash-checked)."""
    path = tensor_path(path)
    card = read_card_file(path)
    tensors = read_tensor_file(path, card)
    return _unflatten(card["state"], tensors)
