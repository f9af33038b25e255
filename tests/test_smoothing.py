"""Tests of advprune.certify.smoothing: the certified radius against the formula on stub
classifiers with a known p_A, abstention, the sample-count check, seeding, the report and
the certified-accuracy curve."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom, norm
from torch import nn

from advprune.certify import (
    ABSTAIN,
    Smooth,
    certify_dataset,
    check_sample_counts,
    plot_certified_accuracy,
)
from advprune.certify.smoothing import lower_confidence_bound, min_certify_samples
from advprune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


class Scripted(nn.Module):
    """Returns the classes of a fixed script, one per input, in call order (ignores inputs)."""

    def __init__(self, script: list[int], num_classes: int = 3) -> None:
        super().__init__()
        self.script, self.pos, self.k = script, 0, num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.tensor(self.script[self.pos : self.pos + len(x)])
        self.pos += len(x)
        return F.one_hot(labels, self.k).float()


class Threshold(nn.Module):
    """Class 0 when the first pixel is below ``t``, else class 1: under noise N(0, sigma^2) at
    a constant image of value v, p_A = P(class 0) = Phi((t - v) / sigma) exactly."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x.flatten(1)[:, 0]
        return torch.stack([(first < self.t).float(), (first >= self.t).float()], 1)


def _clopper_pearson_by_bisection(k: int, n: int, alpha: float) -> float:
    """The p with P(Bin(n, p) >= k) = alpha, by bisection on the binomial tail (independent of
    the beta-quantile formula the library uses)."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if binom.sf(k - 1, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_radius_equals_the_formula_for_known_counts():
    n0, n, alpha, sigma = 20, 500, 0.001, 0.5
    n_a = 430
    script = [2] * n0 + [2] * n_a + [0] * (n - n_a)
    smooth = Smooth(Scripted(script), 3, sigma, batch_size=64)
    pred, radius = smooth.certify(torch.full((1, 1, 2, 2), 0.5), n0, n, alpha)
    p_lower = _clopper_pearson_by_bisection(n_a, n, alpha)
    assert int(pred[0]) == 2
    assert float(radius[0]) == pytest.approx(sigma * norm.ppf(p_lower), abs=1e-9)
    assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(p_lower, abs=1e-12)


def test_radius_of_a_classifier_that_never_changes_its_mind():
    """p_A = 1: all n samples in class A, p_A_lower = alpha ** (1 / n), radius sigma *
    Phi^-1(alpha ** (1 / n))."""
    n, alpha, sigma = 1000, 0.001, 0.25
    smooth = Smooth(Scripted([1] * (100 + n)), 3, sigma)
    pred, radius = smooth.certify(torch.zeros(1, 1, 2, 2), 100, n, alpha)
    assert int(pred[0]) == 1
    assert float(radius[0]) == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)


def test_radius_matches_sigma_phi_inverse_p_a_for_a_known_p_a():
    sigma, p_a, v = 0.5, 0.9, 0.4
    model = Threshold(v + sigma * norm.ppf(p_a))
    smooth = Smooth(model, 2, sigma, batch_size=20_000, seed=3)
    x = torch.full((2, 1, 4, 4), v)
    pred, radius = smooth.certify(x, 100, 40_000, 0.001)
    exact = sigma * norm.ppf(p_a)  # 0.6408
    assert pred.tolist() == [0, 0]
    # a lower confidence bound: below the true radius, and close with 40k samples
    assert (radius <= exact).all() and (radius >= sigma * norm.ppf(p_a - 0.006)).all()


def test_abstains_when_p_a_is_one_half_and_predict_tests_the_top_two():
    sigma = 0.5
    model = Threshold(0.4)  # threshold at the image value: p_A = 1/2
    smooth = Smooth(model, 2, sigma, seed=1)
    x = torch.full((3, 1, 2, 2), 0.4)
    pred, radius = smooth.certify(x, 50, 2000, 0.001)
    assert pred.tolist() == [ABSTAIN] * 3 and radius.tolist() == [0.0] * 3
    assert smooth.predict(x, 2000, 0.001).tolist() == [ABSTAIN] * 3
    confident = Smooth(Threshold(2.0), 2, sigma)  # p_A ~ 0.9993
    assert confident.predict(x, 200, 0.001).tolist() == [0, 0, 0]


def test_sample_counts_too_small_for_alpha_are_refused_before_sampling():
    assert min_certify_samples(0.001) == 10  # 0.001 ** (1/9) = 0.46, 0.001 ** (1/10) = 0.501
    model = Scripted([0] * 10_000)
    smooth = Smooth(model, 3, 0.25)
    with pytest.raises(ConfigError, match=r"n=9 samples cannot certify at alpha=0\.001") as info:
        smooth.certify(torch.zeros(1, 1, 2, 2), 5, 9, 0.001)
    assert "\n" not in str(info.value) and model.pos == 0  # nothing was sampled
    pred, radius = smooth.certify(torch.zeros(1, 1, 2, 2), 5, 10, 0.001)
    assert int(pred[0]) == 0 and 0 < float(radius[0]) < 0.001
    with pytest.raises(ConfigError, match="binomial test"):
        check_sample_counts(10, 0.001, predict=True)
    for bad in (0, -0.25, "0"):
        with pytest.raises(ConfigError, match="sigma must be > 0"):
            Smooth(model, 3, bad)
    for bad_alpha in (0, 1, 1.5):
        with pytest.raises(ConfigError, match="alpha"):
            check_sample_counts(100, bad_alpha)
    with pytest.raises(ConfigError, match="n0"):
        check_sample_counts(100, 0.01, 0)


def test_noise_is_seeded_per_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(3, 1, 4, 4)
    a = Smooth(model, 3, 0.5, seed=7, batch_size=50).certify(x, 20, 300, 0.01)
    b = Smooth(model, 3, 0.5, seed=7, batch_size=50).certify(x[2:], 20, 300, 0.01, start_index=2)
    c = Smooth(model, 3, 0.5, seed=8, batch_size=50).certify(x, 20, 300, 0.01)
    assert torch.equal(a[0][2:], b[0]) and torch.equal(a[1][2:], b[1])
    assert not torch.equal(a[1], c[1])


def test_certify_dataset_report_and_curve(tmp_path):
    sigma = 0.5
    # the class is decided by the first pixel: images far from the threshold get large radii
    model = Threshold(0.5)
    values = torch.tensor([0.1, 0.2, 0.45, 0.9, 0.5])  # p_A: .79, .73, .54, .79 (class 1), .5
    x = values.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    y = torch.tensor([0, 0, 0, 0, 1])  # the fourth is predicted 1: wrong
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    res = certify_dataset(model, loader, 2, sigma, n0=50, n=4000, alpha=0.001, seed=0)
    assert res.num_points == 5
    assert res.predictions[3] == 1 and res.predictions[4] == ABSTAIN
    assert res.abstention_rate == pytest.approx(0.2)
    # sigma * Phi^-1(p_A) = 0.5 - v: 0.4, 0.3, 0.05; the lower confidence bound at n = 4000
    # costs about 0.03 of radius (0.37, 0.27, 0.02)
    for i, exact in enumerate((0.4, 0.3, 0.05)):
        assert exact - 0.06 < res.radii[i] < exact
    # certified accuracy: correct, not abstained, radius >= r
    assert res.certified_accuracy(0.0) == pytest.approx(3 / 5)
    assert res.certified_accuracy(0.25) == pytest.approx(2 / 5)
    assert res.certified_accuracy(0.3) == pytest.approx(1 / 5)
    assert res.certified_accuracy(0.45) == 0.0
    curve = res.curve([0.0, 0.1, 0.2, 0.3, 0.35, 0.5])
    acc = curve["certified_accuracy"]
    assert all(a >= b for a, b in itertools.pairwise(acc))  # never increases with the radius
    summary = res.to_dict()
    assert summary["certified_accuracy"]["0.25"] == pytest.approx(2 / 5)
    assert summary["abstention_rate"] == pytest.approx(0.2) and "radii" not in summary
    fig = plot_certified_accuracy({"threshold": res}, tmp_path / "curve")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    assert (tmp_path / "curve.svg").read_text().lstrip().startswith("<?xml")
    assert fig.axes[0].get_ylabel() == "certified accuracy (%)"
    assert math.isclose(res.sigma, sigma)
