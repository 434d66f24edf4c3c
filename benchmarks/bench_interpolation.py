"""Sharpness and cost of each warp interpolation on the real sequences in ../shared/data.

For each set and interpolation: the stack's median star FWHM over the frames' median FWHM (1.0 = no
blurring by resampling), and the warp's mean time per frame.

Usage: ``python benchmarks/bench_interpolation.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from livestack.config import Config
from livestack.pipeline import Stacker, expand_paths, order_by_time
from livestack.stages.detect import detect

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("microobs_hatp32_first30", "donuts_nites_J1749", "seestar_m94_run2")


def main() -> None:
    print("| set | interpolation | stack FWHM / median frame FWHM | warp per frame |")
    print("| --- | --- | --- | --- |")
    for name in SETS:
        paths = order_by_time(expand_paths([str(DATA / name)]))
        for interpolation in ("bilinear", "bicubic", "lanczos"):
            config = Config().with_overrides({"align.interpolation": interpolation})
            with tempfile.TemporaryDirectory() as work:
                stacker = Stacker(config, workdir=Path(work))
                fwhm, warp = [], []
                for path in paths:
                    result = stacker.process(path)
                    assert result.quality is not None
                    fwhm.append(result.quality.fwhm)
                    warp.append(result.timings.get("warp", 0.0))
                image = stacker.result()
            assert image is not None
            lum = image.mean(axis=2) if image.ndim == 3 else image
            _, quality = detect(np.nan_to_num(lum, nan=float(np.nanmedian(lum))).astype(np.float32))
            print(f"| {name} | {interpolation} | {quality.fwhm / np.median(fwhm):.3f} "
                  f"({quality.fwhm:.2f} / {np.median(fwhm):.2f} px) | {np.mean(warp) * 1000:.1f} ms |")


if __name__ == "__main__":
    main()
