"""Checkpoints: a safetensors file of tensors plus a JSON card.

``save_checkpoint("runs/x/model.safetensors", model, card)`` writes ``model.safetensors`` and
``model.json`` beside it. The card records the architecture (to rebuild the model), the input
shape and normalisation, the masks (to rebuild masked layers), the measured sparsity per
layer, whatever the caller adds (dataset, method, objective, eps, training config), the
advprune version, and the sha256 of the tensor file. Both files are written atomically
(temporary file, fsync, rename); nothing is ever unpickled.

Training state for resuming (optimizer buffers, RNG state) uses the same two-file format via
:func:`save_state` / :func:`load_state`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from advprune.errors import AdvpruneError, CheckpointError, ConfigError

FORMAT = "advprune-checkpoint"
FORMAT_VERSION = 1


def _version() -> str:
    from advprune import __version__

    return __version__


def card_path(path: str | Path) -> Path:
    """The JSON card beside a tensor file (``x.safetensors`` -> ``x.json``)."""
    return Path(path).with_suffix(".json")


def tensor_path(path: str | Path) -> Path:
    """The tensor file of a checkpoint given as ``x``, ``x.safetensors`` or ``x.json``."""
    return Path(path).with_suffix(".safetensors")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: str | Path):
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


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _write_files(path: Path, tensors: Mapping[str, torch.Tensor], card: dict[str, Any]) -> None:
    """Write tensors and card to temporary files, then rename both into place.

    Both files are complete before either is renamed, so a crash leaves at worst the old pair,
    or a new tensor file whose hash the old card rejects, never a truncated file.
    """
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp_tensors:
        save_file(clean, str(tmp_tensors), metadata={"format": "pt"})
        card["tensors"] = {"file": path.name, "sha256": sha256_file(tmp_tensors)}
        write_json_atomic(card_path(path), card)


def _read_tensors(path: Path, card: Mapping[str, Any]) -> dict[str, torch.Tensor]:
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
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def _read_card(path: Path) -> dict[str, Any]:
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


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    card: Mapping[str, Any] | None = None,
    *,
    export: bool = False,
) -> Path:
    """Save ``model`` as ``path`` (``.safetensors``) plus its JSON card; return the tensor path.

    ``model`` must come from :func:`advprune.models.create` (it carries ``model.spec``).
    ``card`` adds caller fields (dataset, method, objective, eps, training, ...). With
    ``export=True`` the masks are folded into a copy of the model first, so the file loads into
    the plain architecture with ``strict=True``; the card still records the per-layer density.
    """
    # imported here: models and sparsity import nothing from this module, and this keeps
    # checkpoint I/O usable on its own
    import copy

    from advprune.sparsity import export_dense, layer_densities, mask_specs, sparsity_report

    spec = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError("model has no `spec`; build models with advprune.models.create")
    path = tensor_path(path)
    densities = layer_densities(model)
    masks = mask_specs(model)
    to_save = model
    if export and masks:
        to_save = export_dense(copy.deepcopy(model))
        masks = {}
    from advprune.models import default_input_size

    input_shape = list(default_input_size(spec.name, spec.in_channels))
    if card and card.get("input_shape"):
        input_shape = list(card["input_shape"])
    report = sparsity_report(to_save, tuple(input_shape))
    full: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "advprune_version": _version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": spec.to_dict(),
        "input_shape": input_shape,
        "normalization": {"mean": list(spec.mean), "std": list(spec.std)},
    }
    full.update(dict(card or {}))
    full["input_shape"] = input_shape
    full["sparsity"] = {
        **dict(full.get("sparsity") or {}),
        "measured": report.sparsity,
        "layers": {r.name: r.density for r in report.layers},
        "masked_layers": densities,
        "exported": bool(export),
    }
    full["masks"] = masks
    _write_files(path, to_save.state_dict(), full)
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint's card without loading tensors."""
    return _read_card(tensor_path(path))


def load_checkpoint(
    path: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    expect_arch: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint saved by :func:`save_checkpoint`; return ``(model, card)``.

    The tensor file's sha256 is checked against the card, the architecture is rebuilt from the
    card, masks are re-attached, and the state dict is loaded with ``strict=True``. Any
    mismatch is a :class:`CheckpointError`, never a partly random model.
    """
    import advprune.methods  # noqa: F401  (registers the mask kinds of the method plug-ins)
    from advprune.models import ModelSpec
    from advprune.sparsity import restore_masks

    path = tensor_path(path)
    card = _read_card(path)
    arch = card.get("architecture") or {}
    if expect_arch is not None and arch.get("name") != expect_arch:
        raise CheckpointError(
            f"{path} holds a {arch.get('name')!r} model, not the expected {expect_arch!r}"
        )
    tensors = _read_tensors(path, card)
    try:
        model = ModelSpec.from_dict(arch).build()
        restore_masks(model, card.get("masks") or {})
    except (KeyError, TypeError, AdvpruneError) as exc:
        raise CheckpointError(f"{card_path(path)}: bad architecture or masks ({exc})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"{path} does not match architecture {arch.get('name')!r}: {detail[:300]}"
        ) from None
    return model.to(map_location), card


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's weights into an existing ``model`` (masked or not); return its card.

    A dense checkpoint loads into a model whose masks are already attached. Raises
    :class:`CheckpointError` when the architectures differ.
    """
    from advprune.sparsity import load_dense_state_dict

    path = tensor_path(path)
    card = _read_card(path)
    spec = getattr(model, "spec", None)
    arch = card.get("architecture") or {}
    if spec is not None and arch.get("name") not in (None, spec.name):
        raise CheckpointError(f"{path} holds a {arch.get('name')!r} model, not {spec.name!r}")
    tensors = _read_tensors(path, card)
    if card.get("masks"):
        raise CheckpointError(
            f"{path} holds a masked model; load it with load_checkpoint or export it first"
        )
    try:
        load_dense_state_dict(model, tensors, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).strip().splitlines()[:3])
        raise CheckpointError(f"{path} does not fit this model: {detail[:300]}") from None
    return card


def export_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write a pruned checkpoint ``src`` as a plain dense checkpoint ``dst``; return its path.

    The masks are folded into the weights (:func:`advprune.sparsity.export_dense`), so ``dst``
    loads into the plain architecture of the card (``ModelSpec.build()``, variants included)
    with ``strict=True`` and computes what ``src`` computed. The card keeps ``src``'s fields
    (method and its options, dataset, objective, eps, per-layer targets) and records the
    measured per-layer density (``sparsity.masked_layers``) and ``exported_from``.
    """
    model, card = load_checkpoint(src)
    keep = {k: v for k, v in card.items() if k not in ("tensors", "masks", "created")}
    keep["exported_from"] = {
        "path": str(tensor_path(src)),
        "sha256": (card.get("tensors") or {}).get("sha256"),
    }
    return save_checkpoint(dst, model, keep, export=True)


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
        "advprune_version": _version(),
        "state": skeleton,
    }
    _write_files(path, tensors, card)
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a state saved by :func:`save_state` (hash-checked)."""
    path = tensor_path(path)
    card = _read_card(path)
    tensors = _read_tensors(path, card)
    return _unflatten(card["state"], tensors)
