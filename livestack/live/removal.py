"""Removal: taking frames back out of the live stack after the fact, and putting them back.

Public API:

- ``COMMANDS``: the control requests this module answers (``remove``, ``reinclude``, ``undo_last``).
- ``Removals(config, journal, stacks, emit, post, changed)``: used by the worker thread (``handle``), by
  recovery (``resume``) and by the snapshot writer (``rows``); owns one background thread at a time, the
  re-integration.

How a removal goes (worker thread, in ``handle``):

1. The request names frames of the current session: by journal number (``seq``), by file name or glob
   (``name``), by a DATE-OBS range (``from``, ``to``); ``undo_last`` names the last frame stacked.
2. Each named file is hashed again. For a mean, a file that changed or vanished refuses the whole request
   with the reason (its contribution cannot be taken out exactly): nothing is journaled, nothing changes.
3. A ``RemovalRecord`` is journaled (fsync) before the stack changes: from then on the removal happens,
   crash or not.
4. Mean (and weighted mean): each frame is read again, warped with its journaled transform and subtracted
   (``Stacker.subtract_known``), on the worker thread, under the stack lock; about one frame's stacking time
   each. A ``reinclude`` adds it back the same way.
5. Kappa-sigma and median have no inverse: a background thread (``livestack-reintegrate``) builds a new
   stack on the same reference from the frames that remain (each checked against its hash, warped with its
   journaled transform, in journal order), catching up with the frames that keep arriving, while the worker
   goes on stacking new frames into the old stack, which keeps being served. When it has caught up it asks
   the worker to switch: the worker adds the frames it stacked since, then swaps the stacks under the lock,
   in one step. A later removal or a new session cancels a re-integration under way (the later one covers
   both).
6. The stack records the id of the last removal it reflects (``Stacker.removals``, kept in checkpoints). On
   restart (``resume``), the removals the checkpoint does not reflect are applied again, so one interrupted
   by a crash finishes.

Events: ``removal`` with ``state`` ``started`` (journaled), ``done`` or ``failed``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from livestack import events
from livestack.config import Config
from livestack.errors import FrameError, LivestackError, StateError
from livestack.live import ledger
from livestack.live.state import Journal, JournalEntry, RemovalRecord, content_hash, removed_seqs
from livestack.pipeline import Stacker
from livestack.stages.provenance import FrameRow

__all__ = ["COMMANDS", "Removals", "StackOwner"]

log = logging.getLogger("livestack.live.removal")

#: Control requests answered here.
COMMANDS: tuple[str, ...] = ("remove", "reinclude", "undo_last")

#: The internal command a finished re-integration sends the worker.
SWITCH = "reintegrated"


class StackOwner(Protocol):
    """The daemon's current stack: changed by the worker only, read by others under ``lock``."""

    lock: threading.Lock

    @property
    def stacker(self) -> Stacker: ...

    @property
    def session(self) -> int: ...

    def swap(self, stacker: Stacker, session: int) -> Stacker: ...


@dataclass
class _Job:
    """One re-integration: a new stack of the frames that remain, built on the background thread."""

    record: RemovalRecord
    session: int
    fork: Stacker
    excluded: frozenset[int]
    cancel: threading.Event = field(default_factory=threading.Event)
    upto: int = 0  # every kept frame with a seq up to this one is in ``fork``
    problems: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None


