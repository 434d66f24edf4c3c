"""Our transforms against each real set's transforms.csv: agreement, and which stacks sharper.

For each sequence in ../shared/data: the largest differences between our frame-to-reference transforms and
the CSV's (frame-centre distance, rotation, with the mean rotation offset), then the same frames stacked twice
(mean of the bicubic-warped luminance) once with each set of transforms, and the stack's median star FWHM:
the sharper stack has the more accurate registration.

Usage: ``python benchmarks/bench_reference_transforms.py``
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np

from livestack.config import Config
from livestack.pipeline import Stacker, expand_paths, order_by_time
from livestack.stages.detect import detect
from livestack.stages.frames import read_frame
from livestack.stages.stack import MeanStack
from livestack.stages.warp import warp

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"microobs_hatp32_first30": "", "seestar_m94_run2": "", "donuts_nites_J1749": "",
        "pocs_kic8462852_dslr_pair": "RGGB"}


def csv_matrix(row: dict[str, str], shape: tuple[int, int]) -> np.ndarray:
    """The CSV's similarity as a frame-to-reference matrix (dx, dy: the frame centre's shift)."""
    angle, scale = np.radians(float(row["rot_deg"])), float(row["scale"])
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])
    shift = np.array([float(row["dx"]), float(row["dy"])])
    return np.column_stack([linear, centre + shift - linear @ centre])


def stack_fwhm(paths: list[Path], matrices: dict[str, np.ndarray], bayer: str | None) -> float:
    acc: MeanStack | None = None
    for path in paths:
        lum = read_frame(path, bayer).luminance
        image, footprint = warp(lum, matrices[path.name], lum.shape, "bicubic")
        acc = acc or MeanStack(lum.shape)
        acc.add(image, footprint)
    assert acc is not None
    result = acc.result()
    _, quality = detect(np.nan_to_num(result, nan=float(np.nanmedian(result))).astype(np.float32))
    return quality.fwhm


def main() -> None:
    print("| set | max centre distance | rotation difference: mean / max | stack FWHM, our transforms | "
          "stack FWHM, transforms.csv |")
    print("| --- | --- | --- | --- | --- |")
    for name, bayer in SETS.items():
        folder = DATA / name
        with (folder / "transforms.csv").open() as fh:
            truth = {row["file"]: row for row in csv.DictReader(fh)}
        config = Config().with_overrides({"frames.bayer_pattern": bayer})
        paths = order_by_time(expand_paths([str(folder)]), bayer or None)
        ours: dict[str, np.ndarray] = {}
        theirs: dict[str, np.ndarray] = {}
        distance, rotation = [], []
        with tempfile.TemporaryDirectory() as work:
            stacker = Stacker(config, workdir=Path(work))
            for path in paths:
                result = stacker.process(path)
                assert result.transform is not None and result.meta is not None, result.reason
                ours[path.name] = result.transform.matrix
                theirs[path.name] = csv_matrix(truth[path.name], result.meta.shape)
                dx, dy = result.transform.centre_shift(result.meta.shape)
                row = truth[path.name]
                distance.append(float(np.hypot(dx - float(row["dx"]), dy - float(row["dy"]))))
                rotation.append(result.transform.rotation - float(row["rot_deg"]))
        rot = np.array(rotation[1:])
        sharp_ours = stack_fwhm(paths, ours, bayer or None)
        sharp_theirs = stack_fwhm(paths, theirs, bayer or None)
        print(f"| {name} | {max(distance):.3f} px | {rot.mean():+.4f} / {np.abs(rot).max():.4f} deg | "
              f"{sharp_ours:.3f} px | {sharp_theirs:.3f} px |", flush=True)


if __name__ == "__main__":
    main()
