"""Test plug-in (``ADVPRUNE_PLUGINS=_crash_objective``): the ``pgd`` objective under the name
``pgd-crash``, which kills its own process (SIGKILL, like the out-of-memory killer) at a given
training step when ``ADVPRUNE_TEST_CRASH=RANK:STEP`` is set; without it, plain PGD-AT. The
same objective name with and without the variable lets a crashed torchrun job be rerun and
resumed with the very settings it started with."""

from __future__ import annotations

import os
import signal

from advprune.training import PGDTraining, register_objective


@register_objective("pgd-crash")
class CrashingPGD(PGDTraining):
    calls = 0

    def __call__(self, model, x, y):
        crash = os.environ.get("ADVPRUNE_TEST_CRASH")
        if crash and model.training:
            rank, step = (int(v) for v in crash.split(":"))
            if int(os.environ.get("RANK", "0")) == rank and CrashingPGD.calls == step:
                os.kill(os.getpid(), signal.SIGKILL)
            CrashingPGD.calls += 1
        return super().__call__(model, x, y)
