"""User-facing errors.

Every error a user can cause by bad input is an :class:`AdvpruneError` whose message is one
line saying what is wrong and what to do. The CLI prints ``error: <message>`` and exits with
status 2 instead of showing a traceback.
"""

from __future__ import annotations


class AdvpruneError(Exception):
    """Base class of all errors caused by bad user input."""


class UnknownNameError(AdvpruneError, KeyError):
    """An unknown model, dataset, objective, method or attack name."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class DataError(AdvpruneError):
    """A dataset file or folder that is missing, corrupt or in the wrong format."""


class ConfigError(AdvpruneError, ValueError):
    """A configuration value that is out of range or malformed."""


class CheckpointError(AdvpruneError):
    """A checkpoint that is missing, corrupt, hash-mismatched or of another architecture."""
