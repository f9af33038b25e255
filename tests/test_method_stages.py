"""The method framework: rounds, stage training, regularizers, rebuild from cards, CLI options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from advprune import pipeline as wf
from advprune.config import load_config
from advprune.errors import ConfigError
from advprune.methods import LWM, create_method, method_from_config, register_method
from advprune.methods.base import _METHODS
from advprune.sparsity import layer_densities, prune_magnitude
from advprune.training import Regularizer


class _CountingRegularizer(Regularizer):
    def __init__(self) -> None:
        self.epochs = 0

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self.epochs += 1
        return {"seen": float(self.epochs)}


class _TwoRoundsTest(LWM):
    """LWM in two rounds (half the target, then the target), weights training in between."""

    name: ClassVar[str] = "two-rounds-test"
    rounds = 2
    trains: ClassVar[dict] = {"prune": ("weights",), "finetune": ("weights", "bn")}
    made: ClassVar[list] = []

    def prune_round(self, model: nn.Module, round_index: int) -> dict[str, float]:
        sparsity = self.sparsity * (round_index + 1) / self.rounds
        from advprune.sparsity import remove_mask

        for module in self.layers(model).values():
            if hasattr(module, "parametrizations"):
                remove_mask(module, fold=True)
        return prune_magnitude(model, sparsity, layers=self.layers(model))

    def regularizer(self, stage: str) -> Regularizer | None:
        reg = _CountingRegularizer()
        self.made.append((stage, reg))
        return reg


@pytest.fixture(autouse=True)
def _registered():
    register_method(_TwoRoundsTest)
    yield
    _METHODS.pop(_TwoRoundsTest.name, None)


def _cfg(**kw):
    base = {"epochs": 1, "attack_steps": 1, "batch_size": 256, "progress": False, "n": 40}
    return load_config(None, {**base, **kw})


def test_prune_stage_runs_rounds_and_trains_between_them(tmp_path: Path) -> None:
    cfg = _cfg(method="two-rounds-test", sparsity=0.8, objective="natural")
    data = wf.prepare_data(cfg)
    model, _ = wf.build_model(cfg, data)
    _TwoRoundsTest.made.clear()
    pruned, card = wf.prune_stage(cfg, data, model, out=tmp_path)
    assert [stage for stage, _ in _TwoRoundsTest.made] == ["prune", "prune"]
    assert all(reg.epochs == 1 for _, reg in _TwoRoundsTest.made)
    for r in (0, 1):
        rows = (tmp_path / f"round_{r}" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(rows[0])["extra"] == {"seen": 1.0}
    densities = layer_densities(pruned)
    assert all(d == pytest.approx(0.2, abs=0.01) for d in densities.values())
    assert card["stage"] == "prune" and card["method"]["name"] == "two-rounds-test"
    assert (tmp_path / wf.MODEL_FILE).exists()
    # the input model is untouched
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_training_prune_stage_needs_an_output_folder() -> None:
    cfg = _cfg(method="two-rounds-test", objective="natural")
    data = wf.prepare_data(cfg)
    model, _ = wf.build_model(cfg, data)
    with pytest.raises(ConfigError, match="output folder"):
        wf.prune_stage(cfg, data, model, out=None)


def test_method_rebuilds_from_its_card_entry() -> None:
    method = create_method("lwm", "9/10", structure="filters", scope="global", keep_first=True)
    again = method_from_config(json.loads(json.dumps(method.config())))
    assert again.config() == method.config()
    assert again.trainable("finetune") == ("weights", "bn")
    assert again.trainable("prune") == ()
    with pytest.raises(ConfigError, match="has no stage 'warmup'"):
        again.trainable("warmup")
    with pytest.raises(ConfigError, match="name and sparsity"):
        method_from_config({"sparsity": 0.5})


def test_method_options_come_from_config_and_are_validated() -> None:
    cfg = _cfg(method="lwm", method_options={"temperature": 2})
    with pytest.raises(ConfigError, match=r"unknown option.*temperature"):
        wf.make_method(cfg)


def test_cli_option_flag_parses_yaml_values(tmp_path: Path) -> None:
    from advprune.cli import _run_config, build_parser

    args = build_parser().parse_args(
        ["prune", "--option", "freeze_bn=true", "--option", "init=uniform", "--option", "a=0.5"]
    )
    args.method_options = dict(args.method_options)
    cfg = _run_config(args)
    assert cfg.method_options == {"freeze_bn": True, "init": "uniform", "a": 0.5}


def test_cli_prune_without_checkpoint_names_why(tmp_path: Path, capsys) -> None:
    from advprune.cli import main

    rc = main(["prune", "--method", "lwm", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoint" in err and "prunes a trained model" in err
    assert err.count("\n") == 1
    rc = main(["prune", "--method", "lwm", "--option", "nonsense", "--out", str(tmp_path)])
    assert rc == 2 and "KEY=VALUE" in capsys.readouterr().err


def test_stage_freezes_untrained_parameters_bit_identically(tmp_path: Path) -> None:
    cfg = _cfg(method="two-rounds-test", objective="natural")
    data = wf.prepare_data(cfg)
    model, _ = wf.build_model(cfg, data)
    bn = {
        f"{name}.{p}": getattr(m, p).detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in ("weight", "bias")
    }
    assert len(bn) == 6
    pruned, _ = wf.prune_stage(cfg, data, model, out=tmp_path)
    after = dict(pruned.named_parameters())
    # weights train, BatchNorm affine parameters do not (the method's prune stage: weights only)
    for key, value in bn.items():
        assert torch.equal(value, after[key]), key
    conv = "features.0.parametrizations.weight.original"
    assert not torch.equal(model.features[0].weight, after[conv])
