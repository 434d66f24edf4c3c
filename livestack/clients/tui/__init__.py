"""The terminal dashboard of a running stack: ``run_tui(connect, control, keys)``.

It is a client of the daemon's sockets and imports only ``livestack.events`` and ``livestack.clients.bus``.
"""

from livestack.clients.tui.app import LivestackApp, run_tui

__all__ = ["LivestackApp", "run_tui"]
