"""The evaluation protocol: AutoAttack, FMN / HO-FMN distances, security curves, attack-failure
checks, per-sample results and resumable runs.

>>> report = evaluate(model, "digits", eps="3/16", attacks="autoattack,hofmn", out="runs/eval")
>>> print(report.format())  # doctest: +SKIP

The CLI front end is ``advprune eval CHECKPOINT --attacks autoattack,hofmn --eps 8/255 --out DIR``.
"""

from advprune.evaluation import certifiers  # noqa: F401  (registers the certifiers)
from advprune.evaluation.attacks import (
    ATTACKS,
    EvalAttack,
    attack_names,
    create_attack,
    list_attacks,
    register_attack,
    run_attack,
)
from advprune.evaluation.autoattack import (
    AA_ATTACKS,
    AA_VERSIONS,
    AutoAttackBatch,
    autoattack_attacks,
    run_autoattack,
)
from advprune.evaluation.checks import Probe, run_probe
from advprune.evaluation.curve import (
    default_eps_grid,
    plot_security_curve,
    robust_accuracy_at,
    save_figure,
    security_curve,
)
from advprune.evaluation.hofmn import SEARCH_SPACE, TuningResult, tune_fmn
from advprune.evaluation.report import Entry, Flag, Report, load_report
from advprune.evaluation.runner import ATTACK_NAMES, DEFAULT_ATTACKS, evaluate, parse_attacks

__all__ = [
    "AA_ATTACKS",
    "AA_VERSIONS",
    "ATTACKS",
    "ATTACK_NAMES",
    "DEFAULT_ATTACKS",
    "SEARCH_SPACE",
    "AutoAttackBatch",
    "Entry",
    "EvalAttack",
    "Flag",
    "Probe",
    "Report",
    "TuningResult",
    "attack_names",
    "autoattack_attacks",
    "create_attack",
    "default_eps_grid",
    "evaluate",
    "list_attacks",
    "load_report",
    "parse_attacks",
    "plot_security_curve",
    "register_attack",
    "robust_accuracy_at",
    "run_attack",
    "run_autoattack",
    "run_probe",
    "save_figure",
    "security_curve",
    "tune_fmn",
]
