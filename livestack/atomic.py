"""Whole files only: the one helper that writes a file so that readers never see a part of it.

Every output of livestack (snapshots, pictures, checkpoint arrays and manifests) goes through
``atomic_file``: a hidden temporary name in the same folder (``.<name>.<random>.tmp``, which folder
watchers ignore), flushed and fsynced, renamed over the target with ``os.replace``, then the folder
fsynced so the rename survives a power cut. A failure at any point removes the temporary file and leaves
the old target as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["NEW_FILE_MODE", "TMP_SUFFIX", "atomic_file", "atomic_write", "fsync_dir"]

#: Mode bits of a new public file (rw-r--r--): stacks and pictures are read by viewers and web servers.
NEW_FILE_MODE = 0o644

#: Suffix of the temporary names (left behind only by a crash; the daemon removes its own at start).
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[BinaryIO]:
    """Open a temporary file that replaces ``path`` only when the ``with`` block ends without error.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace.
    mode : int, optional
        Permission bits of the result; by default those of the file being replaced, or
        ``NEW_FILE_MODE`` for a new file.

    Yields
    ------
    BinaryIO
        Write the whole content into it.

    Raises
    ------
    OSError
        When the folder is not writable or the disk is full; the temporary file is removed and an
        existing ``path`` is left as it was.
    """
    target = Path(path)
    if mode is None:
        try:
            mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview,
                 mode: int | None = None) -> None:
    """Write ``data`` as the whole content of ``path`` through ``atomic_file``.

    Parameters
    ----------
    path : str or os.PathLike
    data : bytes-like
    mode : int, optional
        As for ``atomic_file``.

    Raises
    ------
    OSError
        As for ``atomic_file``.
    """
    with atomic_file(path, mode) as handle:
        handle.write(data)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a folder, so that names created or renamed in it survive a crash (POSIX)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
