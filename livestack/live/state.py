"""State: the daemon's memory across restarts and crashes, so that every accepted frame is stacked once.

Public API:

- ``content_hash(path, like=None) -> str``: XXH3-128 of a file's bytes; the identity of a frame, whatever
  its name (``like``: hash as an older record's digest was made, BLAKE2b, to compare with it).
- ``is_legacy_hash(digest) -> bool``: True for a digest from before XXH3 (BLAKE2b-128).
- ``JournalEntry``: frozen record of one frame's fate (one JSON line of the journal).
- ``Journal(path)``: the append-only journal; ``append``, ``entries``, ``seen``, ``next_seq``, ``close``;
  ``append_removal``, ``removals``, ``next_removal``.
- ``RemovalRecord``: frozen record of frames taken out of (or put back into) a stack after the fact.
- ``read_journal(path)``: the entries and removals of a journal, read-only and without its lock.
- ``removed_seqs(removals, session)``: the frames a session's removals leave out, in effect.
- ``Checkpoint``: frozen description of one complete checkpoint on disk.
- ``CheckpointStore(directory)``: ``save``, ``latest``, ``load``; keeps the newest ``CHECKPOINTS_KEPT``.
- ``Recovery`` and ``recover(journal, store)``: what to load and what to re-process after any stop.

The state folder holds two things::

    journal.jsonl                     one JSON line per frame, fsync'd before the frame counts as done,
                                      and one per removal (``"kind": "removal"``), fsync'd before it starts
    checkpoints/ckpt-<seq>.npz        the accumulators' arrays (uncompressed .npz, readable by np.load)
    checkpoints/ckpt-<seq>.json       the manifest, written last and atomically: without it there is
                                      no checkpoint, whatever .npz may lie beside it

How the daemon uses it (the protocol that gives exactly-once stacking):

1. Per frame: hash the file; if ``journal.seen(hash)`` the content was already judged (renamed, touched,
   remounted): skip it. Otherwise process it, ``journal.append`` its entry (durable on return), then add it
   to the accumulator.
2. Between frames, every so often and at shutdown: ``store.save(journal.next_seq - 1, session,
   accumulator.state(), meta)``. The checkpoint's ``seq`` is the last journal seq whose frame is in it.
3. After a reset (a new session), save a checkpoint of the empty accumulators at once, so that the
   journal's older session is not replayed into the new stack.

Recovery, after a clean stop, a crash or ``kill -9`` (``recover``):

- The base is the newest checkpoint with a valid manifest whose array file matches its size and hash
  (a torn or corrupt newest one falls back to the previous). It is dropped when the journal shows a
  newer session after it: that stack was reset.
- The state after recovery is *base + replay*, where replay is every accepted journal entry of the current
  session with ``seq > base.seq``, in seq order, re-read from its file and warped with its journaled
  transform (no re-alignment needed). Rejected entries after the base are skipped: they are journaled.
- A frame that the crash caught before its journal line was complete is not in the journal (a torn last
  line is cut away on open), hence not in any checkpoint; the watcher's initial scan finds its file again
  and, its hash being unknown, processes it as new.
- So each accepted frame is counted once: in the checkpoint if its seq is at or below the base's, in the
  replay otherwise, and never again afterwards because its hash is journaled.

Removals (``RemovalRecord``): a request to take frames out of the stack (or put them back) is journaled
before the stack changes. Records are numbered ``id`` 1, 2, ... on their own (frame seqs keep no gaps) and
say after which frame seq (``at``) they were made. A checkpoint's meta says up to which removal id its stack
includes (``"removals"``); recovery re-applies the later ones, so a removal a crash interrupted finishes on
restart.

Durability relies on ``os.fsync`` of files and of the folder (POSIX). One process at a time owns a journal:
it is locked with ``fcntl.flock`` while open, and the lock dies with the process, ``kill -9`` included.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
import xxhash

from livestack.atomic import TMP_SUFFIX, atomic_file, atomic_write, fsync_dir
from livestack.errors import StateError

__all__ = [
    "CHECKPOINTS_KEPT",
    "HASH_BLOCK",
    "HASH_PREFIX",
    "STATE_FILE_MODE",
    "Checkpoint",
    "CheckpointStore",
    "Journal",
    "JournalEntry",
    "Recovery",
    "RemovalRecord",
    "Verdict",
    "content_hash",
    "is_legacy_hash",
    "read_journal",
    "recover",
    "removed_seqs",
]

#: Bytes read per step by ``content_hash``: large enough that Python overhead vanishes, small enough to
#: stay in cache. 1 MiB and 4 MiB measure the same.
HASH_BLOCK = 1 << 20

#: Mode bits of the journal and checkpoints: they name the observer's files and hold the stack, for the
#: daemon's user only.
STATE_FILE_MODE = 0o600
#: Prefix of content digests made with XXH3-128. Digests without it are BLAKE2b-128 (32 hex digits), as
#: journals and checkpoint manifests written by earlier versions hold them.
HASH_PREFIX = "xxh3:"

#: Checkpoints kept on disk: the newest and one to fall back to if the newest is found damaged.
CHECKPOINTS_KEPT = 2

Verdict = Literal["accepted", "rejected"]

#: Version of the journal's line format and of the checkpoint manifest; bumped on incompatible changes.
_FORMAT = 1
#: 128 bits: collisions between a night's few thousand frames are out of reach (about 2**-100).
_DIGEST_BYTES = 16
_VERDICTS: tuple[str, ...] = ("accepted", "rejected")
_MANIFEST = re.compile(r"^ckpt-(\d+)\.json$")
_ARRAYS = re.compile(r"^ckpt-(\d+)\.npz$")

_log = logging.getLogger(__name__)


def content_hash(path: str | os.PathLike[str], like: str | None = None) -> str:
    """The identity of a file's content: XXH3-128 of all its bytes, as ``"xxh3:"`` and 32 hex digits.

    Every byte is hashed (no sampling), streamed ``HASH_BLOCK`` bytes at a time into one reused buffer.
    XXH3 is not cryptographic, which frames do not need: its 128 bits keep chance collisions between a
    night's frames out of reach, and it runs at memory speed (a 50 MB frame in ~5 ms from the page cache,
    where BLAKE2b took ~60 ms on the frame path). The same bytes under another name, or after ``touch``,
    give the same hash.

    Parameters
    ----------
    path : str or os.PathLike
        The file to hash.
    like : str, optional
        A digest read from a journal or a manifest: hash the file the way that digest was made, so the two
        compare (BLAKE2b-128 for a digest written before XXH3; see ``is_legacy_hash``).

    Returns
    -------
    str
        ``"xxh3:"`` and 32 lower-case hex digits; 32 hex digits alone when ``like`` is a legacy digest.

    Raises
    ------
    OSError
        The file cannot be opened or read (the caller knows whether that makes a bad frame).
    """
    legacy = like is not None and is_legacy_hash(like)
    digest: hashlib.blake2b | xxhash.xxh3_128 = (hashlib.blake2b(digest_size=_DIGEST_BYTES) if legacy
                                                 else xxhash.xxh3_128())
    buffer = bytearray(HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest() if legacy else HASH_PREFIX + digest.hexdigest()


def is_legacy_hash(digest: str) -> bool:
    """True for a content digest made before XXH3 (BLAKE2b-128: 32 hex digits without a prefix).

    Parameters
    ----------
    digest : str
        A ``content_hash`` as recorded in a journal or a checkpoint manifest.

    Returns
    -------
    bool
    """
    return not digest.startswith(HASH_PREFIX)


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """What happened to one frame: one line of the journal.

    Attributes
    ----------
    seq : int
        Position in the journal, from 1, strictly increasing across restarts.
    path : str
        The file as the daemon saw it.
    size : int
        Its size in bytes.
    mtime_ns : int
        Its modification time (``os.stat().st_mtime_ns``).
    hash : str
        ``content_hash`` of the file: the frame's identity.
    verdict : {"accepted", "rejected"}
    reason : str or None
        Why it was rejected, in words a user can read.
    session : int
        The stack it belongs to; a reset starts a new session. Never decreases along the journal.
    transform : sequence of 6 float or None
        The affine transform to the reference, row-major ``[a, b, tx, c, d, ty]``; stored as a tuple.
        Replaying a frame warps it with this transform instead of aligning it again.
    quality : mapping of str to float, int or None
        Measures of the frame (stars, fwhm, ...); copied into a dict.
    timings : mapping of str to float
        Stage name to seconds; copied into a dict.
    latency : float or None
        Seconds from the file being complete to the frame being stacked.
    time : str
        When the entry was made, ISO 8601 with a UTC offset (now, by default).
    reference : bool
        True for the frame that is its session's alignment reference.
    facts : mapping of str to JSON values
        What the ``FRAMES`` table records of the frame beyond the above (``pipeline.frame_facts``: DATE-OBS,
        EXPTIME, FILTER, calibration, fit figures, weight ...); empty in journals written before it existed.
    """

    seq: int
    path: str
    size: int
    mtime_ns: int
    hash: str
    verdict: Verdict
    reason: str | None = None
    session: int = 0
    transform: Sequence[float] | None = None
    quality: Mapping[str, float | int | None] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    latency: float | None = None
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    reference: bool = False
    facts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int("seq", self.seq, minimum=1)
        _check_int("size", self.size, minimum=0)
        _check_int("mtime_ns", self.mtime_ns, minimum=None)
        _check_int("session", self.session, minimum=0)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("path must be a non-empty string.")
        if not isinstance(self.hash, str) or not self.hash:
            raise ValueError("hash must be a non-empty string.")
        if self.verdict not in _VERDICTS:
            raise ValueError(f"verdict must be 'accepted' or 'rejected', not {self.verdict!r}.")
        if self.reason is not None and not isinstance(self.reason, str):
            raise ValueError("reason must be a string or None.")
        if not isinstance(self.reference, bool):
            raise ValueError("reference must be True or False.")
        if self.transform is not None:
            transform = tuple(float(x) for x in self.transform)
            if len(transform) != 6 or not all(math.isfinite(x) for x in transform):
                raise ValueError("transform must be 6 finite numbers [a, b, tx, c, d, ty] or None.")
            object.__setattr__(self, "transform", transform)
        object.__setattr__(self, "quality", _number_dict("quality", self.quality, allow_none=True))
        object.__setattr__(self, "timings", _number_dict("timings", self.timings, allow_none=False))
        if self.latency is not None:
            object.__setattr__(self, "latency", _finite("latency", self.latency))
        try:
            stamp = datetime.fromisoformat(self.time)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"time must be an ISO 8601 string, not {self.time!r}.") from exc
        if stamp.utcoffset() != timedelta(0):
            raise ValueError(f"time must be in UTC with an explicit offset, not {self.time!r}.")
        if not isinstance(self.facts, Mapping):
            raise ValueError("facts must be a mapping of names to JSON values.")
        try:
            facts = json.loads(json.dumps(dict(self.facts), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"facts must be JSON values without NaN: {exc}") from exc
        object.__setattr__(self, "facts", facts)

    def to_json(self) -> str:
        """The entry as one line of compact JSON (no newline).

        Returns
        -------
        str
        """
        record = {
            "v": _FORMAT,
            "seq": self.seq,
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "hash": self.hash,
            "verdict": self.verdict,
            "reason": self.reason,
            "session": self.session,
            "transform": None if self.transform is None else list(self.transform),
            "quality": dict(self.quality),
            "timings": dict(self.timings),
            "latency": self.latency,
            "time": self.time,
            "reference": self.reference,
        }
        if self.facts:
            record["facts"] = dict(self.facts)
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> JournalEntry:
        """Parse one journal line written by ``to_json``.

        Parameters
        ----------
        line : str
            One JSON object, with or without its trailing newline.

        Returns
        -------
        JournalEntry

        Raises
        ------
        StateError
            The line is not a journal entry of a known version.
        """
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StateError(f"The line is not JSON: {exc.msg}.") from exc
        if not isinstance(record, dict):
            raise StateError("The line is not a JSON object.")
        if record.get("v") != _FORMAT:
            raise StateError(f"The line has version {record.get('v')!r}; this livestack reads {_FORMAT}.")
        names = {"seq", "path", "size", "mtime_ns", "hash", "verdict", "reason", "session", "transform",
                 "quality", "timings", "latency", "time", "reference"}
        missing = sorted(names - record.keys())
        if missing:
            raise StateError(f"The line lacks {', '.join(missing)}.")
        try:
            return cls(**{name: record[name] for name in names}, facts=record.get("facts") or {})
        except (TypeError, ValueError) as exc:
            raise StateError(f"The line is not a valid journal entry: {exc}") from exc


REMOVAL_ACTIONS: tuple[str, ...] = ("remove", "reinclude")


@dataclass(frozen=True, kw_only=True)
class RemovalRecord:
    """Frames taken out of a session's stack, or put back, after they were stacked: one journal line.

    Attributes
    ----------
    id : int
        1, 2, ... along the journal (removals are numbered apart from frames, whose seqs stay gapless).
    at : int
        The last frame seq journaled before this record: the removal applies to the stack as of that frame.
    session : int
        The stack it changes.
    action : {"remove", "reinclude"}
    targets : tuple of int
        The frames' seqs.
    reason : str or None
        What the request said, for the table and the events.
    time : str
        ISO 8601 UTC.
    """

    id: int
    at: int
    session: int
    action: str
    targets: tuple[int, ...]
    reason: str | None = None
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))

    def __post_init__(self) -> None:
        _check_int("id", self.id, minimum=1)
        _check_int("at", self.at, minimum=0)
        _check_int("session", self.session, minimum=0)
        if self.action not in REMOVAL_ACTIONS:
            raise ValueError(f"action must be 'remove' or 'reinclude', not {self.action!r}.")
        targets = tuple(self.targets)
        for seq in targets:
            _check_int("target", seq, minimum=1)
        if not targets:
            raise ValueError("a removal names at least one frame.")
        object.__setattr__(self, "targets", targets)
        if self.reason is not None and not isinstance(self.reason, str):
            raise ValueError("reason must be a string or None.")

    def to_json(self) -> str:
        """The record as one line of compact JSON (no newline)."""
        record = {"v": _FORMAT, "kind": "removal", "id": self.id, "at": self.at, "session": self.session,
                  "action": self.action, "targets": list(self.targets), "reason": self.reason,
                  "time": self.time}
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RemovalRecord:
        """From a decoded journal line whose ``kind`` is ``removal``.

        Raises
        ------
        StateError
            The record lacks a field or holds an invalid value.
        """
        try:
            return cls(id=record["id"], at=record["at"], session=record["session"], action=record["action"],
                       targets=tuple(record["targets"]), reason=record.get("reason"), time=record["time"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"The line is not a valid removal record: {exc}") from exc


def removed_seqs(removals: Sequence[RemovalRecord], session: int | None = None) -> frozenset[int]:
    """The frames that a journal's removals leave out of the stack, all records applied in order.

    Parameters
    ----------
    removals : sequence of RemovalRecord
        In journal order.
    session : int, optional
        Only this session's records.

    Returns
    -------
    frozenset of int
        Frame seqs removed and not re-included since.
    """
    out: set[int] = set()
    for record in removals:
        if session is not None and record.session != session:
            continue
        if record.action == "remove":
            out.update(record.targets)
        else:
            out.difference_update(record.targets)
    return frozenset(out)


def read_journal(path: str | os.PathLike[str]) -> tuple[tuple[JournalEntry, ...], tuple[RemovalRecord, ...]]:
    """Read a journal without locking or repairing it (a daemon may be writing it).

    A torn last line (no newline yet) is ignored.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    entries : tuple of JournalEntry
    removals : tuple of RemovalRecord

    Raises
    ------
    StateError
        The file cannot be read or holds a line that is not a journal record.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StateError(f"Cannot read the journal {path}: {exc.strerror or exc}.") from exc
    entries: list[JournalEntry] = []
    removals: list[RemovalRecord] = []
    for number, raw in enumerate(data[:data.rfind(b"\n") + 1].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            record = _parse_line(raw.decode("utf-8"))
        except (StateError, UnicodeDecodeError) as exc:
            raise StateError(f"The journal {path} is damaged at line {number}: {exc}") from exc
        (removals if isinstance(record, RemovalRecord) else entries).append(record)  # type: ignore[arg-type]
    return tuple(entries), tuple(removals)


def _parse_line(line: str) -> JournalEntry | RemovalRecord:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise StateError(f"The line is not JSON: {exc.msg}.") from exc
    if isinstance(record, dict) and record.get("kind") == "removal":
        if record.get("v") != _FORMAT:
            raise StateError(f"The line has version {record.get('v')!r}; this livestack reads {_FORMAT}.")
        return RemovalRecord.from_record(record)
    return JournalEntry.from_json(line)


class Journal:
    """The append-only journal of frames: one JSON line each, durable before the frame counts as done.

    Opening reads every line, cuts away a torn last line (a crash in the middle of a write leaves a
    partial line without its newline; that frame was never counted) and takes an exclusive lock, so that
    a second daemon on the same state folder fails at once instead of interleaving lines.

    In memory each entry is kept as its line (about 1.5 kB), not as parsed objects (five times that): a
    night of thousands of frames must not grow the daemon. ``entries`` parses them when asked.

    Parameters
    ----------
    path : str or os.PathLike
        The journal file; it and its folder are created when missing.

    Raises
    ------
    StateError
        The file cannot be opened, is locked by another process, or holds a line that is not a valid
        entry, out of order, or a second acceptance of the same content.

    Examples
    --------
    >>> with Journal(state / "journal.jsonl") as journal:          # doctest: +SKIP
    ...     if journal.seen(h) is None:
    ...         journal.append(JournalEntry(seq=journal.next_seq, ...))
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        # Every entry's line, without its newline; the last entry parsed.
        self._lines: list[bytes] = []
        self._last: JournalEntry | None = None
        self._removals: list[RemovalRecord] = []
        # Content hash -> (index of the entry that decided it, whether that was an acceptance).
        self._by_hash: dict[str, tuple[int, bool]] = {}
        self._size = 0
        # A failed write left a partial line that could not be cut yet.
        self._torn = False
        self._fd: int | None = None
        self._fd = self._open()

    @property
    def closed(self) -> bool:
        """True once ``close`` has been called."""
        return self._fd is None

    @property
    def next_seq(self) -> int:
        """The seq the next entry must carry: one after the last journaled, 1 for an empty journal."""
        return self._last.seq + 1 if self._last is not None else 1

    @property
    def session(self) -> int:
        """The session of the last entry, 0 for an empty journal."""
        return self._last.session if self._last is not None else 0

    def append(self, entry: JournalEntry) -> None:
        """Write one entry as a line, then ``os.fsync``: when this returns, the entry survives a crash.

        Parameters
        ----------
        entry : JournalEntry
            Its ``seq`` must be at least ``next_seq`` and its session no older than the last entry's.

        Raises
        ------
        StateError
            The journal is closed, the entry is out of order or accepts content already accepted, or
            the write failed (the file is then rolled back to its last complete line).
        """
        if self._fd is None:
            raise StateError(f"The journal {self.path} is closed.")
        self._check_next(entry, where="")
        line = entry.to_json().encode("utf-8")
        self._write(line + b"\n")
        self._index(entry, line)

    def _write(self, line: bytes) -> None:
        assert self._fd is not None
        try:
            if self._torn:
                # The last failed write left part of a line that could not be cut then; cut it first.
                os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
                self._torn = False
            written = 0
            while written < len(line):
                written += os.write(self._fd, line[written:])
            os.fsync(self._fd)
        except OSError as exc:
            self._roll_back()
            raise StateError(f"Cannot write to the journal {self.path}: {exc.strerror or exc}.") from exc
        self._size += len(line)

    def append_removal(self, record: RemovalRecord) -> None:
        """Write a removal record as a line, then ``os.fsync``: when this returns, it survives a crash.

        Parameters
        ----------
        record : RemovalRecord
            Its ``id`` must be ``next_removal``, ``at`` the last frame seq, its targets journaled frames.

        Raises
        ------
        StateError
            The journal is closed, the record is out of order or names unknown frames, or the write failed.
        """
        if self._fd is None:
            raise StateError(f"The journal {self.path} is closed.")
        self._check_removal(record, where="")
        self._write((record.to_json() + "\n").encode("utf-8"))
        self._removals.append(record)

    def removals(self) -> tuple[RemovalRecord, ...]:
        """Every removal record, in journal order."""
        return tuple(self._removals)

    @property
    def next_removal(self) -> int:
        """The id the next removal record must carry."""
        return self._removals[-1].id + 1 if self._removals else 1

    def entries(self, start: int = 0) -> tuple[JournalEntry, ...]:
        """Every entry, in seq order (parsed at each call: keep what you need of them).

        Parameters
        ----------
        start : int
            Leave out the first ``start`` entries (a reader that took them before takes only the new ones).

        Returns
        -------
        tuple of JournalEntry
        """
        return tuple(JournalEntry.from_json(line.decode("utf-8")) for line in self._lines[start:])

    def seen(self, content: str) -> JournalEntry | None:
        """The entry that decided the fate of this content, if it was ever journaled.

        Parameters
        ----------
        content : str
            A ``content_hash``.

        Returns
        -------
        JournalEntry or None
            The acceptance if the content was accepted, else its latest rejection; None if never seen.
        """
        known = self._by_hash.get(content)
        return None if known is None else JournalEntry.from_json(self._lines[known[0]].decode("utf-8"))

    def close(self) -> None:
        """Release the lock and the file; closing twice is harmless."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor also releases the flock

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._lines)

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         STATE_FILE_MODE)
        except OSError as exc:
            raise StateError(f"Cannot open the journal {self.path}: {exc.strerror or exc}.") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StateError(f"The journal {self.path} is in use by another livestack process.") from exc
            if created:
                fsync_dir(self.path.parent)  # the file's name must survive a crash too
            self._load(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _load(self, fd: int) -> None:
        try:
            data = _read_all(fd)
        except OSError as exc:
            raise StateError(f"Cannot read the journal {self.path}: {exc.strerror or exc}.") from exc
        end = data.rfind(b"\n") + 1
        # Every complete line is checked before anything is written: a journal damaged in the middle is
        # refused as it is on disk, its torn end included, for a person to look at.
        for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            try:
                entry = _parse_line(raw.decode("utf-8"))
            except (StateError, UnicodeDecodeError) as exc:
                raise StateError(f"The journal {self.path} is damaged at line {number}: {exc}") from exc
            if isinstance(entry, RemovalRecord):
                self._check_removal(entry, where=f" at line {number}")
                self._removals.append(entry)
                continue
            self._check_next(entry, where=f" at line {number}")
            self._index(entry, raw)
        if end < len(data):
            # A torn last line: its append never returned, so its frame was never counted. Cut it so
            # that the next append starts on a fresh line.
            _log.warning("Journal %s: removing a torn last line of %d bytes.", self.path, len(data) - end)
            try:
                os.ftruncate(fd, end)
                os.fsync(fd)
            except OSError as exc:
                raise StateError(f"Cannot repair the torn end of the journal {self.path}: "
                                 f"{exc.strerror or exc}.") from exc
        self._size = end

    def _check_next(self, entry: JournalEntry, where: str) -> None:
        if entry.seq < self.next_seq:
            raise StateError(f"The journal {self.path}{where} has seq {entry.seq}, "
                             f"not after the last seq {self.next_seq - 1}.")
        if entry.session < self.session:
            raise StateError(f"The journal {self.path}{where} has session {entry.session}, "
                             f"older than the session {self.session} before it.")
        known = self._by_hash.get(entry.hash)
        if entry.verdict == "accepted" and known is not None and known[1]:
            first = JournalEntry.from_json(self._lines[known[0]].decode("utf-8"))
            raise StateError(f"The journal {self.path}{where} would accept {entry.path} although the same "
                             f"content was accepted as seq {first.seq} ({first.path}).")

    def _check_removal(self, record: RemovalRecord, where: str) -> None:
        if record.id != self.next_removal:
            raise StateError(f"The journal {self.path}{where} has removal {record.id}, "
                             f"not {self.next_removal}.")
        if record.at != self.next_seq - 1:
            raise StateError(f"The journal {self.path}{where} has a removal made after frame {record.at}, "
                             f"but its last frame is {self.next_seq - 1}.")
        if record.session < self.session:
            raise StateError(f"The journal {self.path}{where} has a removal of session {record.session}, "
                             f"older than the session {self.session} before it.")
        if any(seq > record.at for seq in record.targets):
            raise StateError(f"The journal {self.path}{where} has a removal of frames not journaled yet.")

    def _index(self, entry: JournalEntry, line: bytes) -> None:
        self._lines.append(line)
        self._last = entry
        known = self._by_hash.get(entry.hash)
        if known is None or not known[1]:
            self._by_hash[entry.hash] = (len(self._lines) - 1, entry.verdict == "accepted")

    def _roll_back(self) -> None:
        # A failed write (disk full) may have left part of a line; remove it now, or the next append
        # would glue a good line to it and damage the journal in the middle, where it is not tolerated.
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError:
            self._torn = True  # cut before the next write, which the daemon retries until the disk allows


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk, as described by its manifest.

    Attributes
    ----------
    seq : int
        Journal seq of the last frame included.
    session : int
        The session whose stack this is.
    meta : mapping
        Whatever the daemon saved beside the arrays (JSON values).
    manifest : Path
        ``ckpt-<seq>.json``.
    arrays : Path
        ``ckpt-<seq>.npz``.
    size : int
        Size in bytes of the array file.
    hash : str
        ``content_hash`` of the array file.
    layout : mapping of str to (str, tuple of int)
        Array name to (dtype string, shape).
    time : str
        When it was saved, ISO 8601 UTC.
    """

    seq: int
    session: int
    meta: Mapping[str, Any]
    manifest: Path
    arrays: Path
    size: int
    hash: str
    layout: Mapping[str, tuple[str, tuple[int, ...]]]
    time: str


class CheckpointStore:
    """Checkpoints of the accumulators in one folder, written so that a crash never leaves a half one.

    Parameters
    ----------
    directory : str or os.PathLike
        Where the checkpoints live; created on the first ``save``.
    keep : int
        How many complete checkpoints to keep (``CHECKPOINTS_KEPT``); at least 1.

    Notes
    -----
    One process writes to a store at a time (the daemon, which also holds the journal's lock).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = CHECKPOINTS_KEPT) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive integer, not {keep!r}.")
        self.directory = Path(directory)
        self.keep = keep

    def save(
        self,
        seq: int,
        session: int,
        arrays: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint: the arrays, fsync'd, then the manifest, atomically; then prune old ones.

        The arrays go uncompressed into ``ckpt-<seq>.npz`` (through a temporary name); the manifest
        ``ckpt-<seq>.json`` records seq, session, meta, the array file's name, size and hash, and is
        written last (temporary name, fsync, ``os.replace``, fsync of the folder). Only then are all but
        the newest ``keep`` checkpoints deleted. Saving 130 MB of float64/int32 takes about 0.3 s, half of
        it hashing the file back from the page cache.

        Parameters
        ----------
        seq : int
            Journal seq of the last frame included (0 before any frame); not below the newest checkpoint's.
        session : int
            The session of the stack.
        arrays : mapping of str to numpy.ndarray
            The accumulator's ``state()``; numeric or bool dtypes.
        meta : mapping, optional
            JSON-serialisable facts to keep beside the arrays (method, shape, reference, ...).

        Returns
        -------
        Path
            The manifest's path.

        Raises
        ------
        ValueError
            The arguments are malformed (negative seq, no arrays, object dtype, meta not JSON).
        StateError
            The folder cannot be written, or already has a checkpoint with a higher seq.
        """
        _check_int("seq", seq, minimum=0)
        _check_int("session", session, minimum=0)
        checked = _check_arrays(arrays)
        try:
            meta_json = json.loads(json.dumps(dict(meta or {}), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta must be JSON-serialisable: {exc}") from exc
        newest = max(self._manifest_seqs(), default=None)
        if newest is not None and seq < newest:
            raise StateError(f"Cannot save checkpoint {seq} in {self.directory}: it already holds checkpoint "
                             f"{newest}, which is newer.")
        manifest_path = self.directory / f"ckpt-{seq:012d}.json"
        arrays_path = self.directory / f"ckpt-{seq:012d}.npz"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temporaries()
            _write_npz(arrays_path, checked)
            manifest = {
                "v": _FORMAT,
                "seq": seq,
                "session": session,
                "meta": meta_json,
                "arrays": arrays_path.name,
                "size": arrays_path.stat().st_size,
                "hash": content_hash(arrays_path),
                "layout": {name: [a.dtype.str, list(a.shape)] for name, a in checked.items()},
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            atomic_write(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"),
                         STATE_FILE_MODE)
        except OSError as exc:
            raise StateError(f"Cannot write checkpoint {manifest_path}: {exc.strerror or exc}.") from exc
        try:
            self._prune(seq)
        except OSError as exc:
            # The new checkpoint is complete; old ones left behind only cost disk space.
            _log.warning("Cannot remove old checkpoints in %s: %s", self.directory, exc)
        return manifest_path

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint: valid manifest, array file of the recorded size and hash.

        Damaged or partial checkpoints are skipped with a logged warning, falling back to older ones.
        This reads and hashes the array file (about 0.15 s per 100 MB).

        Returns
        -------
        Checkpoint or None
            None when there is no complete checkpoint.
        """
        for seq in sorted(self._manifest_seqs(), reverse=True):
            path = self.directory / f"ckpt-{seq:012d}.json"
            try:
                return self._read(path, verify_hash=True)
            except StateError as exc:
                _log.warning("Skipping checkpoint: %s", exc)
        return None

    def load(self, checkpoint: Checkpoint) -> dict[str, np.ndarray]:
        """Read a checkpoint's arrays, ready for ``Accumulator.restore``.

        Parameters
        ----------
        checkpoint : Checkpoint
            From ``latest`` (which has verified the file's hash).

        Returns
        -------
        dict of str to numpy.ndarray
            Fresh, writable arrays with the names, dtypes and shapes of the manifest.

        Raises
        ------
        StateError
            The array file is missing, unreadable or does not match its manifest.
        """
        path = checkpoint.arrays
        try:
            if path.stat().st_size != checkpoint.size:
                raise StateError(f"The checkpoint {path} has changed size since it was written.")
            out: dict[str, np.ndarray] = {}
            with np.load(path, allow_pickle=False) as npz:
                for name, (dtype, shape) in checkpoint.layout.items():
                    array = npz[name]
                    if array.dtype.str != dtype or array.shape != shape:
                        raise StateError(f"The checkpoint {path} holds {name} as {array.dtype.str} "
                                         f"{array.shape}, not {dtype} {shape} as its manifest says.")
                    out[name] = array
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise StateError(f"Cannot read the checkpoint {path}: {exc}.") from exc
        return out

    def _manifest_seqs(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(f"Cannot list the checkpoints in {self.directory}: "
                             f"{exc.strerror or exc}.") from exc
        return [int(m.group(1)) for m in map(_MANIFEST.match, names) if m]

    def _read(self, path: Path, verify_hash: bool) -> Checkpoint:
        try:
            record = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise StateError(f"The manifest {path} cannot be read: {exc}.") from exc
        try:
            if not isinstance(record, dict) or record.get("v") != _FORMAT:
                raise ValueError("not a checkpoint manifest of a known version")
            name = record["arrays"]
            if not isinstance(name, str) or not _ARRAYS.match(name):
                raise ValueError("its array file name is not a checkpoint's")  # never outside the folder
            seq, session, size, digest = record["seq"], record["session"], record["size"], record["hash"]
            _check_int("seq", seq, minimum=0)
            _check_int("session", session, minimum=0)
            _check_int("size", size, minimum=0)
            if not isinstance(digest, str) or not isinstance(record["meta"], dict):
                raise ValueError("hash or meta has the wrong type")
            match = _MANIFEST.match(path.name)
            if match is None or int(match.group(1)) != seq:
                raise ValueError(f"it records seq {seq}, not the one in its name")
            layout = {str(k): (str(v[0]), tuple(int(n) for n in v[1])) for k, v in record["layout"].items()}
            stamp = str(record["time"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise StateError(f"The manifest {path} is not valid: {exc}.") from exc
        arrays = self.directory / name
        try:
            actual = arrays.stat().st_size
        except OSError as exc:
            raise StateError(f"The array file {arrays} of {path.name} is missing.") from exc
        if actual != size:
            raise StateError(f"The array file {arrays} has {actual} bytes, not {size} as {path.name} says.")
        if verify_hash:
            try:
                found = content_hash(arrays, like=digest)
            except OSError as exc:
                raise StateError(f"The array file {arrays} cannot be read: {exc.strerror or exc}.") from exc
            if found != digest:
                raise StateError(f"The array file {arrays} does not match the hash in {path.name}.")
        return Checkpoint(seq=seq, session=session, meta=record["meta"], manifest=path, arrays=arrays,
                          size=size, hash=digest, layout=layout, time=stamp)

    def _prune(self, newest: int) -> None:
        # Keep the new checkpoint and the next keep-1 older ones that look complete (manifest valid, file
        # size right: what a crash can break; hashing them all on every save would cost too much).
        kept = {newest}
        for seq in sorted((s for s in self._manifest_seqs() if s < newest), reverse=True):
            if len(kept) >= self.keep:
                break
            with contextlib.suppress(StateError):
                self._read(self.directory / f"ckpt-{seq:012d}.json", verify_hash=False)
                kept.add(seq)
        # Manifests first: a checkpoint stops existing before its array file goes.
        for seq in self._manifest_seqs():
            if seq not in kept:
                _remove(self.directory / f"ckpt-{seq:012d}.json")
        for name in os.listdir(self.directory):
            match = _ARRAYS.match(name)
            if match and int(match.group(1)) not in kept:
                _remove(self.directory / name)

    def _remove_stale_temporaries(self) -> None:
        # Left by a crash in the middle of a save; nobody else writes here (see Notes).
        for name in os.listdir(self.directory):
            if name.startswith(".ckpt-") and name.endswith(TMP_SUFFIX):
                _remove(self.directory / name)


@dataclass(frozen=True)
class Recovery:
    """What to do after any stop to get back the exact stack: load ``checkpoint``, then re-add ``replay``.

    Attributes
    ----------
    checkpoint : Checkpoint or None
        The base to load; None means start from empty accumulators.
    session : int
        The current session (the newest in the journal or checkpoint).
    replay : tuple of JournalEntry
        Accepted entries of the session after the base, in seq order: re-read each file (check its
        ``content_hash``), warp it with its journaled transform and add it.
    rejected : tuple of JournalEntry
        Rejected entries of the session after the base: nothing to do, they are journaled.
    superseded : tuple of JournalEntry
        Entries of an older session after the newest complete checkpoint (a reset followed before that
        session was checkpointed again): not replayed; worth a log line.
    hashes : frozenset of str
        Every journaled content hash: files with these hashes are not new.
    reference : JournalEntry or None
        The session's reference frame (the last accepted entry flagged ``reference``), if any.
    next_seq : int
        The seq for the next journal entry.
    """

    checkpoint: Checkpoint | None
    session: int
    replay: tuple[JournalEntry, ...]
    rejected: tuple[JournalEntry, ...]
    superseded: tuple[JournalEntry, ...]
    hashes: frozenset[str]
    reference: JournalEntry | None
    next_seq: int


def recover(journal: Journal, store: CheckpointStore,
            entries: Sequence[JournalEntry] | None = None) -> Recovery:
    """Work out how to rebuild the stack after a stop: which checkpoint to load, which frames to replay.

    The state after recovery is the checkpoint plus the replay of the accepted entries of the current
    session with a seq above the checkpoint's (see the module's docstring for why this is exactly once).
    A checkpoint of an older session than the journal's last is not used: the stack was reset after it,
    and the new session is replayed from its first entry.

    Parameters
    ----------
    journal : Journal
        Open (its torn end already cut away).
    store : CheckpointStore
    entries : sequence of JournalEntry, optional
        ``journal.entries()`` when the caller has them already (the journal parses its lines at each call).

    Returns
    -------
    Recovery

    Raises
    ------
    StateError
        The newest complete checkpoint includes frames the journal does not have (a journal replaced
        or truncated by hand): the two no longer describe the same stack.
    """
    if entries is None:
        entries = journal.entries()
    last_seq = journal.next_seq - 1
    checkpoint = store.latest()
    if checkpoint is not None and checkpoint.seq > last_seq:
        raise StateError(f"The checkpoint {checkpoint.manifest} includes frames up to seq {checkpoint.seq} "
                         f"but the journal {journal.path} ends at seq {last_seq}; they do not describe "
                         f"the same stack.")
    session = max(journal.session, checkpoint.session if checkpoint is not None else 0)
    newest = checkpoint.seq if checkpoint is not None else 0
    if checkpoint is not None and checkpoint.session != session:
        _log.info("Checkpoint %s belongs to session %d, the journal has moved on to session %d.",
                  checkpoint.manifest, checkpoint.session, session)
        checkpoint = None
    base = checkpoint.seq if checkpoint is not None else 0
    current = [e for e in entries if e.seq > base and e.session == session]
    references = [e for e in entries if e.session == session and e.reference and e.verdict == "accepted"]
    return Recovery(
        checkpoint=checkpoint,
        session=session,
        replay=tuple(e for e in current if e.verdict == "accepted"),
        rejected=tuple(e for e in current if e.verdict == "rejected"),
        superseded=tuple(e for e in entries if e.seq > newest and e.session != session),
        hashes=frozenset(e.hash for e in entries),
        reference=references[-1] if references else None,
        next_seq=journal.next_seq,
    )


# --- private helpers -----------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int | None) -> None:
    # bool is an int to Python, never to a journal.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {value}.")


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}.")
    return float(value)


def _number_dict(name: str, values: Mapping[str, Any], allow_none: bool) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise ValueError(f"{name} must be a mapping of names to numbers.")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ValueError(f"{name} keys must be strings, not {key!r}.")
        if value is None and allow_none:
            out[key] = None
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = value
        else:
            # JSON has no NaN: a quality that could not be measured is None, not NaN.
            out[key] = _finite(f"{name}[{key!r}]", value)
    return out


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, Mapping) or not arrays:
        raise ValueError("arrays must be a non-empty mapping of names to arrays.")
    out: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"array names must be non-empty strings, not {name!r}.")
        array = np.asarray(array)
        if array.dtype.hasobject or array.dtype.kind not in "biufc":
            raise ValueError(f"array {name!r} has dtype {array.dtype}; checkpoints hold numbers only.")
        out[name] = array
    return out


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while chunk := os.pread(fd, HASH_BLOCK, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    # The same container as np.savez (readable by np.load) but built by hand: np.savez's own keyword
    # arguments ("file", "allow_pickle") would collide with arrays of those names.
    with (atomic_file(path, STATE_FILE_MODE) as fh,
          zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive):
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
