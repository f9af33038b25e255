"""The ``advprune`` command line, called in-process.

One end-to-end chain (train -> prune -> finetune -> eval -> info) runs once per module on the
embedded digits with tiny settings; the bad-input tests reuse (copies of) its checkpoints.
Every bad input must give exit status 2, one ``error:`` line on stderr, no traceback, and no
``model.safetensors`` / ``model.json`` in the ``--out`` folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from advprune import __version__
from advprune.checkpoint import load_checkpoint, sha256_file
from advprune.cli import _run_config, build_parser, main
from advprune.errors import ConfigError

TINY = [
    "--attack-steps", "1", "--eval-steps", "2", "--n", "40", "--batch-size", "128",
    "--no-progress", "--val-fraction", "0.1",
]  # fmt: skip
EVAL = ["--eval-steps", "2", "--n", "40", "--batch-size", "128", "--no-progress"]
EVAL_PGD = ["--attacks", "pgd", *EVAL]  # `advprune eval` with the quick PGD attack only
SPARSITY = 0.9
MODEL = "model.safetensors"


def run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def ok(argv: list[str]) -> str:
    rc, out, err = run(argv)
    assert rc == 0, err
    return out


def fails(argv: list[str], *words: str, out_dir: Path | None = None) -> str:
    """Run a bad command: exit 2, one ``error:`` line naming ``words``, nothing written."""
    rc, out, err = run(argv)
    assert rc == 2, (rc, out, err)
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # exactly one line
    assert "Traceback" not in err + out
    for word in words:
        assert word in err, (word, err)
    if out_dir is not None:
        assert not (out_dir / "model.safetensors").exists()
        assert not (out_dir / "model.json").exists()
    return err


def info_json(path: Path) -> dict:
    return json.loads(ok(["info", path, "--json"]))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """train (YAML + flags) -> prune -> finetune -> eval -> info, once."""
    root = tmp_path_factory.mktemp("chain")
    yaml_path = root / "train.yaml"
    # epochs: 3 in the YAML is overridden by --epochs 1; eps and attack_steps come from it
    yaml_path.write_text("epochs: 3\neps: 1/8\nattack_steps: 1\nlr: 0.05\n")
    res: dict = {"root": root, "yaml": yaml_path}
    res["train_args"] = ["train", "--config", yaml_path, "--epochs", "1", *TINY]
    res["train_out"] = ok([*res["train_args"], "--out", root / "dense"])
    res["dense"] = root / "dense" / MODEL
    res["prune_out"] = ok(
        [
            "prune",
            "--checkpoint",
            res["dense"],
            "--sparsity",
            str(SPARSITY),
            "--out",
            root / "pruned",
            "--no-progress",
        ]
    )
    res["pruned"] = root / "pruned" / MODEL
    res["finetune_out"] = ok(
        [
            "finetune",
            "--checkpoint",
            res["pruned"],
            "--eps",
            "1/8",
            "--epochs",
            "1",
            *TINY,
            "--out",
            root / "ft",
        ]
    )
    res["ft"] = root / "ft" / MODEL
    res["eval"] = json.loads(
        ok(["eval", "--checkpoint", res["ft"], "--eps", "1/8", *EVAL_PGD, "--json"])
    )
    res["info_dense"] = info_json(res["dense"])
    res["info_pruned"] = info_json(res["pruned"])
    res["info_ft"] = info_json(res["ft"])
    return res


@pytest.fixture
def ckpts(chain, tmp_path) -> dict[str, Path]:
    """Private copies of the chain's checkpoints (safe to corrupt)."""
    copies = {}
    for name in ("dense", "pruned", "ft"):
        folder = tmp_path / name
        folder.mkdir()
        for suffix in (".safetensors", ".json"):
            src = chain[name].with_suffix(suffix)
            shutil.copy(src, folder / src.name)
        copies[name] = folder / MODEL
    return copies


# ----------------------------------------------------------------------------- the chain


