"""FITS structure: is a file a whole FITS file, one still being written, or not FITS at all?

The check reads headers only (2880-byte records up to each END card) and skips each HDU's data by its size
as the header announces it, so it costs a few reads whatever the file's size (plus, for gzip, decompressing
the stream). It never trusts a header further than the standard allows (BITPIX one of six values, NAXIS at
most 999, a header of at most ``MAX_HEADER_BLOCKS`` records), so a hostile or corrupt header cannot make it
loop or allocate; the reader (``frames.read_frame``) runs it before handing a file to astropy, whose parser
would otherwise loop over a NAXIS of 10**20. The watcher uses it to decide when a file is whole.

Public API:

- ``check_fits(path) -> FitsCheck``: ``COMPLETE``, ``INCOMPLETE`` (wait) or ``INVALID`` (not FITS), with why.
- ``fits_complete(path) -> str | None``: None when complete, else the reason (either kind).
- ``FitsState``, ``FitsCheck``; ``BLOCK_SIZE``, ``CARD_SIZE``, ``MAX_HEADER_BLOCKS``, ``GZIP_CHUNK``.
"""

from __future__ import annotations

import enum
import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = [
    "BLOCK_SIZE",
    "CARD_SIZE",
    "GZIP_CHUNK",
    "MAX_HEADER_BLOCKS",
    "FitsCheck",
    "FitsState",
    "check_fits",
    "fits_complete",
]

#: FITS files are made of records of this many bytes.
BLOCK_SIZE = 2880
#: Bytes per header card.
CARD_SIZE = 80
#: A header longer than this many records is not a header: real ones take a handful.
MAX_HEADER_BLOCKS = 1000
#: How many decompressed bytes a gzip check reads at a time while skipping data (bounds memory).
GZIP_CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_PRIMARY_START = b"SIMPLE  ="
_EXTENSION_START = b"XTENSION="
_END_KEYWORD = b"END"
_VALID_BITPIX = (8, 16, 32, 64, -32, -64)
_MAX_NAXIS = 999
# Header cards may hold only printable ASCII (FITS standard 4.1.2.1).
_PRINTABLE = bytes(range(0x20, 0x7F))


class FitsState(enum.Enum):
    """What ``check_fits`` found."""

    #: A whole FITS file: every HDU announced by its headers is there, the file ends at an HDU boundary.
    COMPLETE = "complete"
    #: Looks like FITS but is shorter than its headers announce: wait for the writer.
    INCOMPLETE = "incomplete"
    #: Not a FITS file at all (text, garbage, a broken header or gzip stream). An empty file is INCOMPLETE.
    INVALID = "invalid"


@dataclass(frozen=True)
class FitsCheck:
    """The answer of ``check_fits``.

    Attributes
    ----------
    state : FitsState
    reason : str
        Empty for ``COMPLETE``; otherwise one sentence, e.g.
        ``"still being written: 1,234,560 of 8,294,400 bytes"`` or ``"no END card yet"``.
    """

    state: FitsState
    reason: str = ""

    @property
    def complete(self) -> bool:
        """True when the file is a complete FITS file."""
        return self.state is FitsState.COMPLETE


def check_fits(path: str | Path) -> FitsCheck:
    """Tell whether a file is a complete FITS file, one still being written, or not FITS at all.

    The headers of every HDU are read (2880-byte records up to the END card); each HDU's data size comes
    from BITPIX, NAXISn, PCOUNT and GCOUNT, padded to 2880 bytes, and is skipped without reading. The file
    is complete when it ends exactly at an HDU boundary. A primary HDU without data (NAXIS = 0) followed by
    a tile-compressed image extension (``.fz``) is handled like any other multi-HDU file. Bytes after the
    last HDU that do not start an extension header are ignored, as FITS readers do.

    A gzip file (recognised by its magic bytes, whatever its name) is decompressed as a stream, a megabyte
    at a time, to the end of the stream: a stream that ends before its end marker is incomplete; the gzip
    trailer's CRC and size are then verified by the gzip module, and the decompressed FITS must be complete.
    The gzip trailer alone cannot tell a finished file from a half-written one (its last eight bytes are
    just compressed data until the writer is done), so the whole stream is read; for a 60-megapixel frame
    that costs about a second on a small computer, once per candidate.

    Parameters
    ----------
    path : str or Path
        The file to check. It is only read.

    Returns
    -------
    FitsCheck
        ``COMPLETE``, ``INCOMPLETE`` (with why: wait and check again) or ``INVALID`` (with why).

    Raises
    ------
    OSError
        When the file cannot be opened or read (``FileNotFoundError`` when it has gone).
    """
    with open(path, "rb") as handle:
        magic = handle.read(len(_GZIP_MAGIC))
        handle.seek(0)
        if not magic:
            # Capture programs create the file before writing it: empty means "not yet", and a file that
            # stays empty is reported as stalled like any other incomplete one.
            return FitsCheck(FitsState.INCOMPLETE, "empty: nothing written yet")
        if magic == _GZIP_MAGIC:
            return _check_gzip(handle)
        if _GZIP_MAGIC.startswith(magic):
            # One byte that starts like gzip: the first byte of a gzip file being written.
            return _truncated_gzip()
        return _walk_hdus(_PlainStream(handle))


