"""Warm-up: the first frame's one-time costs, paid when the daemon starts instead of by the first frame.

The first frame through a fresh process pays for more than its own work: numba's kernels loaded from their
cache (compiled, after an install or an upgrade), a specialisation per number of frames held by the
kappa-sigma warm-up, modules imported on first use (astropy's table machinery for the FRAMES extension, the
picture encoders), first calls into OpenCV and sep. At 8.3 MP that is about 0.5 s on the worker's path, and
more on the writer's, which competes for the same cores while the frame is stacked.

Public API:

- ``warm_up(config, folder, stop) -> float``: run the pipeline once, with the daemon's settings, over a few
  small simulated frames of a mono and a colour camera, take the stack as the previews do after each one, and
  write its snapshot, all in a folder of its own; the seconds it took.

The daemon runs it on a thread of its own when it starts, before it watches (``[watch] warm_up``). Nothing
waits for it: a frame that arrives meanwhile is stacked at once, sharing the first calls with it. The
simulated frames go through their own ``Stacker``, never the daemon's stacks, journal or outputs.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from livestack.config import Config
from livestack.pipeline import Stacker, frame_facts
from livestack.simulate import SimConfig, simulate
from livestack.stages.provenance import FrameRow
from livestack.stages.snapshot import encode_image, preview_array, write_snapshot

__all__ = ["SIZE", "warm_up"]

#: Width and height of the simulated frames: the kernels' specialisations depend on the arrays' types and
#: dimensions, not their sizes, so small frames warm them for any camera at little cost.
SIZE = (192, 128)

#: Settings of the daemon's that do not apply to the simulated frames: its masters (another sensor), its
#: chosen reference and photometry targets (frames of its own sky), plate solving.
_OVERRIDES = {"calibration.masters": "", "align.reference": "", "photometry.targets": [], "wcs.solve": "off"}


def warm_up(config: Config, folder: Path, stop: threading.Event) -> float:
    """Run the pipeline once over small simulated frames with the daemon's settings (see the module).

    Parameters
    ----------
    config : Config
        The daemon's configuration.
    folder : Path
        For the simulated frames and their stack; emptied first (a run killed during its warm-up leaves it
        behind) and removed at the end.
    stop : threading.Event
        Checked between frames: a daemon stopping meanwhile waits for one frame's work at most.

    Returns
    -------
    float
        Seconds taken.
    """
    started = time.monotonic()
    settings = config.with_overrides(_OVERRIDES)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        for bayer in (None, "RGGB"):
            if stop.is_set():
                break
            _camera(settings, folder / (bayer or "mono"), bayer, stop)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return time.monotonic() - started


def _camera(config: Config, folder: Path, bayer: str | None, stop: threading.Event) -> None:
    """One camera's frames through a stack of their own, one past the stack's warm-up, then a snapshot."""
    count = max(config.stack.warmup, config.reject.warmup, config.calibration.defect_frames) + 1
    paths = simulate(folder / "frames", SimConfig(frames=count, interval=0.0, size=SIZE, seed=7, n_stars=1200,
                                                  bayer=bayer, drift=(0.7, -0.4)),
                     sleep=lambda _seconds: None)
    (folder / "work").mkdir()
    stacker = Stacker(config, workdir=folder / "work")
    try:
        rows = []
        for seq, path in enumerate(paths, start=1):
            if stop.is_set():
                return
            result = stacker.process(path)
            rows.append(FrameRow.from_facts(seq, "", result.verdict, result.reason, frame_facts(result)))
            # What the writer's previews and pictures take after each frame: smaller stacks (from a side
            # that makes these small frames smaller too) and the signal-to-noise sample. The whole stack,
            # as snapshots take it, is taken below.
            _taken(stacker.result_later(side=SIZE[0] // 2))
            _taken(stacker.sample_later())
        image = stacker.result()
        if image is None or stop.is_set():
            return
        o = config.output
        write_snapshot(folder / "stack.fits", image, replace(stacker.info(), frames=tuple(rows)),
                       image_format=o.image_format, flatten=o.flatten_background, frames_csv=o.frames_csv,
                       crop=o.crop_coverage)
        encode_image(preview_array(image, max_side=config.network.preview_size,
                                   flatten=o.flatten_background), "jpeg")
    finally:
        stacker.discard()


def _taken(later: Callable[[], np.ndarray] | None) -> None:
    if later is not None:
        later()
