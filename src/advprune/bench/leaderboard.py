"""Leaderboards of the results store: Markdown in the benchmark's layout and an offline HTML page.

Measured results come from the results store, one protocol at a time (the same threat model
and exact eps); a model's robust accuracy is its per-sample worst case over every attack of its
evaluation. The benchmark's own figures (:mod:`advprune.bench.reference`) are shown in a
separate section, always marked as reported, not measured here, and never compete with
measured ones for the bold "best" mark.

The HTML page is one self-contained file (inline CSS, JavaScript and data; no request leaves
the page): a sortable table, and the security curves of the models ticked in a list.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advprune.errors import ConfigError

__all__ = ["Board", "Row", "collect", "leaderboard", "write_html", "write_markdown"]

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


@dataclass
class Row:
    """One model: measured here (``reported=False``) or reported by the benchmark."""

    key: str
    method: str
    arch: str
    dataset: str
    structure: str
    sparsity: str
    clean: float  # percent
    robust: float | None  # percent
    reported: bool
    reliable: bool = True
    flags: list[str] = field(default_factory=list)
    attacks: dict[str, float | None] = field(default_factory=dict)  # percent per attack
    curve: dict[str, list[float]] | None = None  # {"eps": [...], "robust_accuracy": [...]}
    n: int | None = None
    url: str | None = None


@dataclass
class Board:
    """Everything a leaderboard shows."""

    protocol: str | None
    rows: list[Row]
    eps: str | None = None
    eps_value: float | None = None
    norm: str | None = None
    attacks: list[str] = field(default_factory=list)
    reference_source: str = ""
    reference_note: str = ""


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def collect(store: Any, protocol: str | None = None, *, reference: bool = True) -> Board:
    """The measured rows of ``store`` (a ResultsStore or its path) under ``protocol`` and the
    benchmark's reported rows. With several protocols in the store, ``protocol`` is required."""
    from advprune.bench.reference import REFERENCE_NOTE, REFERENCE_SOURCE, reference_results
    from advprune.bench.store import ResultsStore

    store = store if isinstance(store, ResultsStore) else ResultsStore(store)
    protocols = store.protocols()
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
    board = Board(protocol=protocol, rows=[])
    grouped: dict[str, list[Any]] = {}
    for r in store.results(protocol=protocol) if protocol else []:
        grouped.setdefault(r.key, []).append(r)
    attacks: list[str] = []
    for key, results in grouped.items():
        worst = next(r for r in results if r.attack == "worst-case")
        k = worst.model_key
        curve = store.report(key, protocol).get("curve") or None
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
                flags=sorted({f"{f['name']}: {f['message']}" for f in worst.flags}),
                attacks={r.attack: _pct(r.robust_accuracy) for r in results if r is not worst},
                curve=curve and {"eps": curve["eps"], "robust_accuracy": curve["robust_accuracy"]},
                n=worst.n,
            )
        )
        attacks += [r.attack for r in results if r is not worst and r.attack not in attacks]
        board.eps, board.eps_value, board.norm = worst.eps, worst.eps_value, worst.norm
    board.attacks = attacks
    if reference:
        board.reference_source, board.reference_note = REFERENCE_SOURCE, REFERENCE_NOTE
        for ref in reference_results():
            board.rows.append(
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
                )
            )
    return board


def _method_name(method: str) -> str:
    return method.split("_")[0]


