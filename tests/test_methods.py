"""Method plug-ins: registry, taxonomy, LWM stages and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advprune.errors import ConfigError, UnknownNameError
from advprune.methods import LWM, Method, create_method, list_methods, method_class
from advprune.models import create
from advprune.sparsity import masked_modules, sparsity_report


def model() -> nn.Module:
    torch.manual_seed(0)
    return create("digits_cnn", width=8)


def test_registry_and_taxonomy() -> None:
    assert "lwm" in list_methods() and list_methods("lw?") == ["lwm"]
    cls = method_class("lwm")
    assert cls is LWM and issubclass(cls, Method)
    t = cls.taxonomy
    assert (t.ap_key, t.pipeline, t.schedule, t.criterion) == (
        "LWM_Han2015Learning", "after", ("1S",), "LWM")  # fmt: skip
    assert set(cls.structures) == {"unstructured", "filters", "channels", "nm"}
    assert cls.stages == ("pretrain", "prune", "finetune")
    assert "prune" not in cls.trains  # LWM's prune stage does not train
    with pytest.raises(UnknownNameError, match=r"valid methods: .*lwm"):
        create_method("hydra-typo", 0.9)


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
def test_lwm_reaches_its_target(scope: str, sparsity: float) -> None:
    m = model()
    densities = create_method("lwm", sparsity, scope=scope).prune(m)
    report = sparsity_report(m, (1, 8, 8))
    assert abs(report.kept - (1 - sparsity) * report.prunable_params) <= len(report.layers)
    assert set(densities) == set(masked_modules(m))


def test_lwm_layer_selection_keeps_first_and_last_dense() -> None:
    m = model()
    method = create_method("lwm", 0.9, keep_first=True, keep_last=True)
    method.prune(m)
    rows = sparsity_report(m).layers
    assert rows[0].density == 1.0 and rows[-1].density == 1.0
    assert all(r.density == pytest.approx(0.1, abs=0.01) for r in rows[1:-1])
    cfg = method.config()
    assert cfg["keep_first"] and cfg["keep_last"] and cfg["taxonomy"]["pipeline"] == "after"


def test_bad_method_input() -> None:
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        create_method("lwm", 1.0)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        create_method("lwm", 99)
    with pytest.raises(ConfigError, match="unknown option"):
        create_method("lwm", 0.5, temperature=3)
    with pytest.raises(ConfigError, match="no Conv2d or Linear"):
        create_method("lwm", 0.5).prune(nn.Sequential(nn.Flatten(), nn.ReLU()))


def test_a_method_declaring_fewer_structures_refuses_others() -> None:
    class OnlyUnstructured(LWM):
        name = "only-unstructured-test"
        structures = ("unstructured",)
        scopes = ("local",)

    with pytest.raises(ConfigError, match="does not support structure 'filters'"):
        OnlyUnstructured(0.5, structure="filters")
    with pytest.raises(ConfigError, match="does not support scope 'global'"):
        OnlyUnstructured(0.5, scope="global")
