"""Attack-failure checks run on every evaluation.

After Pintor et al., "Indicators of Attack Failure: Debugging and Improving Optimization of
Adversarial Examples" (NeurIPS 2022), and AutoAttack's own checks. Each check that fires
returns a named :class:`~advprune.evaluation.report.Flag`:

* ``zero_gradients`` / ``nonfinite_gradients``: the input gradient of the logit difference is
  exactly zero / not finite at some evaluation point (gradient masking, e.g. quantised or
  non-differentiable inputs). The logit difference does not saturate as cross-entropy does,
  so a confident model does not trip this check.
* ``nondeterministic_outputs``: two identical forward passes in eval mode differ (randomised
  defence, or a model left in train mode internally).
* ``loss_not_converged``: a PGD probe's loss (logit difference, clipped at the boundary) was
  still improving over its last 10 % of steps; ``distance_not_converged``: an FMN attack's
  best distances were still shrinking over its last 10 % of steps.
* ``unbounded_attack_failed``: an attack without a meaningful bound (the PGD probe over the
  whole input box, or FMN) did not reach every correctly classified point.
* ``robust_accuracy_rises_with_eps``: the PGD probe found more robust points at a larger eps.
* ``square_beats_whitebox``: AutoAttack's black-box Square broke points the white-box attacks
  before it could not (more than AutoAttack's own 0.2 percentage-point threshold).
* ``autoattack_count_mismatch``, ``adversarial_outside_ball``, ``recheck_mismatch``: the
  attack's own verdict disagrees with advprune's re-check, a returned point left the eps ball
  or ``[0, 1]``, or a reported adversarial example is not misclassified on re-check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advprune.attacks.pgd import project, projected_gradient_ascent
from advprune.errors import ConfigError, DataError
from advprune.evaluation.report import Flag

__all__ = [
    "CONVERGENCE_TOLERANCE",
    "OUTPUT_TOLERANCE",
    "SQUARE_THRESHOLD",
    "Probe",
    "check_logits",
    "convergence_flag",
    "forward_checks",
    "improvement_flag",
    "merge_probe",
    "model_flags",
    "probe_flags",
    "probe_runs",
    "probe_tasks",
    "run_probe",
]

#: Relative change of logits between two identical passes tolerated as float noise.
OUTPUT_TOLERANCE = 1e-4
#: A loss or distance "still improving": the last 10 % of steps gave more than this fraction
#: of the whole run's improvement.
CONVERGENCE_TOLERANCE = 0.05
#: Square may lower robust accuracy by this much (AutoAttack's own threshold, 0.2 points).
SQUARE_THRESHOLD = 0.002
#: eps multiples the PGD probe attacks (plus the whole input box).
PROBE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def check_logits(out: object, n: int, num_classes: int | None = None) -> Tensor:
    """Raise a one-line :class:`ConfigError` unless ``out`` looks like (n, C) logits."""
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"the model must return a tensor of logits (N, classes); it returned "
            f"{type(out).__name__}"
        )
    if out.dim() != 2 or out.shape[0] != n:
        raise ConfigError(
            f"the model must return logits of shape (N, classes) for N={n} inputs; it returned "
            f"shape {tuple(out.shape)}"
        )
    if not out.is_floating_point():
        raise ConfigError(f"the model must return float logits, not {out.dtype}")
    if out.shape[1] < 2:
        raise ConfigError(f"the model returns {out.shape[1]} logit per input; need >= 2 classes")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ConfigError(
            f"the model returns {out.shape[1]} logits per input but the data has "
            f"{num_classes} classes"
        )
    if not bool(torch.isfinite(out).all()):
        raise ConfigError("the model returns non-finite outputs (nan or inf) on clean inputs")
    o = out.detach().float()
    if bool(((o >= 0) & (o <= 1)).all()) and bool(((o.sum(1) - 1).abs() < 1e-4).all()):
        raise ConfigError(
            "the model's outputs are probabilities (in [0, 1], rows sum to 1); attacks need "
            "logits: remove the final softmax"
        )
    return out


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """``max_{j != y} z_j - z_y`` per sample: > 0 exactly when misclassified."""
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    return logits.scatter(1, y.unsqueeze(1), -math.inf).amax(1) - true


@dataclass
class BatchChecks:
    """What :func:`forward_checks` measured on one batch."""

    logits: Tensor  # (N, C) from the first no-grad pass
    grad_norm: Tensor  # (N,) float64 L1 norm of the logit difference's input gradient
    output_change: float  # largest relative change of logits between two identical passes


def forward_checks(model: nn.Module, x: Tensor, y: Tensor, num_classes: int | None) -> BatchChecks:
    """Validate the model's output on a clean batch and measure gradients and determinism.

    The model must already be in the mode it is evaluated in (eval).
    """
    with torch.no_grad():
        first = check_logits(model(x), x.shape[0], num_classes)
        second = model(x)
    if int(y.min()) < 0 or int(y.max()) >= first.shape[1]:
        raise DataError(
            f"labels must be in [0, {first.shape[1] - 1}] for a model with {first.shape[1]} "
            f"outputs; got labels {int(y.min())}..{int(y.max())}"
        )
    scale = float(first.abs().max()) + 1.0
    change = float((second.float() - first.float()).abs().max()) / scale
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        margin = _margin(model(xg).float(), y)
        (grad,) = torch.autograd.grad(margin.sum(), xg, allow_unused=True)
    if grad is None:
        grad_norm = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    else:
        grad_norm = grad.detach().flatten(1).double().abs().sum(1)
    return BatchChecks(logits=first.detach(), grad_norm=grad_norm, output_change=change)


def model_flags(grad_norm: np.ndarray, output_change: float) -> list[Flag]:
    """Flags from the gradients and output changes gathered over the evaluation set."""
    flags = []
    n = grad_norm.size
    nonfinite = int((~np.isfinite(grad_norm)).sum())
    zero = int((grad_norm == 0).sum())
    if zero:
        flags.append(
            Flag(
                "zero_gradients",
                f"the input gradient is exactly zero at {zero} of {n} points "
                "(gradient masking: gradient-based attacks cannot move)",
            )
        )
    if nonfinite:
        flags.append(
            Flag("nonfinite_gradients", f"the input gradient is not finite at {nonfinite} of {n}")
        )
    if output_change > OUTPUT_TOLERANCE:
        flags.append(
            Flag(
                "nondeterministic_outputs",
                f"two identical forward passes differ (largest relative change "
                f"{output_change:.3g}); randomised models need an EOT attack "
                "(AutoAttack version rand)",
            )
        )
    return flags


# ------------------------------------------------------------------------------ PGD probe


@dataclass
class Probe:
    """Results of :func:`run_probe` on the probe points (clean-correct ones only count)."""

    eps: list[float]  # attacked radii, ascending; the last is the whole input box
    robust_accuracy: list[float]  # robust fraction of the probe points at each eps
    unbounded_success: float  # fraction of clean-correct points broken over the whole box
    loss_history: list[float] = field(default_factory=list)  # nominal eps, per step
    n: int = 0


def _box_radius(x: Tensor, norm: str) -> float:
    """A radius whose ball holds the whole input box around any point of it."""
    return 1.0 if norm == "linf" else math.sqrt(x[0].numel())


def _pgd_with_history(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str, steps: int
) -> tuple[Tensor, Tensor]:
    """PGD on the logit difference from ``x`` (no random start) with a cosine step size from
    ``eps / 2``; returns (broken (N,) bool, best clipped loss per step (steps + 1, N))."""
    seen: list[Tensor] = []

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        m = _margin(logits.float(), target)
        seen.append(m.detach())
        return m.sum()

    x_adv = x.detach().clone()
    for t in range(steps):
        step = 0.5 * eps * (1 + math.cos(math.pi * t / steps)) / 2
        x_adv = projected_gradient_ascent(
            model, x, y, loss, eps=eps, step_size=max(step, 1e-12), steps=1, norm=norm,
            x_init=x_adv,
        )  # fmt: skip
    with torch.no_grad():
        seen.append(_margin(model(project(x_adv, x, eps, norm)).float(), y))
    best = torch.stack(seen).cummax(0).values
    return best[-1] > 0, best.clamp(max=0.0)


def probe_tasks(x: Tensor, eps: float, norm: str) -> list[tuple[float, bool]]:
    """The probe's PGD runs, in order: ``(radius, is_history_only)``: one per radius
    (:data:`PROBE_FACTORS` times ``eps`` inside the box, then the whole box), plus a run at
    ``eps`` for the loss history where ``eps`` is not one of the radii."""
    box = _box_radius(x, norm)
    radii = [f * eps for f in PROBE_FACTORS if f * eps < box] + [box]
    tasks = [(r, False) for r in radii]
    if eps not in radii:
        tasks.append((eps, True))
    return tasks


def probe_runs(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    steps: int = 50,
    rank: int = 0,
    world: int = 1,
) -> dict[int, dict[str, Any]]:
    """This process's share of :func:`run_probe`: task ``i`` of :func:`probe_tasks` where
    ``i % world == rank``, each ``{"correct", "broken": counts, "history": [...]}`` by task.
    Every task runs the same code on all the probe points in whichever process, so the
    merged probe (:func:`merge_probe`) is the same for any number of processes."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    xs, ys = x[correct], y[correct]
    out: dict[int, dict[str, Any]] = {}
    for i, (r, _) in enumerate(probe_tasks(x, eps, norm)):
        if i % world != rank:
            continue
        run = {"correct": xs.shape[0], "broken": 0, "history": []}
        if xs.shape[0]:
            broken, hist = _pgd_with_history(model, xs, ys, r, norm, steps)
            run.update(broken=int(broken.sum()), history=hist.mean(1).tolist())
        out[i] = run
    return out


