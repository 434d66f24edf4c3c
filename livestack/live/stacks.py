"""The daemon's stack: the ``Stacker``, its session and output folder, and the lock that guards them.

The worker thread is the only one that changes a stack (commits frames, swaps the stacker on a reset); the
writer reads it under ``lock`` to take snapshots and checkpoints. Others (``status`` on the network thread)
read ``summary``, an immutable value the worker replaces after every change: never a half-swapped state,
and never a wait for a frame in the middle of being stacked.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livestack.config import Config
from livestack.live.reports import StackView, safe_name
from livestack.pipeline import FilterSummary, Stacker
from livestack.stages.snapshot import StackInfo

__all__ = ["StackSummary", "Stacks"]


@dataclass(frozen=True)
class StackSummary:
    """What ``status`` tells about the stack, as of the worker's last change."""

    session: int
    frames: int
    exptime: float
    method: str
    object: str | None
    filter: str | None
    folder: Path
    #: Frames and exposure of each filter's stack of the target.
    filters: tuple[FilterSummary, ...] = ()


class Stacks:
    """The current stack and its session; changed by the worker thread only.

    Parameters
    ----------
    config : Config
    state_dir : Path
        Where the median's cubes go (``work/session-<n>``).
    output_dir : Path
        Where snapshots go (a subfolder per OBJECT when ``[stack] new_session_on_object``).
    """

    def __init__(self, config: Config, state_dir: Path, output_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self.output_dir = output_dir
        #: Held while a stack is changed or read (``commit``, ``result``, ``checkpoint``, a swap).
        self.lock = threading.Lock()
        self.session = 1
        self.stacker = self.new_stacker(1)
        self.summary = self._summarise()

    def new_stacker(self, session: int) -> Stacker:
        """An empty stacker for a session (its median cube goes under ``work/session-<n>``)."""
        workdir = self.state_dir / "work" / f"session-{session}"
        if self.config.stack.method == "median":
            workdir.mkdir(parents=True, exist_ok=True)
        return Stacker(self.config, workdir=workdir)

    def folder(self, stacker: Stacker | None = None) -> Path:
        """Where a stack's snapshots go: a subfolder per OBJECT when sessions follow objects."""
        ref = (stacker or self.stacker).reference_meta
        if self.config.stack.new_session_on_object and ref is not None and ref.object:
            return self.output_dir / safe_name(ref.object)
        return self.output_dir

    def swap(self, stacker: Stacker, session: int) -> Stacker:
        """Make ``stacker`` the current stack of ``session`` (worker); returns the old one."""
        with self.lock:
            old, self.stacker, self.session = self.stacker, stacker, session
        self.changed()
        return old

    def changed(self) -> None:
        """Publish a new ``summary`` after the worker changed the stack."""
        self.summary = self._summarise()

    def view(self, stacker: Stacker | None = None, session: int | None = None,
             image: bool = False) -> StackView:
        """One consistent view of a stack (the current one by default), taken under the lock.

        Parameters
        ----------
        stacker : Stacker, optional
        session : int, optional
            The session of ``stacker``; required with it.
        image : bool
            Include the stack itself (costs computing it).

        Returns
        -------
        StackView
        """
        with self.lock:
            if stacker is None:
                stacker, session = self.stacker, self.session
            assert session is not None
            # The coverage (a copy, for the snapshot's extension) only with the image it belongs to.
            return StackView(info=stacker.info(coverage=image),
                             rejected_fraction=float(stacker.rejected_fraction), session=session,
                             image=stacker.result() if image else None, filters=stacker.summary())

    def channels(self, stacker: Stacker) -> dict[str, tuple[StackInfo, np.ndarray]]:
        """Every filter's stack of ``stacker`` with its header facts, copied under the lock (writer thread).

        Returns
        -------
        dict
            Filter -> (StackInfo, image), in the order the filters arrived; empty filters left out.
        """
        with self.lock:
            out: dict[str, tuple[StackInfo, np.ndarray]] = {}
            for name in stacker.filters:
                image = stacker.result(name)
                info = stacker.info(name)
                if image is not None and info.ncombine > 0:
                    out[name] = (info, image)
            return out

    def _summarise(self) -> StackSummary:
        stacker = self.stacker
        ref = stacker.reference_meta
        return StackSummary(session=self.session, frames=stacker.count, exptime=stacker.exptime,
                            method=stacker.method, object=ref.object if ref else None,
                            filter=ref.filter if ref else None, folder=self.folder(stacker),
                            filters=stacker.summary())
