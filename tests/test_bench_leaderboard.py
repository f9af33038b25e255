"""Leaderboards: the Markdown layout, the CLI, and the offline HTML page in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from advprune.bench import leaderboard as lb
from advprune.bench.leaderboard import collect, leaderboard, markdown
from advprune.bench.reference import REFERENCE_SOURCE, reference_results
from advprune.bench.store import ResultsStore
from advprune.cli import main
from advprune.errors import ConfigError
from advprune.evaluation import Entry, Flag, Report, evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
N_REPORTED = len(reference_results())
HYDRA, LWM, HARP = "HYDRA_Sehwag2020Hydra", "LWM_Han2015Learning", "HARP_Zhao2023Holistic"


def report(clean: float, robust: float, flags: list[Flag] | None = None, eps: str = "3/16"):
    """A report as an evaluation writes it (two attacks, a curve), with chosen accuracies."""
    grid = [0.0, 0.0625, 0.125, 0.1875, 0.25, 0.375]
    curve = [clean] + [max(0.0, clean - (clean - robust) * e / 0.1875) for e in grid[1:]]
    return Report(
        n=360, clean_accuracy=clean, robust_accuracy=robust, eps=eps, eps_value=3 / 16,
        norm="linf", dataset="digits", curve={"attack": "min", "eps": grid,
                                              "robust_accuracy": curve},
        entries=[Entry("autoattack", "empirical", {}, 1.0, robust, flags=list(flags or [])),
                 Entry("hofmn", "empirical", {}, 1.0, robust + 0.02)],
    )  # fmt: skip


MODELS = {  # robust accuracy: LWM-90 and HARP-90 tie for the best at 90 %, HARP-99 is best at 99
    f"{HYDRA}_DCNN_DIGITS_US_90": report(0.97, 0.61),
    f"{HYDRA}_DCNN_DIGITS_US_99": report(0.90, 0.55),
    f"{LWM}_DCNN_DIGITS_US_90": report(0.98, 0.64, [Flag("zero_gradients", "x | y\nz")]),
    f"{LWM}_DCNN_DIGITS_US_99": report(0.65, 0.37),
    f"{HARP}_DCNN_DIGITS_US_90": report(0.95, 0.64),
    f"{HARP}_DCNN_DIGITS_US_99": report(0.92, 0.58),
    f"{HYDRA}_R18_CIFAR10_US_90": report(0.98, 0.97),  # beats every reported cell: no matter
}


@pytest.fixture()
def store(tmp_path):
    s = ResultsStore(tmp_path / "results.sqlite")
    for key, r in MODELS.items():
        s.add_report(r, key)
    return s


def _table_lines(text: str, heading: str) -> dict[str, str]:
    """The rows of the Markdown table under ``heading``, by method name."""
    block = text.split(f"## {heading}\n")[1].split("\n\n")[0].strip()
    lines = [line for line in block.splitlines() if not line.startswith("|---")]
    return {re.match(r"\| \[?([^]|]+)", line)[1].strip(): line for line in lines}


def test_markdown_measured_tables_bold_ties_and_flags(store):
    text = markdown(collect(store))
    measured, reported = text.split("# Reported by the benchmark, not measured here")
    assert "protocol `linf-3/16`: linf, eps 3/16 (= 0.1875" in measured
    assert "n = 360 test points, attacks autoattack, hofmn" in measured
    assert "Digits" not in reported and "DIGITS" not in reported  # measured rows stay apart
    assert f"**Reported** (not measured here): {REFERENCE_SOURCE}" in measured
    # benchmark order: one table per dataset x structure, measured tables first
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:2] == [
        "CIFAR-10 US pruning (measured here)",
        "Digits US pruning (measured here)",
    ]
    rows = _table_lines(measured, "Digits US pruning (measured here)")
    assert rows["Name"] == "| Name | DigitsCNN 90% | DigitsCNN 99% |"
    # column 90: LWM and HARP tie at 64.00 (both bold, LWM flagged), HYDRA is not bold
    assert rows["LWM"].endswith("| **98.00/64.00** ⚠1 | 65.00/37.00 |")
    assert rows["HARP"].endswith("| **95.00/64.00** | **92.00/58.00** |")
    assert rows["HYDRA"].endswith("| 97.00/61.00 | 90.00/55.00 |")
    assert rows["HYDRA"].startswith("| [HYDRA](https://")  # the taxonomy's link
    assert text.count("⚠1") == 1 and "⚠2" not in text
    assert f"1. `{LWM}_DCNN_DIGITS_US_90`: zero_gradients: x \\| y z" in measured
    # the measured CIFAR-10 model is bold among measured ones only
    cifar = _table_lines(measured, "CIFAR-10 US pruning (measured here)")
    assert cifar["HYDRA"].endswith("| **98.00/97.00** |")


def test_markdown_dense_baseline_is_shown_never_ranked(store):
    store.add_report(report(0.99, 0.90), "Dense_DCNN_DIGITS_US_0")  # above every method
    store.add_report(report(0.95, 0.50, [Flag("x", "y")]), "Dense_R18_SVHN_US_0")  # alone
    board = collect(store)
    assert [r.key for r in board.baselines] == ["Dense_DCNN_DIGITS_US_0", "Dense_R18_SVHN_US_0"]
    text = markdown(board)
    measured = text.split("# Reported by the benchmark, not measured here")[0]
    assert "*Dense (baseline, not ranked)* (italics): the unpruned model" in measured
    rows = _table_lines(measured, "Digits US pruning (measured here)")
    assert list(rows)[:2] == ["Name", "*Dense (baseline, not ranked)*"]  # first, apart
    assert sorted(list(rows)[2:]) == ["HARP", "HYDRA", "LWM"]
    assert rows["*Dense (baseline, not ranked)*"].endswith("| *99.00/90.00* | *99.00/90.00* |")
    assert rows["LWM"].endswith("| **98.00/64.00** ⚠2 | 65.00/37.00 |")  # still the best
    assert rows["HARP"].endswith("| **95.00/64.00** | **92.00/58.00** |")
    assert "**99.00" not in text
    # a dataset with a baseline only: its own small table, its flag noted
    headings = re.findall(r"^## (.+)$", measured, re.M)
    assert headings == [  # in the benchmark's order of datasets
        "CIFAR-10 US pruning (measured here)",
        "SVHN dense baseline (measured here)",
        "Digits US pruning (measured here)",
    ]
    svhn = _table_lines(measured, "SVHN dense baseline (measured here)")
    assert svhn == {"Name": "| Name | ResNet18 |",
                    "*Dense (baseline, not ranked)*": "| *Dense (baseline, not ranked)* | "
                    "*95.00/50.00* ⚠1 |"}  # fmt: skip
    assert "1. `Dense_R18_SVHN_US_0`: x: y" in measured


def test_markdown_reported_tables_in_the_benchmarks_layout(store):
    reported = markdown(collect(store)).split("# Reported by the benchmark, not measured here")[1]
    assert f"Source: {REFERENCE_SOURCE}" in reported
    assert "bold marks the best reported robust accuracy of each column" in reported
    headings = re.findall(r"^## (.+)$", reported, re.M)
    assert headings == [
        f"{d} {s} pruning (reported)" for d in ("CIFAR-10", "SVHN") for s in ("US", "S")
    ]
    us = _table_lines(reported, "CIFAR-10 US pruning (reported)")
    assert us["Name"] == (
        "| Name | ResNet18 90% | ResNet18 95% | ResNet18 99% | VGG16 90% | VGG16 95% | VGG16 99% |"
    )
    assert us["HYDRA"] == (
        "| [HYDRA](https://github.com/inspire-group/hydra) | 76.74/43.34 | 76.16/42.45 | "
        "72.21/38.80 | 78.31/43.81 | 76.58/42.61 | 70.59/35.56 |"
    )  # not bold: FlyingBird's 43.95 beats 43.81 at VGG16 90% (the source bolds both)
    assert (
        "| **80.69/46.49** |" in us["FlyingBird"]
    )  # the reported best, despite the measured 97.00
    s = _table_lines(reported, "CIFAR-10 S pruning (reported)")
    assert s["Name"].startswith("| Name | ResNet18 50% | ResNet18 75% | ResNet18 90% | VGG16 50%")
    svhn = _table_lines(reported, "SVHN US pruning (reported)")
    assert svhn["RADMM"].split(" | ")[1:4] == ["-", "-", "-"]  # missing cells
    # every bold cell is the maximum robust accuracy of its column
    for heading in headings:
        table = _table_lines(reported, heading)
        cells = [line.split(" | ")[1:] for name, line in table.items() if name != "Name"]
        for col in zip(*cells):
            values = [float(c.strip(" |*").split("/")[1]) for c in col if c.strip(" |") != "-"]
            bold = [float(c.strip(" |*").split("/")[1]) for c in col if c.startswith("**")]
            assert bold and set(bold) == {max(values)}


def test_protocols_are_never_mixed(store):
    store.add_report(report(0.9, 0.4, eps="1/8"), f"{LWM}_DCNN_DIGITS_US_95")
    with pytest.raises(ConfigError, match="several protocols"):
        collect(store)
    board = collect(store, "linf-1/8")
    assert [r.key for r in board.measured] == [f"{LWM}_DCNN_DIGITS_US_95"]
    assert len(board.reported) == N_REPORTED
    assert all(r.source == REFERENCE_SOURCE for r in board.reported)
    with pytest.raises(ConfigError, match="no results under protocol"):
        collect(store, "l2-1/2")


def test_cli(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "board"
    assert main(["leaderboard", "--store", str(store.path), "--out", str(out)]) == 0
    assert (out / "leaderboard.md").read_text() == markdown(collect(store))
    assert '<div id="tables">' in (out / "leaderboard.html").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.html", "leaderboard.md"]
    # $ADVPRUNE_STORE, then ./results.sqlite
    store.add_report(report(0.9, 0.4, eps="1/8"), f"{LWM}_DCNN_DIGITS_US_95")
    monkeypatch.setenv("ADVPRUNE_STORE", str(store.path))
    capsys.readouterr()
    assert main(["leaderboard", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "linf-1/8, linf-3/16" in err and "\n" not in err
    assert main(["leaderboard", "--out", str(out), "--protocol", "linf-1/8"]) == 0
    assert "`linf-1/8`" in (out / "leaderboard.md").read_text()
    # a store named by --store or $ADVPRUNE_STORE must exist
    for argv, env in (["--store", "missing.sqlite"], None), ([], "missing.sqlite"):
        if env:
            monkeypatch.setenv("ADVPRUNE_STORE", env)
        assert main(["leaderboard", "--out", "x", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: no results store at missing.sqlite") and "\n" not in err
        assert not Path("x").exists()
    monkeypatch.delenv("ADVPRUNE_STORE")


def test_cli_without_a_store_writes_the_reported_leaderboard(tmp_path, monkeypatch, capsys):
    """A new user, in an empty folder: the benchmark's reported results, nothing measured."""
    monkeypatch.delenv("ADVPRUNE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["leaderboard", "--out", "board"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no results store at results.sqlite: nothing measured yet; wrote ")
    md = Path("board/leaderboard.md").read_text()
    assert "**Measured here**: nothing measured yet (no results store;" in md
    assert "(measured here)" not in md and md.count("(reported)") == 4
    assert md == markdown(collect(None))
    page = Path("board/leaderboard.html").read_text()
    assert '"nothing_measured": "nothing measured yet' in page and '<div id="tables">' in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board"]  # no store was created
    assert main(["leaderboard", "--out", "board", "--protocol", "linf-8/255"]) == 2
    assert "there is no results store" in capsys.readouterr().err


