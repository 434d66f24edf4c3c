"""The terminal dashboard of a running stack, local or over the network.

Events arrive on a Textual thread worker that loops on ``Subscriber.recv`` and posts them to the app as
messages; control requests run on thread workers too; the UI thread only folds events into a
``Dashboard`` and redraws. The app needs nothing of livestack but the event schema and the client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import tzinfo
from pathlib import Path
from typing import Any, ClassVar, Literal

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, RichLog, Static
from textual.worker import get_current_worker

from livestack import events
from livestack.clients.bus import ClientKeys, ControlClient, Subscriber
from livestack.clients.tui.model import SERIES, Dashboard, FrameRow, LogLine, format_clock
from livestack.clients.tui.widgets import LightCurveView, Plot, PreviewView, bin_points
from livestack.errors import LivestackError

__all__ = [
    "ConfirmScreen",
    "ConnectionChanged",
    "ControlReplied",
    "EventReceived",
    "ExitRequested",
    "HelpScreen",
    "LivestackApp",
    "Noted",
    "run_app",
    "run_tui",
]

#: How long one wait of the receiving worker lasts: the bound on noticing a cancellation or staleness.
_RECV_TIMEOUT_S = 0.25
#: Every topic but the ``display`` pictures (for web viewers), which would only cost a remote link.
_TOPICS = tuple(topic for topic in events.TOPICS if topic != "display")

ConnectionState = Literal["connecting", "connected", "stale", "failed", "offline"]

_HELP = """\
[b]Keys[/b]
  [b]p[/b]  pause the stack, or resume it when paused
  [b]s[/b]  write a snapshot now (FITS and image)
  [b]r[/b]  reset: start a new stack (asks first; frames on disk are kept)
  [b]x[/b]  remove a frame from the stack: x shows a cursor in the frame table, arrows choose,
     x again asks, then removes it (escape hides the cursor; its file stays on disk)
  [b]?[/b]  this help        [b]q[/b]  {quit}

[b]Panels[/b]
  [b]header[/b]    target, filter, stacking method, the daemon's state, the connection:
            "stale since" means no message (not even the 1 s heartbeat) since then
  [b]counters[/b]  frames received, stacked, rejected; total exposure in the stack; daemon uptime;
            frames per minute (last 10 min); frames queued (oldest wait); file-to-stack latency;
            with a filter wheel, each filter's frames and exposure
  [b]frames[/b]    the latest frames, newest first: verdict or rejection reason, stars, FWHM (px),
            shift from the reference (px), rotation, fit residual (rms px)
  [b]plots[/b]     FWHM, star count, sky background and latency of the accepted frames tonight
  [b]preview[/b]   the stack as it stands, auto-stretched by the daemon
  [b]log[/b]       warnings and errors, rejections, snapshots, replies to your commands

