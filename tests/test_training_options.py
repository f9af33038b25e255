"""Precision (fp32 / bf16 / fp16, recorded in the card), optimizers and schedules from one
definition, and a training loop that does not wait for the device once per batch."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from advprune.cli import _run_config, build_parser, main
from advprune.config import load_config
from advprune.data import DeviceLoader, TensorImageDataset
from advprune.errors import ConfigError, UnknownNameError
from advprune.models import create
from advprune.training import (
    Precision,
    TrainConfig,
    Trainer,
    build_optimizer,
    create_objective,
    list_optimizers,
    lr_factor,
)

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = ["--epochs", "1", "--attack-steps", "1", "--eval-steps", "1", "--eval-n", "20",
        "--progress", "off"]  # fmt: skip


def _model():
    torch.manual_seed(0)
    return create("digits_cnn", width=4)


def _loader(batches: int, batch: int = 8) -> DeviceLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batches * batch, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (batches * batch,), generator=g)
    return DeviceLoader(TensorImageDataset(images, labels), batch, shuffle=True)


# ---------------------------------------------------------------------------- precision


def test_precision_names_and_the_old_amp_switch() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert Precision.from_config(TrainConfig()).name == "fp32"
    assert Precision.from_config(TrainConfig(amp=True)).resolved(cpu) == "bf16"
    assert Precision.from_config(TrainConfig(amp=True)).resolved(gpu) == "fp16"
    assert Precision("bf16").dtype(cpu) == torch.bfloat16
    assert Precision("fp16").dtype(gpu) == torch.float16
    with pytest.raises(ConfigError, match="set precision only"):
        TrainConfig(amp=True, precision="bf16")
    with pytest.raises(UnknownNameError, match="precision"):
        TrainConfig(precision="fp8")


def test_bf16_trains_with_fp32_master_weights() -> None:
    model = _model()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    Trainer(model, create_objective("natural"), _loader(2), TrainConfig(epochs=1,
            precision="bf16"), progress=False).fit()  # fmt: skip
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_without_cuda_is_one_line(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Trainer(_model(), create_objective("natural"), _loader(1),
                TrainConfig(precision="fp16"), progress=False)  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", *TINY, "--precision", "fp16", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: precision fp16 needs a CUDA device" in err[0]
    assert not out.exists()  # nothing written


def test_the_card_records_the_precision(tmp_path: Path) -> None:
    for flags, expected in ((["--precision", "bf16"], "bf16"), ([], "fp32"), (["--amp"], "bf16")):
        out = tmp_path / expected / str(len(flags))
        assert main(["train", *TINY, *flags, "--out", str(out)]) == 0
        card = json.loads((out / "model.json").read_text())
        assert card["training"]["precision"] == expected
        best = json.loads((out / "best.json").read_text())
        assert best["training"]["precision"] == expected


# ---------------------------------------------------------------------------- optimizers


def test_every_optimizer_from_yaml_and_cli(tmp_path: Path) -> None:
    assert set(list_optimizers()) >= {"sgd", "sgd-nesterov", "adam", "adamw"}
    expected = {"sgd": torch.optim.SGD, "sgd-nesterov": torch.optim.SGD,
                "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}  # fmt: skip
    params = [torch.nn.Parameter(torch.ones(3))]
    for name, cls in expected.items():
        opt = build_optimizer([{"params": params}], TrainConfig(optimizer=name, lr=0.01))
        assert type(opt) is cls and opt.param_groups[0]["base_lr"] == 0.01
    assert build_optimizer([{"params": params}], TrainConfig(optimizer="sgd-nesterov")
                           ).param_groups[0]["nesterov"]  # fmt: skip
    args = ["train", "--optimizer", "adamw", "--betas", "0.8,0.99", "--schedule", "onecycle",
            "--cycle-peak", "0.2"]  # fmt: skip
    cfg = _run_config(build_parser().parse_args(args)).train_config()
    assert (cfg.optimizer, cfg.betas, cfg.schedule, cfg.cycle_peak) == (
        "adamw", (0.8, 0.99), "onecycle", 0.2)  # fmt: skip
    opt = build_optimizer([{"params": params}], cfg)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    path = tmp_path / "run.yaml"
    path.write_text("optimizer: adam\nschedule: onecycle\nprecision: bf16\n")
    cfg = load_config(path).train_config()
    assert (cfg.optimizer, cfg.schedule, cfg.precision) == ("adam", "onecycle", "bf16")
    with pytest.raises(UnknownNameError, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ConfigError, match="betas"):
        TrainConfig(betas=(0.9,))


def test_onecycle_follows_torch_onecyclelr() -> None:
    cfg = TrainConfig(epochs=10, schedule="onecycle", cycle_peak=0.3)
    steps = 1000
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=steps,
                                                pct_start=0.3, cycle_momentum=False)  # fmt: skip
    for step in range(steps - 1):
        # torch's step s sits at s / (steps - 1) of its phases' ends; same curve, continuous
        mine = lr_factor(cfg, 10 * _torch_position(step, steps, 0.3))
        assert mine == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-12)
        opt.step()
        sched.step()
    assert lr_factor(cfg, 0) == pytest.approx(1 / 25)
    assert lr_factor(cfg, 3) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1 / 25 / 1e4)
    assert lr_factor(TrainConfig(epochs=10), 5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def _torch_position(step: int, total: int, pct: float) -> float:
    """Where OneCycleLR's step ``step`` lies in [0, 1] of the stage on the continuous curve."""
    peak = pct * total - 1
    if step <= peak:
        return pct * step / peak
    return pct + (1 - pct) * (step - peak) / (total - 1 - peak)


