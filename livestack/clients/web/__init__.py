"""The viewer in the browser: the stack deepening, for a big screen at a star party or a phone anywhere.

A client of the daemon's bus like the terminal dashboard: it imports the event schema (``livestack.events``)
and the bus client (``livestack.clients.bus``), never a processing stage, so it can run on any machine that
reaches the daemon's sockets. ``app`` is the Starlette application, ``model`` what it knows, ``server`` how
it is served; ``static/`` holds the page, served as is (no build step, nothing from the internet).
"""