Press escape or ? to close."""

_QUIT_REMOTE = "quit the dashboard (the daemon keeps running)"
_QUIT_ATTACHED = "quit: stop the daemon (final checkpoint and snapshot) and leave"


class EventReceived(Message):
    """An event from the daemon, posted by the receiving worker.

    Parameters
    ----------
    event : Event
    """

    def __init__(self, event: events.Event) -> None:
        super().__init__()
        self.event = event


class ConnectionChanged(Message):
    """The subscription changed state.

    Parameters
    ----------
    state : str
        ``connecting``, ``connected``, ``stale`` (nothing heard for ``stale_after`` seconds), ``failed``
        (the socket could not be set up) or ``offline`` (no endpoint: events are fed in-process).
    since : float, optional
        For ``stale``: when the last message came (seconds since the epoch).
    detail : str, optional
        For ``failed``: why.
    """

    def __init__(self, state: ConnectionState, since: float | None = None, detail: str | None = None) -> None:
        super().__init__()
        self.state: ConnectionState = state
        self.since = since
        self.detail = detail


class Noted(Message):
    """A line for the log from the program the dashboard runs in (e.g. "camera finished" in the demo).

    Parameters
    ----------
    text : str
    level : str
        ``info``, ``warning`` or ``error``.
    """

    def __init__(self, text: str, level: str = "info") -> None:
        super().__init__()
        self.text = text
        self.level = level


class ExitRequested(Message):
    """The daemon the dashboard is attached to is stopping (a signal, a ``shutdown`` request): close."""


class ControlReplied(Message):
    """A control request finished: with the daemon's reply, or with the reason there was none.

    Parameters
    ----------
    cmd : str
    reply : dict, optional
        ``{"ok": ..., ...}`` as the daemon answered.
    error : str, optional
        Why there is no reply (timeout, bad keys, no control endpoint).
    """

    def __init__(self, cmd: str, reply: dict[str, Any] | None, error: str | None = None) -> None:
        super().__init__()
        self.cmd = cmd
        self.reply = reply
        self.error = error


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True for ``y``, False for ``n`` or escape.

    Parameters
    ----------
    question : str
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "yes"),
        Binding("n", "answer(False)", "no"),
        Binding("escape", "answer(False)", "cancel", show=False),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        """The question and two buttons."""
        with Vertical(id="dialog"):
            yield Static(self.question, id="question")
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        """Start on the safe answer."""
        self.query_one("#no", Button).focus()

    def action_answer(self, yes: bool) -> None:
        """Close with the answer."""
        self.dismiss(yes)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class HelpScreen(ModalScreen[None]):
    """The keys and what each panel means.

    Parameters
    ----------
    attached : bool
        Whether quitting also stops the daemon (it runs in the dashboard's process).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "close"),
        Binding("question_mark", "close", "close", key_display="?", show=False),
    ]

    def __init__(self, attached: bool = False) -> None:
        super().__init__()
        self.attached = attached

    def compose(self) -> ComposeResult:
        """The help text."""
        with VerticalScroll(id="help"):
            yield Static(_HELP.format(quit=_QUIT_ATTACHED if self.attached else _QUIT_REMOTE), id="help-text")

    def action_close(self) -> None:
        """Close the help."""
        self.dismiss(None)


