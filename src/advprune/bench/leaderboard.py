"""Leaderboards of the results store: Markdown in the benchmark's layout and an offline HTML page.

Measured results come from the results store, one protocol at a time (the same threat model
and exact eps); a model's robust accuracy is its per-sample worst case over every attack of its
evaluation (the store's ``worst-case`` row), and models are ranked by it. The benchmark's own
figures (:mod:`advprune.bench.reference`) are shown in a separate section, always marked as
reported, not measured here, and never compete with measured ones for the bold "best" mark.
A dense model stored as the baseline of its (architecture, dataset) (``Dense_..._US_0``) is
shown in every table of its dataset, marked, and never ranked or bold among the methods.

Models evaluated with ``advprune eval --profile`` also show what the pruning bought, measured
against the dense model of their architecture: parameters kept, MACs kept and the measured CPU
speed-up (a table under each measured Markdown table; columns of the HTML table).

The HTML page is one self-contained file (inline CSS, JavaScript and data; no request leaves
the page, so it works from ``file://``): one sortable table per dataset and source (measured
here under one protocol, or reported by the benchmark), so rows of different datasets or
protocols are never sorted together, and the security curves of the models ticked in a list.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advprune.errors import AdvpruneError, ConfigError

__all__ = [
    "Board",
    "Row",
    "arch_name",
    "collect",
    "dataset_name",
    "html_page",
    "leaderboard",
    "markdown",
    "write_html",
    "write_markdown",
]

ARCH_NAMES = {
    "R18": "ResNet18",
    "R34": "ResNet34",
    "R50": "ResNet50",
    "V16": "VGG16",
    "V16BN": "VGG16-BN",
    "WRN28-4": "WRN-28-4",
    "WRN28-10": "WRN-28-10",
    "CNN7": "CNN7",
    "DCNN": "DigitsCNN",
}
DATASET_NAMES = {"CIFAR10": "CIFAR-10", "CIFAR100": "CIFAR-100", "SVHN": "SVHN", "DIGITS": "Digits"}
DENSE_LABEL = "Dense (baseline, not ranked)"
STRUCTURE_ORDER = ("US", "S")  # the benchmark shows unstructured tables before structured ones
WORST_CASE = "worst-case"  # the store's row of the per-sample worst case over the attacks
MEASURED_SOURCE = "measured here"


def arch_name(code: str) -> str:
    """Readable name of an architecture code (``R18`` -> ``ResNet18``; unknown codes as is)."""
    return ARCH_NAMES.get(code, code)


def dataset_name(code: str) -> str:
    """Readable name of a dataset code (``CIFAR10`` -> ``CIFAR-10``; unknown codes as is)."""
    return DATASET_NAMES.get(code, code)


@dataclass
class Row:
    """One model: measured here (``reported=False``) or reported by the benchmark.

    Accuracies are in percent; ``robust`` is the worst case over ``attacks`` (percent per
    attack) for measured rows and the benchmark's figure for reported ones.
    """

    key: str
    method: str
    arch: str
    dataset: str
    structure: str
    sparsity: str
    clean: float
    robust: float | None
    reported: bool
    reliable: bool = True
    flags: list[str] = field(default_factory=list)
    attacks: dict[str, float | None] = field(default_factory=dict)
    curve: dict[str, list[float]] | None = None  # {"eps": [...], "robust_accuracy": [0..1]}
    n: int | None = None
    eps: str | None = None
    url: str | None = None
    source: str = MEASURED_SOURCE
    baseline: bool = False  # the dense model of its (architecture, dataset): shown, never ranked
    profile: dict[str, Any] | None = None  # Profile.summary() (`eval --profile`), if measured

    @property
    def params_kept(self) -> float | None:
        """Parameters kept, percent of the dense model's (None: not profiled)."""
        return None if not self.profile else 100.0 * self.profile["params_fraction"]

    @property
    def macs_kept(self) -> float | None:
        """MACs kept, percent of the dense model's (None: not profiled)."""
        return None if not self.profile else 100.0 * self.profile["macs_fraction"]

    def speedup(self) -> tuple[float, str] | None:
        """The measured speed-up over the dense model on CPU at the largest batch timed (else
        any device), with what it was measured at; None when not measured."""
        rows = [lat for lat in (self.profile or {}).get("latency", []) if lat.get("speedup")]
        if not rows:
            return None
        best = max(rows, key=lambda lat: (lat["device"] == "cpu", lat["batch_size"]))
        return float(best["speedup"]), f"{best['device']}, batch {best['batch_size']}"

    @property
    def name(self) -> str:
        """The method's display name (``HYDRA`` of ``HYDRA_Sehwag2020Hydra``)."""
        return self.method.split("_")[0]