def test_train_records_user_values(chain):
    card = chain["info_dense"]["card"]
    assert card["stage"] == "pretrain"
    assert card["eps"] == "1/8" and card["eps_value"] == 0.125  # YAML text kept exactly
    assert card["training"]["epochs"] == 1  # --epochs 1 beats the YAML's epochs: 3
    assert card["training"]["lr"] == 0.05  # from the YAML
    assert card["objective"]["name"] == "pgd" and card["objective"]["steps"] == 1
    assert card["objective"]["eps"] == 0.125
    assert card["dataset"]["name"] == "digits" and card["masks"] == {}
    assert chain["info_dense"]["sparsity_report"]["sparsity"] == 0.0
    assert chain["train_out"].startswith("train: clean ")
    assert "eps 1/8, n=40" in chain["train_out"]
    metrics = [json.loads(line) for line in (chain["root"] / "dense" / "metrics.jsonl").open()]
    assert len(metrics) == 1  # one epoch, not three


def _check_local_sparsity(report: dict, sparsity: float) -> None:
    assert report["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    assert len(report["layers"]) == 5
    for layer in report["layers"]:
        # LWM local: every layer keeps round((1 - s) * params) weights, within one weight
        assert abs(layer["kept"] - (1 - sparsity) * layer["params"]) <= 1, layer
        assert abs(layer["density"] - (1 - sparsity)) <= 1 / layer["params"] + 1e-9, layer


def test_prune_measured_sparsity(chain):
    info = chain["info_pruned"]
    card = info["card"]
    _check_local_sparsity(info["sparsity_report"], SPARSITY)
    assert card["stage"] == "prune" and card["sparsity"]["target"] == SPARSITY
    assert card["method"]["name"] == "lwm" and card["method"]["scope"] == "local"
    assert set(card["masks"]) == {r["name"] for r in info["sparsity_report"]["layers"]}
    assert "sparsity: 0.9000" in chain["prune_out"]
    assert f"saved {chain['pruned']}" in chain["prune_out"]


def test_finetune_keeps_masks_and_trains(chain):
    info, pruned = chain["info_ft"], chain["info_pruned"]
    card = info["card"]
    assert card["stage"] == "finetune" and card["method"]["name"] == "lwm"
    assert card["masks"] == pruned["card"]["masks"]
    assert card["sparsity"]["target"] == SPARSITY
    assert card["sparsity"]["target_layers"] == pruned["card"]["sparsity"]["target_layers"]
    assert set(card["sparsity"]["target_layers"]) == set(card["masks"])
    _check_local_sparsity(info["sparsity_report"], SPARSITY)
    # the masks stayed fixed: the same number of weights per layer survive training
    kept = {r["name"]: r["kept"] for r in info["sparsity_report"]["layers"]}
    assert kept == {r["name"]: r["kept"] for r in pruned["sparsity_report"]["layers"]}
    assert card["eps"] == "1/8" and card["training"]["epochs"] == 1
    # it did train: the surviving weights changed
    tuned, _ = load_checkpoint(chain["ft"])
    before, _ = load_checkpoint(chain["pruned"])
    w0 = before.classifier[0].weight.detach()
    w1 = tuned.classifier[0].weight.detach()
    assert not torch.equal(w0, w1)
    assert torch.equal(w0 == 0, w1 == 0)  # pruned weights are still exactly zero
    assert "finetune: clean" in chain["finetune_out"] and "sparsity 0.9000" in chain["finetune_out"]


def test_eval_json(chain):
    m = chain["eval"]
    assert 0.0 <= m["robust_accuracy"] <= m["clean_accuracy"] <= 1.0
    assert m["eps"] == "1/8" and m["eps_value"] == 0.125 and m["norm"] == "linf"
    (entry,) = m["entries"]
    assert m["n"] == 40 and entry["name"] == "pgd" and entry["config"]["steps"] == 2
    assert entry["robust_accuracy"] == m["robust_accuracy"]
    assert m["model"]["measured_sparsity"] == pytest.approx(SPARSITY, abs=1e-3)
    assert m["model"]["checkpoint"] == str(chain["ft"])


def test_eval_text(chain, capsys):
    assert main(["eval", "--checkpoint", str(chain["ft"]), "--eps", "8/255", *EVAL_PGD]) == 0
    out = capsys.readouterr().out
    assert "digits n=40, linf eps 8/255" in out.splitlines()[0]
    assert "sparsity 0.9000" in out and "pgd" in out


def test_eval_eps_fraction_exact(chain, tmp_path):
    argv = ["eval", "--checkpoint", chain["dense"], "--eps", "8/255", *EVAL_PGD, "--json"]
    m = json.loads(ok(argv))
    assert m["eps"] == "8/255" and m["eps_value"] == 8 / 255
    assert m["clean_accuracy"] > 0.5  # one epoch of dense training is far above chance (10 %)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"eps: 8/255\ncheckpoint: {chain['dense']}\n")
    m = json.loads(ok(["eval", "--config", cfg, *EVAL_PGD, "--json"]))
    assert m["eps"] == "8/255" and m["eps_value"] == 8 / 255


def test_info_text(chain, capsys):
    assert main(["info", str(chain["ft"])]) == 0
    out = capsys.readouterr().out
    assert "architecture digits_cnn (10 classes, input [1, 8, 8])" in out
    assert "method       lwm" in out and "eps          1/8 (linf)" in out
    assert "sparsity: 0.9000" in out
    # the card can also be given as the .json path
    assert main(["info", str(chain["ft"].with_suffix(".json")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["card"]["stage"] == "finetune"


def test_rerun_resumes_the_finished_run(chain, tmp_path):
    out = tmp_path / "dense"
    shutil.copytree(chain["root"] / "dense", out)
    ok([*chain["train_args"], "--out", out])
    card = json.loads((out / "model.json").read_text())
    assert card["eps"] == "1/8" and card["training"]["epochs"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # no epoch re-run


def test_resume_with_other_settings_is_refused(chain, tmp_path):
    out = tmp_path / "dense"
    shutil.copytree(chain["root"] / "dense", out)
    (out / "model.json").unlink()
    (out / "model.safetensors").unlink()
    fails([*chain["train_args"], "--eps", "2/8", "--out", out], "eps", "new --out", out_dir=out)
    # finetuning into a pretraining folder would load dense weights into a masked model
    fails(
        ["finetune", "--checkpoint", chain["pruned"], *TINY, "--epochs", "1", "--out", out],
        "pretrain run with other settings",
        out_dir=out,
    )


# ----------------------------------------------------------------------------- precedence


def test_flags_not_given_do_not_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\neps: 4/255\nprogress: false\naugment: true\nsparsity: 0.5\n")
    args = build_parser().parse_args(["finetune", "--config", str(path), "--epochs", "1"])
    cfg = _run_config(args)
    assert cfg.epochs == 1
    assert cfg.eps == "4/255" and cfg.eps_value() == 4 / 255
    assert cfg.progress == "off" and cfg.augment is True and cfg.sparsity == 0.5
    args = build_parser().parse_args(["prune", "--config", str(path), "--sparsity", "99/100"])
    assert _run_config(args).sparsity == 0.99


# ----------------------------------------------------------------------------- simple commands


def test_methods_lists_lwm_with_taxonomy():
    out = ok(["methods"])
    line = next(line for line in out.splitlines() if line.startswith("lwm "))
    for part in (
        "pipeline=after",
        "ap_key=LWM_Han2015Learning",
        "schedule=1S",
        "structures=S,US",
        "scopes=L,G",
        "criterion=LWM",
        "| implements structures=unstructured,filters,channels,nm scopes=local,global",
        "stages=pretrain->prune->finetune",
    ):
        assert part in line


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"advprune {__version__}"
    assert main(["eval", "--help"]) == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_quickstart_command(tmp_path, monkeypatch):
    import advprune.quickstart as qs

    original = qs.run_quickstart

    def tiny(out, **kwargs):
        return original(out, pretrain_epochs=0, finetune_epochs=0, sparsities=(0.5,), **kwargs)

    monkeypatch.setattr(qs, "run_quickstart", tiny)
    monkeypatch.setitem(qs.QUICKSTART, "eval_steps", 1)
    monkeypatch.setitem(qs.QUICKSTART, "n", 20)
    out = ok(["quickstart", "--out", tmp_path / "qs", "--no-progress"])
    rows = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert [(r["method"], r["sparsity"]) for r in rows] == [("dense", 0.0), ("lwm", 0.5)]
    assert rows[1]["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert "lwm" in out and "results.json" in out


# ----------------------------------------------------------------------------- bad names


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--model", "resnet9000"], ["unknown model 'resnet9000'", "digits_cnn", "resnet18"]),
        (["--dataset", "mnist"], ["unknown dataset 'mnist'", "digits", "cifar10", "svhn"]),
        (["--objective", "pgdd"], ["unknown objective 'pgdd'", "natural", "pgd", "trades"]),
        (["--norm", "l3"], ["unknown norm 'l3'", "linf, l2"]),
        (["--schedule", "cosin"], ["unknown schedule 'cosin'", "cosine"]),
    ],
)
def test_train_unknown_names(tmp_path, flags, words):
    out = tmp_path / "out"
    fails(["train", *flags, "--epochs", "1", *TINY, "--out", out], *words, out_dir=out)


def test_prune_unknown_method_and_structure(ckpts, tmp_path):
    out = tmp_path / "out"
    base = ["prune", "--checkpoint", ckpts["dense"], "--out", out]
    fails(
        [*base, "--method", "lwn"], "unknown method 'lwn'", "valid methods:", " lwm,", out_dir=out
    )
    valid = "valid structures: N:M (e.g. 2:4), channels, filters, nm, unstructured"
    fails([*base, "--structure", "rows"], "unknown structure 'rows'", valid, out_dir=out)
    fails([*base, "--scope", "world"], "local, global", out_dir=out)


# ----------------------------------------------------------------------------- bad data


def _imagefolder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_missing_dataset_files_name_the_expected_file(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["train", "--epochs", "1", *TINY, "--out", out, "--data-root", empty]
    fails(
        [*base, "--dataset", "cifar10"],
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        out_dir=out,
    )
    fails([*base, "--dataset", "cifar100"], "cifar-100-python", out_dir=out)
    fails([*base, "--dataset", "svhn"], "train_32x32.mat", "test_32x32.mat", out_dir=out)
    fails([*base, "--dataset", "imagefolder"], str(empty / "train"), out_dir=out)


def test_dataset_files_in_the_wrong_format(tmp_path, ckpts):
    out = tmp_path / "out"
    cifar = tmp_path / "c10" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"not a pickle")
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    for name in ("train_32x32.mat", "test_32x32.mat"):
        (svhn / name).write_bytes(b"not a MATLAB file")
    base = ["train", "--epochs", "1", *TINY, "--out", out]
    fails(
        [*base, "--dataset", "cifar10", "--data-root", cifar.parent],
        "data_batch_1",
        "not a valid CIFAR pickle",
        out_dir=out,
    )
    fails(
        [*base, "--dataset", "svhn", "--data-root", svhn],
        "train_32x32.mat",
        "not a readable MATLAB file",
        out_dir=out,
    )
    fails(
        [
            "eval",
            "--checkpoint",
            ckpts["dense"],
            "--dataset",
            "cifar10",
            "--data-root",
            tmp_path / "c10" / "nothing.txt",
        ],
        "cifar-10-batches-py",
    )


def test_inputs_outside_unit_range_are_refused():
    from advprune.attacks import PGD
    from advprune.models import create
    from advprune.training import evaluate_accuracy

    model = create("digits_cnn")
    y = torch.zeros(4, dtype=torch.long)
    for x in (torch.full((4, 1, 8, 8), 16.0), torch.full((4, 1, 8, 8), -0.5)):
        with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
            evaluate_accuracy(model, [(x, y)])
        with pytest.raises(ConfigError, match="normalisation is the model's first layer"):
            evaluate_accuracy(model, [(x, y)], PGD(eps="1/8", steps=1))
    clean, robust = evaluate_accuracy(model, [(torch.rand(4, 1, 8, 8), y)])
    assert 0.0 <= clean <= 1.0 and robust is None


# ----------------------------------------------------------------------------- eps, sparsity


@pytest.mark.parametrize("command", ["train", "finetune", "eval"])
def test_eps_above_one(chain, tmp_path, command):
    out = tmp_path / "out"
    ckpt = {
        "train": [],
        "finetune": ["--checkpoint", chain["pruned"]],
        "eval": ["--checkpoint", chain["ft"]],
    }[command]
    argv = [command, *ckpt, "--eps", "8", "--no-progress"]
    if command != "eval":
        argv += ["--out", out]
    err = fails(argv, "eps=8", "[0, 1]", "did you mean 8/255?", out_dir=out)
    assert "config:" not in err


def test_eps_above_one_in_yaml(chain, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("eps: 16\n")
    fails(["eval", "--config", path, "--checkpoint", chain["ft"]], str(path), "16/255")


def test_step_size_above_one(tmp_path):
    out = tmp_path / "out"
    fails(["train", "--step-size", "2", "--out", out], "step_size=2", "2/255", out_dir=out)


@pytest.mark.parametrize("value", ["99", "1.0", "1", "-0.5", "90%"])
def test_sparsity_outside_unit_interval(ckpts, tmp_path, value):
    out = tmp_path / "out"
    argv = ["prune", "--checkpoint", ckpts["dense"], "--sparsity", value, "--out", out]
    fails(argv, "sparsity", out_dir=out)
    if value != "90%":
        fails(argv, "[0, 1)", "removed fraction", out_dir=out)


# ----------------------------------------------------------------------------- checkpoints


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "flipped-byte": (lambda p: _flip_byte(p), ["sha256", "does not match", "corrupt"]),
    "truncated": (lambda p: _truncate(p), ["sha256", "does not match"]),
    "garbage-card": (lambda p: p.with_suffix(".json").write_text("{garbage"), ["not valid JSON"]),
    "not-a-card": (lambda p: p.with_suffix(".json").write_text("[1, 2]"), ["not an advprune"]),
    "missing-card": (lambda p: p.with_suffix(".json").unlink(), ["model.json is missing"]),
    "missing-tensors": (lambda p: p.unlink(), ["model.safetensors is missing"]),
}
SOURCE = {"eval": "ft", "info": "ft", "prune": "dense", "finetune": "pruned"}


@pytest.mark.parametrize("command", ["eval", "info", "prune", "finetune"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint(ckpts, tmp_path, command, corruption):
    ckpt = ckpts[SOURCE[command]]
    damage, words = CORRUPTIONS[corruption]
    damage(ckpt)
    out = tmp_path / "out"
    if command == "info":
        argv = ["info", ckpt]
    else:
        argv = [command, "--checkpoint", ckpt, "--no-progress"]
        if command != "eval":
            argv += ["--out", out]
    fails(argv, *words, out_dir=out)


def test_missing_checkpoint_argument_and_file(tmp_path):
    fails(["eval"], "needs --checkpoint")
    fails(["prune", "--out", tmp_path / "o"], "needs --checkpoint", out_dir=tmp_path / "o")
    fails(["info", tmp_path / "nope.safetensors"], "nope.json is missing")


def _edit_card(path: Path, edit) -> None:
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    edit(card)
    card_path.write_text(json.dumps(card))


def test_card_architecture_differs_from_tensors(ckpts, tmp_path):
    ckpt = ckpts["dense"]
    _edit_card(ckpt, lambda c: c["architecture"].update(name="resnet18"))
    fails(["info", ckpt], "does not match architecture 'resnet18'")
    fails(["eval", "--checkpoint", ckpt], "does not match architecture 'resnet18'")
    out = tmp_path / "out"
    fails(["prune", "--checkpoint", ckpt, "--out", out], "does not match architecture", out_dir=out)
    # a pruned one: its masks name layers the card's architecture does not have
    ckpt = ckpts["ft"]
    _edit_card(ckpt, lambda c: c["architecture"].update(name="resnet18"))
    fails(["info", ckpt], "features.0")
    fails(["eval", "--checkpoint", ckpt], "features.0")
    ckpt = ckpts["pruned"]
    _edit_card(ckpt, lambda c: c["architecture"].update(num_classes=3))
    fails(
        ["finetune", "--checkpoint", ckpt, "--out", out],
        "does not match",
        "size mismatch",
        out_dir=out,
    )


def test_checkpoint_for_another_dataset(ckpts, tmp_path):
    data = _imagefolder(tmp_path / "rgb")
    out = tmp_path / "out"
    other = ["--dataset", "imagefolder", "--data-root", data, "--no-progress"]
    words = (
        "digits_cnn for 10 classes and 1 channels",
        "3 classes and 3 channels",
        "--dataset digits",
    )
    fails(["eval", "--checkpoint", ckpts["ft"], *other], *words)
    fails(["prune", "--checkpoint", ckpts["dense"], *other, "--out", out], *words, out_dir=out)
    fails(["finetune", "--checkpoint", ckpts["pruned"], *other, "--out", out], *words, out_dir=out)
    fails(["train", "--checkpoint", ckpts["dense"], *other, "--out", out], *words, out_dir=out)


def test_model_flag_conflicts_with_checkpoint(ckpts, tmp_path):
    out = tmp_path / "out"
    fails(
        ["train", "--checkpoint", ckpts["dense"], "--model", "resnet18", "--out", out],
        "model 'resnet18' was set",
        "'digits_cnn'",
        out_dir=out,
    )


def test_wrong_stage_checkpoints(ckpts, tmp_path):
    out = tmp_path / "out"
    fails(
        ["train", "--checkpoint", ckpts["pruned"], "--out", out], "advprune finetune", out_dir=out
    )
    fails(["prune", "--checkpoint", ckpts["pruned"], "--out", out], "already pruned", out_dir=out)
    fails(
        ["finetune", "--checkpoint", ckpts["dense"], "--out", out, *TINY],
        "needs a pruned checkpoint",
        out_dir=out,
    )


def test_out_folder_of_the_input_is_refused(ckpts):
    for command, name in (("prune", "dense"), ("finetune", "pruned"), ("train", "dense")):
        ckpt = ckpts[name]
        before = sha256_file(ckpt)
        fails([command, "--checkpoint", ckpt, "--out", ckpt.parent], "--out NEW_FOLDER")
        assert sha256_file(ckpt) == before


# ----------------------------------------------------------------------------- bad YAML, flags


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("epochs: 1\nsparsty: 0.9\n")
    out = tmp_path / "out"
    fails(
        ["train", "--config", path, "--out", out],
        str(path),
        "sparsty: unknown key",
        "did you mean 'sparsity'?",
        "valid keys:",
        "attack_steps",
        out_dir=out,
    )


def test_yaml_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- epochs: 1\n")
    fails(["train", "--config", path], "must hold a mapping of settings, not list")


def test_missing_config_file(tmp_path):
    fails(["train", "--config", tmp_path / "none.yaml"], "none.yaml does not exist")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (
            ["train", "--epochs", "three"],
            ["--epochs", "invalid int value", "advprune train --help"],
        ),
        (["train", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
        (["fly"], ["invalid choice: 'fly'"]),
        ([], ["required: COMMAND"]),
    ],
)
def test_usage_errors_are_one_line(argv, words):
    fails(argv, *words)


def test_diverging_training_is_one_line(tmp_path):
    out = tmp_path / "out"
    argv = ["train", "--objective", "natural", "--lr", "1e12", "--epochs", "1", *TINY]
    fails([*argv, "--out", out], "lower the learning rate", out_dir=out)


def test_seed_decides_the_initial_weights(tmp_path):
    def init_sha(seed: str, name: str) -> str:
        torch.rand(7)  # other users of the global RNG must not change the result
        out = tmp_path / name
        ok(["train", "--epochs", "0", "--seed", seed, *EVAL, "--out", out])
        return json.loads((out / "model.json").read_text())["tensors"]["sha256"]

    assert init_sha("1", "a") == init_sha("1", "b") != init_sha("2", "c")
