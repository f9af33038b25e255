"""HO-FMN: tune FMN's loss, optimizer, scheduler and their parameters with optuna.

After Mura et al., "HO-FMN: Hyperparameter Optimization for Fast Minimum-Norm Attacks"
(2024), with two corrections: every trial attacks a *fresh* random batch of the tuning split
(the reference reuses one batch, so its search overfits that batch), and failures count as
``+inf`` in the objective, the median distance over the batch's correctly classified points
(the reference counts failed points as distance 0 in its evaluation).

Tuning is deterministic given the seed, and resumable: each finished trial is appended to a
JSON study file (written atomically); a rerun replays the finished trials into a fresh optuna
study and continues. Trial ``k`` draws its batch with ``numpy.random.default_rng([seed, k])``
and its suggestions from a TPE sampler seeded with ``(seed, k)``, so an interrupted and
resumed tuning picks exactly the configuration an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advprune.attacks.fmn import FMN, FMN_LOSSES, FMN_OPTIMIZERS
from advprune.attacks.pgd import model_mode_scope
from advprune.errors import ConfigError
from advprune.io import check_same_settings, write_json_atomic
from advprune.progress import ProgressSetting
from advprune.progress import progress as progress_of

__all__ = [
    "SEARCH_SPACE",
    "TuningResult",
    "cached_tuning",
    "fmn_config_from_params",
    "suggest_params",
    "tune_fmn",
]

STUDY_FORMAT = "advprune-hofmn-study"

#: The search space (documented once here; :func:`suggest_params` follows it).
SEARCH_SPACE: dict[str, Any] = {
    "loss": list(FMN_LOSSES),
    "optimizer": list(FMN_OPTIMIZERS),
    "scheduler": ["cosine", "plateau"],
    "step_size": "log-uniform [0.01, 10]",
    "weight_decay": "uniform [0, 0.5]",
    "momentum (sgd)": "uniform [0, 0.9]",
    "dampening (sgd)": "uniform [0, 0.2]",
    "beta1 (adam, adamax)": "uniform [0.5, 0.99]",
    "beta2 (adam, adamax)": "uniform [0.9, 0.9999]",
    "plateau_factor (plateau)": "uniform [0.1, 0.5]",
    "plateau_patience (plateau)": [2, 5, 10],
    "gamma": "uniform [0.01, 0.2]",
}


def suggest_params(trial: Any) -> dict[str, Any]:
    """Draw one point of :data:`SEARCH_SPACE` from an optuna ``trial`` (define-by-run)."""
    p: dict[str, Any] = {
        "loss": trial.suggest_categorical("loss", list(FMN_LOSSES)),
        "optimizer": trial.suggest_categorical("optimizer", list(FMN_OPTIMIZERS)),
        "scheduler": trial.suggest_categorical("scheduler", ["cosine", "plateau"]),
        "step_size": trial.suggest_float("step_size", 0.01, 10.0, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.5),
        "gamma": trial.suggest_float("gamma", 0.01, 0.2),
    }
    if p["optimizer"] == "sgd":
        p["momentum"] = trial.suggest_float("momentum", 0.0, 0.9)
        p["dampening"] = trial.suggest_float("dampening", 0.0, 0.2)
    else:
        p["beta1"] = trial.suggest_float("beta1", 0.5, 0.99)
        p["beta2"] = trial.suggest_float("beta2", 0.9, 0.9999)
    if p["scheduler"] == "plateau":
        p["plateau_factor"] = trial.suggest_float("plateau_factor", 0.1, 0.5)
        p["plateau_patience"] = trial.suggest_categorical("plateau_patience", [2, 5, 10])
    return p


def fmn_config_from_params(params: dict[str, Any], *, norm: str, steps: int) -> dict[str, Any]:
    """The :class:`~advprune.attacks.FMN` configuration of a trial's parameters."""
    return FMN(norm=norm, steps=steps, **params).config()