@dataclass
class Board:
    """Everything a leaderboard shows: the protocol of its measured rows and every row."""

    protocol: str | None
    rows: list[Row]
    eps: str | None = None
    eps_value: float | None = None
    norm: str | None = None
    attacks: list[str] = field(default_factory=list)
    reference_source: str = ""
    reference_note: str = ""
    store: str | None = None  # the results store's path; None: no store (nothing measured)

    @property
    def measured(self) -> list[Row]:
        """Rows measured here (methods and dense baselines)."""
        return [r for r in self.rows if not r.reported]

    @property
    def baselines(self) -> list[Row]:
        """The dense baselines measured here."""
        return [r for r in self.rows if r.baseline]

    @property
    def reported(self) -> list[Row]:
        """Rows reported by the benchmark, not measured here."""
        return [r for r in self.rows if r.reported]


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _flag_text(flag: dict[str, Any]) -> str:
    where = f" [{flag['attack']}]" if flag.get("attack") else ""
    return _one_line(f"{flag.get('name')}{where}: {flag.get('message')}")


def _method_url(method: str) -> str | None:
    """The taxonomy's URL of a method's AP key or name, if it has one."""
    try:
        from advprune.bench.taxonomy import taxonomy_entry

        return taxonomy_entry(method).url or None
    except (AdvpruneError, ImportError):
        return None


def collect(store: Any, protocol: str | None = None, *, reference: bool = True) -> Board:
    """The measured rows of ``store`` (a ResultsStore or its path; None: nothing measured yet)
    under ``protocol``, plus the benchmark's reported rows. With several protocols stored,
    ``protocol`` is required."""
    from advprune.bench.reference import REFERENCE_NOTE, REFERENCE_SOURCE, reference_results
    from advprune.bench.store import ResultsStore

    if store is not None and not isinstance(store, ResultsStore):
        store = ResultsStore(store)
    if store is None and protocol is not None:
        raise ConfigError(f"no results under protocol {protocol!r}: there is no results store")
    protocols = store.protocols() if store is not None else []
    if protocol is None:
        if len(protocols) > 1:
            raise ConfigError(
                f"the store holds several protocols ({', '.join(protocols)}); choose one "
                "with --protocol"
            )
        protocol = protocols[0] if protocols else None
    elif protocol not in protocols:
        raise ConfigError(
            f"no results under protocol {protocol!r}; stored: {', '.join(protocols) or 'none'}"
        )
    board = Board(protocol=protocol, rows=[], store=None if store is None else str(store.path))
    grouped: dict[str, list[Any]] = {}
    for r in store.results(protocol=protocol) if store is not None and protocol else []:
        grouped.setdefault(r.key, []).append(r)
    for key, results in grouped.items():
        worst = next((r for r in results if r.attack == WORST_CASE), None)
        if worst is None:
            raise ConfigError(f"{key} has no {WORST_CASE} row in {store.path}; re-add its report")
        k = worst.model_key
        curve = store.report(key, protocol).get("curve") or None
        others = [r for r in results if r is not worst]
        board.rows.append(
            Row(
                key=key,
                method=k.method,
                arch=k.arch,
                dataset=k.dataset,
                structure=k.structure,
                sparsity=k.sparsity,
                clean=100.0 * worst.clean_accuracy,
                robust=_pct(worst.robust_accuracy),
                reported=False,
                reliable=worst.reliable,
                flags=sorted({_flag_text(f) for r in results for f in r.flags}),
                attacks={r.attack: _pct(r.robust_accuracy) for r in others},
                curve=curve and {"eps": curve["eps"], "robust_accuracy": curve["robust_accuracy"]},
                n=worst.n,
                eps=worst.eps,
                url=_method_url(k.method),
                baseline=k.is_dense,
                profile=worst.profile,
            )
        )
        board.attacks += [r.attack for r in others if r.attack not in board.attacks]
        board.eps, board.eps_value, board.norm = worst.eps, worst.eps_value, worst.norm
    if reference:
        board.reference_source = REFERENCE_SOURCE
        board.reference_note = REFERENCE_NOTE
        board.rows += [
            Row(
                key=ref.key,
                method=ref.ap_key,
                arch=ref.arch,
                dataset=ref.dataset,
                structure=ref.structure,
                sparsity=ref.sparsity,
                clean=ref.clean,
                robust=ref.robust,
                reported=True,
                url=ref.url,
                source=REFERENCE_SOURCE,
            )
            for ref in reference_results()
        ]
    return board


