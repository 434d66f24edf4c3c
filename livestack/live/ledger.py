"""Ledger: what the journal says about a session's frames, for the FRAMES table, removals and ``restack``.

Public API:

- ``frame_rows(entries, removals, session, removing=()) -> tuple[FrameRow, ...]``: the ``FRAMES`` table of a
  session's stack from its journal.
- ``FrameLedger(journal)``: the same table for a live daemon, each journal entry made into a row once:
  ``rows(removals, session, removing=(), filter=None)``.
- ``select(entries, *, seqs=(), names=(), start=None, end=None) -> list[JournalEntry]``: the accepted frames
  a removal request names (by seq, by file name or glob, by a DATE-OBS range).
- ``parse_exclusions(items)``: ``restack --exclude`` items as seqs, seq ranges and names.
- ``date_obs(entry)``, ``exptime(entry)``, ``weight(entry)``: what a journal entry says (its facts), with the
  defaults of journals written before facts existed.

Only reading: nothing here writes the journal or touches a stack.
"""

from __future__ import annotations

import fnmatch
import re
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from livestack.errors import LivestackError
from livestack.live.state import Journal, JournalEntry, RemovalRecord, removed_seqs
from livestack.pipeline import filter_key
from livestack.stages.provenance import FrameRow

__all__ = ["FrameLedger", "date_obs", "exptime", "frame_rows", "parse_exclusions", "parse_time", "select",
           "weight"]


def frame_rows(entries: Sequence[JournalEntry], removals: Sequence[RemovalRecord], session: int,
               removing: Iterable[int] = (), excluded: Iterable[int] = (),
               excluded_reason: str = "excluded", filter: str | None = None) -> tuple[FrameRow, ...]:
    """The ``FRAMES`` rows of one session: every frame journaled for it, in seq order.

    Parameters
    ----------
    entries : sequence of JournalEntry
    removals : sequence of RemovalRecord
        In journal order; the session's decide which frames are ``removed``.
    session : int
    removing : iterable of int
        Seqs whose removal is journaled but not yet in the stack (a re-integration under way): ``removing``.
    excluded : iterable of int
        Seqs left out for another reason (``restack --exclude``): ``removed`` with ``excluded_reason``.
    excluded_reason : str
    filter : str, optional
        Only the frames of this filter's stack (``pipeline.filter_key``), and those whose filter is unknown
        (unreadable files).

    Returns
    -------
    tuple of FrameRow
    """
    rows = (_row(e) for e in entries if e.session == session)
    return _table(rows, removals, session, removing, excluded, excluded_reason, filter)


class FrameLedger:
    """The ``FRAMES`` rows of a live journal's sessions, each entry made into a row once (any thread).

    A daemon rewrites a stack's table at every snapshot; rebuilt from the whole journal each time, a night of
    thousands of frames costs the writer more at each snapshot, until it falls behind the frames. This keeps
    every session's rows as they were journaled (``stacked`` or ``rejected``), takes only the entries
    journaled since the last call, and applies the removals (few) when asked.

    Parameters
    ----------
    journal : Journal
        Appended to by the worker while ``rows`` reads it.
    """

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._lock = threading.Lock()
        self._taken = 0
        self._sessions: dict[int, list[tuple[str | None, FrameRow]]] = {}

    def rows(self, removals: Sequence[RemovalRecord], session: int, removing: Iterable[int] = (),
             filter: str | None = None) -> tuple[FrameRow, ...]:
        """As ``frame_rows(journal.entries(), removals, session, removing, filter=filter)``.

        Parameters
        ----------
        removals : sequence of RemovalRecord
        session : int
        removing : iterable of int
        filter : str, optional

        Returns
        -------
        tuple of FrameRow
        """
        with self._lock:
            fresh = self._journal.entries(self._taken)
            self._taken += len(fresh)
            for e in fresh:
                self._sessions.setdefault(e.session, []).append(_row(e))
            rows = tuple(self._sessions.get(session, ()))
        return _table(rows, removals, session, removing, (), "excluded", filter)


def _row(e: JournalEntry) -> tuple[str | None, FrameRow]:
    """A journal entry's row as journaled, with the key of its filter's stack (None: in every filter's table,
    a file that could not be read)."""
    facts = {**e.facts, "path": e.path, "reference": e.reference}
    for name in ("stars", "fwhm", "ellipticity", "background", "noise"):
        facts.setdefault(name, e.quality.get(name))
    if e.transform is not None:
        facts.setdefault("matrix", list(e.transform))
    for name in ("filter", "object", "masters"):
        # The same few names on thousands of rows: one string each.
        if isinstance(facts.get(name), str):
            facts[name] = sys.intern(facts[name])
    row = FrameRow.from_facts(e.seq, e.hash, e.verdict, e.reason, facts)
    unreadable = e.verdict != "accepted" and not e.facts.get("exptime") and e.facts.get("stars") is None
    return None if unreadable else filter_key(e.facts.get("filter")), row


