"""The Python API: :func:`prune` and :func:`finetune` on an in-memory model.

Both run the same stages as ``advprune prune`` / ``advprune finetune``
(:func:`advprune.pipeline.run_stage`), on a copy
of the model, with the same settings (:class:`advprune.config.RunConfig`)::

    import advprune
    pruned = advprune.prune(model, method="hydra", sparsity=0.99, objective="trades",
                            data="digits", epochs=5, lr=0.1)
    tuned = advprune.finetune(pruned, data="digits", epochs=10, lr=0.01)
    plain = advprune.sparsity.export_dense(tuned)  # plain architecture, masks folded in
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from advprune.config import RunConfig, load_config
from advprune.data import DataSplits, make_loader
from advprune.data.datasets import DatasetInfo
from advprune.errors import ConfigError
from advprune.training import Objective

DataLike = str | DataSplits | DataLoader
CARD_ATTR = "advprune_card"  # the stage's checkpoint card, kept on the returned model


def _settings(
    config: RunConfig | Mapping[str, Any] | None, values: Mapping[str, Any]
) -> tuple[RunConfig, dict[str, Any]]:
    """Split keyword arguments into RunConfig settings and the rest (method options)."""
    base = config.model_dump(exclude_unset=True) if isinstance(config, RunConfig) else config
    settings = {k: v for k, v in values.items() if k in RunConfig.model_fields}
    rest = {k: v for k, v in values.items() if k not in RunConfig.model_fields}
    settings.setdefault("progress", False)
    return load_config(None, settings, base=dict(base or {})), rest


def _data(cfg: RunConfig, data: DataLike, model: nn.Module, *, train: bool):
    from advprune import pipeline as wf

    if isinstance(data, str):
        return wf.prepare_data(cfg, with_val=train)
    if isinstance(data, DataSplits):
        return wf.Data(
            splits=data,
            train=make_loader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed),
            val=make_loader(data.val, cfg.batch_size) if data.val is not None else None,
            test=make_loader(data.test, cfg.batch_size),
        )
    if isinstance(data, DataLoader):
        x, _ = next(iter(data))
        spec = getattr(model, "spec", None)
        if spec is None:
            raise ConfigError("model has no `spec`; build it with advprune.models.create")
        info = DatasetInfo(
            name="dataloader",
            num_classes=spec.num_classes,
            input_shape=tuple(int(v) for v in x.shape[1:]),
            mean=tuple(spec.mean),
            std=tuple(spec.std),
        )
        ds = data.dataset
        splits = DataSplits(train=ds, test=ds, val=None, info=info)
        return wf.Data(splits=splits, train=data, val=None, test=data)
    raise ConfigError(
        f"data must be a dataset name, DataSplits or DataLoader, not {type(data).__name__}"
    )


@contextlib.contextmanager
def _folder(out: str | Path | None) -> Iterator[Path]:
    if out is not None:
        yield Path(out)
        return
    with tempfile.TemporaryDirectory(prefix="advprune-") as tmp:
        yield Path(tmp)


def _objective(objective: str | Objective) -> tuple[str, Objective | None]:
    """The objective's name for the settings, and the instance when one was given."""
    if isinstance(objective, Objective):
        return objective.name, objective
    if not isinstance(objective, str):
        raise ConfigError(f"objective must be a name or an Objective, not {objective!r}")
    return objective, None


def _dataset(data: DataLike) -> dict[str, str]:
    """The ``dataset`` setting implied by ``data`` (a loader implies none)."""
    if isinstance(data, str):
        return {"dataset": data}
    if isinstance(data, DataSplits):
        return {"dataset": data.info.name}
    return {}


def prune(
    model: nn.Module,
    method: str = "lwm",
    sparsity: float | str | None = None,
    structure: str = "unstructured",
    objective: str | Objective = "pgd",
    data: DataLike = "digits",
    *,
    config: RunConfig | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Run ``method``'s prune stage on a copy of ``model``; return the pruned copy.

    The copy carries its masks (``torch.nn.utils.parametrize``) on the original module
    classes: a method that trains while pruning (HYDRA's scores, HARP's rates, iterative
    LWM's weights between rounds) has trained them with ``objective`` on ``data``. Fold the
    masks in with :func:`advprune.sparsity.export_dense` for a plain model, continue with
    :func:`finetune`, or save it with :func:`advprune.checkpoint.save_checkpoint`. The stage's
    card (method, options, per-layer targets) is ``returned.advprune_card``.

    ``sparsity`` is the removed fraction (default: the settings', 0.9; a structure that
    fixes it, such as ``structure="2:4"``, sets it to ``1 - N/M``).
    ``kwargs`` are :class:`~advprune.config.RunConfig` settings (``epochs``, ``lr``, ``eps``,
    ``batch_size``, ``allocation``, ``scope``, ``seed``, ...; they override ``config``), and
    every other keyword is an option of the method (``rounds=4``, ``freeze_bn=True``).
    ``objective`` is a name (built with the settings' eps / steps) or an
    :class:`~advprune.training.Objective`. ``data`` is a dataset name, a
    :class:`~advprune.data.DataSplits` or a ``DataLoader`` (used to train; no validation).
    Training checkpoints go to ``out`` (a temporary folder when None).
    """
    from advprune import pipeline as wf

    name, obj = _objective(objective)
    cfg, options = _settings(
        config,
        {
            **kwargs,
            "method": method,
            "sparsity": sparsity,
            "structure": structure,
            "objective": name,
            **_dataset(data),
        },
    )
    cfg = cfg.model_copy(update={"method_options": {**cfg.method_options, **options}})
    if getattr(model, "spec", None) is None:
        raise ConfigError("model has no `spec`; build it with advprune.models.create")
    method_obj = wf.make_method(cfg)  # validates method, options, structure, allocation
    d = _data(cfg, data, model, train=bool(method_obj.trainable("prune")))
    with _folder(out) as folder:
        pruned, card = wf.run_stage("prune", cfg, d, model, out=folder, objective=obj)
    setattr(pruned, CARD_ATTR, card)
    return pruned


def finetune(
    model: nn.Module,
    objective: str | Objective = "pgd",
    data: DataLike = "digits",
    *,
    config: RunConfig | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    stage: str = "finetune",
    **kwargs: Any,
) -> nn.Module:
    """Train a model returned by :func:`prune` with the parameter kinds its method trains in
    ``stage`` (``finetune``, or another training stage after prune that the method declares).

    Masks stay fixed; the model is trained in place and returned. ``kwargs`` are
    :class:`~advprune.config.RunConfig` settings (``epochs``, ``lr``, ...).
    """
    from advprune import pipeline as wf

    card = getattr(model, CARD_ATTR, None)
    if not isinstance(card, Mapping) or not card.get("method"):
        raise ConfigError("finetune needs a model returned by advprune.prune (it has no card)")
    name, obj = _objective(objective)
    dataset = _dataset(data) or {"dataset": (card.get("dataset") or {}).get("name") or "digits"}
    cfg, rest = _settings(config, {**kwargs, "objective": name, **dataset})
    if rest:
        raise ConfigError(f"unknown setting(s) {', '.join(sorted(rest))} for finetune")
    d = _data(cfg, data, model, train=True)
    with _folder(out) as folder:
        tuned, new_card = wf.run_stage(stage, cfg, d, model, dict(card), out=folder, objective=obj)
    setattr(tuned, CARD_ATTR, new_card)
    return tuned


__all__ = ["finetune", "prune"]
