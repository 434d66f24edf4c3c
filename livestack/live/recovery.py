"""Recovery: after any stop (clean, crash, ``kill -9``), rebuild the exact stack from the state folder.

``state.recover`` says what to load and what to re-process; ``resume`` does it: it loads the checkpoint into
the daemon's stack, stacks the accepted frames journaled after it again from their files (warped as before,
in journal order), saves a checkpoint of the result, and returns what the worker must know about every frame
already judged. It runs on the starting thread, before the worker and writer exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from livestack.config import Config
from livestack.live.stacks import Stacks
from livestack.live.state import CheckpointStore, Journal, content_hash, is_legacy_hash, recover
from livestack.live.writer import Outputs

__all__ = ["Resumed", "resume"]

log = logging.getLogger("livestack.live.recovery")


@dataclass
class Resumed:
    """What the journal says about the frames already judged (handed to the worker, which then owns it).

    Attributes
    ----------
    known : dict
        ``(path, size, mtime_ns)`` to content hash: files judged, skipped without reading.
    hashes : set of str
        Every judged content: a file with one of these is a duplicate.
    legacy_hash : str or None
        One of ``hashes`` made before XXH3, when the journal holds such: new files are then also hashed
        that way (``content_hash(path, like=legacy_hash)``) to recognise the frames it recorded.
    received, accepted, rejected : int
        Counts over the whole journal.
    """

    known: dict[tuple[str, int, int], str] = field(default_factory=dict)
    hashes: set[str] = field(default_factory=set)
    legacy_hash: str | None = None
    received: int = 0
    accepted: int = 0
    rejected: int = 0


def resume(config: Config, journal: Journal, store: CheckpointStore, stacks: Stacks,
           outputs: Outputs) -> Resumed:
    """Load the last checkpoint and replay the journal after it into ``stacks``.

    Parameters
    ----------
    config : Config
    journal : Journal
        Open.
    store : CheckpointStore
    stacks : Stacks
        Fresh; receives the recovered stack and session.
    outputs : Outputs
        Receives the last journal seq; saves the recovered stack's checkpoint.

    Returns
    -------
    Resumed

    Raises
    ------
    StateError
        When the journal and checkpoints disagree, or a checkpoint holds another method's stack.
    """
    memory = Resumed()
    entries = journal.entries()
    for e in entries:
        memory.known[(e.path, e.size, e.mtime_ns)] = e.hash
        memory.hashes.add(e.hash)
        if is_legacy_hash(e.hash):
            memory.legacy_hash = e.hash
        memory.received += 1
        if e.verdict == "accepted":
            memory.accepted += 1
        else:
            memory.rejected += 1
    outputs.seq = max((e.seq for e in entries), default=0)
    plan = recover(journal, store, entries)
    # The plan's session, not only the checkpoint's: after a reset whose empty checkpoint a crash prevented,
    # the journal may already be in the new session with nothing accepted to replay; going on in the old
    # one would make every later journal line "older than the session before it".
    session = max(plan.session, stacks.session)
    if plan.checkpoint is not None or session != 1:
        stacks.reset(stacks.new_stacker(session), session)
    if plan.checkpoint is not None:
        arrays = store.load(plan.checkpoint)
        stacks.restore(arrays, plan.checkpoint.meta)
    replayed = 0
    for entry in plan.replay:
        if entry.session != stacks.session:
            stacks.reset(stacks.new_stacker(entry.session), entry.session)
        # Each frame to its target's stack, as when it was stacked (the journal keeps its OBJECT).
        stacks.select(stacks.key_of(entry.facts.get("object") if entry.facts else None))
        path = Path(entry.path)
        try:
            same = content_hash(path, like=entry.hash) == entry.hash
        except OSError:
            same = False
        if not same:
            log.error("%s was stacked before the restart but is gone or changed; the stack lacks it", path)
            continue
        result = stacks.stacker.process(path)
        if not result.accepted:
            log.error("%s was accepted before the restart but not now: %s", path, result.reason)
        replayed += 1
    stacks.changed()
    if plan.checkpoint is not None or replayed:
        log.info("resumed session %d: %d frames from the checkpoint, %d stacked again from files",
                 stacks.session, sum(s.count for s in stacks.targets()) - replayed, replayed)
        saved = outputs.checkpoint_now()
        for stacker in stacks.targets():
            # Median cubes folded into kappa-sigma while replaying: no checkpoint needs them once this one
            # is saved (else the next start replays the same frames from the older checkpoint and cube).
            for cube in stacker.take_retired():
                if saved:
                    cube.discard()
    _remove_orphan_cubes(config, stacks, checkpointed=plan.checkpoint is not None)
    return memory


def _remove_orphan_cubes(config: Config, stacks: Stacks, checkpointed: bool) -> None:
    workdir = stacks.stacker.workdir
    if checkpointed or config.stack.method != "median" or not workdir or not workdir.is_dir():
        return
    # A crash before the session's first checkpoint leaves a median cube that nothing names: its frames
    # were just stacked again into a new cube. Left alone, each such crash costs the disk up to
    # checkpoint_every_frames frames.
    current = {f.get("acc_text", {}).get("cube") for stacker in stacks.targets()
               for f in stacker.checkpoint()[1].get("filters", ())}
    for stray in workdir.glob("median-*.cube"):
        if stray.name not in current:
            try:
                stray.unlink()
            except OSError as exc:
                log.warning("cannot remove %s, a median cube no checkpoint names: %s", stray, exc)
            else:
                log.info("removed %s, a median cube no checkpoint names (left by a crash)", stray)
