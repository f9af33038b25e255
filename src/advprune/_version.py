"""advprune's version, in a module of its own so that every layer can read it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("advprune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"