def fits_complete(path: str | Path) -> str | None:
    """Say why a file is not a complete FITS file, or None when it is.

    A shorthand for ``check_fits`` that does not tell "still being written" from "not FITS"; the
    watcher uses ``check_fits``.

    Parameters
    ----------
    path : str or Path
        The file to check.

    Returns
    -------
    str or None
        None for a complete FITS file, else a short reason.

    Raises
    ------
    OSError
        When the file cannot be opened or read.
    """
    result = check_fits(path)
    return None if result.complete else result.reason


class _Stream(Protocol):
    """What the HDU walk needs from a file: sequential reads and forward skips."""

    position: int
    truncated: bool
    note: str

    def read(self, size: int) -> bytes: ...

    def skip(self, size: int) -> int: ...

    def drain(self) -> None: ...


class _PlainStream:
    """An uncompressed file: skips are seeks bounded by the current file size."""

    note = ""
    truncated = False

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.position = 0

    def read(self, size: int) -> bytes:
        data = self._handle.read(size)
        self.position += len(data)
        return data

    def skip(self, size: int) -> int:
        available = max(0, os.fstat(self._handle.fileno()).st_size - self.position)
        step = min(size, available)
        self.position += step
        self._handle.seek(self.position)
        return step

    def drain(self) -> None:
        """Nothing to verify after the last HDU of a plain file."""


class _GzipStream:
    """A gzip file read as a stream of decompressed bytes; an early end of the stream sets ``truncated``."""

    note = " (decompressed)"

    def __init__(self, handle: BinaryIO) -> None:
        self._gzip = gzip.GzipFile(fileobj=handle, mode="rb")
        self.position = 0
        self.truncated = False

    def read(self, size: int) -> bytes:
        chunks = []
        wanted = size
        while wanted > 0 and not self.truncated:
            try:
                data = self._gzip.read(min(wanted, GZIP_CHUNK))
            except EOFError:
                self.truncated = True
                break
            if not data:
                break
            chunks.append(data)
            wanted -= len(data)
        result = b"".join(chunks)
        self.position += len(result)
        return result

    def skip(self, size: int) -> int:
        done = 0
        while done < size:
            got = len(self.read(min(size - done, GZIP_CHUNK)))
            if got == 0:
                break
            done += got
        return done

    def drain(self) -> None:
        """Read to the end of the stream, so that the gzip trailer (CRC, size) is verified."""
        while self.read(GZIP_CHUNK):
            pass


class _HeaderError(Exception):
    """Raised inside the HDU walk for a header that cannot be FITS; carries the reason."""


def _check_gzip(handle: BinaryIO) -> FitsCheck:
    """Check a gzip-compressed FITS file (see ``check_fits``)."""
    try:
        return _walk_hdus(_GzipStream(handle))
    except gzip.BadGzipFile as exc:
        return FitsCheck(FitsState.INVALID, f"not a valid gzip file: {exc}")
    except zlib.error as exc:
        return FitsCheck(FitsState.INVALID, f"corrupt gzip data: {exc}")


