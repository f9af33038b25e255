"""N:M semi-structured masks: exactly N of every M consecutive input weights, the largest."""

from __future__ import annotations

import pytest
import torch

from advprune.errors import ConfigError
from advprune.sparsity import FixedMask, attach_mask, export_dense
from advprune.sparsity.nm import is_nm, nm_mask, parse_nm


def _groups_by_hand(t: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Every group of m consecutive inputs, by explicit loops (not the library's reshape)."""
    out = []
    kernel = t.shape[2:]
    for o in range(t.shape[0]):
        for pos in torch.cartesian_prod(*[torch.arange(k) for k in kernel]) if kernel else [()]:
            pos = tuple(int(p) for p in torch.as_tensor(pos).flatten())
            for start in range(0, t.shape[1], m):
                out.append(torch.stack([t[(o, i, *pos)] for i in range(start, start + m)]))
    return out


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("shape", [(6, 8), (5, 8, 3, 3), (3, 16, 1, 1)])
def test_exactly_n_of_every_m_kept_and_the_largest(n: int, m: int, shape: tuple) -> None:
    importance = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(importance, n, m)
    assert mask.shape == importance.shape and mask.dtype == importance.dtype
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert is_nm(mask, n, m)
    for imp, keep in zip(_groups_by_hand(importance, m), _groups_by_hand(mask, m)):
        assert int(keep.sum()) == n
        assert imp[keep == 1].min() > imp[keep == 0].max()
    assert float(mask.mean()) == pytest.approx(n / m)


def test_ties_still_keep_exactly_n() -> None:
    mask = nm_mask(torch.ones(4, 8, 3, 3), 2, 4)
    assert is_nm(mask, 2, 4)
    assert not is_nm(torch.ones(4, 8), 2, 4)
    not_quite = mask.clone()
    not_quite[0, 0, 0, 0] = 1 - not_quite[0, 0, 0, 0]
    assert not is_nm(not_quite, 2, 4)


def test_groups_run_along_the_input_dimension() -> None:
    """In a 2:4 mask of a linear weight, each row's entries 4k..4k+3 hold two ones."""
    importance = torch.arange(32.0).view(2, 16)  # increasing along inputs
    mask = nm_mask(importance, 2, 4)
    assert mask[0, :4].tolist() == [0.0, 0.0, 1.0, 1.0]
    conv = torch.zeros(1, 4, 1, 2)
    conv[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # one kernel position
    conv[0, :, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # another: its own group
    mask = nm_mask(conv, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert mask[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_an_nm_mask_is_an_ordinary_fixed_mask() -> None:
    layer = torch.nn.Linear(8, 3)
    mask = nm_mask(layer.weight.abs(), 2, 4)
    attach_mask(layer, FixedMask(layer.weight.shape, "unstructured", mask))
    x = torch.randn(5, 8)
    expected = x @ (layer.weight * mask).T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    export_dense(layer)
    assert is_nm(layer.weight, 2, 4)


def test_bad_structures_are_one_line_errors() -> None:
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1 : 8 ") == (1, 8)
    for bad in ("2-4", "4:4", "0:4", "5:4", "a:b", "", 2):
        with pytest.raises(ConfigError, match=r"N:M|N < M"):
            parse_nm(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"multiple of 4; got shape \(16, 3, 3, 3\)"):
        nm_mask(torch.rand(16, 3, 3, 3), 2, 4)
    with pytest.raises(ConfigError, match="multiple of 4"):
        nm_mask(torch.rand(16), 2, 4)
    with pytest.raises(ConfigError, match="integers"):
        nm_mask(torch.rand(4, 4), 2.0, 4)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 sparse kernels need a CUDA GPU")
def test_mask_is_accepted_by_torch_semi_structured_sparse_tensors() -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse kernels need an Ampere or later GPU")
    from torch.sparse import to_sparse_semi_structured

    weight = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    pruned = weight * nm_mask(weight.abs(), 2, 4)
    sparse = to_sparse_semi_structured(pruned)
    torch.testing.assert_close(sparse.to_dense(), pruned)
