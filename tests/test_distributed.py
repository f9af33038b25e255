"""Training on several processes (DDP over gloo, on the CPU): the same weights as one process
with the same global batch, files from rank 0 only, and a crashed torchrun job that resumes
to the weights of an uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from advprune.data import DeviceLoader, load_dataset
from advprune.distributed import SINGLE, DistContext, local_module
from advprune.models import create, list_models, register_model
from advprune.models import registry as model_registry
from advprune.sparsity import FixedMask, HydraMask, RateMask, ScoreMask, attach_mask
from advprune.training import (
    Regularizer,
    TrainConfig,
    Trainer,
    create_objective,
    parameter_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).parent
GLOBAL_BATCH = 64
# DDP averages the two processes' batch-mean gradients, one process takes the mean over the
# whole batch: the same sum in another order, so the weights agree to float32 rounding
# (measured: max |difference| 1.5e-8 after 8 steps). 1e-5 leaves room for other processors;
# the planted regression below (processes that do not average) is off by 1.9e-2.
WEIGHT_TOL = 1e-5


class _RatePenalty(Regularizer):
    """A loss on the HARP rates computed outside the model's forward (as HARP's hinge is)."""

    def loss(self, model: nn.Module) -> torch.Tensor:
        rates = [m.rate for m in model.modules() if isinstance(m, RateMask)]
        return 0.05 * sum(r.pow(2) for r in rates)


NET = "ddp-test-net"  # registered for this file's tests only (see _masked_model)


class _Net(nn.Sequential):
    """BatchNorm-free, so one process with batch 2B computes what two with B each do."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 32), nn.ReLU(),
            nn.Linear(32, num_classes),
        )  # fmt: skip


@contextlib.contextmanager
def _registered() -> Iterator[None]:
    """The test network in the model registry (checkpoints need a spec), removed after."""
    if NET in list_models():
        yield
        return
    register_model(NET, input_size=(1, 8, 8))(_Net)
    try:
        yield
    finally:
        model_registry._REGISTRY.pop(NET, None)


def _masked_model() -> nn.Module:
    """The test network carrying every trainable mask kind: HYDRA scores, HARP scores + rate,
    binary-style scores, and a fixed (LWM) mask on trained weights."""
    torch.manual_seed(0)
    model = create(NET)
    conv1, conv2, fc1, fc2 = model[0], model[2], model[5], model[7]
    attach_mask(conv1, HydraMask(conv1.weight.shape, "unstructured", 0.5,
                                 torch.randn(conv1.weight.shape)))  # fmt: skip
    attach_mask(conv2, RateMask(conv2.weight.shape, "unstructured", rate=0.3))
    attach_mask(fc1, ScoreMask(fc1.weight.shape, "unstructured", 0.5))
    attach_mask(fc2, FixedMask(fc2.weight.shape, mask=torch.rand(fc2.weight.shape) < 0.5))
    return model


def _data():
    splits = load_dataset("digits", val_fraction=0.2, seed=0)
    return splits.train.subset(range(256)), splits.val


def _train(dist: DistContext, shard: tuple[int, int], out: Path | None) -> tuple[dict, float]:
    """Two epochs of PGD-AT (no random start: deterministic) on ``shard`` = (rank, world) of
    the data; the final weights and validation accuracy."""
    train, val = _data()
    rank, world = shard
    model = _masked_model()
    trainer = Trainer(
        model,
        create_objective("pgd", eps="3/16", steps=2, random_start=False),
        DeviceLoader(train, GLOBAL_BATCH // world, shuffle=True, seed=0, rank=rank,
                     world_size=world),
        TrainConfig(epochs=2, lr=0.05, seed=0),
        val_loader=DeviceLoader(val, 50, rank=rank, world_size=world),
        param_groups=parameter_groups(model, ("weights", "scores", "rates")),
        regularizer=_RatePenalty(),
        out_dir=out,
        progress=False,
        dist=dist,
    )  # fmt: skip
    result = trainer.fit()
    assert local_module(trainer.train_module) is model  # unwrapped after fit
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return weights, result.history[-1].val_clean_accuracy


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    root = Path(folder)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{root / 'rendezvous'}", rank=rank, world_size=2
    )
    try:
        dist = DistContext(rank=rank, world_size=2, local_rank=rank)
        with _registered():
            weights, val_acc = _train(dist, (rank, 2), root / f"out{rank}")
            weights["val_acc"] = torch.tensor(val_acc)
            save_file(weights, root / f"ddp{rank}.safetensors")
            if rank == 0:  # planted regression: the same shards, gradients not averaged
                alone, _ = _train(SINGLE, (rank, 2), None)
                save_file(alone, root / "alone.safetensors")
    finally:
        torch.distributed.destroy_process_group()


