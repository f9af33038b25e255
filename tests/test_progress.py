"""Progress: one switch (auto, bar, lines, off) for every loop; logs get plain lines, never
carriage-return frames."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from advprune import progress as pr
from advprune.config import RunConfig, load_config
from advprune.errors import ConfigError


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(pr.ENV, raising=False)


def test_modes_booleans_and_bad_values():
    assert [pr.check_mode(v) for v in ("auto", " Bar ", "LINES", "off")] == [
        "auto", "bar", "lines", "off"
    ]  # fmt: skip
    assert pr.check_mode(None) is None and pr.check_mode(True) is None  # the default
    assert pr.check_mode(False) == "off" and pr.check_mode("false") == "off"
    assert pr.check_mode("true") is None
    with pytest.raises(ConfigError, match=r"progress must be one of auto, bar, lines, off .*'x'"):
        pr.check_mode("x")
    with pytest.raises(ConfigError, match="progress must be one of"):
        pr.check_mode(3)
    # the YAML setting: old booleans still work, modes are checked
    assert RunConfig(progress=False).progress == "off" and RunConfig(progress=True).progress is None
    assert RunConfig(progress="lines").progress == "lines" and RunConfig().progress is None
    with pytest.raises(ConfigError, match="progress must be one of"):
        load_config(None, {"progress": "verbose"})


def test_resolution_order(monkeypatch):
    log, tty = io.StringIO(), _Terminal()
    assert pr.resolve(None, log) == "lines" and pr.resolve(None, tty) == "bar"  # auto
    assert pr.resolve("bar", log) == "bar" and pr.resolve(False, tty) == "off"
    monkeypatch.setenv(pr.ENV, "off")
    assert pr.resolve(None, tty) == "off" and pr.resolve(True, tty) == "off"  # the env var
    assert pr.resolve("lines", tty) == "lines"  # an explicit mode wins over it
    with pr.process_default("bar"):  # the command line's --progress
        assert pr.resolve(None, log) == "bar" and pr.resolve("off", log) == "off"
        with pr.process_default(None):  # no flag given: unchanged
            assert pr.resolve(True, log) == "bar"
    assert pr.resolve(None, tty) == "off"
    monkeypatch.setenv(pr.ENV, "sometimes")
    with pytest.raises(ConfigError, match=r"\$ADVPRUNE_PROGRESS must be one of"):
        pr.resolve(None, log)


def test_lines_mode_writes_plain_lines():
    out = io.StringIO()
    for _ in pr.progress(range(500), desc="attack", unit="batch", leave=True, mode="lines",
                         stream=out):  # fmt: skip
        pass
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()
    assert out.getvalue().startswith("attack: 500/500 batch in ")
    # a transient loop is silent unless it runs longer than the interval; then a line per
    # interval
    out = io.StringIO()
    for _ in pr.progress(range(100), desc="epoch 1/3", mode="lines", stream=out):
        pass
    assert out.getvalue() == ""
    out = io.StringIO()
    bar = pr.progress(total=3 << 20, desc="download", unit="B", mode="lines", interval=0.0,
                      stream=out)  # fmt: skip
    with bar:
        for _ in range(3):
            bar.update(1 << 20)
            bar.set_postfix(loss="0.5")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("download: 1.0 MiB/3.0 MiB (33 %) after ")
    assert lines[-1].endswith("loss 0.5") and "\r" not in out.getvalue()
    # off: nothing; note() prints one line unless off
    out = io.StringIO()
    for _ in pr.progress(range(10), desc="x", leave=True, mode="off", stream=out):
        pass
    pr.note("epoch 1/1: loss 1", "off", out)
    assert out.getvalue() == ""
    pr.note("epoch 1/1: loss 1", "lines", out)
    assert out.getvalue() == "epoch 1/1: loss 1\n"


def test_bar_mode_draws_bars():
    out = _Terminal()
    for _ in pr.progress(range(5), desc="epoch", mode="auto", stream=out, mininterval=0):
        pass
    assert "\r" in out.getvalue() and "epoch" in out.getvalue()


def _train(tmp_path, *flags, env=None):
    """`advprune train` (2 epochs) in a subprocess, its output a pipe as under CI or Slurm."""
    cmd = [sys.executable, "-m", "advprune.cli", "train", "--epochs", "2", "--attack-steps", "1",
           "--eval-steps", "1", "--n", "40", "--batch-size", "256", "--out",
           str(tmp_path / "run"), *flags]  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if k != pr.ENV}
    full_env.update(OMP_NUM_THREADS="1", **(env or {}))
    # bytes, not text=True: universal newlines would turn "\r" into "\n"
    done = subprocess.run(cmd, capture_output=True, env=full_env, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    return (done.stdout + done.stderr).decode()


def test_piped_output_has_plain_lines_per_epoch(tmp_path):
    """What `make quickstart > log 2>&1` gets: no carriage return, one line per epoch."""
    log = _train(tmp_path)
    assert "\r" not in log
    epochs = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert "val robust" in epochs[0]
    assert len(log.splitlines()) <= 2 * 2 + 2  # a few lines per epoch at most, and the summary


def test_the_switch_reaches_the_loops(tmp_path):
    bars = _train(tmp_path / "a", "--progress", "bar")
    assert "\r" in bars  # bars forced, even into a pipe
    # the YAML setting wins over $ADVPRUNE_PROGRESS, the flag over both
    yaml = tmp_path / "c.yaml"
    yaml.write_text("progress: lines\n")
    log = _train(tmp_path / "c", "--config", str(yaml), env={pr.ENV: "off"})
    assert log.count("epoch ") == 2 and "\r" not in log
    from advprune.cli import _run_config, build_parser

    args = build_parser().parse_args(["train", "--config", str(yaml), "--no-progress"])
    assert _run_config(args).progress == "off"
    args = build_parser().parse_args(["train", "--config", str(yaml)])
    assert _run_config(args).progress == "lines"
