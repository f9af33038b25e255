"""Leaderboards: the Markdown layout, and the offline HTML page driven in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from advprune.bench.leaderboard import collect, leaderboard, markdown
from advprune.bench.store import ResultsStore
from advprune.cli import main
from advprune.errors import ConfigError
from advprune.evaluation import Entry, Flag, Report

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def report(clean: float, robust: float, flags: list[Flag] | None = None, eps: str = "3/16"):
    grid = [0.0, 0.0625, 0.125, 0.1875, 0.25, 0.375]
    curve = [clean] + [max(0.0, clean - (clean - robust) * e / 0.1875) for e in grid[1:]]
    return Report(
        n=360, clean_accuracy=clean, robust_accuracy=robust, eps=eps, eps_value=3 / 16,
        norm="linf", dataset="digits", curve={"attack": "all", "eps": grid,
                                              "robust_accuracy": curve},
        entries=[Entry("autoattack", "empirical", {}, 1.0, robust, flags=list(flags or [])),
                 Entry("hofmn", "empirical", {}, 1.0, robust + 0.02)],
    )  # fmt: skip


MODELS = {
    "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_90": report(0.97, 0.61),
    "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_99": report(0.90, 0.55),
    "LWM_Han2015Learning_DCNN_DIGITS_US_90": report(0.98, 0.64, [Flag("zero_gradients", "x")]),
    "LWM_Han2015Learning_DCNN_DIGITS_US_99": report(0.65, 0.37),
    "HARP_Zhao2023Holistic_DCNN_DIGITS_US_99": report(0.92, 0.58),
}


@pytest.fixture()
def store(tmp_path):
    s = ResultsStore(tmp_path / "results.sqlite")
    for key, r in MODELS.items():
        s.add_report(r, key)
    return s


def test_markdown_layout_bold_and_marks(store):
    text = markdown(collect(store))
    measured, reported = text.split("# Reported by the Adversarial Pruning Benchmark")
    assert "not measured here" in reported.splitlines()[0]
    assert "| Name | DigitsCNN 90% | DigitsCNN 99% |" in measured
    lines = {line.split(" |")[0][2:]: line for line in measured.splitlines() if "|" in line}
    # best robust per column: the flagged LWM-90 (64.00) in column 90, HARP-99 (58.00) in 99
    assert "**98.00/64.00** ⚠1" in lines["LWM"] and "65.00/37.00 |" in lines["LWM"]
    assert "| 97.00/61.00 |" in lines["HYDRA"] and "| 90.00/55.00 |" in lines["HYDRA"]
    assert "| - | **92.00/58.00** |" in lines["HARP"]
    assert "1. LWM_Han2015Learning_DCNN_DIGITS_US_90: zero_gradients: x" in measured
    assert "| Name | ResNet18 90% | ResNet18 95% | ResNet18 99% | VGG16 90% |" in reported
    hydra_cifar = [r for r in reported.split("## ")[2].splitlines() if r.startswith("| [HYDRA]")]
    assert hydra_cifar == [
        "| [HYDRA](https://github.com/inspire-group/hydra) | 76.74/43.34 | 76.16/42.45 | "
        "72.21/38.80 | 78.31/43.81 | 76.58/42.61 | 70.59/35.56 |"
    ]  # FlyingBird's 43.95 is the best robust accuracy of VGG16 90% (the source bolds both)
    assert "| **76.72/43.95** |" in reported


def test_protocols_are_never_mixed(store, tmp_path):
    store.add_report(report(0.9, 0.4, eps="1/8"), "LWM_Han2015Learning_DCNN_DIGITS_US_95")
    with pytest.raises(ConfigError, match="several protocols"):
        collect(store)
    board = collect(store, "linf-1/8")
    assert [r.key for r in board.rows if not r.reported] == [
        "LWM_Han2015Learning_DCNN_DIGITS_US_95"
    ]
    with pytest.raises(ConfigError, match="no results under protocol"):
        collect(store, "l2-1/2")
    assert main(["leaderboard", "--store", str(store.path), "--out", str(tmp_path / "b")]) == 2


def test_html_escapes_data(store, tmp_path):
    store.add_report(
        report(0.5, 0.2, [Flag("x", "</script><script>alert(1)</script>")]),
        "LWM_Han2015Learning_DCNN_DIGITS_US_95",
    )
    paths = leaderboard(store.path, tmp_path / "board")
    page = paths["html"].read_text()
    assert "</script><script>alert" not in page
    assert "http://" not in page.replace('"http://www.w3.org/2000/svg"', "").split("<script")[0]
    assert re.search(r"<(link|img|iframe|script src)\b", page) is None  # nothing to fetch


def _launch(p):
    if not Path(CHROMIUM).exists():
        if os.environ.get("ADVPRUNE_SKIP_BROWSER") == "1":
            pytest.skip("ADVPRUNE_SKIP_BROWSER=1 and no Chromium")
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium (make test does)")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update"]  # fmt: skip
    return p.chromium.launch(executable_path=CHROMIUM, args=flags)


def test_page_in_headless_chromium(store, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    page_path = leaderboard(store.path, tmp_path / "board")["html"]
    with playwright.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.as_uri())
        keys = page.eval_on_selector_all("tr[data-key]", "rs => rs.map(r => r.dataset.key)")
        assert set(MODELS) <= set(keys) and len(keys) == len(MODELS) + 154
        assert page.locator("tr.reported").count() == 154
        assert page.locator("tr.unreliable").count() == 1
        # sorting by clean accuracy, descending then ascending
        page.click("th[data-col=clean]")
        cleans = page.eval_on_selector_all(
            "tbody tr", "rs => rs.map(r => parseFloat(r.children[6].textContent))"
        )
        assert cleans == sorted(cleans, reverse=True)
        page.click("th[data-col=clean]")
        cleans = page.eval_on_selector_all(
            "tbody tr", "rs => rs.map(r => parseFloat(r.children[6].textContent))"
        )
        assert cleans == sorted(cleans)
        # curves of the ticked models
        assert page.locator("path.curve").count() == 0
        assert page.locator("input[data-key]").count() == len(MODELS)
        a, b = "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_99", "LWM_Han2015Learning_DCNN_DIGITS_US_99"
        page.check(f"input[data-key={a}]")
        page.check(f"input[data-key={b}]")
        drawn = page.eval_on_selector_all("path.curve", "ps => ps.map(p => p.dataset.key)")
        assert sorted(drawn) == [a, b]
        d = page.get_attribute(f"path.curve[data-key={a}]", "d")
        assert d.startswith("M") and d.count("L") == 5
        assert page.locator("line.eps-line").count() == 1
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "leaderboard.png"
        page.screenshot(path=str(shot), full_page=False)
        page.uncheck(f"input[data-key={a}]")
        drawn = page.eval_on_selector_all("path.curve", "ps => ps.map(p => p.dataset.key)")
        assert drawn == [b]
        browser.close()
    assert errors == []
    assert urls and all(u.startswith("file://") for u in urls)
    assert shot.stat().st_size > 20_000
