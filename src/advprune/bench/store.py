"""The results store: reports in one SQLite file, one row per (model key, protocol, attack).

A row holds every field of a report entry (attack configuration, seconds, robust accuracy,
flags, details), the report-level fields (clean accuracy, n, eps as text and value, norm,
dataset, reliability), the whole report JSON (with its security curve), and the per-sample
file's absolute path and sha256, and the model's profile when the evaluation measured one
(``advprune eval --profile``: parameters and MACs kept against the dense model, file sizes,
measured speed-ups). Besides one row per attack, each report adds the row
``attack="worst-case"``: the per-sample worst case over the empirical attacks, which is what
leaderboards rank by.

Store versions: 1 (no profile column) is read as it is (profiles None) and migrated to 2 by the
first write (one ``ALTER TABLE`` in the write's transaction).

Writes are transactions (``BEGIN IMMEDIATE``): adding a report replaces the rows of the same
(key, protocol) all at once, so a crash leaves the old rows or the new ones, never a mix.
Several processes may write one file at once: every operation opens its own connection and a
writer waits for the lock (busy timeout) instead of failing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from advprune.bench.keys import ModelKey, parse_key
from advprune.errors import ConfigError, DataError

__all__ = ["DEFAULT_STORE", "STORE_VERSION", "ResultsStore", "StoredResult", "protocol_of"]

DEFAULT_STORE = "results.sqlite"
STORE_VERSION = 2
_READABLE_VERSIONS = (1, 2)  # version 1: before the profile column
WORST_CASE = "worst-case"
_BUSY_TIMEOUT_S = 60.0
# Journal mode: SQLite's default rollback journal ("delete"), deliberately not WAL. WAL needs a
# shared-memory index that network file systems (the cluster home folders grid jobs write to
# from several nodes) do not provide, and it leaves -wal/-shm files beside the store; the
# rollback journal only needs POSIX file locks, and a crashed writer's hot journal is rolled
# back by the next connection. The store's writes are rare and small, so WAL's concurrency
# gain buys nothing here. (Only WAL is a persistent setting of the file: nothing to set.)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS advprune_store (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    key TEXT NOT NULL,
    method TEXT NOT NULL,
    arch TEXT NOT NULL,
    dataset_code TEXT NOT NULL,
    structure TEXT NOT NULL,
    sparsity TEXT NOT NULL,
    protocol TEXT NOT NULL,
    attack TEXT NOT NULL,
    kind TEXT NOT NULL,
    clean_accuracy REAL NOT NULL,
    robust_accuracy REAL,
    robust_accuracy_at TEXT NOT NULL,
    reliable INTEGER NOT NULL,
    flags TEXT NOT NULL,
    n INTEGER NOT NULL,
    eps TEXT NOT NULL,
    eps_value REAL NOT NULL,
    norm TEXT NOT NULL,
    dataset TEXT,
    seconds REAL,
    config TEXT NOT NULL,
    details TEXT NOT NULL,
    report TEXT NOT NULL,
    per_sample_path TEXT,
    per_sample_sha256 TEXT,
    created TEXT,
    added TEXT NOT NULL,
    profile TEXT,
    UNIQUE (key, protocol, attack)
);
"""
_COLUMNS = [
    "key",
    "method",
    "arch",
    "dataset_code",
    "structure",
    "sparsity",
    "protocol",
    "attack",
    "kind",
    "clean_accuracy",
    "robust_accuracy",
    "robust_accuracy_at",
    "reliable",
    "flags",
    "n",
    "eps",
    "eps_value",
    "norm",
    "dataset",
    "seconds",
    "config",
    "details",
    "report",
    "per_sample_path",
    "per_sample_sha256",
    "created",
    "added",
    "profile",
]


_KEY_PARTS = ("method", "arch", "dataset_code", "structure", "sparsity", "report")


def protocol_of(report: Any) -> str:
    """The evaluation protocol of a report: ``"{norm}-{eps}"``, e.g. ``"linf-8/255"``.

    Results are comparable only within one protocol (the same threat model and exact eps).
    """
    return f"{report.norm}-{report.eps}"


