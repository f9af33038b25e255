"""``advprune export --compressed``: the card's sha256 covers the compressed file on disk, it
loads back to exactly the tensors of the plain export, and a damaged file is one line."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advprune.checkpoint import load_checkpoint, load_weights, read_card, save_checkpoint
from advprune.cli import main
from advprune.errors import CheckpointError
from advprune.io import read_tensor_file, sha256_file, write_json_atomic
from advprune.models import create
from advprune.sparsity import prune_magnitude

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (exact comparison: -0.0 and NaN payloads included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A 99 %-sparse ResNet-18 (LWM, every conv / linear), exported plain and compressed."""
    folder = tmp_path_factory.mktemp("compressed")
    torch.manual_seed(0)
    model = create("resnet18")
    prune_magnitude(model, 0.99)
    src = save_checkpoint(folder / "pruned" / "model", model, {})
    paths = {"src": src}
    for name, flag in (("plain", []), ("compressed", ["--compressed"])):
        code, out, err = _run(["export", str(src), "--out", str(folder / name), *flag])
        assert code == 0, err
        paths[name] = folder / name / "model.safetensors"
        paths[f"{name}_out"] = out  # type: ignore[assignment]
    return paths


def test_compressed_export_is_small_and_exact(exports: dict[str, Path]) -> None:
    plain, compressed = exports["plain"], exports["compressed"]
    card = read_card(compressed)
    assert card["tensors"]["encoding"] == "advprune-compressed"
    assert card["tensors"]["sha256"] == sha256_file(compressed)  # covers what is on disk
    assert not card["masks"] and card["sparsity"]["exported"]
    # a 99 %-sparse ResNet-18: the compressed file is under 3 % of the plain one (issue target)
    assert compressed.stat().st_size <= 0.03 * plain.stat().st_size
    assert "% of the" in exports["compressed_out"] and "reads it back exactly" in str(
        exports["compressed_out"]
    )
    a, _ = load_checkpoint(plain)
    b, _ = load_checkpoint(compressed)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() == load_file(str(plain)).keys()
    for key in sa:  # exact by construction: an entry is either stored or all-zero bits
        if key.endswith("weight") and sa[key].dim() > 1:  # masked weights: +0.0 where pruned
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert torch.equal(_bits(sa[key]), _bits(sb[key])), key
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def test_damaged_compressed_file_is_one_line(exports: dict[str, Path], tmp_path: Path) -> None:
    def copy(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for suffix in (".safetensors", ".json"):
            shutil.copy(exports["compressed"].with_suffix(suffix), folder / f"model{suffix}")
        return folder / "model.safetensors"

    flipped = copy("flipped")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    # the card's sha256 catches it, through every command that loads a checkpoint
    for argv in (["info", str(flipped)], ["profile", str(flipped), "--no-latency"],
                 ["export", str(flipped), "--out", str(tmp_path / "x")]):  # fmt: skip
        code, out, err = _run(argv)
        assert code == 2 and out == "" and err.count("\n") == 1, argv
        assert "sha256" in err and "corrupt" in err
    # a card re-signed over the damaged file: the compressed file's own sha256 catches it
    resigned = copy("resigned")
    resigned.write_bytes(bytes(data))
    card = json.loads(resigned.with_suffix(".json").read_text())
    card["tensors"]["sha256"] = sha256_file(resigned)
    write_json_atomic(resigned.with_suffix(".json"), card)
    code, _, err = _run(["info", str(resigned)])
    assert code == 2 and err.count("\n") == 1
    assert "compressed state dict" in err and str(resigned) in err
    # truncated: not a readable file at all
    truncated = copy("truncated")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    card = json.loads(truncated.with_suffix(".json").read_text())
    card["tensors"]["sha256"] = sha256_file(truncated)
    write_json_atomic(truncated.with_suffix(".json"), card)
    with pytest.raises(CheckpointError, match="not a readable compressed state dict") as e:
        load_checkpoint(truncated)
    assert "\n" not in str(e.value)
    # an encoding this advprune does not know, and the reader of plain files: refused, one line
    unknown = copy("unknown")
    card = json.loads(unknown.with_suffix(".json").read_text())
    card["tensors"]["encoding"] = "zstd-2030"
    write_json_atomic(unknown.with_suffix(".json"), card)
    with pytest.raises(CheckpointError, match="unknown tensor encoding 'zstd-2030'"):
        load_checkpoint(unknown)
    with pytest.raises(CheckpointError, match="advprune-compressed tensors"):
        read_tensor_file(exports["compressed"], read_card(exports["compressed"]))
    # load_weights (a dense checkpoint into an existing model) reads compressed files too
    model = create("resnet18")
    load_weights(model, exports["compressed"])
    plain, _ = load_checkpoint(exports["plain"])
    for key, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