# ---------------------------------------------------------------------------- host syncs


class _Reads:
    """Counts the ways Python reads a tensor's value (each waits for the device)."""

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in self.names:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("objective", ["natural", "pgd"])
def test_an_epoch_reads_the_device_a_fixed_number_of_times(monkeypatch, objective) -> None:
    """The number of host reads in an epoch does not grow with its number of batches."""
    counts = []
    reads = _Reads(monkeypatch)
    for batches in (3, 9):
        obj = create_objective(objective, eps="3/16", steps=2) if objective == "pgd" else (
            create_objective("natural"))  # fmt: skip
        trainer = Trainer(_model(), obj, _loader(batches), TrainConfig(epochs=1),
                          progress=False)  # fmt: skip
        reads.count = 0
        trainer.fit()
        counts.append(reads.count)
    assert counts[0] == counts[1] == 1  # the epoch's figures, read once at its end
    # the planted regression: one read per batch (what float(loss) did) is caught
    reads.count = 0
    trainer = Trainer(_model(), create_objective("natural"), _loader(9), TrainConfig(epochs=1),
                      progress=False, report_every=1)  # fmt: skip
    trainer.fit()
    assert reads.count > counts[1] + 5


# ---------------------------------------------------------------------------- CUDA


@cuda
def test_a_cuda_epoch_synchronises_a_fixed_number_of_times() -> None:
    counts = []
    for batches in (2, 6):
        loader = DeviceLoader(_loader(batches).dataset, 8, shuffle=True, device="cuda")
        trainer = Trainer(_model(), create_objective("pgd", eps="3/16", steps=3), loader,
                          TrainConfig(epochs=1, precision="bf16"), device="cuda",
                          progress=False)  # fmt: skip
        trainer.train_epoch(0)  # warm-up (cuDNN, allocator)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train_epoch(1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1]


@cuda
def test_fp16_on_cuda_uses_a_gradient_scaler_and_channels_last() -> None:
    model = _model()
    trainer = Trainer(model, create_objective("natural"), _loader(3), TrainConfig(epochs=1,
                      precision="fp16"), device="cuda", progress=False)  # fmt: skip
    assert trainer.scaler.is_enabled() and trainer.channels_last
    trainer.fit()
    assert all(torch.isfinite(p).all() for p in model.parameters())