@dataclass(frozen=True)
class StoredResult:
    """One stored row: one attack (or the worst case) of one model under one protocol."""

    key: str
    protocol: str
    attack: str
    kind: str
    clean_accuracy: float
    robust_accuracy: float | None
    reliable: bool
    flags: list[dict[str, Any]]
    n: int
    eps: str
    eps_value: float
    norm: str
    dataset: str | None
    seconds: float | None
    per_sample_path: str | None
    per_sample_sha256: str | None
    added: str
    robust_accuracy_at: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    created: str | None = None
    profile: dict[str, Any] | None = None  # Profile.summary() of `eval --profile`, if measured

    @property
    def model_key(self) -> ModelKey:
        """The parsed model key."""
        return parse_key(self.key)

    def to_dict(self) -> dict[str, Any]:
        """The fields as strict JSON types (+-inf and nan as the strings the reports use)."""
        from advprune.io import jsonable as _jsonable

        return _jsonable(asdict(self))


class ResultsStore:
    """A results store in the SQLite file ``path`` (created on the first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._version = STORE_VERSION  # of the file, as the last connection found it

    # ------------------------------------------------------------------ connection

    @contextmanager
    def _connect(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        if not write and not self.path.is_file():
            raise ConfigError(f"no results store at {self.path}; add a report with `bench add`")
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # reads open with mode=rw: never create a file, but still able to roll back the hot
        # journal a crashed writer left (a read-only connection could not)
        uri = f"{self.path.resolve().as_uri()}?mode={'rwc' if write else 'rw'}"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open results store {self.path} ({exc})") from None
        try:
            self._check(con, create=write)
            yield con
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise ConfigError(
                    f"results store {self.path} stayed locked for {_BUSY_TIMEOUT_S:.0f} s "
                    f"by another process; try again"
                ) from None
            raise ConfigError(f"{self.path} is not a usable results store ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a usable results store ({exc})") from None
        finally:
            con.close()

    def _check(self, con: sqlite3.Connection, *, create: bool) -> None:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            if not create:
                raise ConfigError(f"{self.path} is an empty file, not a results store")
            con.execute("BEGIN IMMEDIATE")
            try:
                tables = {
                    r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                if not tables:  # another process may have created it meanwhile
                    if self.path.stat().st_size > 0:  # we hold the write lock: size is stable
                        # an SQLite database of someone else's that merely holds no table yet
                        raise ConfigError(f"{self.path} is an SQLite file but not a results store")
                    for stmt in _SCHEMA.strip().split(";"):
                        if stmt.strip():
                            con.execute(stmt)
                    con.execute("INSERT INTO advprune_store (version) VALUES (?)", (STORE_VERSION,))
                    tables = {"advprune_store", "results"}
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        if tables != {"advprune_store", "results"}:
            raise ConfigError(
                f"{self.path} is not an advprune results store "
                f"(tables: {', '.join(sorted(tables))})"
            )
        row = con.execute("SELECT version FROM advprune_store").fetchone()
        if row is None or row[0] not in _READABLE_VERSIONS:
            raise ConfigError(
                f"{self.path} has store version {row and row[0]}; this advprune reads versions "
                f"{', '.join(map(str, _READABLE_VERSIONS))}"
                + (": upgrade advprune" if row and isinstance(row[0], int) and row[0] > 2 else "")
            )
        self._version = row[0]
        if create and row[0] < STORE_VERSION:
            self._migrate(con)

    def _migrate(self, con: sqlite3.Connection) -> None:
        """Bring a version 1 store to the current version (in one transaction)."""
        con.execute("BEGIN IMMEDIATE")
        try:
            version = con.execute("SELECT version FROM advprune_store").fetchone()[0]
            if version == 1:  # another writer may have migrated it meanwhile
                con.execute("ALTER TABLE results ADD COLUMN profile TEXT")
                con.execute("UPDATE advprune_store SET version = ?", (STORE_VERSION,))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self._version = STORE_VERSION

    # ------------------------------------------------------------------ writing

    def add_report(
        self, report: Any, key: str | None = None, *, report_dir: str | Path | None = None
    ) -> list[StoredResult]:
        """Store ``report`` (a :class:`~advprune.evaluation.Report` or a report.json path).

        ``key`` defaults to ``report.model["key"]``; ``report_dir`` (default: the folder of
        the report file) resolves the report's relative file names. The rows of the same
        (key, protocol) are replaced in one transaction; returns the new rows.
        """
        _, key, protocol = self._add(report, key, report_dir=report_dir, once=False)
        return self.results(key=key, protocol=protocol)

    def add_report_once(
        self, report: Any, key: str | None = None, *, report_dir: str | Path | None = None
    ) -> bool:
        """Like :meth:`add_report`, but leave the store untouched when the same report (the
        same JSON and per-sample file) is already stored under its (key, protocol): the check
        and the write are one transaction, so processes ingesting the same report at once
        store it once. Returns whether this call stored it."""
        return self._add(report, key, report_dir=report_dir, once=True)[0]

    def _add(
        self, report: Any, key: str | None, *, report_dir: str | Path | None, once: bool
    ) -> tuple[bool, str, str]:
        """Write the rows of ``report`` (``once``: unless the same report is stored); return
        whether it wrote them, the key and the protocol."""
        from advprune.checkpoint import sha256_file
        from advprune.evaluation import load_report

        if isinstance(report, (str, Path)):
            path = Path(report)
            if path.is_dir():
                path = path / "report.json"
            report_dir = path.parent if report_dir is None else report_dir
            report = load_report(path)
        key = key or (report.model or {}).get("key")
        if not key:
            raise ConfigError("the report names no model key; give one (--key KEY)")
        mk = parse_key(str(key))
        key = str(mk)
        _check_report(report)
        per_sample, sha = None, None
        name = (report.files or {}).get("per_sample")
        if name:
            if report_dir is None and not Path(name).is_absolute():
                raise ConfigError(
                    f"the report names its per-sample file {name!r} relative to its folder; "
                    "pass report_dir= (the folder of report.json) or the report.json path"
                )
            file = (Path(report_dir or "") / name).resolve()
            if not file.is_file():
                raise DataError(f"the report's per-sample file {file} does not exist")
            per_sample, sha = str(file), sha256_file(file)
        protocol = protocol_of(report)
        profile = (report.model or {}).get("profile")
        report_json = json.dumps(report.to_dict())
        report_flags = [_flag(f) for f in report.flags]
        added = datetime.now(timezone.utc).isoformat(timespec="seconds")
        common = dict(
            key=key,
            method=mk.method,
            arch=mk.arch,
            dataset_code=mk.dataset,
            structure=mk.structure,
            sparsity=mk.sparsity,
            protocol=protocol,
            clean_accuracy=float(report.clean_accuracy),
            reliable=int(report.reliable),
            n=int(report.n),
            eps=str(report.eps),
            eps_value=float(report.eps_value),
            norm=str(report.norm),
            dataset=report.dataset,
            report=report_json,
            per_sample_path=per_sample,
            per_sample_sha256=sha,
            created=report.created,
            added=added,
            profile=_dumps(profile) if profile else None,
        )
        rows = []
        for e in report.entries:
            rows.append(
                {
                    **common,
                    "attack": e.name,
                    "kind": e.kind,
                    "robust_accuracy": _opt_float(e.robust_accuracy),
                    "robust_accuracy_at": _dumps(e.robust_accuracy_at),
                    "flags": _dumps([*report_flags, *(_flag(f) for f in e.flags)]),
                    "seconds": float(e.seconds),
                    "config": _dumps(e.config),
                    "details": _dumps(e.details),
                }
            )
        rows.append(
            {
                **common,
                "attack": WORST_CASE,
                "kind": WORST_CASE,
                "robust_accuracy": _opt_float(report.robust_accuracy),
                "robust_accuracy_at": "{}",
                "flags": _dumps([_flag(f) for f in report.all_flags()]),
                "seconds": float(sum(e.seconds for e in report.entries)),
                "config": _dumps({"attacks": [e.name for e in report.entries]}),
                "details": "{}",
            }
        )
        sql = (
            f"INSERT INTO results ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        )
        with self._connect(write=True) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                same = (
                    once
                    and con.execute(
                        "SELECT 1 FROM results WHERE key=? AND protocol=? AND attack=? "
                        "AND report=? AND per_sample_sha256 IS ?",
                        (key, protocol, WORST_CASE, report_json, sha),
                    ).fetchone()
                )
                if not same:
                    con.execute("DELETE FROM results WHERE key=? AND protocol=?", (key, protocol))
                    self._insert(con, sql, [tuple(r[c] for c in _COLUMNS) for r in rows])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return not same, key, protocol

    @staticmethod
    def _insert(con: sqlite3.Connection, sql: str, rows: list[tuple]) -> None:
        con.executemany(sql, rows)

    def remove(self, key: str, protocol: str | None = None) -> int:
        """Delete the rows of ``key`` (and ``protocol``, if given); return how many."""
        where, args = _where(key=key, protocol=protocol)
        with self._connect(write=True) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                count = con.execute(f"DELETE FROM results{where}", args).rowcount
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return count

    # ------------------------------------------------------------------ reading

    def results(
        self, key: str | None = None, protocol: str | None = None, attack: str | None = None
    ) -> list[StoredResult]:
        """Stored rows, filtered, ordered by key, protocol and attack (worst case last)."""
        where, args = _where(key=key, protocol=protocol, attack=attack)
        cols = [c for c in _COLUMNS if c not in _KEY_PARTS]
        with self._connect(write=False) as con:
            # a version 1 store has no profile column: read it as NULL
            select = [c if c != "profile" or self._version >= 2 else "NULL" for c in cols]
            rows = con.execute(
                f"SELECT {', '.join(select)} FROM results{where} "
                f"ORDER BY key, protocol, attack = '{WORST_CASE}', rowid",
                args,
            ).fetchall()
        out = []
        for row in rows:
            d = dict(zip(cols, row))
            for name in ("flags", "robust_accuracy_at", "config", "details"):
                d[name] = _loads(d[name])
            d["profile"] = _loads(d["profile"]) if d["profile"] else None
            d["reliable"] = bool(d["reliable"])
            out.append(StoredResult(**d))
        return out

    def keys(self) -> list[str]:
        """Every stored model key, sorted."""
        with self._connect(write=False) as con:
            return [r[0] for r in con.execute("SELECT DISTINCT key FROM results ORDER BY key")]

    def protocols(self) -> list[str]:
        """Every stored protocol, sorted."""
        with self._connect(write=False) as con:
            rows = con.execute("SELECT DISTINCT protocol FROM results ORDER BY protocol")
            return [r[0] for r in rows]

    def has(self, key: str, protocol: str | None = None) -> bool:
        """Whether results of ``key`` (under ``protocol``, if given) are stored."""
        if not self.path.is_file():
            return False
        where, args = _where(key=key, protocol=protocol)
        with self._connect(write=False) as con:
            return con.execute(f"SELECT 1 FROM results{where} LIMIT 1", args).fetchone() is not None

    def report(self, key: str, protocol: str) -> dict[str, Any]:
        """The stored report JSON of ``key`` under ``protocol`` (holds ``curve``)."""
        with self._connect(write=False) as con:
            row = con.execute(
                "SELECT report FROM results WHERE key=? AND protocol=? LIMIT 1", (key, protocol)
            ).fetchone()
        if row is None:
            raise ConfigError(f"no results of {key!r} under protocol {protocol!r} in {self.path}")
        return json.loads(row[0])


def _check_report(report: Any) -> None:
    """Refuse a report the rows could not represent faithfully (before any write)."""
    names = [e.name for e in report.entries]
    if WORST_CASE in names or len(set(names)) != len(names):
        raise ConfigError(
            f"report entry names must be unique and not {WORST_CASE!r}, got {', '.join(names)}"
        )
    values = {"clean accuracy": report.clean_accuracy, "robust accuracy": report.robust_accuracy}
    values.update({f"robust accuracy of {e.name}": e.robust_accuracy for e in report.entries})
    for what, value in values.items():
        if value is not None and not 0.0 <= float(value) <= 1.0:  # also refuses nan
            raise ConfigError(f"the report's {what} must be a fraction in [0, 1], got {value}")
    if report.clean_accuracy is None:
        raise ConfigError("the report has no clean accuracy")


def _where(**filters: Any) -> tuple[str, tuple]:
    given = {k: v for k, v in filters.items() if v is not None}
    if not given:
        return "", ()
    return " WHERE " + " AND ".join(f"{k}=?" for k in given), tuple(given.values())


def _flag(flag: Any) -> dict[str, Any]:
    return {"name": flag.name, "message": flag.message, "attack": flag.attack}


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _dumps(obj: Any) -> str:
    from advprune.io import jsonable as _jsonable

    return json.dumps(_jsonable(obj))


def _loads(text: str) -> Any:
    from advprune.io import from_jsonable as _from_jsonable

    return _from_jsonable(json.loads(text))