def merge_probe(
    runs: dict[int, dict[str, Any]], x: Tensor, *, eps: float, norm: str, n: int
) -> Probe:
    """The :class:`Probe` from every task's run (:func:`probe_runs` of all processes)."""
    tasks = probe_tasks(x, eps, norm)
    radii = [r for r, history_only in tasks if not history_only]
    robust, history, box_success = [], [], 1.0
    for i, (r, history_only) in enumerate(tasks):
        run = runs[i]
        correct = run["correct"]
        if r == eps:
            history = run["history"]
        if history_only:
            continue
        robust.append((correct - run["broken"]) / n)
        if i == len(radii) - 1 and correct:
            box_success = run["broken"] / correct
    return Probe(
        eps=radii,
        robust_accuracy=robust,
        unbounded_success=box_success,
        loss_history=history,
        n=n,
    )


def run_probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    steps: int = 50,
) -> Probe:
    """Attack ``(x, y)`` with PGD at several multiples of ``eps`` and over the whole box.

    The model must be in eval mode. Only correctly classified points are attacked. A sharded
    evaluation shares the runs out with :func:`probe_runs` and :func:`merge_probe`.
    """
    runs = probe_runs(model, x, y, eps=eps, norm=norm, steps=steps)
    return merge_probe(runs, x, eps=eps, norm=norm, n=x.shape[0])


