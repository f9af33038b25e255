"""The SQLite results store: round trips, transactions, concurrent writers, CLI."""

from __future__ import annotations

import json
import math
import multiprocessing
import sqlite3

import pytest
import torch

from _digits_models import digits_splits
from advprune.bench.store import ResultsStore, protocol_of
from advprune.checkpoint import sha256_file
from advprune.cli import main
from advprune.errors import ConfigError, DataError
from advprune.evaluation import Entry, Flag, Report, evaluate
from advprune.models import create

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "HYDRA_Sehwag2020Hydra_DCNN_DIGITS_US_90"


def make_report(robust: float = 0.5, flags: list[Flag] | None = None, key: str | None = None):
    """A hand-made report with two attacks and a curve (inf / nan in details)."""
    entries = [
        Entry(
            "autoattack",
            "empirical",
            {"version": "standard"},
            12.5,
            robust + 0.1,
            details={"per_attack": {"apgd-ce": robust + 0.2}},
        ),
        Entry(
            "hofmn",
            "empirical",
            {"steps": 200},
            3.0,
            robust + 0.05,
            flags=list(flags or []),
            details={"median": math.inf, "bad": math.nan},
        ),
    ]
    entries.append(
        Entry(
            "smoothing",
            "certified",
            {"sigma": 0.25},
            7.0,
            None,
            robust_accuracy_at={"0.25": 0.4, "0.5": 0.2},
        )
    )
    return Report(
        n=100,
        clean_accuracy=0.9,
        robust_accuracy=robust,
        eps="3/16",
        eps_value=3 / 16,
        norm="linf",
        entries=entries,
        dataset="digits",
        curve={"attack": "all", "eps": [0.0, 3 / 16], "robust_accuracy": [0.9, robust]},
        model={"key": key} if key else {},
        created="2026-11-21T00:00:00+00:00",
    )


