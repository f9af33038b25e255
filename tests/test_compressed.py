"""Compressed sparse state dicts: bit-exact round trips, small files, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from advprune.errors import CheckpointError
from advprune.models import create
from advprune.sparsity import prune_magnitude
from advprune.sparsity.compressed import (
    encode_state_dict,
    encode_tensor,
    load_compressed,
    save_compressed,
    sparse_state_dict,
)

_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(_INT[t.element_size()])


def assert_bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, shapes, dtypes and bits (torch.equal would accept -0.0 for +0.0)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


def _sparse(shape: tuple, density: float, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen).to(dtype)
    # where(), not t * mask: the product leaves -0.0 (a stored value) where t < 0
    return torch.where(torch.rand(shape, generator=gen) < density, t, torch.zeros((), dtype=dtype))


def test_round_trip_is_bit_exact_for_every_encoding_and_dtype(tmp_path: Path) -> None:
    tensors = {
        "conv.weight": _sparse((64, 32, 3, 3), 0.01, torch.float32, 0),  # csr
        "half.weight": _sparse((64, 32, 3, 3), 0.3, torch.float32, 1),  # bitmask
        "dense.weight": torch.randn(16, 8),
        "fc.weight": _sparse((10, 70000), 0.001, torch.float32, 2),  # int32 columns
        "bf16": _sparse((8, 300), 0.05, torch.bfloat16, 3),  # uint16 columns
        "f16": _sparse((33,), 0.2, torch.float16, 4),
        "f64": _sparse((5, 7), 0.1, torch.float64, 5),
        "steps": torch.tensor(7),  # 0-d int64
        "flags": torch.tensor([True, False, False, False, False, False, False, False, True]),
        "ints": torch.tensor([0, 0, -3, 0, 0, 0, 0, 0, 0, 0, 0, 5], dtype=torch.int32),
        "empty_rows": torch.zeros(6, 40),
        "nothing": torch.zeros(0, 3),
    }
    weird = torch.zeros(4, 64)
    weird[0, 1] = -0.0  # a signed zero is a stored value, not an implicit zero
    weird[2, 5] = float("nan")
    weird[3, 63] = float("inf")
    tensors["weird"] = weird
    path = save_compressed(tensors, tmp_path / "m.safetensors")
    assert_bit_exact(load_compressed(path), tensors)
    encodings = {n: encode_tensor(n, t)[1]["encoding"] for n, t in tensors.items()}
    assert encodings["conv.weight"] == "csr" and encodings["fc.weight"] == "csr"
    assert encodings["half.weight"] == "bitmask" and encodings["dense.weight"] == "dense"
    assert encode_tensor("x", weird)[0]["x::values"].numel() == 3  # -0.0, nan, inf


def test_planted_signed_zero_dropped_is_caught_by_the_bit_comparison() -> None:
    a = {"w": torch.tensor([-0.0, 1.0])}
    b = {"w": torch.tensor([0.0, 1.0])}
    assert torch.equal(a["w"], b["w"])  # value equality cannot see it
    with pytest.raises(AssertionError):
        assert_bit_exact(a, b)


def test_sparse_state_dict_stores_positive_zeros_and_leaves_the_model_masked() -> None:
    torch.manual_seed(0)
    model = create("digits_cnn")
    prune_magnitude(model, 0.9)
    state = sparse_state_dict(model)
    assert set(state) == set(create("digits_cnn").state_dict())
    w = state["features.0.weight"]
    assert int((w == 0).sum()) > 0 and not bool(torch.signbit(w[w == 0]).any())
    assert "features.0.parametrizations.weight.original" in model.state_dict()
    x = torch.rand(4, 1, 8, 8)
    plain = create("digits_cnn").eval()
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), model.eval()(x), rtol=0, atol=0)


def test_99_percent_sparse_resnet18_is_under_3_percent_of_dense(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create("resnet18")
    prune_magnitude(model, 0.99)
    state = sparse_state_dict(model)
    dense = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(dense))
    small = save_compressed(state, tmp_path / "small.safetensors")
    ratio = small.stat().st_size / dense.stat().st_size
    assert ratio <= 0.03, f"compressed file is {ratio:.2%} of the dense one"
    assert_bit_exact(load_compressed(small), state)


def _corrupt(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_files_are_one_line_errors(tmp_path: Path) -> None:
    tensors = {"w": _sparse((32, 64), 0.05, torch.float32, 0), "b": torch.randn(32)}

    def fails(path: Path, match: str) -> None:
        with pytest.raises(CheckpointError, match=match) as info:
            load_compressed(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)

    flipped = save_compressed(tensors, tmp_path / "flipped.safetensors")
    _corrupt(flipped, 3)  # one bit of the data
    fails(flipped, "sha256 check")
    truncated = save_compressed(tensors, tmp_path / "truncated.safetensors")
    truncated.write_bytes(truncated.read_bytes()[:-10])
    fails(truncated, "not a readable compressed state dict")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 7)
    fails(garbage, "not a readable compressed state dict")
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    fails(plain, "no format marker")
    fails(tmp_path / "missing.safetensors", "no compressed state dict")
    # a consistent sha256 over inconsistent parts (a writer bug, not damage): still refused
    stored, metadata = encode_state_dict(tensors)
    stored["w::cols"] = stored["w::cols"].flip(0).contiguous()
    from advprune.sparsity.compressed import _digest

    metadata["sha256"] = _digest(stored, metadata["tensors"])
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(save(stored, metadata=metadata))
    fails(forged, "CSR columns out of order")


def test_a_failed_save_leaves_the_old_file(tmp_path: Path) -> None:
    path = save_compressed({"w": torch.zeros(3)}, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="contains '::'"):
        save_compressed({"a::b": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