def _table(rows: Iterable[tuple[str | None, FrameRow]], removals: Sequence[RemovalRecord], session: int,
           removing: Iterable[int], excluded: Iterable[int], excluded_reason: str,
           filter: str | None) -> tuple[FrameRow, ...]:
    """A session's rows as of now: of one filter's stack when given, with the removals' states and reasons."""
    removed = removed_seqs(removals, session)
    pending, left_out = set(removing), set(excluded)
    reasons: dict[int, str | None] = {}
    for record in removals:
        if record.session == session and record.action == "remove":
            for seq in record.targets:
                reasons[seq] = record.reason or "removed on request"
    wanted = None if filter is None else filter_key(filter)
    out = []
    for key, row in rows:
        if wanted is not None and key is not None and key != wanted:
            continue
        if row.verdict == "accepted":
            if row.seq in pending:
                row = replace(row, state="removing", reason=reasons.get(row.seq))
            elif row.seq in removed:
                row = replace(row, state="removed", reason=reasons.get(row.seq))
            elif row.seq in left_out:
                row = replace(row, state="removed", reason=excluded_reason)
        out.append(row)
    return tuple(out)


def select(entries: Sequence[JournalEntry], *, seqs: Iterable[int] = (), names: Iterable[str] = (),
           start: datetime | None = None, end: datetime | None = None) -> list[JournalEntry]:
    """The accepted frames a request names: by seq, by file name (or glob, or full path), or by DATE-OBS.

    Parameters
    ----------
    entries : sequence of JournalEntry
        Candidates (the session's accepted entries).
    seqs : iterable of int
    names : iterable of str
        A base name (``sim_0005.fits``), a glob on the base name (``sim_000[1-3].fits``) or a full path.
    start, end : datetime, optional
        A DATE-OBS range, both ends included (either may be open).

    Returns
    -------
    list of JournalEntry
        In seq order, each once.

    Raises
    ------
    LivestackError
        When a seq or a name matches no accepted frame, or a time range matches none, naming it.
    """
    chosen: dict[int, JournalEntry] = {}
    by_seq = {e.seq: e for e in entries}
    for seq in seqs:
        if seq not in by_seq:
            raise LivestackError(f"no stacked frame has the number {seq}")
        chosen[seq] = by_seq[seq]
    for name in names:
        hits = [e for e in entries if e.path == name or fnmatch.fnmatchcase(Path(e.path).name, name)]
        if not hits:
            raise LivestackError(f"no stacked frame is called {name!r}")
        chosen.update((e.seq, e) for e in hits)
    if start is not None or end is not None:
        hits = []
        for e in entries:
            t = date_obs(e)
            if t is not None and (start is None or t >= start) and (end is None or t <= end):
                hits.append(e)
        if not hits:
            raise LivestackError(f"no stacked frame began between {_iso(start)} and {_iso(end)}")
        chosen.update((e.seq, e) for e in hits)
    return [chosen[seq] for seq in sorted(chosen)]


def parse_exclusions(items: Iterable[str]) -> tuple[set[int], list[str]]:
    """``restack --exclude`` items: seq numbers (``12``), ranges (``12-15``) and file names or globs.

    Parameters
    ----------
    items : iterable of str

    Returns
    -------
    seqs : set of int
    names : list of str
    """
    seqs: set[int] = set()
    names: list[str] = []
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            whole = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if whole:
                first = int(whole.group(1))
                last = int(whole.group(2) or first)
                seqs.update(range(min(first, last), max(first, last) + 1))
            else:
                names.append(part)
    return seqs, names


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without an offset it is taken as UTC.

    Raises
    ------
    LivestackError
        When the text is not an ISO 8601 time.
    """
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise LivestackError(f"{text!r} is not an ISO 8601 time like 2026-11-30T21:05:00") from exc
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def date_obs(entry: JournalEntry) -> datetime | None:
    """The frame's DATE-OBS from its journaled facts (None when unknown)."""
    text = entry.facts.get("date_obs")
    if not isinstance(text, str):
        return None
    try:
        return parse_time(text)
    except LivestackError:
        return None


def exptime(entry: JournalEntry) -> float | None:
    """The frame's exposure from its journaled facts (None when unknown)."""
    value = entry.facts.get("exptime")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def weight(entry: JournalEntry) -> float:
    """The frame's weight in the stack (1 when the journal does not say)."""
    value = entry.facts.get("weight")
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return 1.0


def _iso(moment: datetime | None) -> str:
    return "the beginning" if moment is None else moment.isoformat()
