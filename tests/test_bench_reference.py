"""The benchmark's reported leaderboard as data."""

from __future__ import annotations

from advprune.bench.keys import parse_key
from advprune.bench.reference import REFERENCE_NOTE, REFERENCE_SOURCE, reference_results


def cell(name, dataset, structure, arch, sparsity):
    hits = [
        r
        for r in reference_results(dataset, structure)
        if (r.name, r.arch, r.sparsity) == (name, arch, sparsity)
    ]
    assert len(hits) <= 1
    return hits[0] if hits else None


def test_cells_per_table():
    counts = {
        (d, s): len(reference_results(d, s)) for d in ("CIFAR10", "SVHN") for s in ("US", "S")
    }
    # 10 x 6 and 4 x 6 full tables; SVHN US misses 8 cells, SVHN S the 6 of RADMM
    assert counts == {("CIFAR10", "US"): 60, ("CIFAR10", "S"): 24, ("SVHN", "US"): 52,
                      ("SVHN", "S"): 18}  # fmt: skip


def test_exact_cells_and_bold():
    hydra = cell("HYDRA", "CIFAR10", "US", "R18", "90")
    assert (hydra.clean, hydra.robust, hydra.bold) == (76.74, 43.34, False)
    twin = cell("TwinRep", "SVHN", "S", "V16", "90")
    assert (twin.clean, twin.robust, twin.bold) == (89.61, 44.83, True)
    assert cell("RADMM", "SVHN", "US", "R18", "90") is None
    assert cell("MAD", "SVHN", "US", "V16", "95").robust == 24.90
    assert cell("HARP", "CIFAR10", "US", "R18", "99").bold
    assert hydra.key == "HYDRA_Sehwag2020Hydra_R18_CIFAR10_US_90"
    flying = cell("FlyingBird", "SVHN", "US", "R18", "90")  # the one plain FlyingBird cell there
    assert (flying.clean, flying.robust, flying.bold) == (92.60, 39.81, False)
    assert cell("RADMM", "SVHN", "US", "V16", "99").robust == 37.91
    assert all(r.url == "https://github.com/inspire-group/hydra" for r in reference_results()
               if r.name == "HYDRA")  # fmt: skip


def test_bold_cells_per_table():
    bold = {(d, s): sum(r.bold for r in reference_results(d, s))
            for d in ("CIFAR10", "SVHN") for s in ("US", "S")}  # fmt: skip
    assert bold == {("CIFAR10", "US"): 18, ("CIFAR10", "S"): 6, ("SVHN", "US"): 18,
                    ("SVHN", "S"): 6}  # fmt: skip
    twin_s = [r.bold for r in reference_results("CIFAR10", "S") if r.name == "TwinRep"]
    assert twin_s == [True] * 6


def test_every_key_parses_and_is_unique():
    keys = [r.key for r in reference_results()]
    assert len(keys) == len(set(keys)) == 154
    for r in reference_results():
        k = parse_key(r.key)
        assert (k.method, k.arch, k.dataset, k.structure, k.sparsity) == (
            r.ap_key, r.arch, r.dataset, r.structure, r.sparsity)  # fmt: skip
        assert 0 < r.robust < r.clean < 100


def test_marked_as_reported():
    assert "arXiv 2409.01249" in REFERENCE_SOURCE
    assert "not measured" in REFERENCE_NOTE