class Removals:
    """Removal requests, their journal records and the re-integrations they start.

    Parameters
    ----------
    config : Config
    journal : Journal
        The daemon's journal (open); removal records are appended by the worker thread.
    stacks : StackOwner
        The current stack and its lock.
    emit : callable
        Queues an event for publication (any thread).
    post : callable
        ``post(name, args)`` queues a command for the worker thread (the re-integration's switch).
    changed : callable
        Called on the worker thread after the stack changed (with the replaced stacker, or None): publish
        it, checkpoint it, discard the replaced one after that checkpoint.
    """

    def __init__(self, config: Config, journal: Journal, stacks: StackOwner,
                 emit: Callable[[events.Event], None], post: Callable[[str, dict[str, Any]], None],
                 changed: Callable[[Stacker | None], None]) -> None:
        self.config = config
        self.journal = journal
        self.stacks = stacks
        self._emit = emit
        self._post = post
        self._changed = changed
        self._job: _Job | None = None  # the worker's: the re-integration under way, if any
        self._removing: frozenset[int] = frozenset()  # read by the writer for the FRAMES table
        self._ledger = ledger.FrameLedger(journal)  # the FRAMES rows, made once per frame

    # -- the worker's side ----------------------------------------------------------------------------

    def handle(self, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Answer ``remove``, ``reinclude``, ``undo_last`` and the internal switch (worker thread).

        Returns
        -------
        dict
            The reply's result: ``id``, ``action``, ``seqs``, ``names``, ``state`` (``done`` or
            ``re-integrating``), ``frames``.

        Raises
        ------
        LivestackError
            When the request names nothing that can be done, or a file cannot be taken out exactly; the
            stack and the journal are then unchanged.
        """
        if name == SWITCH:
            self._switch(args["job"])
            return {}
        session = self.stacks.session
        entries = [e for e in self.journal.entries() if e.session == session and e.verdict == "accepted"]
        removed = removed_seqs(self.journal.removals(), session)
        if name == "undo_last":
            candidates = [e for e in entries if e.seq not in removed]
            if not candidates:
                raise LivestackError("no frame is in the stack: nothing to undo")
            action, targets = "remove", [candidates[-1]]
        elif name in ("remove", "reinclude"):
            action = name
            pool = ([e for e in entries if e.seq not in removed] if action == "remove"
                    else [e for e in entries if e.seq in removed])
            targets = _select(pool, args, "stacked" if action == "remove" else "removed")
        else:
            raise LivestackError(f"unknown command {name}")
        exact = self._exact()
        problems = self._check_files(targets, exact)
        reason = args.get("reason") if isinstance(args.get("reason"), str) else None
        record = RemovalRecord(id=self.journal.next_removal, at=self.journal.next_seq - 1, session=session,
                               action=action, targets=tuple(e.seq for e in targets),
                               reason=reason or ("undo last" if name == "undo_last" else None))
        self.journal.append_removal(record)
        self._event(record, "started", "subtracted" if exact else "re-integrated", problems=problems)
        log.info("%s of %s journaled (%s)", action, ", ".join(Path(e.path).name for e in targets),
                 "subtracting" if exact else "re-integrating in the background")
        if exact and self._apply_exactly(record):
            state = "done"
        else:
            self._start(record)
            state = "re-integrating"
        return {"id": record.id, "action": action, "seqs": list(record.targets),
                "names": [Path(e.path).name for e in targets], "state": state,
                "frames": self.stacks.stacker.count, "problems": problems}

    def session_changed(self) -> None:
        """A new session started (worker): a re-integration of the old one is no longer wanted."""
        self._cancel()

    def close(self) -> None:
        """Stop a re-integration under way and wait for its thread (the daemon is stopping)."""
        self._cancel(wait=True)

    # -- recovery -------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Apply the journaled removals the recovered stack does not reflect (starting thread).

        The recovered stack reflects removals up to ``Stacker.removals``; a later one was interrupted by the
        stop. A mean applies the difference exactly; kappa-sigma and median re-integrate in the background
        once the worker runs.
        """
        session = self.stacks.session
        records = [r for r in self.journal.removals() if r.session == session]
        applied = self.stacks.stacker.removals
        pending = [r for r in records if r.id > applied]
        if not pending:
            return
        last = pending[-1]
        before = removed_seqs([r for r in records if r.id <= applied], session)
        after = removed_seqs(records, session)
        log.info("finishing %d removal(s) interrupted by the stop (up to removal %d)", len(pending), last.id)
        if self._exact() and self._apply_difference(before, after, last):
            self._event(last, "done", "subtracted")
            return
        self._start(last)

    # -- any thread -----------------------------------------------------------------------------------

    def rows(self, session: int, filter: str | None = None) -> tuple[FrameRow, ...]:
        """The ``FRAMES`` rows of a session's stack (of one filter's, when given), from the journal.

        Frames whose removal is under way (a re-integration) are ``removing``.
        """
        return self._ledger.rows(self.journal.removals(), session, removing=self._removing, filter=filter)

    @property
    def busy(self) -> bool:
        """A re-integration is under way."""
        return bool(self._removing)

    # -- private --------------------------------------------------------------------------------------

    def _exact(self) -> bool:
        return self.stacks.stacker.method == "mean"

    def _check_files(self, targets: Sequence[JournalEntry], exact: bool) -> list[str]:
        """Hash each file again; for a mean a changed or vanished one refuses the request."""
        problems = []
        for e in targets:
            problem = _changed(e)
            if problem is None:
                continue
            if exact:
                raise LivestackError(f"{Path(e.path).name} cannot be taken out of the mean exactly: "
                                     f"{problem}; nothing was removed")
            problems.append(f"{Path(e.path).name}: {problem} (re-integration does not need it)")
        return problems

    def _apply_exactly(self, record: RemovalRecord) -> bool:
        """Subtract (or add back) the record's frames; False when a file failed, to re-integrate instead."""
        by_seq = {e.seq: e for e in self.journal.entries()}
        done = []
        try:
            for seq in record.targets:
                e = by_seq[seq]
                assert e.transform is not None
                with self.stacks.lock:
                    if record.action == "remove":
                        self.stacks.stacker.subtract_known(e.path, e.transform, ledger.weight(e), e.facts)
                    else:
                        self.stacks.stacker.add_known(e.path, e.transform, ledger.weight(e), e.facts)
                done.append(seq)
        except (OSError, FrameError, StateError) as exc:
            log.error("removal %d: %s could not be %s (%s); re-integrating instead", record.id,
                      by_seq[seq].path, "subtracted" if record.action == "remove" else "added back", exc)
            return False
        self._finish(record, None)
        self._event(record, "done", "subtracted")
        return True

    def _apply_difference(self, before: frozenset[int], after: frozenset[int], last: RemovalRecord) -> bool:
        """Recovery of a mean: subtract what is newly removed, add back what is newly re-included."""
        by_seq = {e.seq: e for e in self.journal.entries()}
        try:
            for seq in sorted(after - before):
                e = by_seq[seq]
                assert e.transform is not None
                if _changed(e) is not None:
                    raise FrameError(f"{e.path} changed or vanished")
                self.stacks.stacker.subtract_known(e.path, e.transform, ledger.weight(e), e.facts)
            for seq in sorted(before - after):
                e = by_seq[seq]
                assert e.transform is not None
                if _changed(e) is not None:
                    raise FrameError(f"{e.path} changed or vanished")
                self.stacks.stacker.add_known(e.path, e.transform, ledger.weight(e), e.facts)
        except (OSError, FrameError, StateError, ValueError) as exc:
            log.error("finishing removal %d exactly failed (%s); re-integrating instead", last.id, exc)
            return False
        self._finish(last, None)
        return True

    def _finish(self, record: RemovalRecord, old: Stacker | None) -> None:
        """The stack now reflects ``record``: mark it, count exposure and time span again, publish."""
        stacker = self.stacks.stacker
        session = self.stacks.session
        removed = removed_seqs(self.journal.removals(), session)
        kept = [e for e in self.journal.entries()
                if e.session == session and e.verdict == "accepted" and e.seq not in removed]
        with self.stacks.lock:
            stacker.removals = record.id
            if all("exptime" in e.facts for e in kept):
                stacker.recount((ledger.date_obs(e), ledger.exptime(e), e.facts.get("filter")) for e in kept)
        self._changed(old)

    def _start(self, record: RemovalRecord) -> None:
        """Begin re-integrating the session without the frames removed up to ``record`` (worker)."""
        self._cancel()
        session = self.stacks.session
        excluded = removed_seqs([r for r in self.journal.removals() if r.id <= record.id], session)
        with self.stacks.lock:
            fork = self.stacks.stacker.fork()
        job = _Job(record=record, session=session, fork=fork, excluded=excluded)
        job.thread = threading.Thread(target=self._reintegrate, args=(job,), name="livestack-reintegrate",
                                      daemon=True)
        self._job = job
        self._removing = frozenset(removed_seqs(self.journal.removals(), session))
        job.thread.start()

    def _cancel(self, wait: bool = False) -> None:
        job, self._job = self._job, None
        self._removing = frozenset()
        if job is None:
            return
        job.cancel.set()
        if wait and job.thread is not None:
            job.thread.join()

    def _reintegrate(self, job: _Job) -> None:
        """Background thread: stack the remaining frames into ``job.fork``, catch up, then ask to switch."""
        try:
            while not job.cancel.is_set():
                entries = self.journal.entries()
                horizon = entries[-1].seq if entries else 0
                todo = [e for e in entries if job.upto < e.seq <= horizon and e.session == job.session
                        and e.verdict == "accepted" and e.seq not in job.excluded]
                for e in todo:
                    if job.cancel.is_set():
                        break
                    self._add(job, e)
                job.upto = horizon
                if not todo:
                    break
        except (OSError, LivestackError, ValueError) as exc:
            log.error("re-integration for removal %d failed: %s", job.record.id, exc, exc_info=True)
            job.cancel.set()
            self._event(job.record, "failed", "re-integrated", problems=[str(exc)])
        if job.cancel.is_set():
            job.fork.discard()
            return
        self._post(SWITCH, {"job": job})

    def _add(self, job: _Job, e: JournalEntry) -> None:
        problem = _changed(e)
        if problem is None:
            assert e.transform is not None
            try:
                job.fork.add_known(e.path, e.transform, ledger.weight(e), e.facts)
                return
            except (OSError, FrameError) as exc:
                problem = str(exc)
        message = f"{Path(e.path).name}: {problem}; the re-integrated stack lacks it"
        log.error("re-integration for removal %d: %s", job.record.id, message)
        job.problems.append(message)

    def _switch(self, job: _Job) -> None:
        """Worker: add the frames stacked since the job last looked, then make its stack the current one."""
        if job is not self._job or job.cancel.is_set() or job.session != self.stacks.session:
            job.fork.discard()
            return
        for e in self.journal.entries():
            if (e.seq > job.upto and e.session == job.session and e.verdict == "accepted"
                    and e.seq not in job.excluded):
                self._add(job, e)
        self._job = None
        self._removing = frozenset()
        old = self.stacks.swap(job.fork, job.session)
        self._finish(job.record, old)
        self._event(job.record, "done", "re-integrated", problems=job.problems)
        log.info("re-integration for removal %d done: %d frames", job.record.id, job.fork.count)

    def _event(self, record: RemovalRecord, state: str, how: str, problems: Sequence[str] = ()) -> None:
        by_seq = {e.seq: e for e in self.journal.entries()}
        names = [Path(by_seq[s].path).name for s in record.targets if s in by_seq]
        with contextlib.suppress(events.SchemaError):
            self._emit(events.make_event(
                "removal", id=record.id, action=record.action, seqs=list(record.targets), names=names,
                state=state, how=how, frames=self.stacks.stacker.count, reason=record.reason,
                session=record.session, problems=list(problems)))


