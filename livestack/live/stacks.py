"""The daemon's stack: the ``Stacker``, its session and output folder, and the lock that guards them.

The worker thread is the only one that changes a stack (commits frames, swaps the stacker on a reset); the
writer reads it under ``lock`` to take snapshots and checkpoints, and computes a stack's picture after it
(``computing``). Others (``status`` on the network thread)
read ``summary``, an immutable value the worker replaces after every change: never a half-swapped state,
and never a wait for a frame in the middle of being stacked.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """The stacks of the current session, one per target (OBJECT); changed by the worker thread only.

    A frame goes to its target's stack (``key_of``): its own reference, median cube, snapshots in
    ``<output>/<OBJECT>/``; a frame without OBJECT, or every frame when ``[stack] new_session_on_object`` is
    off, goes to the current one. ``stacker`` is the stack the last frame went to. A reset (a new session)
    starts over with one empty stack.

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
        #: Taken before ``lock`` while a stack read under ``lock`` is computed out of it (``view``,
        #: ``channels``), and by the worker while it ends a kappa-sigma warm-up (``settle``): frames are
        #: stacked meanwhile, and the warm-up's end, which writes its moments over buffered frames, waits for
        #: the picture that reads them instead of taking new memory.
        self.computing = threading.Lock()
        self.session = 1
        self._targets: dict[str, Stacker] = {"": self.new_stacker(1)}
        self.current = ""
        self.summary = self._summarise()

    @property
    def stacker(self) -> Stacker:
        """The current target's stack."""
        return self._targets[self.current]

    def targets(self) -> list[Stacker]:
        """Every target's stack of the session, in the order they started."""
        return list(self._targets.values())

    def new_stacker(self, session: int) -> Stacker:
        """An empty stack of a session (median cubes, named uniquely, in ``work/session-<n>``)."""
        workdir = self.state_dir / "work" / f"session-{session}"
        if self.config.stack.method == "median":
            workdir.mkdir(parents=True, exist_ok=True)
        return Stacker(self.config, workdir=workdir, reuse=True)

    def get(self, key: str) -> Stacker | None:
        """A target's stack in this session, if it has one (worker)."""
        return self._targets.get(key)

    def key_of(self, object_name: str | None) -> str:
        """The target a frame with this OBJECT goes to."""
        if not self.config.stack.new_session_on_object or not object_name or not object_name.strip():
            return self.current
        return " ".join(object_name.split()).lower()

    def select(self, key: str) -> bool:
        """Make ``key`` the current target, starting its stack if it has none (worker); True if it is new.

        The first target of a session takes over the session's empty stack (and its reference, when one was
        set by ``set_reference``).
        """
        if key == self.current:
            return False
        new = key not in self._targets
        with self.lock:
            if new:
                empty = self._targets.get("")
                if self.current == "" and empty is not None and empty.count == 0:
                    del self._targets[""]
                    self._targets[key] = empty
                else:
                    self._targets[key] = self.new_stacker(self.session)
            self.current = key
        self.changed()
        return new

    def drop(self, key: str, back_to: str) -> Stacker:
        """Forget a target a rejected frame started, and make ``back_to`` current again (worker).

        Returns
        -------
        Stacker
            The stack to discard: the dropped one, or a fresh one when the dropped one was the session's
            empty stack and goes back to being it.
        """
        with self.lock:
            dropped = self._targets.pop(key)
            if back_to not in self._targets:
                # It had taken over the session's empty stack (perhaps with a reference set by request).
                self._targets[back_to], dropped = dropped, self.new_stacker(self.session)
            self.current = back_to
        self.changed()
        return dropped

    def folder(self, stacker: Stacker | None = None) -> Path:
        """Where a stack's snapshots go: a subfolder per OBJECT when targets are kept apart."""
        ref = (stacker or self.stacker).reference_meta
        if self.config.stack.new_session_on_object and ref is not None and ref.object:
            return self.output_dir / safe_name(ref.object)
        return self.output_dir

    def swap(self, stacker: Stacker, session: int) -> Stacker:
        """Replace the current target's stack (worker; a re-integration); returns the old one.

        A ``session`` other than the current one starts that session with ``stacker`` alone (``reset``).
        """
        if session != self.session:
            old = self.reset(stacker, session)
            return old[0] if len(old) == 1 else stacker
        with self.lock:
            old_stack = self._targets[self.current]
            self._targets[self.current] = stacker
        self.changed()
        return old_stack

    def reset(self, stacker: Stacker, session: int) -> list[Stacker]:
        """Start ``session`` with ``stacker`` as its only stack (worker); returns every stack replaced."""
        with self.lock:
            old = list(self._targets.values())
            self._targets = {"": stacker}
            self.current = ""
            self.session = session
        self.changed()
        return old

    def changed(self) -> None:
        """Publish a new ``summary`` after the worker changed the stack."""
        self.summary = self._summarise()

    def view(self, stacker: Stacker | None = None, session: int | None = None,
             image: bool = False, coverage: bool | None = None, side: int = 0,
             sample: bool = False, into: Callable[[tuple[int, ...]], np.ndarray] | None = None,
             ) -> StackView:
        """One consistent view of a stack (the current one by default), taken under the lock.

        Parameters
        ----------
        stacker : Stacker, optional
        session : int, optional
            The session of ``stacker``; required with it.
        image : bool
            Include the stack itself (costs computing it).
        coverage : bool, optional
            Include a copy of the coverage (a snapshot's extension); by default with the image. Pictures
            for people leave it out: the copy is a whole int32 image, made while the worker waits.
        side : int
            With ``image``, for a picture whose longest side is ``side`` pixels: the image is the stack
            made smaller, never made whole (``Stacker.result_later``); 0: the stack itself.
        sample : bool
            Include the pixels ``Stacker.snr`` samples (``Stacker.sample_later``).
        into : callable, optional
            Given the stack's shape, the array to write the whole stack in: a buffer the caller keeps from
            one view to the next, which a new array's page faults would otherwise cost under the lock.

        Returns
        -------
        StackView
        """
        with self.computing if image or sample else contextlib.nullcontext():
            with self.lock:
                if stacker is None:
                    stacker, session = self.stacker, self.session
                assert session is not None
                # The coverage (a copy, for the snapshot's extension) only with the image it belongs to.
                info = stacker.info(coverage=image if coverage is None else coverage)
                rejected, filters = float(stacker.rejected_fraction), stacker.summary()
                later = stacker.result_later(side=side, into=into) if image else None
                sampled = stacker.sample_later() if sample else None
            # Out of the lock: a kappa-sigma warm-up's stack takes ~0.3 s at 8.3 MP (mono), while the worker
            # may commit the next frame.
            return StackView(info=info, rejected_fraction=rejected, session=session,
                             image=later() if later is not None else None, filters=filters,
                             sample=sampled() if sampled is not None else None)

    def channels(self, stacker: Stacker) -> dict[str, tuple[StackInfo, np.ndarray]]:
        """Every filter's stack of ``stacker`` with its header facts, copied under the lock (writer thread).

        Returns
        -------
        dict
            Filter -> (StackInfo, image), in the order the filters arrived; empty filters left out.
        """
        with self.computing:
            with self.lock:
                taken = [(name, stacker.info(name), stacker.result_later(name)) for name in stacker.filters]
            return {name: (info, later()) for name, info, later in taken
                    if later is not None and info.ncombine > 0}

    # -- checkpoints ----------------------------------------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Every target's stack (copies, under the caller's lock): arrays ``t<i>_...`` and their meta.

        Returns
        -------
        arrays : dict of ndarray
            Empty when no target has a reference yet.
        meta : dict
            ``targets``: a list of ``{"key", "meta"}``; ``current``: the current target's key.
        """
        arrays: dict[str, np.ndarray] = {}
        targets: list[dict[str, Any]] = []
        for key, stacker in self._targets.items():
            a, m = stacker.checkpoint()
            if not a:
                continue
            prefix = f"t{len(targets)}_"
            arrays.update({prefix + name: value for name, value in a.items()})
            targets.append({"key": key, "meta": m})
        return arrays, {"empty": not arrays, "targets": targets, "current": self.current,
                        "removals": int(self.stacker.removals)}

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Resume every target from ``checkpoint()`` (or a one-stack checkpoint of an earlier version)."""
        if "targets" not in meta:
            self.stacker.restore(arrays, meta)
            key = self.key_of(self.stacker.reference_meta.object if self.stacker.reference_meta else None)
            if key != self.current:
                self._targets = {key: self.stacker}
                self.current = key
            self.changed()
            return
        self._targets = {}
        for i, target in enumerate(meta["targets"]):
            key = str(target["key"])
            prefix = f"t{i}_"
            stacker = self.new_stacker(self.session)
            stacker.restore({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)},
                            target["meta"])
            self._targets[key] = stacker
        current = str(meta.get("current", ""))
        if current not in self._targets:
            self._targets[current] = self.new_stacker(self.session)
        self.current = current
        self.stacker.removals = int(meta.get("removals", self.stacker.removals))
        self.changed()

    def _summarise(self) -> StackSummary:
        stacker = self.stacker
        ref = stacker.reference_meta
        return StackSummary(session=self.session, frames=stacker.count, exptime=stacker.exptime,
                            method=stacker.method_in_use, object=ref.object if ref else None,
                            filter=ref.filter if ref else None, folder=self.folder(stacker),
                            filters=stacker.summary())