@dataclass
class TuningResult:
    """Outcome of :func:`tune_fmn`: the best parameters and every trial."""

    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    trials: list[dict[str, Any]]
    seconds: float

    def config(self, *, norm: str, steps: int) -> dict[str, Any]:
        """The tuned FMN configuration with ``steps`` steps (HO-FMN evaluates with 200)."""
        return fmn_config_from_params(self.best_params, norm=norm, steps=steps)


def _median_distance(distance: Tensor, clean_correct: Tensor) -> float:
    d = distance[clean_correct].double().cpu().numpy()
    return float(np.median(d)) if d.size else math.inf


def _load_trials(path: Path | None, settings: dict[str, Any]) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    try:
        study = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"{path} is not a readable HO-FMN study; delete it to start over"
        ) from None
    if not isinstance(study, dict) or study.get("format") != STUDY_FORMAT:
        raise ConfigError(f"{path} is not an advprune HO-FMN study; delete it to start over")
    check_same_settings(path, study.get("settings") or {}, settings, what="an HO-FMN study")
    return list(study.get("trials") or [])


def _take(data: Any, indices: np.ndarray) -> tuple[Tensor, Tensor]:
    """Samples ``indices`` of a dataset or of an ``(x, y)`` pair of tensors."""
    if isinstance(data, (tuple, list)):
        x, y = data
        idx = torch.as_tensor(indices, dtype=torch.long)
        return x[idx], torch.as_tensor(y)[idx]
    items = [data[int(i)] for i in indices]
    return torch.stack([it[0] for it in items]), torch.as_tensor([int(it[1]) for it in items])


def tune_fmn(
    model: nn.Module,
    tune_data: Any,
    *,
    norm: str = "linf",
    trials: int = 32,
    steps: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    study_path: str | Path | None = None,
    progress: ProgressSetting = False,
    device: torch.device | str | None = None,
    on_trial: Callable[[int], None] | None = None,
) -> TuningResult:
    """Tune FMN on ``tune_data``, a dataset or an ``(x, y)`` pair of tensors: a tuning split,
    never the evaluation points.

    Each of ``trials`` trials runs FMN for ``steps`` steps on a fresh random batch of
    ``batch_size`` tuning samples; its value is the median distance over the batch's correctly
    classified samples, failures counted as ``+inf`` (lower is better). With ``study_path`` the
    trials are saved after each one and a rerun resumes. ``on_trial(k)`` is called after trial
    ``k`` is saved (used by tests to interrupt).
    """
    import optuna
    from optuna.distributions import distribution_to_json, json_to_distribution

    if trials < 1:
        raise ConfigError(f"hofmn trials must be >= 1, got {trials}")
    n_tune = len(tune_data[0]) if isinstance(tune_data, (tuple, list)) else len(tune_data)
    if n_tune == 0:
        raise ConfigError("the HO-FMN tuning split is empty")
    batch_size = min(int(batch_size), n_tune)
    settings = {
        "norm": norm, "trials": int(trials), "steps": int(steps), "batch_size": batch_size,
        "seed": int(seed), "n_tune": n_tune,
    }  # fmt: skip
    path = Path(study_path) if study_path is not None else None
    done = _load_trials(path, settings)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for t in done:
        study.add_trial(
            optuna.trial.create_trial(
                params=t["params"],
                distributions={k: json_to_distribution(v) for k, v in t["distributions"].items()},
                value=float(t["value"]),
            )
        )
    bar = progress_of(total=trials, initial=len(done), desc="HO-FMN tuning", unit="trial",
                      leave=True, mode=progress)  # fmt: skip
    for k in range(len(done), trials):
        t0 = time.perf_counter()
        study.sampler = optuna.samplers.TPESampler(
            seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        )
        trial = study.ask()
        params = suggest_params(trial)
        rng = np.random.default_rng([seed, k])
        batch = np.sort(rng.choice(n_tune, size=batch_size, replace=False))
        x, y = _take(tune_data, batch)
        x, y = x.to(device), y.to(device)
        with torch.no_grad(), model_mode_scope(model, "eval"):
            clean_correct = model(x).argmax(1) == y
        result = FMN(norm=norm, steps=steps, **params).run(model, x, y)
        value = _median_distance(result.distance, clean_correct)
        study.tell(trial, value)
        done.append(
            {
                "number": k,
                "params": params,
                "distributions": {
                    name: distribution_to_json(d) for name, d in trial.distributions.items()
                },
                "value": value,
                "success_rate": float(result.success[clean_correct].float().mean())
                if bool(clean_correct.any())
                else math.nan,
                "batch": batch.tolist(),
                "seconds": time.perf_counter() - t0,
            }
        )
        if path is not None:
            write_json_atomic(path, _study_json(settings, done))
        bar.update(1)
        if on_trial is not None:
            on_trial(k)
    bar.close()
    best = min(done, key=lambda t: (float(t["value"]), t["number"]))
    return TuningResult(
        best_params=dict(best["params"]),
        best_value=float(best["value"]),
        best_trial=int(best["number"]),
        trials=done,
        seconds=float(sum(t["seconds"] for t in done)),
    )


