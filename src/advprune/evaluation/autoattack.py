"""AutoAttack (Croce & Hein, ICML 2020) through the ``pyautoattack`` package, re-checked.

The attacks of a version run one after the other on the points still robust, as in
``AutoAttack.run_standard_evaluation``, but one call per attack so that every success is
attributed to the attack that found it (needed to flag Square succeeding where the white-box
attacks failed). Every returned point is re-checked by advprune: inside the eps ball and
``[0, 1]`` (points outside beyond float rounding are projected back and flagged) and
misclassified by the model in eval mode. Robust accuracy comes from that re-check, never from
printed output; AutoAttack's own verdict (its returned labels) is kept to flag disagreements.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from advprune.attacks.fmn import lp_distance
from advprune.attacks.pgd import model_mode_scope, project
from advprune.errors import ConfigError, UnknownNameError

__all__ = [
    "AA_ATTACKS",
    "AA_VERSIONS",
    "WHITE_BOX",
    "AutoAttackBatch",
    "autoattack_attacks",
    "ball_tolerance",
    "run_autoattack",
]

AA_VERSIONS: tuple[str, ...] = ("standard", "plus", "rand")
AA_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
WHITE_BOX = frozenset({"apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t"})
_STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
_VERSION_ATTACKS = {
    "standard": _STANDARD,
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
_AA_NORM = {"linf": "Linf", "l2": "L2"}
_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4, "fab-t": 3}


def ball_tolerance(eps: float) -> float:
    """Slack for float rounding when checking ``||x_adv - x|| <= eps`` (1e-6 + 1e-5 * eps)."""
    return 1e-6 + 1e-5 * eps


def autoattack_attacks(
    version: str = "standard", attacks: Sequence[str] | None = None
) -> list[str]:
    """The attacks run, in order: ``attacks`` if given (each validated), else the version's."""
    if version not in AA_VERSIONS:
        raise UnknownNameError("AutoAttack version", str(version), AA_VERSIONS)
    if attacks is None:
        return list(_VERSION_ATTACKS[version])
    names = [str(a).strip().lower() for a in attacks]
    if not names:
        raise ConfigError("the list of AutoAttack attacks is empty")
    for name in names:
        if name not in AA_ATTACKS:
            raise UnknownNameError("AutoAttack attack", name, AA_ATTACKS)
    if len(set(names)) != len(names):
        raise ConfigError(f"AutoAttack attacks listed twice: {', '.join(names)}")
    return names


@dataclass
class AutoAttackBatch:
    """Per-sample results of :func:`run_autoattack` on one batch (N samples).

    Attributes:
        x_adv: (N, ...) the adversarial example where one was found (re-checked), else ``x``.
        success: (N,) bool, advprune's verdict: clean-correct, and ``x_adv`` is misclassified
            by the model in eval mode and inside the eps ball and ``[0, 1]``.
        own_success: (N,) bool, AutoAttack's verdict (the labels it returned differ from y).
        first_attack: (N,) int64 index into ``attacks`` of the attack that broke the sample,
            -1 where none did.
        outside_ball: (N,) bool, AutoAttack returned a point outside the ball or ``[0, 1]``
            beyond float rounding (it was projected back before the re-check).
        attacks: the attacks run, in order.
        warnings: messages AutoAttack logged (its own checks), deduplicated.
    """

    x_adv: Tensor
    success: Tensor
    own_success: Tensor
    first_attack: Tensor
    outside_ball: Tensor
    attacks: list[str]
    warnings: list[str]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def _captured_aa_log() -> Iterator[_Capture]:
    """Collect AutoAttack's warnings instead of printing them."""
    logger = logging.getLogger("auto-attack")
    handler = _Capture()
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _outside(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    dist = lp_distance(x_adv - x, norm)
    out_box = (x_adv < 0).flatten(1).any(1) | (x_adv > 1).flatten(1).any(1)
    bad = ~torch.isfinite(x_adv).flatten(1).all(1)
    return (dist > eps + ball_tolerance(eps)) | out_box | bad


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    seed: int = 0,
) -> AutoAttackBatch:
    """Run AutoAttack on one batch and re-check its output; see the module docstring.

    Args:
        model: classifier on inputs in [0, 1]; run in eval mode (restored afterwards).
        x: (N, ...) inputs in [0, 1]; y: (N,) labels.
        eps: radius in input units; norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"plus"`` or ``"rand"``;
            its settings (restarts, target classes, queries) are used.
        attacks: run these attacks (in this order) with the version's settings instead of the
            version's list, e.g. ``["square"]`` for Square alone.
        seed: seed of every attack (AutoAttack reseeds torch's RNG; the caller's RNG state is
            restored afterwards).
    """
    from pyautoattack import AutoAttack

    if norm not in _AA_NORM:
        raise UnknownNameError("norm", norm, tuple(_AA_NORM))
    order = autoattack_attacks(version, attacks)
    device = x.device
    n = x.shape[0]
    success = torch.zeros(n, dtype=torch.bool, device=device)
    own = torch.zeros_like(success)
    outside = torch.zeros_like(success)
    first = torch.full((n,), -1, dtype=torch.long, device=device)
    x_adv = x.detach().clone()
    devices = [device] if device.type == "cuda" else []
    with model_mode_scope(model, "eval"), _captured_aa_log() as log:
        with torch.no_grad():
            logits = model(x)
        num_classes = logits.shape[1]
        for name in order:
            if num_classes < _MIN_CLASSES.get(name, 2):
                raise ConfigError(
                    f"AutoAttack's {name} needs at least {_MIN_CLASSES[name]} classes; the model "
                    f"has {num_classes}; choose other attacks (e.g. apgd-ce, fab, square)"
                )
        remaining = logits.argmax(1) == y
        with torch.random.fork_rng(devices=devices):
            aa = AutoAttack(
                model, norm=_AA_NORM[norm], eps=eps, version=version, seed=seed, device=device
            )
            aa.verbose = False
            aa.apgd_targeted.n_target_classes = min(9, num_classes - 1)
            aa.fab.n_target_classes = min(9, num_classes - 1)
            for k, name in enumerate(order):
                idx = remaining.nonzero().flatten()
                if idx.numel() == 0:
                    break
                aa.attacks_to_run = [name]
                xa, ya = aa.run_standard_evaluation(x[idx], y[idx], batch_size=idx.numel())
                xa = xa.to(device)
                own[idx] |= ya.to(device) != y[idx]
                off = _outside(xa, x[idx], eps, norm)
                if off.any():
                    outside[idx[off]] = True
                    xa = torch.where(
                        off.view(-1, *[1] * (x.dim() - 1)),
                        project(xa.nan_to_num(0.0), x[idx], eps, norm),
                        xa,
                    )
                with torch.no_grad():
                    broken = model(xa).argmax(1) != y[idx]
                hit = idx[broken]
                success[hit] = True
                first[hit] = k
                x_adv[hit] = xa[broken]
                remaining[hit] = False
    return AutoAttackBatch(
        x_adv=x_adv,
        success=success,
        own_success=own,
        first_attack=first,
        outside_ball=outside,
        attacks=order,
        warnings=list(log.messages),
    )