def test_failed_write_keeps_the_previous_page(store, tmp_path, monkeypatch):
    out = tmp_path / "board"
    before = leaderboard(store.path, out)["html"].read_text()
    store.add_report(report(0.5, 0.2), f"{LWM}_DCNN_DIGITS_US_95")

    def broken(board):
        raise RuntimeError("crash while rendering")

    monkeypatch.setattr(lb, "html_page", broken)
    with pytest.raises(RuntimeError):
        leaderboard(store.path, out)
    assert (out / "leaderboard.html").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.html", "leaderboard.md"]


def test_html_is_self_contained_and_escaped(store, tmp_path):
    evil = "</script><script>alert(1)</script><!--<script>"
    store.add_report(report(0.5, 0.2, [Flag("x", evil)]), f"{LWM}_DCNN_DIGITS_US_95")
    page = leaderboard(store.path, tmp_path / "board")["html"].read_text()
    assert "alert" in page and "<script>alert" not in page and "<!--" not in page
    assert page.count("</script>") == 2  # the data block's and the code's own
    assert (
        re.search(r"<(link|img|iframe|object|embed)\b|<script[^>]*\bsrc=|@import|url\(", page)
        is None
    )
    assert re.search(r"(https?:)?//[^\s\"']+\.(js|css)\b", page) is None