def _tables(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    tables: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        tables.setdefault((r.dataset, r.structure), []).append(r)
    return tables


def _columns(rows: list[Row]) -> list[tuple[str, str]]:
    cols = {(r.arch, r.sparsity) for r in rows}
    return sorted(cols, key=lambda c: (list(ARCH_NAMES).index(c[0]), float(c[1])))


def _markdown_table(rows: list[Row], cols: list[tuple[str, str]], notes: list[str]) -> list[str]:
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        if r.robust is not None:
            c = (r.arch, r.sparsity)
            best[c] = max(best.get(c, -1.0), r.robust)
    head = ["Name", *(f"{ARCH_NAMES[a]} {s}%" for a, s in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    methods = list(dict.fromkeys(r.method for r in rows))
    for m in methods:
        mine = {(r.arch, r.sparsity): r for r in rows if r.method == m}
        first = next(iter(mine.values()))
        name = f"[{_method_name(m)}]({first.url})" if first.url else _method_name(m)
        cells = [name]
        for c in cols:
            r = mine.get(c)
            if r is None:
                cells.append("-")
                continue
            robust = "n/a" if r.robust is None else f"{r.robust:.2f}"
            text = f"{r.clean:.2f}/{robust}"
            if r.robust is not None and r.robust == best[c]:
                text = f"**{text}**"
            if not r.reliable:
                notes.append(f"{r.key}: " + "; ".join(r.flags))
                text += f" ⚠{len(notes)}"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(board: Board) -> str:
    """The leaderboard as Markdown (see the module docstring)."""
    measured = [r for r in board.rows if not r.reported]
    reported = [r for r in board.rows if r.reported]
    lines = ["# Adversarial pruning leaderboard", ""]
    if measured:
        n = sorted({r.n for r in measured if r.n is not None})
        lines += [
            f"Measured here: protocol `{board.protocol}` ({board.norm}, eps {board.eps} = "
            f"{board.eps_value:.6g} in input units), n = {', '.join(map(str, n))} test points, "
            f"attacks {', '.join(board.attacks)}. Cells are clean / robust accuracy in percent; "
            "robust is the per-sample worst case over the attacks. Bold: best robust accuracy "
            "of the column. ⚠: the evaluation raised attack-failure flags (listed below); its "
            "robust accuracy may be overestimated.",
            "",
        ]
    notes: list[str] = []
    for (dataset, structure), rows in sorted(_tables(measured).items()):
        lines += [f"## {DATASET_NAMES[dataset]} {structure} pruning (measured here)", ""]
        lines += [*_markdown_table(rows, _columns(rows), notes), ""]
    if notes:
        lines += ["Flags:", ""] + [f"{i}. {text}" for i, text in enumerate(notes, 1)] + [""]
    if reported:
        lines += [
            "# Reported by the Adversarial Pruning Benchmark (not measured here)",
            "",
            f"Source: {board.reference_source}. {board.reference_note}",
            "",
        ]
        for (dataset, structure), rows in sorted(_tables(reported).items()):
            lines += [f"## {DATASET_NAMES[dataset]} {structure} pruning (reported)", ""]
            lines += [*_markdown_table(rows, _columns(rows), []), ""]
    return "\n".join(lines)


def write_markdown(board: Board, path: str | Path) -> Path:
    """Write :func:`markdown` to ``path`` atomically."""
    from advprune.checkpoint import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(markdown(board), encoding="utf-8")
    return path


def _page_data(board: Board) -> dict[str, Any]:
    rows = []
    for r in board.rows:
        rows.append(
            {
                "key": r.key,
                "method": _method_name(r.method),
                "arch": ARCH_NAMES[r.arch],
                "dataset": DATASET_NAMES[r.dataset],
                "structure": r.structure,
                "sparsity": float(r.sparsity),
                "clean": r.clean,
                "robust": r.robust,
                "reported": r.reported,
                "reliable": r.reliable,
                "flags": r.flags,
                "attacks": r.attacks,
                "curve": r.curve,
                "n": r.n,
            }
        )
    return {
        "protocol": board.protocol,
        "eps": board.eps,
        "eps_value": board.eps_value,
        "norm": board.norm,
        "attacks": board.attacks,
        "reference_source": board.reference_source,
        "rows": rows,
    }


def html_page(board: Board) -> str:
    """The self-contained HTML page (see the module docstring)."""
    data = json.dumps(_page_data(board), allow_nan=False, ensure_ascii=False)
    data = data.replace("</", "<\\/")  # no "</script>" can end the data block early
    title = html.escape(f"Adversarial pruning leaderboard ({board.protocol or 'reported only'})")
    from importlib import resources

    template = (resources.files("advprune.bench") / "data" / "leaderboard.html").read_text("utf-8")
    return template.replace("{{TITLE}}", title).replace("{{DATA}}", data)


def write_html(board: Board, path: str | Path) -> Path:
    """Write :func:`html_page` to ``path`` atomically."""
    from advprune.checkpoint import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(html_page(board), encoding="utf-8")
    return path


def leaderboard(store: str | Path, out: str | Path, protocol: str | None = None) -> dict[str, Path]:
    """Write ``OUT/leaderboard.md`` and ``OUT/leaderboard.html``; return their paths."""
    board = collect(store, protocol)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "markdown": write_markdown(board, out / "leaderboard.md"),
        "html": write_html(board, out / "leaderboard.html"),
    }