def _walk_hdus(stream: _Stream) -> FitsCheck:
    """Walk the HDUs of a FITS byte stream; complete when it ends exactly after one."""
    hdu = 0
    while True:
        start = _PRIMARY_START if hdu == 0 else _EXTENSION_START
        cards: dict[bytes, bytes] = {}
        blocks = 0
        while True:
            block = stream.read(BLOCK_SIZE)
            if blocks == 0:
                head = block[: len(start)]
                if not start.startswith(head) or not block:
                    if stream.truncated:
                        return _truncated_gzip()
                    if hdu == 0:
                        reason = "the file is empty" if not block else "it does not start with SIMPLE"
                        return FitsCheck(FitsState.INVALID, f"not a FITS file: {reason}")
                    # The end of the file, or bytes after the last HDU that FITS readers ignore.
                    stream.drain()
                    return _truncated_gzip() if stream.truncated else FitsCheck(FitsState.COMPLETE)
            if block.translate(None, _PRINTABLE):
                what = "not a FITS file: the header" if hdu == 0 else f"HDU {hdu}: the header"
                return FitsCheck(FitsState.INVALID, f"{what} holds bytes that are not text")
            found_end = _parse_cards(block, cards)
            blocks += 1
            if len(block) < BLOCK_SIZE:
                if stream.truncated:
                    return _truncated_gzip()
                if not found_end:
                    return FitsCheck(FitsState.INCOMPLETE, "no END card yet")
                return _short(stream, stream.position - len(block) + BLOCK_SIZE)
            if found_end:
                break
            if blocks >= MAX_HEADER_BLOCKS:
                return FitsCheck(FitsState.INVALID,
                                 f"HDU {hdu}: no END card in the first {MAX_HEADER_BLOCKS} header records")
        try:
            size = _data_size(cards, primary=hdu == 0)
        except _HeaderError as exc:
            return FitsCheck(FitsState.INVALID, f"HDU {hdu}: {exc}")
        padded = -(-size // BLOCK_SIZE) * BLOCK_SIZE
        end = stream.position + padded
        if stream.skip(padded) < padded:
            if stream.truncated:
                return _truncated_gzip()
            return _short(stream, end)
        hdu += 1


def _short(stream: _Stream, announced: int) -> FitsCheck:
    """The answer for a file that ends before what its headers announce."""
    return FitsCheck(FitsState.INCOMPLETE,
                     f"still being written: {stream.position:,} of {announced:,} bytes{stream.note}")


def _truncated_gzip() -> FitsCheck:
    """The answer for a gzip stream that ends before its end marker.

    No byte counts: what a truncated stream decompresses to is only known up to the last full read.
    """
    return FitsCheck(FitsState.INCOMPLETE, "still being written: the gzip stream has no end yet")


def _parse_cards(block: bytes, cards: dict[bytes, bytes]) -> bool:
    """Add the valued cards of a header record to ``cards`` (first one wins); True at the END card."""
    for offset in range(0, len(block) - CARD_SIZE + 1, CARD_SIZE):
        card = block[offset:offset + CARD_SIZE]
        keyword = card[:8].rstrip()
        if keyword == _END_KEYWORD:
            return True
        if card[8:10] == b"= ":
            cards.setdefault(keyword, card[10:])
    return False


def _data_size(cards: dict[bytes, bytes], *, primary: bool) -> int:
    """Bytes of data an HDU's header announces, before padding (FITS standard 4.4.1.1 and 7.1.1)."""
    bitpix = _int_card(cards, b"BITPIX")
    if bitpix not in _VALID_BITPIX:
        raise _HeaderError(f"BITPIX = {bitpix} is not one of {', '.join(map(str, _VALID_BITPIX))}")
    naxis = _int_card(cards, b"NAXIS")
    if not 0 <= naxis <= _MAX_NAXIS:
        raise _HeaderError(f"NAXIS = {naxis} is not between 0 and {_MAX_NAXIS}")
    axes = [_int_card(cards, b"NAXIS%d" % n) for n in range(1, naxis + 1)]
    if any(length < 0 for length in axes):
        raise _HeaderError("an NAXISn value is negative")
    pcount = _int_card(cards, b"PCOUNT", default=0)
    gcount = _int_card(cards, b"GCOUNT", default=1)
    if pcount < 0 or gcount < 0:
        raise _HeaderError("PCOUNT or GCOUNT is negative")
    if naxis == 0:
        elements = 0
    elif primary and axes[0] == 0 and _value_text(cards.get(b"GROUPS", b"")) == b"T":
        # Random groups: NAXIS1 = 0 is a marker, not a length.
        elements = math.prod(axes[1:])
    else:
        elements = math.prod(axes)
    return abs(bitpix) // 8 * gcount * (pcount + elements)


def _int_card(cards: dict[bytes, bytes], keyword: bytes, default: int | None = None) -> int:
    """The integer value of a card; ``default`` when absent, or ``_HeaderError`` when required."""
    raw = cards.get(keyword)
    name = keyword.decode("ascii")
    if raw is None:
        if default is None:
            raise _HeaderError(f"the header has no {name}")
        return default
    text = _value_text(raw)
    try:
        return int(text)
    except ValueError as exc:
        raise _HeaderError(f"{name} is not an integer: {text.decode('ascii')!r}") from exc


def _value_text(raw: bytes) -> bytes:
    """A card's value without its comment."""
    return raw.split(b"/", 1)[0].strip()
