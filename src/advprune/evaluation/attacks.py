"""Attacks and certifiers of the evaluation protocol: one interface, one registry.

An evaluation attack is an :class:`EvalAttack` registered with :func:`register_attack`. Built
for a radius ``eps`` in a ``norm`` (input units, inputs in [0, 1]), with its typed
``Options``, it runs on one batch::

    out = attack.run_batch(model, x, y, seed)   # x in [0, 1], y labels
    out["success"]   # (N,) bool: an adversarial example within eps was found (and re-checked)
    out["distance"]  # (N,) float: its norm; inf where none was found

plus any per-sample arrays of its own (saved with the batch). :func:`run_attack` does the same
in one call by name. :func:`advprune.evaluation.evaluate` runs the attacks a user names batch
by batch (seeded per batch, resumable), and the entry of each in the report comes from
:meth:`EvalAttack.entry_details` (its flags and figures). A certifier (``kind =
"certified"``) is registered in the same registry and listed by ``list_attacks(kind=
"certified")``; :mod:`advprune.evaluation.certifiers` runs them.

The CLI's ``--attacks`` / ``--certify`` help, the grid's validation and the default lists
all read this registry, so adding an attack is one file: subclass :class:`EvalAttack`,
decorate it with ``@register_attack("name")``, import the module (or name it in
``$ADVPRUNE_PLUGINS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from advprune.attacks.fmn import FMN, lp_distance
from advprune.attacks.pgd import PGD
from advprune.errors import ConfigError, UnknownNameError
from advprune.evaluation.autoattack import (
    AA_ATTACKS,
    AA_VERSIONS,
    autoattack_attacks,
    run_autoattack,
)
from advprune.evaluation.checks import improvement_flag
from advprune.evaluation.report import Flag
from advprune.registry import Options, Registry, parse_options

__all__ = [
    "ATTACKS",
    "DEFAULT_ATTACKS",
    "EvalAttack",
    "attack_names",
    "attacks_help",
    "create_attack",
    "list_attacks",
    "register_attack",
    "run_attack",
]

#: the protocol's attacks when none are named (the benchmark's: AutoAttack, then HO-FMN)
DEFAULT_ATTACKS: tuple[str, ...] = ("autoattack", "hofmn")

ATTACKS: Registry[type[EvalAttack]] = Registry("attack")


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


class EvalAttack:
    """Base of the protocol's attacks (``kind = "empirical"``) and certifiers
    (``kind = "certified"``).

    Subclasses set ``name`` (by :func:`register_attack`), ``Options`` (typed options; their
    defaults are the attack's) and implement :meth:`run_batch`. ``min_norm`` attacks report
    minimum distances (robust accuracy is ``distance > eps``; they feed the security curve).
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "empirical"
    min_norm: ClassVar[bool] = False
    Options: ClassVar[type[Options]] = Options
    #: evaluate() settings an attack reads its options from (option -> setting), so the
    #: protocol's settings keep their names (``pgd_steps``, ``aa_version``, ...)
    settings_keys: ClassVar[Mapping[str, str]] = {}

    def __init__(self, eps: float, norm: str, options: Options | None = None) -> None:
        self.eps, self.norm = float(eps), norm
        self.options = options if options is not None else self.Options()
        self.tuning_seconds = 0.0

    def config(self) -> dict[str, Any]:
        """The attack's settings, recorded in its report entry."""
        return {"name": self.name, "eps": self.eps, "norm": self.norm, **self.options.model_dump()}

    def prepare(self, model: nn.Module, context: Mapping[str, Any]) -> None:
        """Work before the batches (e.g. HO-FMN's tuning); ``context`` holds the evaluation's
        ``settings``, ``tune`` data, ``out`` folder, ``progress``, ``device``, ``after_batch``."""

    def run_batch(self, model: nn.Module, x: Tensor, y: Tensor, seed: int) -> dict[str, Any]:
        """Per-sample ``success`` (bool) and ``distance`` (float, inf where nothing was found)
        of one batch, plus the attack's own arrays."""
        raise NotImplementedError

    def entry_details(
        self,
        arrays: dict[str, np.ndarray],
        correct: np.ndarray,
        per_sample: dict[str, np.ndarray],
        details: dict[str, Any],
    ) -> list[Flag]:
        """The attack's own flags and report figures after every batch ran (``per_sample``
        and ``details`` may be extended). Default: minimum-norm checks for ``min_norm``."""
        return []


def register_attack(name: str) -> Callable[[type[EvalAttack]], type[EvalAttack]]:
    """Class decorator registering an :class:`EvalAttack` under ``name``."""

    def decorator(cls: type[EvalAttack]) -> type[EvalAttack]:
        cls.name = name
        return ATTACKS.add(name, cls)

    return decorator


def list_attacks(pattern: str = "*", *, kind: str | None = "empirical") -> list[str]:
    """Registered attacks (``kind="certified"``: certifiers; ``None``: both)."""
    return [n for n in ATTACKS.names(pattern) if kind is None or ATTACKS.get(n).kind == kind]


def attack_names() -> tuple[str, ...]:
    """The attacks ``--attacks`` accepts, protocol order first (AutoAttack, HO-FMN, FMN,
    PGD, AutoAttack's own attacks), then any other registered one."""
    first = ["autoattack", "hofmn", "fmn", "pgd", *AA_ATTACKS]
    names = list_attacks()
    return tuple([n for n in first if n in names] + [n for n in names if n not in first])


def attacks_help() -> str:
    """The ``--attacks`` help: the default and every registered attack."""
    return (
        f"comma-separated, in order: {','.join(DEFAULT_ATTACKS)} (default), or any of "
        f"{', '.join(n for n in attack_names() if n not in DEFAULT_ATTACKS)} "
        "(apgd-ce ... square: one AutoAttack attack alone)"
    )


def create_attack(
    name: str, eps: float, norm: str, options: Mapping[str, Any] | None = None
) -> EvalAttack:
    """The attack ``name`` at ``eps`` in ``norm`` with ``options`` (validated)."""
    cls = ATTACKS.get(name)
    opts = parse_options(cls.Options, dict(options or {}), f"attack {name!r}")
    return cls(eps, norm, opts)


def run_attack(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """Run attack ``name`` on one batch (``x`` in [0, 1], labels ``y``) at ``eps``; return
    per-sample ``success`` and ``distance`` (numpy) and the attack's own arrays. An attack
    that needs preparation (HO-FMN's tuning) is run by :func:`~advprune.evaluation.evaluate`."""
    attack = create_attack(name, eps, norm, options)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        return attack.run_batch(model, x, y, seed)


# ---------------------------------------------------------------------------- the shipped attacks


class _AAOptions(Options):
    version: str = "standard"


class _AutoAttack(EvalAttack):
    """AutoAttack (``pyautoattack``), or one of its attacks alone with the version's settings."""

    Options = _AAOptions
    settings_keys: ClassVar[Mapping[str, str]] = {"version": "aa_version"}

    def __init__(self, eps: float, norm: str, options: Options | None = None) -> None:
        super().__init__(eps, norm, options)
        self.version = self.options.version
        if self.version not in AA_VERSIONS:
            raise UnknownNameError("AutoAttack version", str(self.version), AA_VERSIONS)
        self.attacks = autoattack_attacks(
            self.version, None if self.name == "autoattack" else [self.name]
        )

    def config(self) -> dict[str, Any]:
        import pyautoattack

        return {
            "name": self.name,
            "library": f"pyautoattack {getattr(pyautoattack, '__version__', '?')}",
            "version": self.version if self.name == "autoattack" else f"{self.version} settings",
            "attacks": self.attacks,
            "eps": self.eps,
            "norm": self.norm,
        }

    def run_batch(self, model: nn.Module, x: Tensor, y: Tensor, seed: int) -> dict[str, Any]:
        r = run_autoattack(
            model, x, y, eps=self.eps, norm=self.norm, version=self.version,
            attacks=self.attacks, seed=seed,
        )  # fmt: skip
        dist = lp_distance(r.x_adv - x, self.norm)
        return {
            "success": _np(r.success),
            "distance": _np(torch.where(r.success, dist, math.inf)),
            "own_success": _np(r.own_success),
            "first_attack": _np(r.first_attack),
            "outside_ball": _np(r.outside_ball),
            "warnings": np.asarray(r.warnings, dtype=str),
        }

    def entry_details(self, arrays, correct, per_sample, details) -> list[Flag]:
        from advprune.evaluation.autoattack import ball_tolerance

        name, order = self.name, self.attacks
        first = np.where(correct, arrays["first_attack"], -1)
        own = arrays["own_success"] & correct
        outside = arrays["outside_ball"] & correct
        per_sample[f"{name}_first_attack"] = first
        per_sample[f"{name}_own_success"] = own
        per_sample[f"{name}_outside_ball"] = outside
        per_sample[f"{name}_attacks"] = np.asarray(order, dtype=str)
        after = {"clean": float(correct.mean())}
        remaining = correct.copy()
        for k, attack in enumerate(order):
            remaining &= first != k
            after[attack] = float(remaining.mean())
        success = per_sample[f"success_{name}"]
        details.update(
            robust_accuracy_after=after,
            own_robust_accuracy=float((correct & ~own).mean()),
            warnings=[str(w) for w in arrays["warnings"]],
        )
        flags = []
        mismatch = int((own != success).sum())
        if mismatch:
            flags.append(
                Flag(
                    "autoattack_count_mismatch",
                    f"AutoAttack's own verdict differs from advprune's re-check on {mismatch} "
                    f"points (robust accuracy {100 * details['own_robust_accuracy']:.2f} % by "
                    f"its labels, {100 * float((correct & ~success).mean()):.2f} % re-checked)",
                    name,
                )
            )
        if outside.any():
            flags.append(
                Flag(
                    "adversarial_outside_ball",
                    f"{int(outside.sum())} returned points were outside the eps ball or [0, 1] "
                    f"(beyond float tolerance {ball_tolerance(1.0):.1e}); projected and re-checked",
                    name,
                )
            )
        return flags


for _name in ("autoattack", *AA_ATTACKS):
    ATTACKS.add(_name, type(f"AutoAttack_{_name.replace('-', '_')}", (_AutoAttack,),
                            {"name": _name, "__module__": __name__}))  # fmt: skip


class _StepsOptions(Options):
    steps: Annotated[int, Field(ge=1)] = 20


@register_attack("pgd")
class _PGDAttack(EvalAttack):
    """PGD with random start (``steps``; step 2.5 eps / steps), the model in eval mode."""

    Options = _StepsOptions
    settings_keys: ClassVar[Mapping[str, str]] = {"steps": "pgd_steps"}

    def __init__(self, eps: float, norm: str, options: Options | None = None) -> None:
        super().__init__(eps, norm, options)
        self.attack = PGD(eps=eps, steps=self.options.steps, norm=norm, model_mode="eval")

    def config(self) -> dict[str, Any]:
        return self.attack.config()

    def run_batch(self, model: nn.Module, x: Tensor, y: Tensor, seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)
        x_adv = self.attack(model, x, y)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
            broken = correct & (model(x_adv).argmax(1) != y)
        dist = lp_distance(x_adv - x, self.attack.norm)
        return {"success": _np(broken), "distance": _np(torch.where(broken, dist, math.inf))}


class _FMNOptions(Options):
    steps: Annotated[int, Field(ge=1)] = 200


class _MinNorm(EvalAttack):
    """FMN-based minimum-norm attacks: the distance of each point, re-checked."""

    min_norm = True
    Options = _FMNOptions
    settings_keys: ClassVar[Mapping[str, str]] = {"steps": "fmn_steps"}

    def __init__(self, eps: float, norm: str, options: Options | None = None) -> None:
        super().__init__(eps, norm, options)
        self.attack = FMN(norm=norm, steps=self.options.steps)
        self.tuning: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        cfg = self.attack.config()
        if self.tuning is not None:
            cfg["tuning"] = self.tuning
        return cfg

    def run_batch(self, model: nn.Module, x: Tensor, y: Tensor, seed: int) -> dict[str, Any]:
        r = self.attack.run(model, x, y)
        with torch.no_grad():
            still = model(r.x_adv).argmax(1) != y
        found = r.success
        mismatch = found & ~still
        distance = torch.where(mismatch, math.inf, r.distance)
        hist = r.best_history.double()
        steps = hist.shape[0] - 1
        finite = torch.isfinite(hist)
        first_step = torch.where(finite.any(0), finite.double().argmax(0), steps)
        d_first = hist.gather(0, first_step.clamp(max=steps).unsqueeze(0)).squeeze(0)
        d_90 = hist[int(0.9 * steps)]
        return {
            "success": _np(distance <= self.eps),
            "distance": _np(distance),
            "recheck_mismatch": _np(mismatch),
            "distance_first": _np(d_first),
            "distance_90": _np(torch.where(torch.isfinite(d_90), d_90, d_first)),
        }

    def entry_details(self, arrays, correct, per_sample, details) -> list[Flag]:
        name = self.name
        distance = per_sample[f"distance_{name}"]
        per_sample[f"recheck_mismatch_{name}"] = arrays["recheck_mismatch"]
        found = distance[correct]
        details.update(
            median_distance=float(np.median(found)) if found.size else math.inf,
            success_rate=float(np.isfinite(found).mean()) if found.size else 1.0,
        )
        flags = []
        failed = int((correct & ~np.isfinite(distance)).sum())
        if failed:
            flags.append(
                Flag(
                    "unbounded_attack_failed",
                    f"the minimum-norm attack found no adversarial example for {failed} of "
                    f"{int(correct.sum())} correctly classified points",
                    name,
                )
            )
        mismatch = int(arrays["recheck_mismatch"].sum())
        if mismatch:
            flags.append(
                Flag(
                    "recheck_mismatch",
                    f"{mismatch} adversarial examples were not misclassified on re-check",
                    name,
                )
            )
        ok = correct & np.isfinite(distance)
        total = float((arrays["distance_first"][ok] - distance[ok]).sum())
        late = float((arrays["distance_90"][ok] - distance[ok]).sum())
        flag = improvement_flag(total, late, name="distance_not_converged", what="the distances")
        if flag:
            flags.append(Flag(flag.name, flag.message, name))
        return flags


@register_attack("fmn")
class _FMNAttack(_MinNorm):
    """FMN with its default settings (``steps``)."""


class _HOFMNOptions(Options):
    steps: Annotated[int, Field(ge=1)] = 200
    trials: Annotated[int, Field(ge=1)] = 32
    tune_steps: Annotated[int, Field(ge=1)] = 100
    tune_batch: Annotated[int, Field(ge=1)] = 64


@register_attack("hofmn")
class _HOFMNAttack(_MinNorm):
    """FMN tuned with optuna on the tuning split (:mod:`advprune.evaluation.hofmn`)."""

    Options = _HOFMNOptions
    settings_keys: ClassVar[Mapping[str, str]] = {
        "steps": "fmn_steps",
        "trials": "hofmn_trials",
        "tune_steps": "hofmn_tune_steps",
        "tune_batch": "hofmn_tune_batch",
    }
    STUDY_FILE = "hofmn_study.json"
    TUNED_FILE = "hofmn_config.json"

    def prepare(self, model: nn.Module, context: Mapping[str, Any]) -> None:
        """Tune FMN (or reuse the configuration tuned for this model, see
        :func:`~advprune.evaluation.hofmn.cached_tuning`): on rank 0 only in a sharded
        evaluation, its result sent to every process."""
        from advprune.distributed import SINGLE
        from advprune.evaluation.hofmn import SEARCH_SPACE, cached_tuning, fmn_config_from_params
        from advprune.io import write_json_atomic

        o, out = self.options, context.get("out")
        dist = context.get("dist") or SINGLE
        after_batch = context.get("after_batch")
        if context.get("tune") is None:
            raise ConfigError(
                "HO-FMN needs a tuning split apart from the evaluation points: pass a "
                "DataSplits or dataset name as data, or tune_data="
            )
        tuned = None
        if dist.is_main:
            tuned = cached_tuning(
                model, context["tune"], norm=self.norm, trials=o.trials, steps=o.tune_steps,
                batch_size=o.tune_batch, seed=context["settings"]["seed"],
                study_path=out / self.STUDY_FILE if out is not None else None,
                progress=context.get("progress", False), device=context.get("device"),
                on_trial=(lambda k: after_batch("hofmn-tuning", k)) if after_batch else None,
                cache=context.get("cache"), model_sha256=context.get("model_sha256"),
            )  # fmt: skip
        tuned = dist.broadcast_object(tuned)
        self.attack = FMN.from_config(
            fmn_config_from_params(tuned["best_params"], norm=self.norm, steps=o.steps)
        )
        self.tuning_seconds = 0.0 if tuned["reused"] else float(tuned["seconds"])
        self.reused = bool(tuned["reused"])
        self.tuning = {
            "trials": o.trials,
            "steps": o.tune_steps,
            "batch_size": o.tune_batch,
            "objective": "median distance over the batch's correct points, failures +inf",
            "best_trial": tuned["best_trial"],
            "best_value": tuned["best_value"],
            "search_space": SEARCH_SPACE,
        }
        if out is not None and dist.is_main:
            write_json_atomic(out / self.TUNED_FILE, self.config())

    def entry_details(self, arrays, correct, per_sample, details) -> list[Flag]:
        details["tuning_seconds"] = self.tuning_seconds
        details["tuning_reused"] = getattr(self, "reused", False)
        return super().entry_details(arrays, correct, per_sample, details)
