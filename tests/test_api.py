"""advprune.prune / advprune.finetune, the method listing, and one-line errors on bad input."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn

import advprune
from advprune.cli import main
from advprune.data import load_dataset, make_loader
from advprune.errors import ConfigError, UnknownNameError
from advprune.methods import create_method, list_methods, method_class
from advprune.models import create
from advprune.sparsity import masked_modules, sparsity_report
from advprune.training import create_objective


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create("digits_cnn", width=8)


def test_prune_returns_a_pruned_copy_with_trained_scores() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = advprune.prune(model, method="hydra", sparsity=0.9, objective="pgd", data="digits",
                            epochs=1, attack_steps=1, lr=0.1, freeze_bn=True)  # fmt: skip
    assert pruned is not model and not masked_modules(model)  # the input is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sparsity_report(pruned).kept == round(0.1 * sparsity_report(pruned).prunable_params)
    card = pruned.advprune_card
    assert card["method"]["name"] == "hydra" and card["method"]["options"]["freeze_bn"] is True
    assert card["objective"]["name"] == "pgd" and card["training"]["epochs"] == 1
    # the scores trained away from the scaled init, so the mask moved off the LWM mask
    lwm = advprune.prune(model, method="lwm", sparsity=0.9, data="digits")
    masks = masked_modules(pruned)
    assert any(
        not torch.equal(mask.full_mask(), masks[n][1].full_mask())
        for n, (_, mask) in masked_modules(lwm).items()
    )
    tuned = advprune.finetune(pruned, objective="natural", data="digits", epochs=1, lr=0.01)
    assert tuned.advprune_card["stage"] == "finetune"
    for n, (_, mask) in masked_modules(tuned).items():
        assert torch.equal(mask.full_mask(), masks[n][1].full_mask())


def test_prune_takes_an_objective_instance_and_a_dataloader() -> None:
    splits = load_dataset("digits", val_fraction=0.0)
    loader = make_loader(torch.utils.data.Subset(splits.train, range(256)), 64, shuffle=True)
    objective = create_objective("trades", eps="1/8", steps=1, beta=6.0)
    pruned = advprune.prune(_model(), method="hydra", sparsity=0.5, objective=objective,
                            data=loader, epochs=1, eps="1/8")  # fmt: skip
    assert pruned.advprune_card["objective"]["name"] == "trades"
    assert pruned.advprune_card["objective"]["beta"] == 6.0


def test_api_bad_input_is_one_line_errors() -> None:
    model = _model()

    def one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
        msg = str(exc.value)
        assert "\n" not in msg and all(w in msg for w in words), msg

    with pytest.raises(ConfigError) as e:  # structure the method does not support
        advprune.prune(model, method="binary", sparsity=0.9, structure="filters")
    one_line(e, "does not support structure 'filters'", "unstructured")
    with pytest.raises(ConfigError) as e:  # a sparsity it cannot reach
        advprune.prune(model, method="lwm", sparsity=0.999, structure="channels")
    one_line(e, "cannot be reached", "channel")
    with pytest.raises(ConfigError) as e:
        advprune.prune(model, method="lwm", sparsity=1.0)
    one_line(e, "must be in [0, 1)")
    with pytest.raises(ConfigError) as e:  # an architecture with no prunable layer
        create_method("hydra", 0.5).prune(nn.Sequential(nn.Flatten(), nn.ReLU()))
    one_line(e, "no Conv2d or Linear layer")
    with pytest.raises(ConfigError) as e:
        advprune.prune(model, method="lwm", sparsity=0.5, temperature=2)
    one_line(e, "unknown option", "temperature")
    with pytest.raises(UnknownNameError):
        advprune.prune(model, method="hydar", sparsity=0.5)
    with pytest.raises(ConfigError) as e:
        advprune.finetune(model, data="digits")
    one_line(e, "returned by advprune.prune")


def _run(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_methods_listing_shows_every_method_with_its_taxonomy() -> None:
    rc, out, _ = _run(["methods"])
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == set(list_methods())
    assert {"lwm", "lwm-iterative", "hydra"} <= set(lines)
    for name, line in lines.items():
        cls = method_class(name)
        t = cls.taxonomy
        assert f"pipeline={t.pipeline}" in line and f"ap_key={t.ap_key}" in line
        assert f"| implements structures={','.join(cls.structures)}" in line
        assert "->".join(cls.stages) in line
    assert "schedule=IT" in lines["lwm-iterative"]


def test_cli_prune_bad_input(tmp_path) -> None:
    base = ["prune", "--no-progress", "--out", tmp_path / "o"]
    rc, _, err = _run([*base, "--method", "hydra"])  # no pretrained checkpoint
    assert rc == 2 and err.count("\n") == 1 and "needs --checkpoint" in err
    rc, _, err = _run([*base, "--method", "lwm", "--allocation", "erkk"])
    assert rc == 2 and err.count("\n") == 1 and "valid allocations" in err
    rc, _, err = _run([*base, "--method", "lwm", "--allocation-p", "0.5"])
    assert rc == 2 and err.count("\n") == 1 and "unknown parameter(s) p" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()