def test_round_trip_every_field(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    report = make_report(flags=[Flag("zero_gradients", "m", "hofmn")])
    report.flags = [Flag("few_samples", "n is small")]
    rows = store.add_report(report, KEY)
    assert [r.attack for r in rows] == ["autoattack", "hofmn", "smoothing", "worst-case"]
    aa, ho, cert, worst = rows
    assert cert.kind == "certified" and cert.robust_accuracy is None
    assert cert.robust_accuracy_at == {"0.25": 0.4, "0.5": 0.2} and cert.config == {"sigma": 0.25}
    assert all(r.created == "2026-11-21T00:00:00+00:00" for r in rows)
    assert json.loads(json.dumps(store.report(KEY, "linf-3/16"))) == report.to_dict()
    assert aa.robust_accuracy == pytest.approx(0.6) and aa.config == {"version": "standard"}
    assert aa.details == {"per_attack": {"apgd-ce": 0.7}} and aa.seconds == 12.5
    assert math.isinf(ho.details["median"]) and math.isnan(ho.details["bad"])
    assert worst.robust_accuracy == 0.5 and worst.kind == "worst-case"
    assert worst.seconds == pytest.approx(22.5)
    for r in rows:
        assert (r.key, r.protocol, r.n, r.eps, r.norm) == (KEY, "linf-3/16", 100, "3/16", "linf")
        assert r.eps_value == 3 / 16 and r.clean_accuracy == 0.9 and r.dataset == "digits"
        assert r.reliable is False  # the hofmn flag makes the whole report unreliable
        assert r.per_sample_path is None and r.model_key.arch == "DCNN"
    few = {"name": "few_samples", "message": "n is small", "attack": None}
    assert ho.flags == [few, {"name": "zero_gradients", "message": "m", "attack": "hofmn"}]
    assert aa.flags == [few] and [f["name"] for f in worst.flags] == [
        "few_samples",
        "zero_gradients",
    ]
    stored = store.report(KEY, "linf-3/16")
    assert stored["curve"]["robust_accuracy"] == [0.9, 0.5]
    assert Report.from_dict(stored).entry("hofmn").details["median"] == math.inf
    assert store.keys() == [KEY] and store.has(KEY) and store.has(KEY, "linf-3/16")
    assert not store.has(KEY, "l2-1/2") and store.protocols() == ["linf-3/16"]


def test_real_evaluation_report_and_per_sample_hash(tmp_path):
    splits = digits_splits()
    x = torch.stack([splits.test[i][0] for i in range(32)])
    y = torch.tensor([splits.test[i][1] for i in range(32)])
    torch.manual_seed(0)
    out = tmp_path / "eval"
    report = evaluate(create("digits_cnn", width=4), (x, y), eps="3/16", attacks=("pgd",), out=out)
    store = ResultsStore(tmp_path / "r.sqlite")
    rows = store.add_report(out / "report.json", KEY)
    assert rows[0].per_sample_path == str((out / "per_sample.npz").resolve())
    assert rows[0].per_sample_sha256 == sha256_file(out / "per_sample.npz")
    assert rows[-1].robust_accuracy == pytest.approx(report.robust_accuracy)
    assert protocol_of(report) == "linf-3/16"
    (out / "per_sample.npz").unlink()
    with pytest.raises(DataError, match="per-sample file"):
        store.add_report(out, "LWM_Han2015Learning_DCNN_DIGITS_US_90")
    assert store.keys() == [KEY]


def test_readd_replaces_rows_of_the_same_protocol(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    store.add_report(make_report(0.5), KEY)
    report = make_report(0.3)
    report.entries = report.entries[:1]
    store.add_report(report, KEY)
    rows = store.results(key=KEY)
    assert [r.attack for r in rows] == ["autoattack", "worst-case"]
    assert rows[-1].robust_accuracy == 0.3
    assert store.remove(KEY) == 2 and store.keys() == []


def test_key_checked_before_any_write(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultsStore(path)
    store.add_report(make_report(key=KEY))  # the key from report.model
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="architecture"):
        store.add_report(make_report(), "HYDRA_R99_DIGITS_US_90")
    with pytest.raises(ConfigError, match="model key"):
        store.add_report(make_report())
    assert path.read_bytes() == before


def test_foreign_files_refused_and_untouched(tmp_path):
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE users (name TEXT)")
    con.commit()
    con.close()
    before = other.read_bytes()
    with pytest.raises(ConfigError, match="not an advprune results store"):
        ResultsStore(other).add_report(make_report(), KEY)
    assert other.read_bytes() == before
    text = tmp_path / "notes.sqlite"
    text.write_text("hello " * 200)
    with pytest.raises(ConfigError):
        ResultsStore(text).results()
    assert text.read_text() == "hello " * 200
    with pytest.raises(ConfigError, match="no results store"):
        ResultsStore(tmp_path / "missing.sqlite").results()
    assert not (tmp_path / "missing.sqlite").exists()


def test_failed_write_keeps_the_old_rows(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path / "r.sqlite")
    store.add_report(make_report(0.5), KEY)

    def crash(con, sql, rows):
        con.executemany(sql, rows[:1])  # half the rows, after the delete
        raise RuntimeError("power cut")

    monkeypatch.setattr(ResultsStore, "_insert", staticmethod(crash))
    with pytest.raises(RuntimeError):
        store.add_report(make_report(0.1), KEY)
    rows = store.results(key=KEY)
    assert [r.attack for r in rows] == ["autoattack", "hofmn", "smoothing", "worst-case"]
    assert rows[-1].robust_accuracy == 0.5


def _writer(path: str, worker: int, count: int) -> None:
    store = ResultsStore(path)
    for i in range(count):
        store.add_report(make_report(0.5), f"W{worker}_DCNN_DIGITS_US_{i + 1}")


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "r.sqlite")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = ResultsStore(path)
    assert len(store.keys()) == 100
    assert len(store.results()) == 400
    for w in range(4):
        for i in range(25):
            rows = store.results(key=f"W{w}_DCNN_DIGITS_US_{i + 1}")
            assert [r.attack for r in rows] == ["autoattack", "hofmn", "smoothing", "worst-case"]
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    con.close()


def test_cli_add_list_show(tmp_path, capsys, monkeypatch):
    report = make_report(key=KEY)
    report_path = report.save(tmp_path / "report.json")
    db = tmp_path / "r.sqlite"
    assert main(["bench", "add", str(report_path), "--store", str(db)]) == 0
    monkeypatch.setenv("ADVPRUNE_STORE", str(db))
    capsys.readouterr()
    assert main(["bench", "list"]) == 0
    out = capsys.readouterr().out
    assert KEY in out and "UNRELIABLE" not in out and "50.00" in out
    assert main(["bench", "show", KEY, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["attack"] for r in rows} == {"autoattack", "hofmn", "smoothing", "worst-case"}
    assert main(["bench", "list", "--method", "LWM"]) == 0
    assert KEY not in capsys.readouterr().out
    assert main(["bench", "show", "HARP_Zhao2023Holistic_R18_CIFAR10_US_90"]) == 2
    assert "no results" in capsys.readouterr().err
    bare = make_report().save(tmp_path / "bare" / "report.json")
    assert main(["bench", "add", str(bare.parent), "--store", str(db)]) == 2
    assert "--key" in capsys.readouterr().err
    assert main(["bench", "list", "--store", str(tmp_path / "none.sqlite")]) == 2


def test_report_object_needs_its_folder_for_a_relative_per_sample_file(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "per_sample.npz").write_bytes(b"per-sample bytes")
    report = make_report()
    report.files = {"per_sample": "per_sample.npz"}
    store = ResultsStore(tmp_path / "r.sqlite")
    with pytest.raises(ConfigError, match="report_dir"):
        store.add_report(report, KEY)
    assert not (tmp_path / "r.sqlite").exists()
    rows = store.add_report(report, KEY, report_dir=folder)
    assert {r.per_sample_path for r in rows} == {str((folder / "per_sample.npz").resolve())}
    assert {r.per_sample_sha256 for r in rows} == {sha256_file(folder / "per_sample.npz")}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda r: setattr(r.entries[1], "name", "autoattack"), "unique"),
        (lambda r: setattr(r.entries[0], "name", "worst-case"), "unique"),
        (lambda r: setattr(r.entries[0], "robust_accuracy", math.nan), "fraction"),
        (lambda r: setattr(r, "clean_accuracy", 90.0), "fraction"),
    ],
)
def test_unrepresentable_reports_refused_before_any_write(tmp_path, change, match):
    path = tmp_path / "r.sqlite"
    store = ResultsStore(path)
    store.add_report(make_report(), KEY)
    before = path.read_bytes()
    bad = make_report()
    change(bad)
    with pytest.raises(ConfigError, match=match):
        store.add_report(bad, "LWM_Han2015Learning_DCNN_DIGITS_US_90")
    assert path.read_bytes() == before


