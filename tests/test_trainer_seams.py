"""The trainer is handed its optimizer, precision and distributed context; every TrainConfig
setting is a YAML key and a CLI flag from one definition."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from advprune.cli import _run_config, build_parser
from advprune.config import TRAIN_FIELDS, RunConfig, load_config
from advprune.distributed import SINGLE, DistContext
from advprune.errors import UnknownNameError
from advprune.models import create
from advprune.training import Precision, TrainConfig, Trainer, create_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create("digits_cnn", num_classes=10, in_channels=1)


def test_trainer_steps_the_optimizer_it_is_handed(tmp_path: Path) -> None:
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = Trainer(model, create_objective("natural"), _data(), TrainConfig(epochs=1, lr=1e-3),
                      optimizer=adam, progress=False)  # fmt: skip
    assert trainer.optimizer is adam and adam.param_groups[0]["base_lr"] == 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit()
    assert adam.state and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_only_the_main_process_writes(tmp_path: Path) -> None:
    other = DistContext(rank=1, world_size=1)
    assert SINGLE.is_main and not other.is_main and not other.distributed
    assert torch.equal(SINGLE.reduce_sum(torch.tensor([2.0])), torch.tensor([2.0]))
    out = tmp_path / "run"
    Trainer(_model(), create_objective("natural"), _data(), TrainConfig(epochs=1), out_dir=out,
            progress=False, dist=other).fit()  # fmt: skip
    assert not out.exists()
    Trainer(_model(), create_objective("natural"), _data(), TrainConfig(epochs=1), out_dir=out,
            progress=False).fit()  # fmt: skip
    assert (out / "last.safetensors").exists() and (out / "metrics.jsonl").exists()


def test_precision_is_handed_in_or_follows_amp() -> None:
    trainer = Trainer(_model(), create_objective("natural"), _data(), TrainConfig(amp=True),
                      progress=False)  # fmt: skip
    assert trainer.precision == Precision("amp")
    trainer = Trainer(_model(), create_objective("natural"), _data(), TrainConfig(amp=True),
                      progress=False, precision=Precision("fp32"))  # fmt: skip
    assert not trainer.precision.mixed
    with pytest.raises(UnknownNameError, match="precision"):
        Precision("fp8")


def test_every_train_setting_is_a_yaml_key_and_a_flag(tmp_path: Path) -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed", "select_by"}
    assert set(TRAIN_FIELDS) == names and names <= set(RunConfig.model_fields)
    argv = ["train", "--nesterov", "--milestones", "0.3,0.6", "--gamma", "0.5",
            "--grad-clip", "2", "--schedule", "step", "--momentum", "0.8"]  # fmt: skip
    cfg = _run_config(build_parser().parse_args(argv)).train_config()
    assert cfg.nesterov and cfg.milestones == (0.3, 0.6) and cfg.gamma == 0.5
    assert cfg.grad_clip == 2.0 and cfg.schedule == "step" and cfg.momentum == 0.8
    path = tmp_path / "run.yaml"
    path.write_text("nesterov: true\nmilestones: [0.25]\ngrad_clip: 0.5\n")
    tcfg = load_config(path).train_config(select_by="clean")
    assert tcfg.nesterov and tcfg.milestones == (0.25,) and tcfg.grad_clip == 0.5
    assert tcfg.select_by == "clean"
