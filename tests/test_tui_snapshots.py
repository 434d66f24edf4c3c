"""Snapshots of the dashboard's screen, fed a fixed night of events without sockets.

Times are the events' own (fixed) times shown in UTC and the app's clock is frozen, so nothing of the
wall clock or the machine's time zone reaches the picture. Update after a deliberate change of the
layout with ``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the SVGs first.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, timedelta
from typing import Any

from textual.pilot import Pilot

from livestack.clients.tui.app import ConnectionChanged, LivestackApp
from livestack.clients.tui.demo import DEMO_START, demo_events

SnapCompare = Callable[..., bool]


def _app() -> LivestackApp:
    # No endpoints: nothing is received from a socket and the control keys report that they are off.
    return LivestackApp(None, None, None, tz=UTC, clock=lambda: DEMO_START.timestamp())


def _night(connection: ConnectionChanged) -> Callable[[Pilot[Any]], None]:
    def feed(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, LivestackApp)
        app.apply_events(demo_events())
        app.post_message(connection)

    return feed


def test_dashboard_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=_night(ConnectionChanged("connected")))


def test_dashboard_120x40(snap_compare: SnapCompare) -> None:
    assert snap_compare(_app(), terminal_size=(120, 40), run_before=_night(ConnectionChanged("connected")))


def test_dashboard_stale_120x40(snap_compare: SnapCompare) -> None:
    since = (DEMO_START + timedelta(minutes=12, seconds=17)).timestamp()
    stale = ConnectionChanged("stale", since=since)
    assert snap_compare(_app(), terminal_size=(120, 40), run_before=_night(stale))


def test_reset_confirmation_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(
        _app(), terminal_size=(80, 24), press=["r"], run_before=_night(ConnectionChanged("connected"))
    )


def test_help_120x40(snap_compare: SnapCompare) -> None:
    connected = _night(ConnectionChanged("connected"))
    assert snap_compare(_app(), terminal_size=(120, 40), press=["question_mark"], run_before=connected)
