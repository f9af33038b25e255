"""A method and an attack defined only in this file run end to end through the CLI and a
benchmark grid: adding either changes no advprune file.

``recover-test`` has a stage sequence no shipped method has (pretrain -> prune -> finetune ->
recover, where ``recover`` retrains BatchNorm only, masks and weights fixed);
``noise-test`` is a random-noise evaluation attack with one typed option. Both register in
:func:`register` (a fixture here; ``ADVPRUNE_PLUGINS=test_plugins:register`` in the CLI and
grid subprocesses), so the other test files never see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import pytest
import torch
import yaml
from pydantic import Field
from torch import nn

from advprune.errors import ConfigError
from advprune.evaluation.attacks import ATTACKS, EvalAttack
from advprune.methods import Method, Taxonomy, register_method
from advprune.methods.base import _METHODS
from advprune.registry import Options
from advprune.sparsity import prune_magnitude

HERE = Path(__file__).resolve().parent


class RecoverTest(Method):
    """LWM masks, then two training stages after pruning: ``finetune`` trains the surviving
    weights, ``recover`` only BatchNorm (a stage no shipped method has)."""

    name: ClassVar[str] = "recover-test"
    taxonomy: ClassVar[Taxonomy] = Taxonomy(
        ap_key="RecoverTest_Test2026Recover",
        pipeline="after",
        pretraining=("NT",),
        finetuning=("NT",),
        schedule=("1S",),
        structures=("US",),
        scopes=("L",),
        criterion="LWM",
    )
    stages: ClassVar[tuple[str, ...]] = ("pretrain", "prune", "finetune", "recover")
    trains: ClassVar[dict[str, tuple[str, ...]]] = {
        "pretrain": ("weights", "bn"),
        "finetune": ("weights",),
        "recover": ("bn",),
    }

    class Options(Options):
        keep_bias: bool = True  # a typed option (validated, recorded in the card)

    def prune(self, model: nn.Module) -> dict[str, float]:
        return prune_magnitude(model, self.sparsity, layers=self.layers(model))


class NoiseOptions(Options):
    tries: Annotated[int, Field(ge=1)] = 1


class NoiseAttack(EvalAttack):
    """Uniform noise in the L∞ ball, ``tries`` draws per point (a weak attack: a test)."""

    Options = NoiseOptions

    def __init__(self, eps: float, norm: str, options: Any = None) -> None:
        super().__init__(eps, norm, options)
        if norm != "linf":
            raise ConfigError("noise-test attacks the L∞ ball only")

    def run_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
            success = torch.zeros_like(correct)
            distance = torch.full((len(y),), float("inf"))
            for _ in range(self.options.tries):
                noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * self.eps
                x_adv = (x + noise.to(x.device)).clamp(0, 1)
                broken = correct & ~success & (model(x_adv).argmax(1) != y)
                dist = (x_adv - x).flatten(1).abs().amax(1).cpu()
                distance = torch.where(broken.cpu(), dist, distance)
                success |= broken
        return {"success": success.cpu().numpy(), "distance": distance.numpy()}


def register() -> None:
    """Register both plug-ins (``ADVPRUNE_PLUGINS=test_plugins:register``)."""
    if "recover-test" not in _METHODS:
        register_method(RecoverTest)
    if "noise-test" not in ATTACKS:
        NoiseAttack.name = "noise-test"
        ATTACKS.add("noise-test", NoiseAttack)


@pytest.fixture
def plugins():
    register()
    yield
    _METHODS.pop("recover-test")
    ATTACKS.pop("noise-test")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["ADVPRUNE_PLUGINS"] = "test_plugins:register"
    return env


def _cli(*args: Any, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "advprune.cli", *map(str, args)],
        cwd=cwd, env=_env(), capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{args}: {done.stderr[-2000:]}"
    return done.stdout


FAST = ["--objective", "natural", "--epochs", "1", "--batch-size", "256", "--n", "40",
        "--eval-steps", "1", "--no-progress"]  # fmt: skip


def test_plugins_register_and_validate(plugins) -> None:
    from advprune.evaluation import create_attack, list_attacks
    from advprune.methods import create_method, list_methods

    assert "recover-test" in list_methods() and "noise-test" in list_attacks()
    method = create_method("recover-test", 0.5)
    assert method.stage_kind("recover") == "train" and method.trainable("recover") == ("bn",)
    with pytest.raises(ConfigError, match="option keep_bias must be true or false"):
        create_method("recover-test", 0.5, keep_bias="yes")
    with pytest.raises(ConfigError, match="option tries must be an integer >= 1"):
        create_attack("noise-test", 0.1, "linf", {"tries": 0})


def test_plugin_method_and_attack_through_the_cli(tmp_path: Path) -> None:
    from advprune.checkpoint import load_checkpoint

    assert "recover-test" in _cli("methods", cwd=tmp_path)
    assert "noise-test" in _cli("eval", "--help", cwd=tmp_path)
    _cli("train", *FAST, "--out", "dense", cwd=tmp_path)
    _cli("prune", "--method", "recover-test", "--checkpoint", "dense/model.safetensors",
         "--sparsity", "0.5", *FAST, "--out", "pruned", cwd=tmp_path)  # fmt: skip
    _cli("finetune", "--checkpoint", "pruned/model.safetensors", *FAST, "--out", "ft",
         cwd=tmp_path)  # fmt: skip
    _cli("finetune", "--stage", "recover", "--checkpoint", "ft/model.safetensors", *FAST,
         "--lr", "0.5", "--out", "rec", cwd=tmp_path)  # fmt: skip
    ft, _ = load_checkpoint(tmp_path / "ft" / "model.safetensors")
    rec, card = load_checkpoint(tmp_path / "rec" / "model.safetensors")
    assert card["stage"] == "recover" and card["method"]["name"] == "recover-test"
    assert card["method"]["options"] == {"keep_bias": True}
    before, after = ft.state_dict(), rec.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bn = [n for n, m in rec.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert changed and all(k.rsplit(".", 1)[0] in bn for k in changed), changed  # BN only
    _cli("eval", "rec/model.safetensors", "--attacks", "noise-test,pgd", "--attack-option",
         "noise-test.tries=3", "--eps", "3/16", "--n", "40", "--batch-size", "20",
         "--eval-steps", "2", "--no-progress", "--out", "eval", cwd=tmp_path)  # fmt: skip
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    entry = next(e for e in report["entries"] if e["name"] == "noise-test")
    assert entry["config"]["tries"] == 3 and entry["kind"] == "empirical"
    samples = np.load(tmp_path / "eval" / "per_sample.npz")
    assert samples["success_noise-test"].shape == (40,)


def test_plugin_method_and_attack_through_a_grid(tmp_path: Path) -> None:
    from advprune.bench.store import ResultsStore

    grid = {
        "name": "plugins",
        "base": {
            "dataset": "digits",
            "model": "digits_cnn",
            "objective": "natural",
            "batch_size": 256,
            "attack_steps": 1,
            "eval_steps": 1,
        },
        "pretrain": {"epochs": 1},
        "methods": {
            "recover-test": {
                "options": {"keep_bias": False},
                "finetune": {"epochs": 1},
                "stages": {"recover": {"epochs": 1, "lr": 0.5}},
            }
        },
        "sparsities": {"unstructured": [0.5]},
        "evaluation": {
            "attacks": ["noise-test"],
            "eps": "3/16",
            "n": 40,
            "options": {"attack_options": {"noise-test": {"tries": 2}}},
            "certify": ["ibp"],  # a certifier of the same registry, asked for by the grid
        },
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    out = tmp_path / "out"
    store = out / "results.sqlite"
    _cli("bench", "run", path, "--out", out, "--store", store, "--no-progress", cwd=tmp_path)
    key = "RecoverTest_Test2026Recover_DCNN_DIGITS_US_50"
    job = out / "jobs" / key
    for stage in ("prune", "finetune", "recover", "export"):
        assert (job / stage / "done").exists(), stage
    card = json.loads((job / "recover" / "model.json").read_text())
    assert card["stage"] == "recover" and card["method"]["options"] == {"keep_bias": False}
    report = ResultsStore(store).report(key, "linf-3/16")
    assert [(e["name"], e["kind"]) for e in report["entries"]] == [
        ("noise-test", "empirical"),
        ("ibp", "certified"),
    ]
    assert report["entries"][0]["config"]["tries"] == 2
