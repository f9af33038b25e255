"""N:M structures (``--structure 2:4``) for LWM and HYDRA: exactly N of every M kept in each
group, incompatible layers left dense with a reason, and the masks survive save / load / export
(plain and compressed). On CPU the structure trains and evaluates like any mask."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from advprune.checkpoint import export_checkpoint, load_checkpoint, save_checkpoint
from advprune.cli import main
from advprune.config import RunConfig
from advprune.errors import AdvpruneError, CheckpointError, ConfigError
from advprune.io import sha256_file, write_json_atomic
from advprune.methods import create_method, method_class
from advprune.models import create
from advprune.pipeline import make_method, prepare_data, prune_stage
from advprune.sparsity import (
    NMOptions,
    dense_weight,
    list_structures,
    masked_modules,
    nm_layers,
    parse_structure,
    semi_structured_support,
    to_semi_structured,
)
from advprune.sparsity.nm import is_nm

pytestmark = pytest.mark.usefixtures("one_thread")

NM = [(2, 4), (1, 4), (4, 8)]


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    """Rows = the groups of m consecutive inputs at one output unit and kernel position, by
    explicit indexing (not the library's reshape)."""
    rows = []
    for o in range(t.shape[0]):
        for pos in [()] if t.dim() == 2 else [(i, j) for i in range(t.shape[2])
                                               for j in range(t.shape[3])]:  # fmt: skip
            for start in range(0, t.shape[1], m):
                rows.append(torch.stack([t[(o, c, *pos)] for c in range(start, start + m)]))
    return torch.stack(rows)


def _check_nm_model(model: torch.nn.Module, n: int, m: int) -> None:
    masked = masked_modules(model)
    assert masked and nm_layers(model) == {name: (n, m) for name in masked}
    for name, (module, mask) in masked.items():
        keep = _groups(mask.full_mask(), m)
        assert bool((keep.sum(1) == n).all()), name
        # the effective weight has at most n non-zeros per group
        assert bool((_groups(module.weight.detach(), m).ne(0).sum(1) <= n).all()), name


def test_structures_registry_round_trips_and_refuses_bad_text() -> None:
    assert set(list_structures()) == {"unstructured", "filters", "channels", "nm"}
    for name in list_structures():  # every registered structure parses from its text form
        s = parse_structure(name)
        assert parse_structure(str(s)) == s and s.name == name
    s = parse_structure("2:4")
    assert (s.name, s.granularity, s.nm, s.density, str(s)) == ("nm", "unstructured", (2, 4),
                                                                0.5, "2:4")  # fmt: skip
    assert parse_structure(" 1 : 8 ").options == NMOptions(n=1, m=8)
    assert parse_structure("nm", n=3, m=4).nm == (3, 4)
    assert s.incompatible((16, 3, 3, 3)).startswith("its input dimension (3) is not a multiple")
    assert s.incompatible((16, 8, 3, 3)) is None
    for bad, match in [("4:4", "1 <= N < M"), ("0:4", "option n must be an integer >= 1"),
                       ("a:b", "looks like '2:4'"), ("2-4", "unknown structure")]:  # fmt: skip
        with pytest.raises(AdvpruneError, match=match) as err:
            parse_structure(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="option m"):
        parse_structure("nm", m="four")


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("name", ["lwm", "hydra"])
def test_exactly_n_of_every_m_and_incompatible_layers_recorded(name: str, n: int, m: int):
    torch.manual_seed(0)
    model = create("digits_cnn", width=8)
    method = create_method(name, 1 - n / m, structure=f"{n}:{m}")
    densities = method.prune(model)
    # the first conv reads 1 input channel: no group of m fits, so it is left dense, and why
    assert set(method.skipped_layers) == {"features.0"}
    assert "input dimension (1) is not a multiple of" in method.skipped_layers["features.0"]
    assert "features.0" not in masked_modules(model) and set(densities) == set(
        masked_modules(model)
    )
    assert all(d == n / m for d in densities.values())
    _check_nm_model(model, n, m)
    if name == "lwm":  # the n largest |w| of every group
        for module, mask in masked_modules(model).values():
            w = _groups(dense_weight(module).detach().abs(), m)
            keep = _groups(mask.full_mask(), m).bool()
            kept_min = torch.where(keep, w, torch.inf).amin(1)
            dropped_max = torch.where(keep, -torch.inf, w).amax(1)
            assert bool((kept_min >= dropped_max).all())


def test_hydra_starts_from_the_magnitude_mask_and_stays_nm_while_scores_train() -> None:
    torch.manual_seed(0)
    base = create("digits_cnn", width=8)
    lwm, hydra = create("digits_cnn", width=8), create("digits_cnn", width=8)
    lwm.load_state_dict(base.state_dict())
    hydra.load_state_dict(base.state_dict())
    create_method("lwm", 0.5, structure="2:4").prune(lwm)
    create_method("hydra", 0.5, structure="2:4").prune(hydra)
    for (_, a), (_, b) in zip(masked_modules(lwm).values(), masked_modules(hydra).values()):
        assert torch.equal(a.full_mask(), b.full_mask())  # HYDRA's scaled init = |w| ranking
    scores = [mask.scores for _, mask in masked_modules(hydra).values()]
    before = [mask.full_mask().clone() for _, mask in masked_modules(hydra).values()]
    optimizer = torch.optim.SGD(scores, lr=50.0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    for _ in range(5):  # the straight-through gradient reaches the scores and moves the mask
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(hydra(x), y).backward()
        assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
        optimizer.step()
    after = [mask.full_mask() for _, mask in masked_modules(hydra).values()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    _check_nm_model(hydra, 2, 4)


@pytest.mark.parametrize("name", ["lwm", "hydra"])
def test_nm_masks_survive_save_load_and_export(tmp_path: Path, name: str) -> None:
    torch.manual_seed(1)
    model = create("digits_cnn", width=8)
    method = create_method(name, 0.5, structure="2:4")
    method.prune(model)
    src = save_checkpoint(tmp_path / "m", model, {"method": method.config()})
    loaded, card = load_checkpoint(src)
    kind = "nm" if name == "lwm" else "nm-scores"
    assert {spec["kind"] for spec in card["masks"].values()} == {kind}
    assert all((spec["n"], spec["m"]) == (2, 4) for spec in card["masks"].values())
    _check_nm_model(loaded, 2, 4)
    x = torch.rand(16, 1, 8, 8)
    model.eval()
    loaded.eval()
    with torch.no_grad():  # exact: the same weights and masks, the same operations
        assert torch.equal(loaded(x), model(x))
    for compressed in (False, True):
        out = tmp_path / f"export_{compressed}" / "model.safetensors"
        dst = export_checkpoint(src, out, compressed=compressed)
        plain, pcard = load_checkpoint(dst)
        assert pcard["method"]["structure"] == "2:4" and not pcard["masks"]
        for layer in nm_layers(model):
            assert is_nm(plain.get_submodule(layer).weight.detach(), 2, 4), layer
        plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-6)


def test_an_altered_nm_mask_is_refused_on_load(tmp_path: Path) -> None:
    model = create("digits_cnn", width=8)
    create_method("lwm", 0.5, structure="2:4").prune(model)
    path = save_checkpoint(tmp_path / "m", model, {})
    tensors = load_file(str(path))
    key = "features.3.parametrizations.weight.0.mask"
    tensors[key] = torch.ones_like(tensors[key])  # every group keeps 4: not 2:4 any more
    save_file(tensors, str(path), metadata={"format": "pt"})
    card = json.loads(path.with_suffix(".json").read_text())
    card["tensors"]["sha256"] = sha256_file(path)  # a consistent card: only the pattern is off
    write_json_atomic(path.with_suffix(".json"), card)
    with pytest.raises(CheckpointError, match=r"features.3.* not 2:4") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_pipeline_and_cli(tmp_path: Path, capsys) -> None:
    # the structure fixes the sparsity: left out it is 1 - N/M, given otherwise refused
    method = make_method(RunConfig(method="lwm", structure="2:4"))
    assert method.sparsity == 0.5 and method.structure == "2:4"
    with pytest.raises(ConfigError, match=r"keeps 2 of every 4 .* sparsity 0.5, not 0.9"):
        make_method(RunConfig(method="lwm", structure="2:4", sparsity=0.9))
    with pytest.raises(ConfigError, match="no layer allocation or global scope"):
        make_method(RunConfig(method="lwm", structure="2:4", scope="global"))
    assert method_class("hydra").supports_structure("1:8")
    assert not method_class("harp").supports_structure("2:4")
    with pytest.raises(ConfigError, match="'harp' does not support structure '2:4'; it supp"):
        make_method(RunConfig(method="harp", structure="2:4"))
    assert not method_class("lwm-iterative").supports_structure("2:4")
    with pytest.raises(ConfigError, match=r"no layer of .* can take structure 4:8"):
        create_method("lwm", 0.5, structure="4:8", include=["features.0"]).prune(
            create("digits_cnn", width=8)
        )

    cfg = RunConfig(method="lwm", structure="2:4", progress=False, device="cpu")
    data = prepare_data(cfg, with_val=False)
    torch.manual_seed(0)
    pruned, card = prune_stage(cfg, data, create("digits_cnn", width=8), out=tmp_path / "p")
    assert card["sparsity"]["target"] == 0.5 and card["method"]["structure"] == "2:4"
    assert list(card["sparsity"]["skipped_layers"]) == ["features.0"]
    _check_nm_model(pruned, 2, 4)
    # the CLI: prune, say which layers stayed dense, evaluate like any pruned model
    dense = save_checkpoint(tmp_path / "dense" / "model", create("digits_cnn", width=8),
                            {"dataset": data.splits.info.to_dict()})  # fmt: skip
    capsys.readouterr()
    assert main(["prune", "--checkpoint", str(dense), "--method", "hydra", "--structure", "2:4",
                 "--epochs", "1", "--objective", "natural", "--batch-size", "256",
                 "--out", str(tmp_path / "h"), "--progress", "off"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "not pruned: features.0: its input dimension (1) is not a multiple of 4" in out
    loaded, hcard = load_checkpoint(tmp_path / "h" / "model.safetensors")
    assert hcard["method"]["structure"] == "2:4" and hcard["sparsity"]["target"] == 0.5
    _check_nm_model(loaded, 2, 4)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["eval", str(tmp_path / "h" / "model.safetensors"), "--attacks", "pgd",
                     "--n", "32", "--eval-steps", "3", "--json", "--progress", "off"])  # fmt: skip
    assert code == 0 and json.loads(buf.getvalue())["n"] == 32
    assert main(["prune", "--checkpoint", str(dense), "--method", "lwm", "--structure", "2:5",
                 "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "structure" in err


def test_semi_structured_export_needs_a_recent_cuda_gpu() -> None:
    model = create("digits_cnn", width=8)
    create_method("lwm", 0.5, structure="2:4").prune(model)
    why = semi_structured_support()
    if why is None:
        pytest.skip("a CUDA GPU with 2:4 kernels is present: covered by the CUDA test")
    with pytest.raises(ConfigError, match="2:4 semi-structured kernels unavailable: no CUDA") as e:
        to_semi_structured(model)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(semi_structured_support() is not None, reason="needs a CUDA GPU, sm_80+")
def test_semi_structured_linear_layers_on_cuda() -> None:  # pragma: no cover - GPU only
    from advprune.sparsity.nm import semi_structured_latency

    model = create("digits_cnn")
    create_method("lwm", 0.5, structure="2:4").prune(model)
    sparse, record = to_semi_structured(model)
    assert "classifier.0" in record.converted  # Linear(512, 256)
    assert "features.3" in record.skipped  # a convolution: no semi-structured kernel
    x = torch.rand(64, 1, 8, 8, device="cuda", dtype=torch.float16)
    dense = model.to("cuda", torch.float16).eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-2, atol=1e-2)
    result = semi_structured_latency(model.float().cpu(), (1, 8, 8), (64,), repeats=5)
    assert result["layers"] and all(r["speedup"] > 0 for r in result["layers"])


def test_nm_in_model_keys() -> None:
    from advprune.bench.keys import make_key, structure_code

    assert structure_code("2:4") == "US"
    assert make_key("LWM_Han2015Learning", "resnet18", "cifar10", "2:4", 0.5) == (
        "LWM_Han2015Learning_R18_CIFAR10_US_50"
    )
    with pytest.raises(AdvpruneError):
        structure_code("2-4")