def _study_json(settings: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any]:
    from advprune.io import jsonable as _jsonable

    return _jsonable({"format": STUDY_FORMAT, "settings": settings, "trials": trials})


CACHE_FORMAT = "advprune-hofmn-tuned"


def _tune_sha256(tune_data: Any) -> str:
    """sha256 of every tuning sample (inputs and labels)."""
    import hashlib

    n = len(tune_data[0]) if isinstance(tune_data, (tuple, list)) else len(tune_data)
    digest = hashlib.sha256()
    for lo in range(0, n, 1024):
        x, y = _take(tune_data, np.arange(lo, min(lo + 1024, n)))
        for t in (x.detach().float().cpu().contiguous(), torch.as_tensor(y).long().cpu()):
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_tuning(
    model: nn.Module,
    tune_data: Any,
    *,
    cache: str | Path | None,
    model_sha256: str | None,
    norm: str = "linf",
    trials: int = 32,
    steps: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`tune_fmn`, or the configuration it tuned before for the same model.

    The tuned configuration is stored in ``cache`` under a key of the model's weights
    (``model_sha256``), the tuning samples and every tuning setting, and reused by a later
    run on the same model (tuning is deterministic given these, so reusing it changes no
    result; ``reused`` says which happened). ``cache`` None: tune every time. Returns
    ``best_params``, ``best_value``, ``best_trial``, ``seconds`` (of the tuning that produced
    it) and ``reused``.
    """
    import hashlib

    from advprune.io import read_json_record

    path = None
    if cache is not None and model_sha256:
        n_tune = len(tune_data[0]) if isinstance(tune_data, (tuple, list)) else len(tune_data)
        key_of = {
            "format": CACHE_FORMAT, "model_sha256": model_sha256,
            "tune_sha256": _tune_sha256(tune_data), "norm": norm, "trials": int(trials),
            "steps": int(steps), "batch_size": min(int(batch_size), n_tune), "seed": int(seed),
            "search_space": SEARCH_SPACE,
        }  # fmt: skip
        key = hashlib.sha256(json.dumps(key_of, sort_keys=True).encode()).hexdigest()[:32]
        path = Path(cache) / f"{key}.json"
        if path.exists():
            stored = read_json_record(
                path, what="a cached HO-FMN configuration", hint=f"delete {path} to tune again"
            )
            if isinstance(stored, dict) and stored.get("key") == key_of:
                return {**stored["result"], "reused": True}
    result = tune_fmn(
        model, tune_data, norm=norm, trials=trials, steps=steps, batch_size=batch_size,
        seed=seed, **kwargs,
    )  # fmt: skip
    out = {
        "best_params": result.best_params,
        "best_value": result.best_value,
        "best_trial": result.best_trial,
        "seconds": result.seconds,
    }
    if path is not None:
        write_json_atomic(path, {"key": key_of, "result": out})
    return {**out, "reused": False}
