"""Trainer: schedules, parameter groups, best-checkpoint selection, resume after a crash."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from advprune.attacks import PGD
from advprune.checkpoint import load_checkpoint
from advprune.data import load_dataset, make_loader
from advprune.errors import ConfigError, UnknownNameError
from advprune.models import create
from advprune.sparsity import attach_scores, masked_modules, prunable_layers, prune_magnitude
from advprune.training import (
    Regularizer,
    TrainConfig,
    Trainer,
    create_objective,
    evaluate_accuracy,
    lr_factor,
    parameter_groups,
)


@pytest.fixture(scope="module")
def digits():
    splits = load_dataset("digits", val_fraction=0.1, seed=0)
    return splits


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create("digits_cnn", num_classes=10, mean=(0.3054,), std=(0.3761,), width=8)


def loaders(splits, batch_size: int = 128):
    return (
        make_loader(splits.train, batch_size, shuffle=True, seed=0),
        make_loader(splits.val, batch_size),
    )


def test_lr_schedules_by_hand() -> None:
    cos = TrainConfig(epochs=10, schedule="cosine")
    assert lr_factor(cos, 0) == 1.0
    assert lr_factor(cos, 5) == pytest.approx(0.5)
    assert lr_factor(cos, 10) == pytest.approx(0.0, abs=1e-12)
    warm = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2)
    assert lr_factor(warm, 1) == pytest.approx(0.5)
    assert lr_factor(warm, 2) == pytest.approx(1.0)
    assert lr_factor(warm, 6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    step = TrainConfig(epochs=10, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_factor(step, e) for e in (0, 4.9, 5, 7.5)] == pytest.approx([1, 1, 0.1, 0.01])


def test_bad_train_config() -> None:
    with pytest.raises(UnknownNameError, match="cosine"):
        TrainConfig(schedule="linear-ish")
    with pytest.raises(ConfigError):
        TrainConfig(epochs=-1)
    with pytest.raises(ConfigError):
        TrainConfig(epochs=2, warmup_epochs=3)


def test_natural_training_learns_digits(digits) -> None:
    train, val = loaders(digits)
    model = small_model()
    before, _ = evaluate_accuracy(model, val)
    trainer = Trainer(
        model,
        create_objective("natural"),
        train,
        TrainConfig(epochs=3, lr=0.05),
        val_loader=val,
        progress=False,
    )
    result = trainer.fit()
    after, _ = evaluate_accuracy(model, val)
    assert before < 0.3 and after > 0.85
    assert [r.epoch for r in result.history] == [0, 1, 2]
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_only_chosen_parameter_kinds_train(digits) -> None:
    train, _ = loaders(digits)
    model = small_model()
    masks = attach_scores(model, dict.fromkeys(prunable_layers(model), 0.5), init="magnitude")
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "scores" not in n}
    scores = {n: m.scores.detach().clone() for n, m in masks.items()}
    groups = parameter_groups(model, ("scores",))
    assert [g["kind"] for g in groups] == ["scores"]
    Trainer(model, create_objective("natural"), train, TrainConfig(epochs=1), param_groups=groups,
            progress=False).fit()  # fmt: skip
    for n, p in model.named_parameters():
        if "scores" not in n:
            assert torch.equal(p, weights[n]), f"{n} changed while frozen"
            assert not p.requires_grad
    assert any(not torch.equal(m.scores, scores[n]) for n, m in masks.items())


def test_parameter_groups_errors_and_overrides() -> None:
    model = small_model()
    with pytest.raises(UnknownNameError, match="parameter kind"):
        parameter_groups(model, ("weights", "bias"))
    with pytest.raises(ConfigError, match="no parameters of kind scores"):
        parameter_groups(model, ("scores",))
    groups = parameter_groups(model, ("weights", "bn"), lr={"bn": 0.01}, weight_decay={"bn": 0})
    bn = next(g for g in groups if g["kind"] == "bn")
    assert bn["lr"] == 0.01 and bn["weight_decay"] == 0
    n_bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
               for p in m.parameters())  # fmt: skip
    assert sum(p.numel() for p in bn["params"]) == n_bn


def test_masks_stay_fixed_during_finetuning(digits) -> None:
    train, _ = loaders(digits)
    model = small_model()
    prune_magnitude(model, 0.9)
    before = {n: m.full_mask().clone() for n, (_, m) in masked_modules(model).items()}
    Trainer(model, create_objective("natural"), train, TrainConfig(epochs=1, lr=0.05),
            param_groups=parameter_groups(model), progress=False).fit()  # fmt: skip
    for n, (module, mask) in masked_modules(model).items():
        assert torch.equal(mask.full_mask(), before[n])
        assert int(module.weight.count_nonzero()) <= int(before[n].sum())


class CrashingLoader:
    """Wraps a loader and raises after ``crash_after`` batches in total (a simulated crash)."""

    def __init__(self, loader, crash_after: int) -> None:
        self.loader, self.crash_after, self.seen = loader, crash_after, 0
        self.generator = loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.seen == self.crash_after:
                raise KeyboardInterrupt("simulated crash")
            self.seen += 1
            yield batch


def test_resume_after_interruption_continues_where_it_stopped(digits, tmp_path) -> None:
    cfg = TrainConfig(epochs=3, lr=0.05, seed=1)
    objective = create_objective("pgd", eps="3/16", steps=2)
    attack = PGD(eps="3/16", steps=2)

    def run(out, loader):
        model = small_model()
        trainer = Trainer(model, objective, loader, cfg, val_loader=val, val_attack=attack,
                          out_dir=out, progress=False)  # fmt: skip
        return model, trainer.fit()

    train, val = loaders(digits)
    reference, ref_result = run(tmp_path / "straight", train)

    n_batches = len(train)
    crashing = CrashingLoader(loaders(digits)[0], crash_after=n_batches + 3)  # inside epoch 2
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", crashing)
    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0]

    resumed, result = run(tmp_path / "crashed", loaders(digits)[0])
    assert result.resumed_from == 1
    # exact by construction: the RNGs are reseeded per epoch and the state restored, so the
    # resumed epochs run the same operations on the same values as the straight run (this
    # process, this processor)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    lines = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]
    assert [r.train_loss for r in result.history] == pytest.approx(
        [r.train_loss for r in ref_result.history]
    )
    assert result.best_epoch == ref_result.best_epoch


def test_best_checkpoint_is_the_best_robust_epoch(digits, tmp_path) -> None:
    train, val = loaders(digits)
    model = small_model()
    trainer = Trainer(model, create_objective("pgd", eps="3/16", steps=2), train,
                      TrainConfig(epochs=3, lr=0.05), val_loader=val,
                      val_attack=PGD(eps="3/16", steps=3), out_dir=tmp_path, progress=False,
                      card={"dataset": {"name": "digits"}})  # fmt: skip
    result = trainer.fit()
    robust = [r.val_robust_accuracy for r in result.history]
    assert result.best_epoch == max(i for i, r in enumerate(robust) if r == max(robust))
    best, card = load_checkpoint(tmp_path / "best.safetensors")
    assert card["training"]["epoch"] == result.best_epoch
    assert card["training"]["val_robust_accuracy"] == pytest.approx(max(robust))
    assert card["objective"]["name"] == "pgd" and card["dataset"] == {"name": "digits"}
    torch.manual_seed(0)
    _, rob = evaluate_accuracy(best, val, PGD(eps="3/16", steps=3))
    assert rob == pytest.approx(max(robust), abs=0.05)


def test_resume_refuses_a_different_config(digits, tmp_path) -> None:
    train, _ = loaders(digits)
    Trainer(small_model(), create_objective("natural"), train, TrainConfig(epochs=1),
            out_dir=tmp_path, progress=False).fit()  # fmt: skip
    trainer = Trainer(small_model(), create_objective("natural"), train,
                      TrainConfig(epochs=1, lr=0.5), out_dir=tmp_path, progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="another training config"):
        trainer.fit()


def test_inputs_outside_unit_range_are_rejected() -> None:
    model = small_model()
    x = torch.rand(4, 1, 8, 8) * 16  # raw digits pixel values, not scaled
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        evaluate_accuracy(model, [(x, y)])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        Trainer(model, create_objective("natural"), [(x, y)], TrainConfig(epochs=1),
                progress=False).fit()  # fmt: skip


def test_robust_accuracy_never_exceeds_clean(digits) -> None:
    _, val = loaders(digits)
    clean, robust = evaluate_accuracy(small_model(), val, PGD(eps="3/16", steps=2))
    assert 0 <= robust <= clean <= 1


def test_amp_on_cpu_trains_in_bfloat16(digits) -> None:
    train, val = loaders(digits)
    model = small_model()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    Trainer(model, create_objective("natural"), train, TrainConfig(epochs=3, lr=0.05, amp=True),
            progress=False).fit()  # fmt: skip
    assert torch.bfloat16 in seen  # the forward pass ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    clean, _ = evaluate_accuracy(model, val)
    assert clean > 0.8


class _L2Penalty(Regularizer):
    """A regularizer with a schedule: weight grows each epoch; ready from epoch ``ready_at``."""

    def __init__(self, ready_at: int) -> None:
        self.weight, self.ready_at, self.epochs_seen = 0.0, ready_at, 0

    def loss(self, model: nn.Module) -> torch.Tensor:
        return self.weight * sum(p.pow(2).sum() for p in model.parameters())

    def end_epoch(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self.weight += 1e-3
        self.epochs_seen = epoch + 1
        return {"weight": self.weight}

    def ready(self, model: nn.Module) -> bool:
        return self.epochs_seen > self.ready_at

    def state_dict(self) -> dict:
        return {"weight": self.weight, "epochs_seen": self.epochs_seen}

    def load_state_dict(self, state) -> None:
        self.weight, self.epochs_seen = state["weight"], state["epochs_seen"]


class _Recording(type(create_objective("natural"))):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def set_progress(self, progress: float) -> None:
        self.seen.append(progress)


def test_regularizer_adds_loss_logs_and_gates_best_checkpoint(digits, tmp_path) -> None:
    train, val = loaders(digits)
    reg = _L2Penalty(ready_at=2)
    trainer = Trainer(small_model(), create_objective("natural"), train,
                      TrainConfig(epochs=3, lr=0.05, select_by="clean"), val_loader=val,
                      out_dir=tmp_path, progress=False, regularizer=reg)  # fmt: skip
    result = trainer.fit()
    # best can only be the last epoch: the regularizer is not ready before
    assert result.best_epoch == 2
    assert [r.extra["weight"] for r in result.history] == pytest.approx([1e-3, 2e-3, 3e-3])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["extra"]["weight"] == pytest.approx(2e-3)
    # a resumed trainer gets the schedule state back
    fresh = _L2Penalty(ready_at=2)
    Trainer(small_model(), create_objective("natural"), train,
            TrainConfig(epochs=3, lr=0.05, select_by="clean"), val_loader=val,
            out_dir=tmp_path, progress=False, regularizer=fresh).fit()  # fmt: skip
    assert fresh.weight == pytest.approx(3e-3) and fresh.epochs_seen == 3


def test_regularizer_loss_changes_the_update(digits) -> None:
    train, _ = loaders(digits)

    def norm_after(weight: float) -> float:
        reg = _L2Penalty(ready_at=0)
        reg.weight = weight
        model = small_model()
        Trainer(model, create_objective("natural"), train, TrainConfig(epochs=1, lr=0.05),
                progress=False, regularizer=reg).fit()  # fmt: skip
        return float(sum(p.detach().pow(2).sum() for p in model.parameters()))

    assert norm_after(0.05) < norm_after(0.0)


def test_objective_sees_stage_progress(digits) -> None:
    train, _ = loaders(digits)
    objective = _Recording()
    Trainer(small_model(), objective, train, TrainConfig(epochs=2, lr=0.05), progress=False).fit()
    n = len(train)
    assert objective.seen == pytest.approx([i / (2 * n) for i in range(2 * n)])