class LivestackApp(App[None]):
    """The dashboard: header, counters, frame table, plots, stack preview and log, with control keys.

    Parameters
    ----------
    connect : str or None
        The daemon's event endpoint (PUB), e.g. ``tcp://127.0.0.1:5555``; None to receive no events
        from a socket (they are then fed with ``apply_events`` or posted as ``EventReceived``).
    control : str or None
        The daemon's control endpoint (REP), e.g. ``tcp://127.0.0.1:5556``; None disables the control keys.
    keys : str, Path or None
        A folder with ``client.key_secret`` and ``server.key`` for CURVE; None for plain sockets.
    stale_after : float
        Seconds without any message after which the connection shows as stale (the daemon's heartbeat
        comes every second).
    clock : callable, optional
        Seconds since the epoch, ``time.time`` by default; injected by tests.
    tz : tzinfo, optional
        The time zone of displayed times; the local one by default.
    control_timeout : float
        Seconds to wait for a control reply.
    attached : bool
        The daemon runs in this process (``livestack run --tui``, ``livestack demo``) and stops when the
        dashboard quits; the help says so.
    lightcurve_bin : int
        Photometry points averaged per point of the light curve (it also bins to fit its width).

    Attributes
    ----------
    heard : threading.Event
        Set when the first event has come from the daemon's socket: a program running its daemon in
        process can wait on it before producing events the dashboard must not miss (a subscriber only
        receives what is published after it has connected).

    Raises
    ------
    NetworkError
        When ``keys`` is given and its files are missing or unreadable.
    """

    TITLE = "livestack"
    ENABLE_COMMAND_PALETTE = False
    CSS_PATH = "app.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "pause", "pause/resume"),
        Binding("s", "snapshot", "snapshot"),
        Binding("r", "reset", "reset"),
        Binding("x", "remove", "remove frame", show=False),
        Binding("escape", "unselect", "hide the cursor", show=False),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(
        self,
        connect: str | None,
        control: str | None,
        keys: str | Path | None = None,
        stale_after: float = 3.0,
        *,
        clock: Callable[[], float] = time.time,
        tz: tzinfo | None = None,
        control_timeout: float = 2.0,
        attached: bool = False,
        lightcurve_bin: int = 1,
    ) -> None:
        super().__init__()
        if stale_after <= 0:
            raise LivestackError(f"stale_after must be positive, not {stale_after}")
        self.connect = connect
        self.control = control
        self.stale_after = stale_after
        self.control_timeout = control_timeout
        self.attached = attached
        self.lightcurve_bin = max(1, lightcurve_bin)
        self.heard = threading.Event()
        self._keys = None if keys is None else ClientKeys.load(keys)
        self._clock = clock
        self.model = Dashboard(tz)
        self.connection: ConnectionState = "connecting" if connect is not None else "offline"
        self.stale_since: float | None = None
        self._connection_detail: str | None = None
        # One control request at a time, in the order the keys were pressed.
        self._control_lock = threading.Lock()

    # Layout and start.

    def compose(self) -> ComposeResult:
        """The one screen of the dashboard."""
        yield Static(id="header")
        yield Static(id="counters")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                table: DataTable[str | Text] = DataTable(id="frames", cursor_type="none", zebra_stripes=True)
                table.border_title = "latest frames"
                yield table
                with Vertical(id="plots") as plots:
                    plots.border_title = "tonight"
                    yield Plot("FWHM", " px", ".2f", id="plot-fwhm")
                    yield Plot("stars", "", ".0f", id="plot-stars")
                    yield Plot("background", "", ".0f", id="plot-background")
                    yield Plot("latency", " s", ".1f", id="plot-latency")
            with Vertical(id="right"):
                preview = PreviewView(id="preview")
                preview.border_title = "stack"
                yield preview
                curve = LightCurveView(id="lightcurve")
                curve.border_title = "light curve"
                curve.display = False  # until the first photometry event
                yield curve
                log = RichLog(id="log", max_lines=500, min_width=20, wrap=True, markup=False, highlight=False)
                log.border_title = "log"
                yield log
        yield Footer()

    def on_mount(self) -> None:
        """Set up the table and start receiving."""
        table: DataTable[str | Text] = self.query_one("#frames", DataTable)
        for label in _COLUMNS:
            table.add_column(label, key=label)
        self._refresh_header()
        self._refresh_counters()
        if self.connect is not None:
            self._receive()

    def on_resize(self) -> None:
        """Tighten the layout on small terminals (80x24)."""
        compact = self.size.width < 100 or self.size.height < 32
        if compact != self.screen.has_class("-compact"):
            self.screen.set_class(compact, "-compact")
            self._refresh_frames()

    # Feeding events.

    def apply_events(self, batch: Iterable[events.Event]) -> None:
        """Show events at once, on the UI thread, as if they had been received.

        For tests, snapshots and an in-process daemon; a receiving thread posts ``EventReceived`` instead.

        Parameters
        ----------
        batch : iterable of Event
        """
        for event in batch:
            self._apply(event)

    def on_event_received(self, message: EventReceived) -> None:
        """Fold an event posted by the receiving worker into the dashboard."""
        if not self.is_running or self._dashboard_closed():
            return  # posted while the app was closing: its widgets are gone
        self._apply(message.event)

    def _dashboard_closed(self) -> bool:
        """True once the dashboard's widgets have been removed (the app is shutting down)."""
        try:
            self.screen_stack[0].query_one("#header", Static)
        except (NoMatches, IndexError):
            return True
        return False

    def on_connection_changed(self, message: ConnectionChanged) -> None:
        """Show the connection's new state."""
        self.connection = message.state
        self.stale_since = message.since if message.state == "stale" else None
        self._connection_detail = message.detail
        if message.state == "failed" and message.detail:
            self._write_log(LogLine(format_clock(self._clock(), self.model.tz), "error", message.detail))
        self._refresh_header()

    def on_noted(self, message: Noted) -> None:
        """Write a line from the hosting program to the log."""
        self._write_log(LogLine(format_clock(self._clock(), self.model.tz), message.level, message.text))

    def on_exit_requested(self, message: ExitRequested) -> None:
        """The attached daemon is stopping: leave, so that the program can finish the stop."""
        self.exit()

    def note(self, text: str, level: str = "info") -> None:
        """Add a line to the log; safe from any thread.

        Parameters
        ----------
        text : str
        level : str
            ``info``, ``warning`` or ``error``.
        """
        self.post_message(Noted(text, level))

    def on_control_replied(self, message: ControlReplied) -> None:
        """Report a control reply (or its absence) in the log and a notification."""
        now = format_clock(self._clock(), self.model.tz)
        reply = message.reply
        if reply is not None and reply.get("ok"):
            self._write_log(LogLine(now, "info", f"{message.cmd}: done"))
            self.notify(f"{message.cmd}: done", timeout=3)
            return
        if reply is None:
            reason = message.error or "no reply"
        else:
            reason = str(reply.get("error", "refused without a reason"))
        self._write_log(LogLine(now, "error", f"{message.cmd} failed: {reason}"))
        self.notify(reason, title=f"{message.cmd} failed", severity="error", timeout=6)

    # Keys.

    def action_pause(self) -> None:
        """Pause a running stack, resume a paused one."""
        state = self.model.state
        if state == "paused":
            self.send_command("resume")
        elif state in ("running", "waiting", "choosing", "starting"):
            self.send_command("pause")
        else:
            self.notify("the daemon's state is not known yet; wait for its status", severity="warning")

    def action_snapshot(self) -> None:
        """Ask for a snapshot now."""
        self.send_command("snapshot")

    def action_reset(self) -> None:
        """Ask, then reset the stack."""

        def answered(yes: bool | None) -> None:
            if yes:
                self.send_command("reset")

        self.push_screen(
            ConfirmScreen("Reset the stack? It starts again from the next frame; files on disk stay."),
            answered,
        )

    def action_remove(self) -> None:
        """First press: a cursor in the frame table; second: ask, then remove the frame under it."""
        table: DataTable[str | Text] = self.query_one("#frames", DataTable)
        rows = self.model.rows()
        if table.cursor_type == "none":
            if not rows:
                self.notify("no frame yet", severity="warning")
                return
            table.cursor_type = "row"
            table.can_focus = True
            table.focus()
            table.move_cursor(row=0)
            self.notify("choose a frame with the arrows, then x to remove it (escape: never mind)", timeout=5)
            return
        if not 0 <= table.cursor_row < len(rows):
            return
        row = rows[table.cursor_row]
        if row.status != "accepted":
            self.notify(f"{row.name} is not in the stack ({row.status})", severity="warning")
            return
        seq = row.key[0]

        def answered(yes: bool | None) -> None:
            if yes:
                self.send_command("remove", seq=seq)
                self.action_unselect()

        self.push_screen(ConfirmScreen(f"Remove {row.name} (frame {seq}) from the stack? "
                                       "Its file stays on disk; it can be put back."), answered)

    def action_unselect(self) -> None:
        """Hide the frame table's cursor."""
        table: DataTable[str | Text] = self.query_one("#frames", DataTable)
        if table.cursor_type != "none":
            table.cursor_type = "none"
            table.can_focus = False
            self.set_focus(None)

    def action_help(self) -> None:
        """Show the keys and what the panels mean."""
        self.push_screen(HelpScreen(self.attached))

    def send_command(self, cmd: str, **fields: Any) -> None:
        """Send a control command from a worker thread; the reply comes back as ``ControlReplied``.

        Parameters
        ----------
        cmd : str
            One of ``events.COMMANDS``.
        **fields
            The request's other fields (``seq`` for ``remove``).
        """
        if self.control is None:
            self.post_message(ControlReplied(cmd, None, "no control endpoint was given"))
            return
        self._request(cmd, fields)

    # Workers.

    @work(thread=True, exclusive=True, group="subscriber")
    def _receive(self) -> None:
        assert self.connect is not None
        worker = get_current_worker()
        try:
            subscriber = Subscriber(self.connect, self._keys, topics=_TOPICS)
        except LivestackError as exc:
            self.post_message(ConnectionChanged("failed", detail=str(exc)))
            return
        last: float | None = None
        stale = False
        try:
            while not worker.is_cancelled:
                event = subscriber.recv(_RECV_TIMEOUT_S)
                now = self._clock()
                if event is not None:
                    self.heard.set()
                    if last is None or stale:
                        self.post_message(ConnectionChanged("connected"))
                    last, stale = now, False
                    self.post_message(EventReceived(event))
                elif last is not None and not stale and now - last >= self.stale_after:
                    stale = True
                    self.post_message(ConnectionChanged("stale", since=last))
        finally:
            subscriber.close()

    @work(thread=True, group="control")
    def _request(self, cmd: str, fields: dict[str, Any]) -> None:
        assert self.control is not None
        # A fresh client per request keeps each socket in the one thread that uses it; requests are
        # rare (a key press), so connecting each time costs nothing noticeable.
        with self._control_lock:
            try:
                with ControlClient(self.control, self._keys, timeout=self.control_timeout) as client:
                    reply = client.request(cmd, **fields)
            except LivestackError as exc:
                self.post_message(ControlReplied(cmd, None, str(exc)))
                return
        self.post_message(ControlReplied(cmd, reply))

    # Drawing.

    def _apply(self, event: events.Event) -> None:
        for line in self.model.apply(event):
            self._write_log(line)
        if event.topic in ("status", "stack"):
            self._refresh_header()
            self._refresh_counters()
        if event.topic == "stack" and event.preview is not None:
            self.query_one("#preview", PreviewView).show(self.model.preview)
        if event.topic == "removal":
            self._refresh_frames()
        if event.topic == "frame":
            self._refresh_frames()
            self._refresh_counters()
            if event["verdict"] == "accepted":
                for name in SERIES:
                    self.query_one(f"#plot-{name}", Plot).plot(self.model.series[name])
        if event.topic == "photometry" and self.model.lightcurves:
            name, points = next(iter(self.model.lightcurves.items()))  # the first target
            curve = self.query_one("#lightcurve", LightCurveView)
            curve.display = True
            curve.border_title = f"light curve · {name} · {self.model.time_scale or ''}"
            if points:
                latest = points[-1]
                curve.border_subtitle = f"{latest[1]:+.4f} ± {latest[2]:.4f} mag"
            if self.lightcurve_bin > 1:
                curve.plot(bin_points(list(points), -(-len(points) // self.lightcurve_bin)))
            else:
                curve.plot(points)

    def _write_log(self, line: LogLine) -> None:
        styles = {"info": "", "warning": "yellow", "error": "bold red"}
        text = Text.assemble((f"{line.time} ", "dim"), (line.text, styles.get(line.level, "")))
        self.query_one("#log", RichLog).write(text)

    def _refresh_header(self) -> None:
        m = self.model
        state_style = {"running": "bold green", "paused": "bold yellow", "stopping": "bold red"}
        left = Text.assemble(
            ("livestack ", "bold"),
            (m.target, "bold cyan"),
            " · ",
            m.filter,
            " · ",
            m.method,
            " · ",
            (m.state_label, state_style.get(m.state or "", "")),
        )
        if m.status is not None and m.status["insecure"]:
            left.append(" · INSECURE", "bold red")
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(justify="right", no_wrap=True)
        grid.add_row(left, self._connection_text())
        self.query_one("#header", Static).update(grid)

    def _connection_text(self) -> Text:
        if self.connection == "connected":
            return Text("● connected", "green")
        if self.connection == "stale":
            since = "--:--:--" if self.stale_since is None else format_clock(self.stale_since, self.model.tz)
            return Text(f"● stale since {since}", "bold yellow")
        if self.connection == "failed":
            return Text("● no connection", "bold red")
        if self.connection == "offline":
            return Text("● offline", "dim")
        return Text(f"○ connecting to {self.connect}", "dim")

    def _refresh_counters(self) -> None:
        values = self.model.counters()
        grid = Table.grid(expand=True, padding=(0, 1))
        for _ in range(4):
            grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        cells = [Text.assemble((f"{label} ", "dim"), (value, "bold")) for label, value in values.items()]
        grid.add_row(*cells[:4])
        grid.add_row(*cells[4:])
        filters = self.model.filter_counts()
        if not filters:
            self.query_one("#counters", Static).update(grid)
            return
        line = Text.assemble(("filters ", "dim"))
        for i, (name, value) in enumerate(filters):
            line.append_text(Text.assemble(("  " if i else "", ""), (f"{name} ", "bold cyan"),
                                           (value, "bold")))
        line.no_wrap = True
        line.overflow = "ellipsis"
        self.query_one("#counters", Static).update(Group(grid, line))

    def _refresh_frames(self) -> None:
        table: DataTable[str | Text] = self.query_one("#frames", DataTable)
        # A frame chosen with the cursor stays chosen while new frames push it down.
        chosen = None
        if table.cursor_type != "none" and table.row_count:
            chosen = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        table.clear()
        name_width = _NAME_WIDTH_COMPACT if self.screen.has_class("-compact") else _NAME_WIDTH
        for row in self.model.rows():
            table.add_row(*_cells(row, name_width), key=f"{row.key[0]}:{row.key[1]}")
        if chosen is not None and chosen in table.rows:
            table.move_cursor(row=table.get_row_index(chosen))


def run_tui(connect: str, control: str, keys: str | Path | None = None, lightcurve_bin: int = 1) -> None:
    """Run the dashboard in this terminal until the user quits.

    Parameters
    ----------
    connect : str
        The daemon's event endpoint, e.g. ``tcp://127.0.0.1:5555``.
    control : str
        The daemon's control endpoint, e.g. ``tcp://127.0.0.1:5556``.
    keys : str, Path or None
        A folder with ``client.key_secret`` and ``server.key``; None for plain sockets.
    lightcurve_bin : int
        Photometry points averaged per point of the light curve.

    Raises
    ------
    NetworkError
        When the key folder is unusable (before the terminal is taken over).
    """
    run_app(LivestackApp(connect, control, keys, lightcurve_bin=lightcurve_bin))


def run_app(
    app: LivestackApp, stop_requested: Callable[[float], bool] | None = None, *, headless: bool = False
) -> None:
    """Run a dashboard in this terminal until the user quits, or until the attached daemon stops.

    While the dashboard owns the terminal, the root logger's handlers are set aside (a line written to the
    terminal would land in the middle of the screen) and put back afterwards; the daemon's warnings and
    errors reach the dashboard as ``log`` events anyway.

    Parameters
    ----------
    app : LivestackApp
    stop_requested : callable, optional
        For a daemon in this process, its ``wait``: called with a timeout in seconds, True once a stop has
        been requested (a signal, a ``shutdown`` request); the dashboard then closes so that the caller
        can stop the daemon and report.
    headless : bool
        Run without drawing to a terminal (for tests).
    """
    with _terminal_logging_set_aside():
        if stop_requested is None:
            app.run(headless=headless)
            return
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                if stop_requested(_RECV_TIMEOUT_S):
                    app.post_message(ExitRequested())
                    return

        watcher = threading.Thread(target=watch, name="livestack-tui-stop-watch", daemon=True)
        watcher.start()
        try:
            app.run(headless=headless)
        finally:
            done.set()
            watcher.join()


@contextmanager
def _terminal_logging_set_aside() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:]
    # A NullHandler rather than none: with no handler at all, logging's last resort writes to stderr.
    root.handlers[:] = [logging.NullHandler()]
    try:
        yield
    finally:
        root.handlers[:] = saved


#: The frame table: a verdict mark first (it must show even at 80 columns), the reason last (it is long).
_COLUMNS = ("", "time", "file", "stars", "FWHM", "shift", "rot", "rms", "verdict")
_NAME_WIDTH = 22
_NAME_WIDTH_COMPACT = 18
_VERDICT_STYLES = {"accepted": "green", "rejected": "bold red", "received": "dim", "removed": "yellow"}
_VERDICT_MARKS = {"accepted": "✓", "rejected": "✗", "received": "…", "removed": "○"}


def _cells(row: FrameRow, name_width: int) -> tuple[str | Text, ...]:
    style = _VERDICT_STYLES.get(row.status, "")
    return (
        Text(_VERDICT_MARKS.get(row.status, "?"), style),
        row.time,
        _shorten(row.name, name_width),
        Text(row.stars, justify="right"),
        Text(row.fwhm, justify="right"),
        Text(row.shift, justify="right"),
        Text(row.rotation, justify="right"),
        Text(row.rms, justify="right"),
        Text(row.verdict, style),
    )


def _shorten(text: str, width: int) -> str:
    # Keep both ends: capture programs put the target first and the sequence number last.
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return f"{text[:head]}…{text[-(width - 1 - head):]}"