# ---------------------------------------------------------------------------- the browser

REAL = [f"{HYDRA}_DCNN_DIGITS_US_90", f"{LWM}_DCNN_DIGITS_US_90", f"{HARP}_DCNN_DIGITS_US_90"]
DENSE = "Dense_DCNN_DIGITS_US_0"


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, one_thread):
    """Three digits models of different training length, really evaluated (PGD and FMN on 48
    points, curve included), plus one flagged report with an HTML-breaking flag message."""
    from _digits_models import digits_splits, natural_digits_model

    root = tmp_path_factory.mktemp("real")
    store = ResultsStore(root / "results.sqlite")
    for epochs, key in zip((1, 2, 4), REAL):
        model = natural_digits_model(width=4, epochs=epochs)
        evaluate(
            model, digits_splits(), eps="1/16", attacks=("pgd", "fmn"), n=48, pgd_steps=5,
            fmn_steps=20, curve_points=7, out=root / key, model_info={"key": key},
        )  # fmt: skip
        store.add_report(root / key / "report.json")
    flagged = report(0.5, 0.2, [Flag("x", "</script><b>")], eps="1/16")
    flagged.eps_value, flagged.curve = 1 / 16, None
    store.add_report(flagged, f"{LWM}_DCNN_DIGITS_US_99")
    dense = report(0.99, 0.95, eps="1/16")  # above every method: still never ranked among them
    dense.eps_value = 1 / 16
    store.add_report(dense, DENSE)
    return store