def _select(pool: Sequence[JournalEntry], args: Mapping[str, Any], what: str) -> list[JournalEntry]:
    """The frames a ``remove`` or ``reinclude`` request names (see ``events.decode_request``)."""
    seqs = _as_list(args.get("seq"))
    names = _as_list(args.get("name"))
    start = ledger.parse_time(args["from"]) if args.get("from") else None
    end = ledger.parse_time(args["to"]) if args.get("to") else None
    if not seqs and not names and start is None and end is None:
        raise LivestackError("name the frames: 'seq' (journal numbers), 'name' (file names) or 'from'/'to'")
    try:
        return ledger.select(pool, seqs=[int(s) for s in seqs], names=[str(n) for n in names], start=start,
                             end=end)
    except LivestackError as exc:
        raise LivestackError(str(exc).replace("stacked frame", f"{what} frame")) from exc


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _changed(e: JournalEntry) -> str | None:
    """Why the file is no longer the frame that was stacked, or None when it still is."""
    try:
        digest = content_hash(e.path, like=e.hash)
    except FileNotFoundError:
        return "the file is gone"
    except OSError as exc:
        return f"the file cannot be read ({exc.strerror or exc})"
    if digest != e.hash:
        return "the file changed since it was stacked (its content hash differs)"
    return None