# ---------------------------------------------------------------------------- Markdown


def _tables(rows: list[Row]) -> list[tuple[tuple[str, str], list[Row]]]:
    """Rows grouped by (dataset, structure), in the benchmark's order of tables."""
    tables: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        tables.setdefault((r.dataset, r.structure), []).append(r)
    return sorted(
        tables.items(),
        key=lambda t: (_rank(DATASET_NAMES, t[0][0]), _rank(STRUCTURE_ORDER, t[0][1])),
    )


def _rank(order: Any, value: str) -> tuple[int, str]:
    order = list(order)
    return (order.index(value) if value in order else len(order), value)


def _columns(rows: list[Row]) -> list[tuple[str, str]]:
    cols = {(r.arch, r.sparsity) for r in rows}
    return sorted(cols, key=lambda c: (_rank(ARCH_NAMES, c[0]), float(c[1])))


def _md_text(text: str) -> str:
    """Text safe inside a Markdown table cell (no pipes, brackets or HTML)."""
    return html.escape(_one_line(text)).replace("|", "\\|").replace("[", "\\[")


def _markdown_table(
    rows: list[Row], notes: list[str], baselines: list[Row] | tuple[Row, ...] = ()
) -> list[str]:
    """One table: rows = methods, columns = arch x sparsity, cells clean/robust (percent).

    ``baselines`` (dense models of the table's dataset) come first, in italics, in every
    column of their architecture; they are never bold and never compete for it.
    """
    cols: list[tuple[str, str | None]] = list(_columns(rows))
    base = {b.arch: b for b in baselines}
    if not cols:  # a dataset with dense baselines only
        cols = [(a, None) for a in sorted(base, key=lambda a: _rank(ARCH_NAMES, a))]
    best: dict[tuple[str, str | None], float] = {}
    for r in rows:
        if r.robust is not None:
            c = (r.arch, r.sparsity)
            best[c] = max(best.get(c, -1.0), r.robust)
    head = ["Name", *(arch_name(a) + ("" if s is None else f" {s}%") for a, s in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if base:
        cells = [f"*{DENSE_LABEL}*"]
        for arch, _ in cols:
            r = base.get(arch)
            cells.append("-" if r is None else f"*{_cell_text(r)}*" + _flag_mark(r, notes))
        lines.append("| " + " | ".join(cells) + " |")
    for method in dict.fromkeys(r.method for r in rows):
        mine: dict[tuple[str, str | None], Row] = {
            (r.arch, r.sparsity): r for r in rows if r.method == method
        }
        first = next(iter(mine.values()))
        name = _md_text(first.name)
        cells = [f"[{name}]({first.url})" if first.url else name]
        for c in cols:
            r = mine.get(c)
            if r is None:
                cells.append("-")
                continue
            text = _cell_text(r)
            if r.robust is not None and r.robust == best[c]:
                text = f"**{text}**"
            cells.append(text + _flag_mark(r, notes))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cell_text(r: Row) -> str:
    return f"{r.clean:.2f}/{'n/a' if r.robust is None else f'{r.robust:.2f}'}"


def _flag_mark(r: Row, notes: list[str]) -> str:
    """`` ⚠N`` for an unreliable row (its flags become note N), else nothing."""
    if r.reliable:
        return ""
    notes.append(f"`{r.key}`: " + ("; ".join(map(_md_text, r.flags)) or "flagged"))
    return f" ⚠{len(notes)}"


def _measured_tables(board: Board) -> list[tuple[tuple[str, str | None], list[Row]]]:
    """The measured method tables by (dataset, structure), plus one (structure None) for a
    dataset that has dense baselines only."""
    tables: list[tuple[tuple[str, str | None], list[Row]]] = list(
        _tables([r for r in board.measured if not r.baseline])
    )
    datasets = {d for (d, _), _ in tables}
    for d in dict.fromkeys(r.dataset for r in board.baselines):
        if d not in datasets:
            tables.append(((d, None), []))
    return sorted(tables, key=lambda t: (_rank(DATASET_NAMES, t[0][0]), t[0][1] is None))


def _cost_table(rows: list[Row]) -> list[str]:
    """What the pruning bought, per profiled model: robust accuracy beside parameters and MACs
    kept and the measured speed-up (empty when no row was profiled)."""
    profiled = [r for r in rows if r.profile]
    if not profiled:
        return []
    lines = [
        "What the pruning bought (measured here against the dense model of the architecture):",
        "",
        "| Model | Robust % | Params kept % | MACs kept % | Speed-up | Timed |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(profiled, key=lambda r: (r.baseline is False, -(r.robust or -1.0))):
        speed = r.speedup()
        lines.append(
            f"| `{r.key}` | {'n/a' if r.robust is None else f'{r.robust:.2f}'} | "
            f"{r.params_kept:.2f} | {r.macs_kept:.2f} | "
            + ("-" if speed is None else f"{speed[0]:.2f}x ({speed[1]})")
            + f" | {_md_text(r.profile.get('timed') or '')} |"
        )
    return [*lines, ""]


def markdown(board: Board) -> str:
    """The leaderboard as Markdown: measured tables, their flags, then the reported tables."""
    measured, reported = board.measured, board.reported
    lines = ["# Adversarial pruning leaderboard", ""]
    if measured:
        n = sorted({r.n for r in measured if r.n is not None})
        lines += [
            f"**Measured here**: protocol `{board.protocol}`: {board.norm}, eps {board.eps} "
            f"(= {board.eps_value:.6g} in input units [0, 1]), n = {', '.join(map(str, n))} "
            f"test points, attacks {', '.join(board.attacks)}. Cells: clean/robust accuracy in "
            "percent; robust is the per-sample worst case over the attacks. Bold: best robust "
            "accuracy of the column. ⚠: the evaluation raised flags (listed below the tables); "
            "its robust accuracy may be overestimated."
            + (
                f" *{DENSE_LABEL}* (italics): the unpruned model of each architecture, for "
                "reference in every table of its dataset; never ranked or bold."
                if board.baselines
                else ""
            ),
            "",
        ]
    else:
        lines += [f"**Measured here**: {_nothing_measured(board)}", ""]
    if reported:
        lines += [
            f"**Reported** (not measured here): {board.reference_source}. Reported rows are in "
            "their own tables below and never compete with measured ones for the bold mark.",
            "",
        ]
    notes: list[str] = []
    for (dataset, structure), rows in _measured_tables(board):
        what = "dense baseline" if structure is None else f"{structure} pruning"
        lines += [f"## {dataset_name(dataset)} {what} (measured here)", ""]
        baselines = [b for b in board.baselines if b.dataset == dataset]
        lines += [*_markdown_table(rows, notes, baselines), ""]
        lines += _cost_table(rows)
    if notes:
        lines += ["Unreliable evaluations (⚠):", ""]
        lines += [f"{i}. {text}" for i, text in enumerate(notes, 1)] + [""]
    if reported:
        lines += ["# Reported by the benchmark, not measured here", ""]
        lines += [f"Source: {board.reference_source}. {board.reference_note}".rstrip(), ""]
        lines += [
            "In these tables bold marks the best reported robust accuracy of each column "
            "(recomputed here, ties bold both; the source bolds some cells differently).",
            "",
        ]
        for (dataset, structure), rows in _tables(reported):
            lines += [f"## {dataset_name(dataset)} {structure} pruning (reported)", ""]
            lines += [*_markdown_table(rows, []), ""]
    return "\n".join(lines)


def _nothing_measured(board: Board) -> str:
    if board.store is None:
        return (
            "nothing measured yet (no results store; `advprune bench add REPORT` adds an "
            "evaluation report to one)."
        )
    return "no results in the store yet."


def write_markdown(board: Board, path: str | Path) -> Path:
    """Write :func:`markdown` to ``path`` atomically."""
    return _write_atomic(Path(path), markdown(board))


# ---------------------------------------------------------------------------- HTML


def _page_data(board: Board) -> dict[str, Any]:
    rows = [
        {
            "key": r.key,
            "method": r.name,
            "arch": arch_name(r.arch),
            "dataset": dataset_name(r.dataset),
            "structure": r.structure,
            "sparsity": float(r.sparsity),
            "clean": r.clean,
            "robust": r.robust,
            "reported": r.reported,
            "baseline": r.baseline,
            "source": r.source,
            "reliable": r.reliable,
            "flags": r.flags,
            "attacks": r.attacks,
            "curve": r.curve,
            "n": r.n,
            "params_kept": r.params_kept,
            "macs_kept": r.macs_kept,
            "speedup": None if r.speedup() is None else r.speedup()[0],
            "speedup_at": None if r.speedup() is None else r.speedup()[1],
        }
        for r in board.rows
    ]
    return {
        "protocol": board.protocol,
        "eps": board.eps,
        "eps_value": board.eps_value,
        "norm": board.norm,
        "attacks": board.attacks,
        "n": sorted({r.n for r in board.measured if r.n is not None}),
        "reference_source": board.reference_source,
        "reference_note": board.reference_note,
        "nothing_measured": _nothing_measured(board),
        "profiled": any(r.profile for r in board.measured),
        "rows": rows,
    }


# characters that could end or confuse the <script> data block, as JSON escapes
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028"}
_SCRIPT_ESCAPES["\u2029"] = "\\u2029"


def _script_json(data: Any) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>``, ``<!--``)."""
    text = json.dumps(data, allow_nan=False, ensure_ascii=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _SCRIPT_ESCAPES[m.group()], text)


def html_page(board: Board) -> str:
    """The self-contained HTML page (see the module docstring)."""
    from importlib import resources

    title = f"Adversarial pruning leaderboard ({board.protocol or 'reported results only'})"
    values = {"TITLE": html.escape(title), "DATA": _script_json(_page_data(board))}
    template = (resources.files("advprune.bench") / "data" / "leaderboard.html").read_text("utf-8")
    return re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: values[m.group(1)], template)


def write_html(board: Board, path: str | Path) -> Path:
    """Write :func:`html_page` to ``path`` atomically."""
    return _write_atomic(Path(path), html_page(board))


def _write_atomic(path: Path, text: str) -> Path:
    from advprune.io import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def leaderboard(
    store_path: str | Path | None, out_dir: str | Path, protocol: str | None = None
) -> dict[str, Path]:
    """Write ``OUT/leaderboard.md`` and ``OUT/leaderboard.html``; return their paths.

    ``store_path`` None: nothing measured yet (the reported sections only)."""
    board = collect(store_path, protocol)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "markdown": write_markdown(board, out / "leaderboard.md"),
        "html": write_html(board, out / "leaderboard.html"),
    }
