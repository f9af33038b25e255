"""Every YAML in configs/ is a valid run configuration naming registered components."""

from __future__ import annotations

from pathlib import Path

import pytest

from advprune.config import load_config, read_yaml
from advprune.errors import ConfigError
from advprune.models import list_models
from advprune.pipeline import make_method
from advprune.training import list_objectives

ALL = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
GRIDS = [p for p in ALL if "sparsities" in p.read_text()]  # benchmark grids (bench run)
CONFIGS = [p for p in ALL if p not in GRIDS]


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_grid_files_load(path: Path) -> None:
    from advprune.bench.grid import jobs, load_grid

    grid = load_grid(path)
    # every job runs, but a method's at a structure it does not support (the APB grid has
    # binary subnetworks, which prune unstructured only); every method runs somewhere
    skipped = [job.skip for job in jobs(grid) if job.skip is not None]
    assert all("does not support" in why for why in skipped), skipped
    assert {job.method for job in jobs(grid) if job.skip is None} == set(grid.methods)
    with pytest.raises(ConfigError, match="advprune bench run"):
        load_config(path)  # a grid is not a run config: the error says how to run it


def test_there_are_configs_for_every_stage_of_hydra() -> None:
    names = {p.relative_to(p.parents[1]).as_posix() for p in CONFIGS}
    for ds in ("cifar10", "svhn"):
        for stage in ("pretrain", "prune", "finetune"):
            assert f"hydra/{ds}_resnet18_{stage}.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(p.parents[1]).as_posix())
def test_config_loads_and_names_registered_components(path: Path) -> None:
    raw = read_yaml(path)
    cfg = load_config(path)
    assert cfg.objective in list_objectives()
    assert cfg.model in list_models()
    if "method" in raw:  # a prune-stage config: the method, its options and structure build
        method = make_method(cfg)
        assert method.name == raw["method"]
        assert method.opts == {**method.options, **raw.get("method_options", {})}


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_hydra_configs_hold_the_paper_settings(dataset: str) -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "hydra"
    expected = {"pretrain": (100, 0.1), "prune": (20, 0.1), "finetune": (100, 0.01)}
    for stage, (epochs, lr) in expected.items():
        cfg = load_config(root / f"{dataset}_resnet18_{stage}.yaml")
        assert (cfg.epochs, cfg.lr) == (epochs, lr)
        assert (cfg.momentum, cfg.weight_decay, cfg.batch_size, cfg.schedule) == (
            0.9, 1e-4, 128, "cosine"
        )  # fmt: skip
        assert (cfg.objective, cfg.beta) == ("trades", 6.0)
        assert (cfg.eps_value(), cfg.step_size_value(), cfg.attack_steps) == (8 / 255, 2 / 255, 10)
