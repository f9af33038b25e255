"""Progress of long loops (training epochs, attacks, certification, downloads) in one place.

Modes:

- ``bar``: tqdm bars, redrawn in place (carriage returns): for a terminal;
- ``lines``: plain lines, never a carriage return: one when a loop that reports its end
  finishes (an epoch, an attack), and one every :data:`LINE_INTERVAL` seconds while a loop
  runs longer than that; for logs (CI, Slurm, ``nohup``, ``> log``);
- ``off``: nothing;
- ``auto``: ``bar`` when the output stream (stderr) is a terminal, else ``lines``.

Which mode a loop uses: an explicit mode (``--progress``, the YAML ``progress`` setting or a
function's ``progress=`` argument) wins; unset, ``None`` or ``True`` mean "the default": the
process default set by the command line (:func:`process_default`), else
``$ADVPRUNE_PROGRESS``, else ``auto``. ``False`` means ``off``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from advprune.errors import ConfigError

__all__ = [
    "ENV",
    "LINE_INTERVAL",
    "MODES",
    "Progress",
    "ProgressSetting",
    "add_progress_flag",
    "check_mode",
    "note",
    "process_default",
    "progress",
    "resolve",
]

MODES: tuple[str, ...] = ("auto", "bar", "lines", "off")
ENV = "ADVPRUNE_PROGRESS"
LINE_INTERVAL = 30.0  # seconds between two plain lines of one running loop
ProgressSetting = str | bool | None  # a mode, True (the default) or False (off)

_BOOLEAN_TEXT = {"true": None, "yes": None, "on": None, "1": None, "false": "off", "no": "off",
                 "0": "off", "none": "off"}  # fmt: skip
_default: str | None = None  # set by the command line for the whole process


def check_mode(value: ProgressSetting, what: str = "progress") -> str | None:
    """The mode of a setting: ``auto``, ``bar``, ``lines``, ``off``, or ``None`` (the default:
    unset or ``True``). ``False`` is ``off``. Anything else is a one-line :class:`ConfigError`."""
    if value is None or value is True:
        return None
    if value is False:
        return "off"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in MODES:
            return text
        if text in _BOOLEAN_TEXT:
            return _BOOLEAN_TEXT[text]
    raise ConfigError(f"{what} must be one of {', '.join(MODES)} (or true / false), got {value!r}")


def resolve(value: ProgressSetting = None, stream: TextIO | None = None) -> str:
    """The mode a loop uses now: ``bar``, ``lines`` or ``off`` (see the module docstring)."""
    mode = check_mode(value)
    if mode is None:
        mode = _default
    if mode is None:
        mode = check_mode(os.environ.get(ENV) or None, f"${ENV}") or "auto"
    if mode == "auto":
        stream = stream if stream is not None else sys.stderr
        isatty = getattr(stream, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "lines"
    return mode


@contextmanager
def process_default(value: ProgressSetting) -> Iterator[None]:
    """Within the block, loops whose setting is the default use ``value`` (``None``: no change).
    The command line wraps each command in it, so ``--progress`` reaches every loop."""
    global _default
    before, mode = _default, check_mode(value)
    _default = mode if mode is not None else before
    try:
        yield
    finally:
        _default = before


def add_progress_flag(parser: argparse._ActionsContainer) -> None:
    """``--progress MODE`` (and its alias ``--no-progress``) on a command; default None."""
    parser.add_argument(
        "--progress",
        type=_mode_arg,
        metavar="MODE",
        help=f"auto (bars on a terminal, plain lines otherwise), bar, lines or off "
        f"(default: ${ENV}, else auto)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_const", const="off", help="--progress off"
    )


def _mode_arg(text: str) -> str:
    mode = check_mode(text, "--progress")
    return "auto" if mode is None else mode


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:g}"
    for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {name}"
    return f"{n:g} B"


class Progress:
    """One loop's progress: iterate over it, or call :meth:`update`; close it (or use ``with``).

    In ``lines`` mode it writes a line every ``interval`` seconds while the loop runs and, with
    ``leave=True``, one when it closes (a bar is then kept on the terminal too).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        desc: str = "",
        total: int | None = None,
        initial: int = 0,
        unit: str = "it",
        leave: bool = False,
        mode: ProgressSetting = None,
        interval: float = LINE_INTERVAL,
        stream: TextIO | None = None,
        **bar_options: Any,
    ) -> None:
        self.iterable = iterable
        self.desc, self.unit, self.leave, self.interval = desc, unit, leave, interval
        self.stream = stream
        self.mode = resolve(mode, stream)
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n = total, initial
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._lines = 0
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit,
                             leave=leave, file=stream, **bar_options)  # fmt: skip

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this Progress wraps no iterable; call update()")
        try:
            if self._bar is not None:
                yield from self._bar
            else:
                for item in self.iterable:
                    yield item
                    self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """``n`` more units done."""
        if self._bar is not None:
            self._bar.update(n)
            return
        self.n += n
        if self.mode == "lines" and time.monotonic() - self._last >= self.interval:
            self._write(self._line(done=False))

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (a bar's postfix; the end of a line)."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values)

    def close(self) -> None:
        """End the loop (its last line in ``lines`` mode)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.leave:
            self._write(self._line(done=True))

    def _line(self, *, done: bool) -> str:
        elapsed = time.monotonic() - self._start
        count = _amount(self.n, self.unit)
        if self.total is not None:
            count += f"/{_amount(self.total, self.unit)}"
            if not done and self.total:
                count += f" ({100 * self.n / self.total:.0f} %)"
        unit = "" if self.unit in ("B", "it") else f" {self.unit}"
        text = f"{self.desc}: {count}{unit} {'in' if done else 'after'} {elapsed:.1f} s"
        if self.postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return text

    def _write(self, text: str) -> None:
        self._last = time.monotonic()
        self._lines += 1
        stream = self.stream if self.stream is not None else sys.stderr
        print(text, file=stream, flush=True)


def progress(iterable: Iterable[Any] | None = None, **options: Any) -> Progress:
    """A :class:`Progress` over ``iterable`` (options: ``desc``, ``total``, ``initial``,
    ``unit``, ``leave``, ``mode``, ``interval``, ``stream``, and tqdm's own for bars)."""
    return Progress(iterable, **options)


def note(text: str, mode: ProgressSetting = None, stream: TextIO | None = None) -> None:
    """Print a one-line report (e.g. an epoch's figures) unless progress is ``off``; in ``bar``
    mode through tqdm, so that a running bar is not broken."""
    resolved = resolve(mode, stream)
    if resolved == "off":
        return
    stream = stream if stream is not None else sys.stderr
    if resolved == "bar":
        from tqdm.auto import tqdm

        tqdm.write(text, file=stream)
    else:
        print(text, file=stream, flush=True)
