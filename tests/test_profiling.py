"""Profiles: parameter and MAC counts against hand-computed values; latency bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from advprune.errors import ConfigError
from advprune.models import create
from advprune.sparsity import FixedMask, attach_mask, compact, prune_magnitude
from advprune.sparsity.profiling import (
    count_macs,
    count_params,
    measure_latency,
    profile,
    state_dict_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(h: int, w: int, c_in: int, c_out: int, k: int = 3) -> int:
    """MACs of a conv producing an h x w map: every output value sums c_in * k * k products."""
    return h * w * c_out * c_in * k * k


def test_digits_cnn_by_hand() -> None:
    # 1x8x8 -> conv 1->32 (8x8) -> conv 32->64 (8x8) -> pool 4x4 -> conv 64->128 (4x4)
    # -> pool 2x2 -> adaptive pool 2x2 -> linear 512->256 -> linear 256->10
    macs = [
        _conv(8, 8, 1, 32),
        _conv(8, 8, 32, 64),
        _conv(4, 4, 64, 128),
        512 * 256,
        256 * 10,
    ]
    weights = [1 * 32 * 9, 32 * 64 * 9, 64 * 128 * 9, 512 * 256, 256 * 10]
    others = 2 * (32 + 64 + 128) + 256 + 10  # BatchNorm scale and shift; linear biases
    model = create("digits_cnn")
    total, kept = count_params(model)
    assert total == kept == sum(weights) + others == 226_794
    dense, kept_macs, layers = count_macs(model, (1, 8, 8))
    assert [layer.flops for layer in layers] == macs
    assert dense == kept_macs == sum(macs) == 2_511_360


def test_digits_cnn_masked_and_compacted_by_hand() -> None:
    model = create("digits_cnn").eval()
    conv = model.features[3]  # 32 -> 64: keep 16 of 32 input channels
    mask = torch.zeros(32)
    mask[:16] = 1
    attach_mask(conv, FixedMask(conv.weight.shape, "channels", mask))
    total, kept = count_params(model)
    assert total == 226_794 and kept == total - 16 * 64 * 9
    dense, kept_macs, _ = count_macs(model, (1, 8, 8))
    assert dense == 2_511_360 and kept_macs == dense - _conv(8, 8, 16, 64)
    # compacted: the first conv loses the 16 filters nobody reads (and its BatchNorm)
    thin, _ = compact(model)
    total, kept = count_params(thin)
    assert total == kept == 226_794 - 16 * 64 * 9 - 16 * 9 - 2 * 16
    dense, kept_macs, _ = count_macs(thin, (1, 8, 8))
    assert dense == kept_macs == 2_511_360 - _conv(8, 8, 16, 64) - _conv(8, 8, 1, 16)


def test_resnet18_by_hand() -> None:
    macs = _conv(32, 32, 3, 64)  # stem
    macs += 4 * _conv(32, 32, 64, 64)  # layer1: two blocks of two convs
    params = 3 * 64 * 9 + 4 * 64 * 64 * 9
    bn = 64 + 4 * 64
    side, c_in = 32, 64
    for c in (128, 256, 512):  # layer2..4: stride 2 first block with a 1x1 projection
        side //= 2
        macs += (
            _conv(side, side, c_in, c) + 3 * _conv(side, side, c, c) + _conv(side, side, c_in, c, 1)
        )
        params += c_in * c * 9 + 3 * c * c * 9 + c_in * c
        bn += 5 * c
        c_in = c
    macs += 512 * 10
    params += 512 * 10 + 10 + 2 * bn
    model = create("resnet18")
    with torch.no_grad():  # 11M random draws can hit 0.0 exactly, which counts as pruned
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[m.weight == 0] = 1.0
    total, kept = count_params(model)
    assert total == kept == params == 11_173_962
    dense, kept_macs, layers = count_macs(model, (3, 32, 32))
    assert dense == kept_macs == macs == 555_422_720
    assert len(layers) == 21  # 17 convs + 3 projections + linear
    # unstructured 90 %: each layer keeps round(0.1 n) weights, used at every output position
    prune_magnitude(model, 0.9)
    _, kept_macs, layers = count_macs(model, (3, 32, 32))
    assert kept_macs == sum(r.flops_dense // r.params * round(0.1 * r.params) for r in layers)


def test_state_dict_bytes_is_the_safetensors_file_size(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = create("digits_cnn").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    assert state_dict_bytes(state) == (tmp_path / "m.safetensors").stat().st_size


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.layer = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.layer(x)


def test_latency_bookkeeping() -> None:
    a, b = _Counting(), _Counting()
    before = torch.get_num_threads()
    out = measure_latency({"a": a, "b": b}, (4,), 8, threads=2, warmup=2, repeats=5)
    assert torch.get_num_threads() == before
    assert a.calls == b.calls == 7  # warm-up and timed runs, both models alike
    for lat in out.values():
        assert (lat.device, lat.batch_size, lat.threads, lat.repeats) == ("cpu", 8, 2, 5)
        assert 0 < lat.q1_ms <= lat.median_ms <= lat.q3_ms
    with pytest.raises(ConfigError, match="batch size"):
        measure_latency({"a": a}, (4,), 0)
    with pytest.raises(ConfigError, match="threads"):
        measure_latency({"a": a}, (4,), 1, threads=0)


def test_profile_against_a_baseline(tmp_path: Path) -> None:
    model = create("digits_cnn")
    dense = create("digits_cnn")
    prune_magnitude(model, 0.5, granularity="channels")
    thin, _ = compact(model)
    (tmp_path / "m.bin").write_bytes(b"x" * 123)
    result = profile(
        thin,
        (1, 8, 8),
        baseline=dense,
        batch_sizes=(1, 4),
        devices=["cpu"],
        warmup=1,
        repeats=3,
        files={"compacted": tmp_path / "m.bin"},
    )
    assert result.baseline_macs == 2_511_360 and result.macs < result.baseline_macs
    assert [(lat.batch_size, lat.device) for lat in result.latency] == [(1, "cpu"), (4, "cpu")]
    assert set(result.speedups()) == {("cpu", 1), ("cpu", 4)}
    assert result.files == {"compacted": 123}
    assert "x the dense model" in result.format()
    assert result.to_dict()["speedups"][0]["batch_size"] == 1
    with pytest.raises(ConfigError, match="no such file"):
        profile(thin, (1, 8, 8), batch_sizes=(), files={"x": tmp_path / "missing"})


def test_latency_sets_the_memory_format_both_ways() -> None:
    conv = nn.Conv2d(3, 8, 3)
    measure_latency({"c": conv}, (3, 8, 8), 2, warmup=0, repeats=1, channels_last=True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    measure_latency({"c": conv}, (3, 8, 8), 2, warmup=0, repeats=1)
    assert conv.weight.is_contiguous()