def _sync_playwright():
    """Playwright's sync API; a clear failure when it is missing (skip: ADVPRUNE_SKIP_BROWSER=1)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("ADVPRUNE_SKIP_BROWSER") == "1":
            pytest.skip("ADVPRUNE_SKIP_BROWSER=1 and no playwright")
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (`make test` does)")
    return sync_playwright()


def _launch(p):
    if not Path(CHROMIUM).exists():
        if os.environ.get("ADVPRUNE_SKIP_BROWSER") == "1":
            pytest.skip("ADVPRUNE_SKIP_BROWSER=1 and no Chromium")
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: install Debian's chromium package (`make test` "
            "does), or set ADVPRUNE_SKIP_BROWSER=1 to skip the browser test"
        )
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update"]  # fmt: skip
    return p.chromium.launch(executable_path=CHROMIUM, args=flags)


def _column(page, table: str, col: str) -> list[str]:
    """The texts of column ``col`` in the ranked rows of the table matched by ``table``."""
    index = page.eval_on_selector_all(
        f"{table} th", f"hs => hs.findIndex(h => h.dataset.col === {col!r})"
    )
    return page.eval_on_selector_all(
        f"{table} tbody.ranked tr", f"rs => rs.map(r => r.children[{index}].textContent)"
    )


def _keys(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "rs => rs.map(r => r.dataset.key)")


def _robust(page, table: str) -> list[float]:
    return [float(v.rstrip(" ⚠")) for v in _column(page, table, "robust")]


def test_page_in_headless_chromium(real_store, tmp_path):
    board = collect(real_store)
    robust = {r.key: r.robust for r in board.measured if not r.baseline}
    assert len(set(robust.values())) == 4 and all(robust[k] > 0 for k in REAL)
    reported = {d: [r.key for r in board.reported if r.dataset == d] for d in ("CIFAR10", "SVHN")}
    page_path = leaderboard(real_store.path, tmp_path / "board")["html"]
    with _sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        urls: list[str] = []
        page.on("request", lambda r: urls.append(r.url))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.as_uri())
        # one table per source and dataset: measured digits, reported CIFAR-10, reported SVHN
        tables = page.eval_on_selector_all(
            "table.board", "ts => ts.map(t => t.dataset.source + ' ' + t.dataset.dataset)"
        )
        assert tables == ["measured Digits", "reported CIFAR-10", "reported SVHN"]
        measured = "table.board[data-source=measured]"
        cifar = "table.board[data-source=reported][data-dataset=CIFAR-10]"
        svhn = "table.board[data-source=reported][data-dataset=SVHN]"
        assert sorted(_keys(page, "tr[data-key]")) == sorted(r.key for r in board.rows)
        assert sorted(_keys(page, f"{cifar} tr[data-key]")) == sorted(reported["CIFAR10"])
        assert sorted(_keys(page, f"{svhn} tr[data-key]")) == sorted(reported["SVHN"])
        assert page.locator(f"{measured} tr.reported").count() == 0
        assert page.locator("tr.reported .tag.base").count() == 0
        # the dense baseline: above the ranked rows, marked, never among them
        assert _keys(page, f"{measured} tbody.baseline tr") == [DENSE]
        assert page.locator(f"{measured} tbody.baseline .tag.base").count() == 1
        ranked = _keys(page, f"{measured} tbody.ranked tr")
        assert ranked == sorted(robust, key=lambda k: -robust[k])  # ranked by robust accuracy
        flagged = page.locator("tr.unreliable")
        assert flagged.count() == 1 and "</script><b>" in flagged.get_attribute("title")
        assert "⚠" in flagged.locator("td").nth(5).text_content()
        # numeric sort on robust accuracy within the measured table: descending, ascending;
        # the baseline stays where it is, outside the ranking
        page.click(f"{measured} th[data-col=robust]")
        shown = [round(v, 2) for v in robust.values()]  # as the page shows them
        assert _robust(page, measured) == sorted(shown, reverse=True)
        page.click(f"{measured} th[data-col=robust]")
        assert _robust(page, measured) == sorted(shown)
        assert _keys(page, f"{measured} tbody.baseline tr") == [DENSE]
        assert _keys(page, f"{measured} tbody tr")[0] == DENSE
        # each reported table sorts its own rows only (CIFAR-10 never among SVHN or digits)
        before = _keys(page, f"{measured} tbody.ranked tr")
        page.click(f"{cifar} th[data-col=robust]")
        values = _robust(page, cifar)
        assert values == sorted(values, reverse=True) and len(values) == len(reported["CIFAR10"])
        assert _keys(page, f"{measured} tbody.ranked tr") == before
        page.click(f"{svhn} th[data-col=sparsity]")  # numbers, not text: "99" after "5" fails
        sparsity = [float(v) for v in _column(page, svhn, "sparsity")]
        assert sparsity == sorted(sparsity, reverse=True) and len(set(sparsity)) > 2
        page.click(f"{measured} th[data-col=key]")
        assert _column(page, measured, "key") == sorted(robust)
        # curves: the models with a curve are listed (the baseline too); tick two, untick one
        assert sorted(
            page.eval_on_selector_all("input[data-key]", "e => e.map(i => i.dataset.key)")
        ) == sorted([*REAL, DENSE])
        assert page.locator("path.curve").count() == 0
        a, b = REAL[0], REAL[2]
        page.check(f"input[data-key={a}]")
        page.check(f"input[data-key={b}]")
        drawn = page.eval_on_selector_all("path.curve", "ps => ps.map(p => p.dataset.key)")
        assert sorted(drawn) == sorted([a, b])
        d = page.get_attribute(f"path.curve[data-key={a}]", "d")
        assert d.startswith("M") and d.count("L") == 6  # the 7 points of the curve
        assert page.locator("line.eps-line").count() == 1
        assert page.locator("#legend div").count() == 2
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "leaderboard.png"
        page.click(f"{measured} th[data-col=robust]")  # best first for the screenshot
        page.eval_on_selector_all(".wrap", "ws => ws.forEach(w => { w.scrollTop = 0; })")
        page.evaluate("window.scrollTo(0, 0)")
        page.mouse.move(0, 0)
        page.screenshot(path=str(shot), full_page=True)
        page.uncheck(f"input[data-key={a}]")
        drawn = page.eval_on_selector_all("path.curve", "ps => ps.map(p => p.dataset.key)")
        assert drawn == [b]
        # nothing measured yet (no store): the reported tables, and a line saying so
        empty = leaderboard(None, tmp_path / "empty")["html"]
        page.goto(empty.as_uri())
        tables = page.eval_on_selector_all(
            "table.board", "ts => ts.map(t => t.dataset.source + ' ' + t.dataset.dataset)"
        )
        assert tables == ["reported CIFAR-10", "reported SVHN"]
        assert "nothing measured yet" in page.text_content("#protocol")
        assert page.locator("input[data-key]").count() == 0
        browser.close()
    assert errors == []
    assert urls and all(u.startswith("file://") for u in urls)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size[0] >= 1600 and image.size[1] >= 900
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # not blank


def _profiled(clean: float, robust: float, params: float, speedup: float | None) -> Report:
    r = report(clean, robust)
    latency = [] if speedup is None else [
        {"device": "cpu", "batch_size": 1, "speedup": 1.1},
        {"device": "cpu", "batch_size": 256, "speedup": speedup},
    ]  # fmt: skip
    r.model = {"profile": {"params_fraction": params, "macs_fraction": params / 2,
                           "latency": latency, "timed": "compacted"}}  # fmt: skip
    return r


def test_cost_columns_in_markdown_and_headless_chromium(tmp_path):
    """Profiled models (`eval --profile`) show parameters, MACs kept and the measured speed-up
    beside their robustness; the page sorts that column as numbers."""
    s = ResultsStore(tmp_path / "results.sqlite")
    s.add_report(_profiled(0.9, 0.5, 0.25, 3.5), f"{HYDRA}_DCNN_DIGITS_S_75")
    s.add_report(_profiled(0.9, 0.6, 0.5, 12.0), f"{LWM}_DCNN_DIGITS_S_50")
    s.add_report(_profiled(0.9, 0.4, 0.1, None), f"{HARP}_DCNN_DIGITS_S_90")
    s.add_report(report(0.9, 0.3), f"{LWM}_DCNN_DIGITS_S_90")  # not profiled
    text = markdown(collect(s, reference=False))
    cost = text.split("What the pruning bought")[1].split("\n\n")[1].splitlines()
    assert cost[2].startswith(f"| `{LWM}_DCNN_DIGITS_S_50` | 60.00 | 50.00 | 25.00 | 12.00x "
                              "(cpu, batch 256)")  # fmt: skip
    assert len(cost) == 5 and cost[4].endswith("| - | compacted |")  # HARP: no latency
    page_path = leaderboard(s.path, tmp_path / "board")["html"]
    with _sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_path.as_uri())
        table = "table.board[data-source=measured]"
        heads = page.eval_on_selector_all(f"{table} th", "hs => hs.map(h => h.dataset.col)")
        assert heads[-4:] == ["params_kept", "macs_kept", "speedup", "key"]
        page.click(f"{table} th[data-col=speedup]")  # descending, numbers ("12" above "3.5")
        assert _column(page, table, "speedup") == ["12.00×", "3.50×", "-", "-"]
        assert _column(page, table, "params_kept")[:2] == ["50.00", "25.00"]
        browser.close()
    assert errors == []