def _spawn_two(folder: Path, limit_s: float = 240.0) -> None:
    """Run :func:`_worker` on two spawned processes; fail (and kill them) after ``limit_s``
    seconds instead of hanging the suite if one of them waits for the other forever."""
    ctx = mp.start_processes(_worker, args=(str(folder),), nprocs=2, start_method="spawn",
                             join=False)  # fmt: skip
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"two-process training did not finish in {limit_s:.0f} s")


def test_two_processes_train_as_one_with_the_global_batch(tmp_path: Path) -> None:
    _spawn_two(tmp_path)
    with _registered():
        reference, ref_acc = _train(SINGLE, (0, 1), None)
    ddp = [load_file(tmp_path / f"ddp{r}.safetensors") for r in range(2)]
    alone = load_file(tmp_path / "alone.safetensors")

    def max_diff(a: dict, b: dict) -> float:
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in reference)

    assert any("rate" in k for k in reference) and any("scores" in k for k in reference)
    assert max_diff(ddp[0], ddp[1]) == 0.0  # DDP keeps the processes identical
    assert max_diff(ddp[0], reference) <= WEIGHT_TOL
    assert max_diff(alone, reference) > 100 * WEIGHT_TOL  # the tolerance catches no averaging
    # validation: each process counts its share, the counts are summed
    assert float(ddp[0]["val_acc"]) == float(ddp[1]["val_acc"]) == pytest.approx(ref_acc)
    # only rank 0 writes: rank 1's folder was never made
    assert not (tmp_path / "out1").exists()
    written = {p.name for p in (tmp_path / "out0").iterdir()}
    assert written >= {"last.safetensors", "best.safetensors", "metrics.jsonl"}
    lines = (tmp_path / "out0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def _torchrun(out: Path, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), "ADVPRUNE_PLUGINS": "_crash_objective",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("ADVPRUNE_TEST_CRASH", None)
    if crash is not None:
        env["ADVPRUNE_TEST_CRASH"] = crash
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "advprune.cli", "train", "--objective", "pgd-crash", "--epochs", "3",
            "--attack-steps", "2", "--eval-steps", "1", "--eval-n", "40", "--seed", "3",
            "--progress", "lines", "--out", str(out)]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def _why(done: subprocess.CompletedProcess) -> str:
    """A failed torchrun's cause: the workers' own error lines first (torchrun's summary,
    which ends its stderr, names only the signal), then the end of stderr."""
    lines = done.stderr.splitlines()
    cause = [
        line for line in lines if any(w in line for w in ("Error", "error", "what()", "terminate"))
    ]
    return "\n".join(cause[:20]) + "\n...\n" + done.stderr[-1500:]


def test_a_crashed_torchrun_job_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    straight = _torchrun(tmp_path / "straight")
    assert straight.returncode == 0, _why(straight)
    # rank 1 is killed in its 16th step: the second of three epochs (11 steps each)
    crashed = _torchrun(tmp_path / "crashed", crash="1:15")
    assert crashed.returncode != 0
    folder = tmp_path / "crashed"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0] and not (folder / "model.safetensors").exists()
    resumed = _torchrun(folder)
    assert resumed.returncode == 0, _why(resumed)
    assert "epoch 1/3" not in resumed.stderr and "epoch 2/3" in resumed.stderr  # resumed
    # exact by construction: both jobs run the same operations on the same values (the
    # resumed one from the saved state, RNGs reseeded per epoch and process, a two-process
    # all-reduce is one commutative addition)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(folder / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # rank 0 wrote each epoch's metrics once, in today's format
    for run in (tmp_path / "straight", folder):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1, 2]
        assert not list(run.glob("*.tmp*"))
    card = json.loads((folder / "model.json").read_text())
    assert card["training"]["world_size"] == 2 and card["training"]["precision"] == "fp32"
