"""Shared fixtures: every test must leave no thread behind that it started."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

#: Seconds a test's threads get to finish after it returns (a stop that is under way, a joined observer
#: whose emitter is winding down) before they count as leaked.
THREAD_GRACE = 2.0


def _alive(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started during the test (livestack's, watchdog's, pyzmq's authenticator, a test's own)."""
    return [t for t in threading.enumerate() if t.is_alive() and t not in before]


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves behind a thread it started (threads alive before the test are exempt)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE
    leaked = _alive(before)
    while leaked and time.monotonic() < deadline:
        leaked[0].join(timeout=max(0.0, deadline - time.monotonic()))
        leaked = _alive(before)
    if leaked:
        names = ", ".join(sorted(f"{t.name} ({type(t).__name__})" for t in leaked))
        pytest.fail(f"the test left threads running: {names}", pytrace=False)
