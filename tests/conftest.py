"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module single-threaded: small batches gain little from threads, and on a
    busy machine OpenMP threads spinning against each other made such files 5x slower.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """A module's own ``$ADVPRUNE_CACHE`` while its module-scoped fixtures run (a fixture that
    evaluates once for the whole file must tune HO-FMN, not reuse ``~/.cache``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADVPRUNE_CACHE", str(tmp_path_factory.mktemp("module-cache")))
        yield


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own ``$ADVPRUNE_CACHE`` (tuned HO-FMN configurations, zoo files):
    no test reads what another (or the user's home) stored."""
    monkeypatch.setenv("ADVPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