def test_empty_foreign_sqlite_file_refused_and_untouched(tmp_path):
    path = tmp_path / "other.sqlite"
    con = sqlite3.connect(path)
    con.execute("PRAGMA user_version = 7")  # a real SQLite file, but no table
    con.close()
    before = path.read_bytes()
    assert before
    with pytest.raises(ConfigError, match="not a results store"):
        ResultsStore(path).add_report(make_report(), KEY)
    with pytest.raises(ConfigError, match="not a results store"):
        ResultsStore(path).keys()
    assert path.read_bytes() == before


def test_store_locked_too_long_is_a_clear_error_and_keeps_rows(tmp_path, monkeypatch):
    import advprune.bench.store as store_module

    path = tmp_path / "r.sqlite"
    store = ResultsStore(path)
    store.add_report(make_report(0.5), KEY)
    monkeypatch.setattr(store_module, "_BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    try:
        with pytest.raises(ConfigError, match="stayed locked"):
            store.add_report(make_report(0.1), KEY)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.results(key=KEY, attack="worst-case")[0].robust_accuracy == 0.5


def test_reads_never_create_a_store(tmp_path):
    missing = tmp_path / "missing.sqlite"
    store = ResultsStore(missing)
    assert store.has(KEY) is False
    for read in (store.keys, store.results, lambda: store.report(KEY, "linf-3/16")):
        with pytest.raises(ConfigError, match="no results store"):
            read()
    assert not missing.exists()
    store.add_report(make_report(), KEY)
    with pytest.raises(ConfigError, match="no results of"):
        store.report(KEY, "l2-1/2")
    assert store.results(attack="hofmn")[0].attack == "hofmn"
    assert store.results(protocol="l2-1/2") == []


def test_cli_list_filters_and_text(tmp_path, capsys):
    db = str(tmp_path / "r.sqlite")
    store = ResultsStore(db)
    store.add_report(make_report(0.5, flags=[Flag("zero_gradients", "no gradient", "hofmn")]), KEY)
    other = "LWM_Han2015Learning_R18_CIFAR10_US_95"
    store.add_report(make_report(0.25), other)
    capsys.readouterr()
    assert main(["bench", "list", "--store", db]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    hydra, lwm = (next(line for line in lines if k in line) for k in (KEY, other))
    assert "linf-3/16" in hydra and "clean 90.00 %" in hydra and "UNRELIABLE" in hydra
    assert "autoattack 60.00 %" in hydra and "hofmn 55.00 %" in hydra
    assert "worst-case 50.00 %" in hydra and "worst-case 25.00 %" in lwm
    assert "UNRELIABLE" not in lwm and "reliable" in lwm
    assert main(["bench", "list", "--store", db, "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert other in out and KEY not in out
    assert main(["bench", "list", "--store", db, "--method", "hydra", "--json"]) == 0
    assert {r["key"] for r in json.loads(capsys.readouterr().out)} == {KEY}
    assert main(["bench", "list", "--store", db, "--method", "H"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["bench", "list", "--store", db, "--dataset", "MNIST"]) == 2
    assert "MNIST" in capsys.readouterr().err
    assert main(["bench", "show", KEY, "--store", db]) == 0
    out = capsys.readouterr().out
    assert "FLAG zero_gradients: no gradient" in out and "UNRELIABLE" in out
    assert main(["bench", "show", "not a key", "--store", db]) == 2
    assert main(["bench", "add", str(tmp_path / "nothing"), "--store", db]) == 2
    assert "no report" in capsys.readouterr().err


def _crash_mid_write(path: str) -> None:
    """Child process: die hard (no rollback, no cleanup) after the delete and half the insert."""
    import os

    def die(con, sql, rows):
        con.execute("PRAGMA cache_size = 1")  # spill changed pages into the file before dying
        con.executemany(sql, rows[:2])
        os._exit(3)

    ResultsStore._insert = staticmethod(die)
    report = make_report(0.1)
    report.entries[0].details["log"] = "x" * 200_000  # rows over many pages: the cache spills
    ResultsStore(path).add_report(report, KEY)


def test_process_killed_mid_write_leaves_the_old_rows(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultsStore(path)
    store.add_report(make_report(0.5), KEY)
    before = path.read_bytes()
    proc = multiprocessing.get_context("spawn").Process(target=_crash_mid_write, args=(str(path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    # the file holds the dead writer's half-written pages, and its hot journal is beside it
    assert path.read_bytes() != before and (tmp_path / "r.sqlite-journal").is_file()
    rows = store.results(key=KEY)  # the next connection rolls the hot journal back
    assert [r.attack for r in rows] == ["autoattack", "hofmn", "smoothing", "worst-case"]
    assert rows[-1].robust_accuracy == 0.5
    assert path.read_bytes() == before and not (tmp_path / "r.sqlite-journal").exists()
    assert store.add_report(make_report(0.2), KEY)[-1].robust_accuracy == 0.2


def test_json_output_is_strict_json(tmp_path, capsys):
    db = str(tmp_path / "r.sqlite")
    ResultsStore(db).add_report(make_report(), KEY)
    capsys.readouterr()

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    for command in (["bench", "show", KEY], ["bench", "list"]):
        assert main([*command, "--store", db, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out, parse_constant=refuse)
        hofmn = next(r for r in rows if r["attack"] == "hofmn")
        assert hofmn["details"] == {"median": "inf", "bad": "nan"}
        assert hofmn["clean_accuracy"] == 0.9 and hofmn["key"] == KEY


def test_empty_file_becomes_a_store_on_write_only(tmp_path):
    path = tmp_path / "r.sqlite"
    path.touch()
    with pytest.raises(ConfigError, match="empty file"):
        ResultsStore(path).keys()
    assert path.stat().st_size == 0
    ResultsStore(path).add_report(make_report(), KEY)
    assert ResultsStore(path).keys() == [KEY]