def improvement_flag(total: float, late: float, *, name: str, what: str) -> Flag | None:
    """Flag an attack whose last 10 % of steps gave more than :data:`CONVERGENCE_TOLERANCE`
    of its total improvement (``total`` and ``late`` are improvements, >= 0)."""
    if total > 0 and late > CONVERGENCE_TOLERANCE * total:
        return Flag(
            name,
            f"{what} improved by {100 * late / total:.1f} % of its total in the last 10 % of "
            "steps; the attack had not converged: use more steps",
        )
    return None


def convergence_flag(history: np.ndarray | list[float], *, name: str, what: str) -> Flag | None:
    """:func:`improvement_flag` of a best-so-far curve to maximise (one value per step)."""
    h = np.asarray(history, dtype=np.float64)
    h = h[np.isfinite(h)]
    if h.size < 10:
        return None
    late_start = h[int(0.9 * (h.size - 1))]
    return improvement_flag(float(h[-1] - h[0]), float(h[-1] - late_start), name=name, what=what)


def probe_flags(probe: Probe) -> list[Flag]:
    """Flags from a :class:`Probe`."""
    flags = []
    flag = convergence_flag(
        probe.loss_history, name="loss_not_converged", what="the PGD probe's loss at eps"
    )
    if flag:
        flags.append(flag)
    if probe.unbounded_success < 1.0:
        flags.append(
            Flag(
                "unbounded_attack_failed",
                f"PGD over the whole input box broke only {100 * probe.unbounded_success:.1f} % "
                "of the correctly classified probe points (should be 100 %)",
            )
        )
    for (e0, a0), (e1, a1) in zip(
        zip(probe.eps, probe.robust_accuracy), zip(probe.eps[1:], probe.robust_accuracy[1:])
    ):
        if a1 > a0:
            flags.append(
                Flag(
                    "robust_accuracy_rises_with_eps",
                    f"PGD robust accuracy rises from {100 * a0:.1f} % at eps {e0:.4g} to "
                    f"{100 * a1:.1f} % at eps {e1:.4g}",
                )
            )
            break
    return flags
