"""The ``livestack`` command: stack, masters, restack, compose, photometry, solve, simulate, run, demo,
tui, web, keys, config."""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from livestack import __version__
from livestack.errors import LivestackError

__all__ = ["main"]

log = logging.getLogger("livestack")

_FITS_OUT = (".fits", ".fit", ".fts")
_METHODS = ("mean", "kappa-sigma", "median", "max", "mean-without-max")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 1 when nothing could be done, 2 for a usage or configuration error.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.command)
    try:
        status: int = args.func(args)
    except LivestackError as exc:
        print(f"livestack: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("livestack: interrupted", file=sys.stderr)
        return 130
    return status


# -- livestack stack -----------------------------------------------------------------------------------

def _cmd_stack(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from livestack.pipeline import FrameResult, Stacker, expand_paths, order_by_time, reference_first
    from livestack.stages.snapshot import write_snapshot

    config = _load(args, {"stack.method": args.method, "align.reference": args.reference,
                          "frames.bayer_pattern": args.bayer, "align.interpolation": args.interpolation,
                          "output.image_format": args.image_format,
                          "calibration.masters": _abs(args.masters)})
    console = Console(stderr=True)
    paths = expand_paths(args.paths)
    if not paths:
        console.print("livestack: no files match " + " ".join(args.paths))
        return 1
    paths = order_by_time(paths, config.frames.bayer_pattern or None)
    fits_path, image_path = _stack_outputs(Path(args.output), config.output.image_format)
    fits_path.parent.mkdir(parents=True, exist_ok=True)

    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    results: list[FrameResult] = []
    with tempfile.TemporaryDirectory(prefix=".livestack-", dir=fits_path.parent) as workdir:
        stacker = Stacker(config, workdir=Path(workdir))
        columns = (TextColumn("[bold]stacking"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[name]}"), TimeRemainingColumn())
        with Progress(*columns, console=console, disable=args.quiet) as progress:
            task = progress.add_task("stack", total=len(paths), name="")
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="livestack-read") as ahead:
                # The reference is the best of the first frames (as in the daemon), stacked first; what
                # was found in those frames is not searched for again.
                found: dict[Any, Any] = {}
                paths = reference_first(stacker, paths, ahead, found)
                for result in stacker.stream(paths, ahead, found):
                    for cube in stacker.take_retired():
                        cube.discard()  # a median folded into kappa-sigma at its disk budget
                    name = Path(result.path).name
                    results.append(result)
                    if not result.accepted:
                        progress.console.print(f"[yellow]rejected[/] {name}: {result.reason}")
                    progress.update(task, name=name, advance=1)
        image = stacker.result()
        exptime = stacker.exptime
        method = stacker.method_in_use  # a median past its disk budget went on as kappa-sigma
        if image is not None and stacker.count > 0 and len(stacker.filters) > 1:
            image_path = _write_filter_stacks(stacker, results, fits_path, config,
                                              args.frames_csv or config.output.frames_csv, console)
        elif image is not None and stacker.count > 0:
            rows = _result_rows(results)
            _solve_for_stack(config, stacker, console)
            info = replace(stacker.info(), frames=rows)
            stacker.discard()  # the accumulators' memory goes back before the snapshot's pictures are made
            write_snapshot(fits_path, image, info,
                           image_format=config.output.image_format, flatten=config.output.flatten_background,
                           surface=stacker.path == "surface",
                           frames_csv=args.frames_csv or config.output.frames_csv,
                           crop=config.output.crop_coverage)
    if args.report:
        _write_report(Path(args.report), results)
    accepted = [r for r in results if r.accepted]
    reasons = Counter(r.reason for r in results if not r.accepted)
    console.print(f"[bold]{len(accepted)}[/] of {len(results)} frames stacked "
                  f"({method}), total exposure {_hms(exptime)}")
    for reason, n in reasons.most_common():
        console.print(f"  rejected {n}: {reason}")
    if not accepted:
        console.print("livestack: no frame could be stacked; nothing written")
        return 1
    console.print(f"wrote {fits_path} and {image_path}")
    return 0


def _write_filter_stacks(stacker: Any, results: Sequence[Any], fits_path: Path, config: Any, frames_csv: bool,
                         console: Any) -> Path:
    """Several filters: each filter's stack into ``<folder>/<filter>/``, the composite at ``fits_path``.

    Returns the picture written beside ``fits_path`` (the composite's, or else the first filter's).
    """
    from livestack.live.reports import safe_name
    from livestack.pipeline import build_composite, composite_info, filter_key
    from livestack.stages.snapshot import write_snapshot

    o = config.output
    stacks = {}
    picture = None
    for name in stacker.filters:
        image, info = stacker.result(name), stacker.info(name)
        stacks[name] = image
        rows = _result_rows([r for r in results if filter_key(r.meta.filter if r.meta else None) == name])
        folder = fits_path.parent / safe_name(name or "unfiltered")
        folder.mkdir(exist_ok=True)
        files = write_snapshot(folder / fits_path.name, image, replace(info, frames=rows),
                               image_format=o.image_format, flatten=o.flatten_background,
                               frames_csv=frames_csv, crop=o.crop_coverage)
        picture = picture or files.picture
        console.print(f"{name or 'unfiltered'}: {info.ncombine} frames, {_hms(info.exptime)} -> {files.fits}")
    try:
        result = build_composite(stacks, config.compose)
    except ValueError as exc:
        console.print(f"livestack: no colour composite: {exc}")
        assert picture is not None
        return picture
    info = replace(composite_info((stacker.info(n) for n in stacker.filters), result.recipe),
                   frames=_result_rows(results), cards=result.cards)
    files = write_snapshot(fits_path, result.image, info, image_format=o.image_format,
                           flatten=o.flatten_background, picture=result.picture, frames_csv=frames_csv)
    console.print(f"{result.recipe} composite (luminance: {result.luminance}) -> {files.fits}")
    return files.picture


def _result_rows(results: Sequence[Any]) -> tuple[Any, ...]:
    """The ``FRAMES`` table of a run: one row per file, numbered from 1 in the order stacked."""
    from livestack.live.state import content_hash
    from livestack.pipeline import frame_facts
    from livestack.stages.provenance import FrameRow

    rows = []
    for seq, r in enumerate(results, start=1):
        try:
            digest = content_hash(r.path)
        except OSError:
            digest = ""
        rows.append(FrameRow.from_facts(seq, digest, r.verdict, r.reason, frame_facts(r)))
    return tuple(rows)


def _stack_outputs(out: Path, image_format: str, stem: str = "stack") -> tuple[Path, Path]:
    from livestack.stages.snapshot import picture_suffix

    fits_path = out if out.name.lower().endswith(_FITS_OUT) else out / f"{stem}.fits"
    return fits_path, fits_path.with_suffix(picture_suffix(image_format))


_REPORT_COLUMNS = ("file", "verdict", "reason", "m00", "m01", "m02", "m10", "m11", "m12", "rotation_deg",
                   "scale", "inliers", "rms", "method", "rms_before", "rms_after", "stars", "fwhm",
                   "ellipticity", "background", "noise", "calibration", "defects", "t_read", "t_calibrate",
                   "t_detect", "t_align", "t_warp", "t_stack")


def _write_report(path: Path, results: Sequence[Any]) -> None:
    """One CSV row per frame (see the README for the columns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_REPORT_COLUMNS)
        for r in results:
            t, q = r.transform, r.quality
            matrix = [f"{v:.6f}" for v in t.matrix.ravel()] if t is not None else [""] * 6
            row = [r.path, r.verdict, r.reason or "", *matrix,
                   f"{t.rotation:.5f}" if t else "", f"{t.scale:.6f}" if t else "",
                   t.inliers if t else "", f"{t.rms:.4f}" if t else "", t.method if t else "",
                   _fmt(t.rms_before if t else None, 4), _fmt(t.rms_after if t else None, 4),
                   q.stars if q else "", _fmt(q.fwhm if q else None), _fmt(q.ellipticity if q else None),
                   _fmt(q.background if q else None), _fmt(q.noise if q else None),
                   r.calibration or "", "" if r.defects is None else r.defects]
            row += [_fmt(r.timings.get(stage), 4)
                    for stage in ("read", "calibrate", "detect", "align", "warp", "stack")]
            writer.writerow(row)


def _solve_for_stack(config: Any, stacker: Any, console: Any) -> None:
    """Plate-solve the reference when ``[wcs] solve`` asks, so the stack's FITS carries sky coordinates."""
    from livestack.pipeline import solve_reference, wants_solution
    from livestack.stages.solve import SolveFailure

    if not wants_solution(config, stacker.reference_meta):
        return
    outcome = solve_reference(config, stacker)
    if isinstance(outcome, SolveFailure):
        console.print(f"livestack: no WCS for the stack: {outcome.reason}")
        return
    stacker.use_wcs(outcome.wcs_header)
    console.print(f"plate-solved the reference in {outcome.seconds:.1f} s: centre RA {outcome.ra:.5f} Dec "
                  f"{outcome.dec:+.5f}, {outcome.scale:.3f}\"/px, up {outcome.rotation:.1f} deg E of N")


# -- livestack solve -----------------------------------------------------------------------------------

def _cmd_solve(args: argparse.Namespace) -> int:
    from dataclasses import replace as _replace

    from astropy.io import fits

    from livestack.stages.detect import detect
    from livestack.stages.frames import read_frame
    from livestack.stages.solve import SolveFailure, hints_from_header, solve

    config = _load(args, {"wcs.command": args.command, "wcs.time_limit": args.time_limit})
    path = Path(args.file)
    frame = read_frame(path, bayer_pattern=config.frames.bayer_pattern or None)
    d = config.detect
    stars, _quality = detect(frame.luminance, threshold=d.threshold, binning=d.binning, max_stars=d.max_stars)
    with fits.open(path) as hdul:
        header = next((h.header for h in hdul if h.header.get("NAXIS", 0) >= 2), hdul[0].header)
        hints = hints_from_header(header)
    if args.ra is not None or args.dec is not None:
        hints = _replace(hints, ra=args.ra, dec=args.dec)
    if args.scale is not None:
        hints = _replace(hints, scale_low=args.scale * 0.9, scale_high=args.scale * 1.1)
    outcome = solve(stars, frame.meta.shape, hints, image=frame.luminance, command=config.wcs.command,
                    time_limit=config.wcs.time_limit)
    if isinstance(outcome, SolveFailure):
        print(f"livestack: {path} not solved: {outcome.reason}", file=sys.stderr)
        return 1
    print(f"{path}: centre RA {outcome.ra:.6f} Dec {outcome.dec:+.6f} (ICRS degrees), "
          f"{outcome.scale:.4f} arcsec/pixel, up {outcome.rotation:.2f} deg east of north, "
          f"{len(outcome.matches)} catalogue stars matched, {outcome.seconds:.1f} s ({outcome.solver})")
    if args.output:
        out = Path(args.output)
        if out.resolve() == path.resolve():
            raise LivestackError("the frame is never modified: name another file with -o")
        with fits.open(path) as hdul:
            index = next((i for i, h in enumerate(hdul) if h.header.get("NAXIS", 0) >= 2), 0)
            data = hdul[index].data
            head = hdul[index].header.copy()
        for key in [k for k in head if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD", "PC", "CDELT", "A_",
                                                       "B_", "AP_", "BP_"))]:
            del head[key]
        head.update(fits.Header.fromstring(outcome.wcs_header))
        head["HISTORY"] = f"WCS by livestack solve ({outcome.solver})"
        import io

        from livestack.stages.snapshot import atomic_write

        buffer = io.BytesIO()
        fits.PrimaryHDU(data, head).writeto(buffer)
        atomic_write(out, buffer.getvalue())
        print(f"wrote {out}", file=sys.stderr)
    return 0


# -- livestack restack ---------------------------------------------------------------------------------

def _journal_session(folder: Path, session: int | None) -> tuple[Any, Any, int]:
    """The journal's entries and removals in a state folder (or an output folder holding one), and a session:
    the one asked for, or the last with a stacked frame."""
    from livestack.live.state import read_journal

    state = folder
    if not (state / "journal.jsonl").is_file() and (state / ".livestack-state" / "journal.jsonl").is_file():
        state = state / ".livestack-state"  # an output folder, with its state inside
    journal = state / "journal.jsonl"
    if not journal.is_file():
        raise LivestackError(f"{folder} holds no journal.jsonl: name a daemon's state or output folder")
    entries, removals = read_journal(journal)
    sessions = sorted({e.session for e in entries if e.verdict == "accepted"})
    if not sessions:
        raise LivestackError(f"the journal {journal} has no stacked frame")
    chosen = sessions[-1] if session is None else session
    if chosen not in sessions:
        listed = ", ".join(map(str, sessions))
        raise LivestackError(f"session {chosen} has no stacked frame; sessions: {listed}")
    return entries, removals, chosen


def _cmd_restack(args: argparse.Namespace) -> int:
    from livestack.live import ledger
    from livestack.live.state import content_hash, removed_seqs
    from livestack.pipeline import Stacker
    from livestack.stages.snapshot import write_snapshot

    entries, removals, session = _journal_session(Path(args.state_dir), args.session)
    accepted = [e for e in entries if e.session == session and e.verdict == "accepted"]
    seqs, names = ledger.parse_exclusions(args.exclude or [])
    unknown = sorted(seqs - {e.seq for e in entries if e.session == session})
    if unknown:
        raise LivestackError(f"--exclude names frame {unknown[0]}, which session {session} does not have")
    excluded = {e.seq for e in ledger.select(accepted, names=names)} | seqs
    removed = removed_seqs(removals, session)
    kept = [e for e in accepted if e.seq not in excluded and e.seq not in removed]
    references = [e for e in accepted if e.reference]
    if not kept:
        raise LivestackError("every frame is excluded or removed: nothing to stack")
    if not references:
        raise LivestackError(f"the journal does not say which frame session {session} was aligned to")
    config = _load(args, {"stack.method": args.method, "align.interpolation": args.interpolation,
                          "output.image_format": args.image_format})
    fits_path, image_path = _stack_outputs(Path(args.output), config.output.image_format)
    fits_path.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    missing = 0
    with tempfile.TemporaryDirectory(prefix=".livestack-", dir=fits_path.parent) as workdir:
        stacker = Stacker(config, workdir=Path(workdir))
        problem = stacker.use_reference(references[-1].path)
        if problem:
            raise LivestackError(f"the reference {references[-1].path} cannot be read again: {problem}")
        for e in kept:
            assert e.transform is not None
            try:
                if content_hash(e.path, like=e.hash) != e.hash:
                    raise OSError("its content changed since it was stacked")
                stacker.add_known(e.path, e.transform, ledger.weight(e), e.facts)
            except (OSError, LivestackError) as exc:
                missing += 1
                print(f"livestack: left out {e.path}: {exc}", file=sys.stderr)
        rows = ledger.frame_rows(entries, removals, session, excluded=excluded,
                                 excluded_reason="excluded from this restack")
        image = stacker.result()
        if image is None or stacker.count == 0:
            print("livestack: no frame could be stacked; nothing written", file=sys.stderr)
            return 1
        write_snapshot(fits_path, image, replace(stacker.info(), frames=rows),
                       image_format=config.output.image_format, flatten=config.output.flatten_background,
                       surface=stacker.path == "surface",
                       frames_csv=args.frames_csv or config.output.frames_csv,
                       crop=config.output.crop_coverage)
    print(f"{stacker.count} of {len(accepted)} frames of session {session} stacked again "
          f"({config.stack.method}, no re-alignment); {len(accepted) - len(kept)} excluded or removed"
          + (f", {missing} unreadable" if missing else ""), file=sys.stderr)
    print(f"wrote {fits_path} and {image_path}", file=sys.stderr)
    return 0 if not missing else 1


# -- livestack compose ---------------------------------------------------------------------------------

def _cmd_compose(args: argparse.Namespace) -> int:
    import numpy as np
    from astropy.io import fits

    from livestack.pipeline import build_composite
    from livestack.stages.snapshot import write_snapshot

    config = _load(args, {"compose.recipe": args.recipe, "compose.combine": args.combine,
                          "compose.scale": args.scale, "compose.background": args.background,
                          "compose.weights": args.weights, "output.image_format": args.image_format})
    stacks: dict[str, np.ndarray] = {}
    headers: list[fits.Header] = []
    for item in args.stacks:
        path = Path(item)
        try:
            with fits.open(path) as hdul:
                hdu = next(h for h in hdul if h.data is not None)
                data = np.asarray(hdu.data, dtype=np.float32)
                header = hdu.header.copy()
        except (OSError, StopIteration, ValueError) as exc:
            raise LivestackError(f"{path} is not a readable FITS stack ({exc or 'no image'}).") from exc
        if data.ndim == 3 and data.shape[0] == 3:
            data = np.moveaxis(data, 0, 2)  # the 3-plane cube of a colour stack
        # The folder of a per-filter snapshot (<target>/<filter>/stack.fits) names the filter when the
        # header does not.
        name = str(header.get("FILTER", "") or path.parent.name).strip()
        if name in stacks:
            raise LivestackError(f"two stacks are for the filter {name!r}: give one per filter.")
        stacks[name] = data
        headers.append(header)
    try:
        result = build_composite(stacks, config.compose)
    except ValueError as exc:
        raise LivestackError(str(exc)) from exc
    fits_path, image_path = _stack_outputs(Path(args.output), config.output.image_format, "composite")
    fits_path.parent.mkdir(parents=True, exist_ok=True)
    info = replace(_composite_info(headers, result.recipe), cards=result.cards)
    write_snapshot(fits_path, result.image, info, image_format=config.output.image_format,
                   flatten=config.output.flatten_background, picture=result.picture)
    slots = ", ".join(f"{slot} <- {source}" for slot, source in result.slots.items())
    print(f"{result.recipe} composite (luminance: {result.luminance}; {slots})", file=sys.stderr)
    print(f"wrote {fits_path} and {image_path}", file=sys.stderr)
    return 0


def _composite_info(headers: Sequence[Any], recipe: str) -> Any:
    """Header facts of a composite: frames and exposure summed over its stacks, the first stack's WCS."""
    from datetime import datetime

    from livestack.stages.snapshot import StackInfo

    def when(header: Any, key: str) -> datetime | None:
        try:
            return datetime.fromisoformat(str(header[key])) if key in header else None
        except ValueError:
            return None

    starts = [t for t in (when(h, "DATE-OBS") for h in headers) if t is not None]
    ends = [t for t in (when(h, "DATE-END") for h in headers) if t is not None]
    first = headers[0]
    wcs = None
    with contextlib.suppress(Exception):
        from astropy.wcs import WCS

        celestial = WCS(first).celestial
        wcs = celestial.to_header().tostring() if celestial.has_celestial else None
    return StackInfo(ncombine=sum(int(h.get("NCOMBINE", 0)) for h in headers),
                     exptime=sum(float(h.get("EXPTIME", 0.0)) for h in headers),
                     date_obs=min(starts) if starts else None, date_end=max(ends) if ends else None,
                     method=str(first.get("STACKMET", "")) or "unknown", object=first.get("OBJECT"),
                     filter=recipe, wcs_header=wcs)


# -- livestack masters ---------------------------------------------------------------------------------

def _cmd_masters(args: argparse.Namespace) -> int:
    from livestack.pipeline import expand_paths
    from livestack.stages.calibrate import make_masters

    config = _load(args, {"frames.bayer_pattern": args.bayer})
    paths = expand_paths(args.paths)
    if not paths:
        print("livestack: no files match " + " ".join(args.paths), file=sys.stderr)
        return 1
    lines = make_masters(paths, Path(args.output), method=args.method,
                         bayer_pattern=config.frames.bayer_pattern or None,
                         temperature_tolerance=config.calibration.temperature_tolerance)
    for line in lines:
        print(line, file=sys.stderr)
    return 0 if any(line.startswith("wrote ") for line in lines) else 1


# -- livestack photometry ------------------------------------------------------------------------------

def _cmd_photometry(args: argparse.Namespace) -> int:
    import numpy as np

    from livestack.live.state import content_hash, removed_seqs
    from livestack.pipeline import FrameResult, Stacker, photometry_setup
    from livestack.stages.align import Transform
    from livestack.stages.frames import read_meta
    from livestack.stages.photometry import Photometer, write_lightcurve

    entries, removals, session = _journal_session(Path(args.folder), args.session)
    config = _load(args, {"photometry.targets": args.target, "photometry.comparisons": args.comparisons,
                          "photometry.gain": args.gain, "photometry.site": args.site})
    if not config.photometry.targets:
        raise LivestackError("name at least one --target ('x,y' on the reference, or 'sky RA DEC')")
    removed = removed_seqs(removals, session)
    kept = [e for e in entries if e.session == session and e.verdict == "accepted" and e.seq not in removed]
    references = [e for e in kept if e.reference]
    wcs = read_meta(references[0].path).wcs_header if references else None
    stacker = Stacker(config)
    photometer: Photometer | None = None
    setup = None
    skipped = 0
    for e in kept:
        assert e.transform is not None
        try:
            if content_hash(e.path, like=e.hash) != e.hash:
                raise OSError("its content changed since it was stacked")
        except OSError as exc:
            skipped += 1
            print(f"livestack: left out {e.path}: {exc}", file=sys.stderr)
            continue
        prepared = stacker.prepare(e.path)
        if isinstance(prepared, FrameResult):
            skipped += 1
            print(f"livestack: left out {e.path}: {prepared.reason}", file=sys.stderr)
            continue
        transform = Transform.from_matrix(np.asarray(e.transform, dtype=np.float64).reshape(2, 3), "journal")
        if setup is None:
            try:
                setup = photometry_setup(config, prepared, transform, wcs)
            except ValueError as exc:
                raise LivestackError(str(exc)) from exc
            assert setup is not None
            for note in setup.notes:
                print(f"livestack: {note}", file=sys.stderr)
            photometer = Photometer(setup.plan, setup.time_scale)
        assert photometer is not None
        fwhm = prepared.quality.fwhm
        photometer.add(e.seq, Path(e.path).name, setup.time(prepared.frame.meta),
                       setup.plan.cut(prepared.frame.luminance, transform.matrix, fwhm), fwhm)
    if photometer is None or setup is None:
        print("livestack: no frame could be measured; nothing written", file=sys.stderr)
        return 1
    out = write_lightcurve(Path(args.output), photometer.curve, setup.describe())
    for star in setup.plan.targets:
        points = [r for r in photometer.curve.rows if r.target == star.name and not r.flags]
        mags = np.array([r.magnitude for r in points], dtype=np.float64)
        spread = f"{np.nanstd(mags) * 1000:.1f} mmag rms" if mags.size > 1 else "one point"
        print(f"{star.name}: {len(points)} clean points, {spread}", file=sys.stderr)
    print(f"{len(kept) - skipped} frames of session {session} measured against "
          f"{len(setup.plan.comparisons)} comparison stars ({setup.time_scale}); wrote {out}",
          file=sys.stderr)
    return 0 if not skipped else 1


# -- livestack simulate --------------------------------------------------------------------------------

#: OBJECT written for each simulated target.
_TARGET_OBJECTS = {"stars": "SIM-FIELD", "moon": "Moon", "planet": "Jupiter"}


def _cmd_simulate(args: argparse.Namespace) -> int:
    from livestack.simulate import SimConfig, parse_filters, simulate

    width, height = _size(args.size)
    config = SimConfig(frames=args.frames, interval=args.interval, size=(width, height), seed=args.seed,
                       bayer=args.bayer, flip_at=args.flip_at, bad_frames=_indices(args.bad),
                       trails=_indices(args.trails), write_mode=args.write_mode,
                       filters=parse_filters(args.filters) if args.filters else (), target=args.target,
                       object_name=_TARGET_OBJECTS[args.target], fixed_pattern=args.fixed_pattern,
                       hot_pixels=args.hot_pixels, blank_frames=_indices(args.blank), dither=args.dither,
                       barrel=args.barrel)
    out = Path(args.outdir)
    print(f"simulating {args.frames} frames of {width}x{height} into {out} every {args.interval:g} s",
          file=sys.stderr)
    paths = simulate(out, config, on_written=lambda p: print(f"wrote {p}", file=sys.stderr))
    print(f"{len(paths)} frames written; true transforms in {out / 'truth.csv'}", file=sys.stderr)
    return 0


# -- livestack run -------------------------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    from livestack.live.daemon import Daemon

    config = _load(args, {"watch.folder": _abs(args.watch), "output.folder": _abs(args.output),
                          "watch.polling": True if args.polling else None,
                          "stack.method": args.method})
    daemon = Daemon(config)
    _install_signals(daemon.request_stop)
    tui = args.tui and sys.stdin.isatty() and sys.stdout.isatty()
    if not tui and args.web is None:
        return daemon.run()
    daemon.start()
    web = None
    try:
        web = _web_beside(args, config, daemon)
        if tui:
            from livestack.clients.tui.app import LivestackApp, run_app

            # The dashboard closes when a signal or a `shutdown` request stops the daemon; quitting the
            # dashboard stops the daemon (final checkpoint and snapshot) in the finally.
            run_app(LivestackApp(daemon.publish_endpoint, daemon.control_endpoint, attached=True),
                    stop_requested=daemon.wait)
        else:
            while not daemon.wait(1.0):
                pass
    finally:
        if web is not None:
            web.stop()
        daemon.stop()
    s = daemon.stats
    print(f"livestack: stopped; {s.accepted} stacked, {s.rejected} rejected of {s.received} frames; "
          f"snapshots in {daemon.session_dir}", file=sys.stderr)
    return 0


def _install_signals(stop: Callable[[], None]) -> None:
    """First SIGINT/SIGTERM: stop cleanly (finish the frame, checkpoint, snapshot); second SIGINT: now."""
    import os
    import signal

    count = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal count
        count += 1
        if count > 1 and signum == signal.SIGINT:
            os._exit(130)
        log.warning("%s received: finishing the frame in hand, then checkpoint and snapshot "
                    "(Ctrl-C again to quit at once)", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# -- livestack demo ------------------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile
    import threading
    import time

    from livestack.live.daemon import Daemon
    from livestack.simulate import SimConfig, parse_filters, simulate

    output = Path(args.output).resolve()
    use_tui = not args.plain and sys.stdin.isatty() and sys.stdout.isatty()
    with tempfile.TemporaryDirectory(prefix="livestack-demo-") as tmp:
        frames_dir = Path(tmp) / "frames"
        frames_dir.mkdir()
        config = _load(args, {
            "watch.folder": str(frames_dir), "output.folder": str(output),
            "state.folder": str(Path(tmp) / "state"), "watch.settle": 0.5, "watch.poll_interval": 0.25,
            "output.every_frames": 5, "network.preview_interval": 2.0, "web.display_interval": 2.0,
            "compose.every_seconds": 5.0,
            "network.publish": "tcp://127.0.0.1:*", "network.control": "tcp://127.0.0.1:*"})
        width, height = _size(args.size)
        sim = SimConfig(frames=args.frames, interval=args.interval, size=(width, height), seed=args.seed,
                        bad_frames=(args.frames * 2 // 3,), trails=(args.frames // 3,), write_mode="mixed",
                        subdir_every=7, filters=parse_filters(args.filters) if args.filters else ())
        printer = _DemoPrinter(args.frames, quiet=use_tui)
        daemon = Daemon(config, listeners=[printer])
        stop = threading.Event()

        def stop_all() -> None:
            stop.set()
            daemon.request_stop()

        def pause(seconds: float) -> None:
            # The camera's clock: a stop ends the night instead of rushing the remaining frames out.
            if stop.wait(seconds):
                raise _CameraStoppedError

        _install_signals(stop_all)
        daemon.start()
        try:
            web = _web_beside(args, config, daemon)
        except BaseException:
            daemon.stop()
            raise
        written: list[Path] = []
        app: LivestackApp | None = None
        if use_tui:
            from livestack.clients.tui.app import LivestackApp, run_app

            app = LivestackApp(daemon.publish_endpoint, daemon.control_endpoint, attached=True)

        def camera() -> None:
            def note(path: Path) -> None:
                written.append(path)

            if app is not None:
                # A subscriber hears only what is published after it connects: let the dashboard hear
                # the daemon's heartbeat before the first frame, so that its table misses none.
                deadline = time.monotonic() + 10.0
                while not app.heard.wait(0.1) and not stop.is_set() and time.monotonic() < deadline:
                    pass
            with contextlib.suppress(_CameraStoppedError):
                simulate(frames_dir, sim, sleep=pause, on_written=note)
            if app is not None and not stop.is_set():
                app.note(f"camera finished: {len(written)} frames. The dashboard stays; q stops the "
                         "daemon (final snapshot) and prints the summary.")

        thread = threading.Thread(target=camera, name="livestack-demo-camera", daemon=True)
        thread.start()
        print(f"demo: a simulated camera writes {args.frames} frames of {width}x{height} every "
              f"{args.interval:g} s; snapshots go to {output}", file=sys.stderr)
        try:
            if app is not None:
                # Until q, or a signal (which stops the daemon and so closes the dashboard).
                run_app(app, stop_requested=daemon.wait)
            else:
                told = False
                while not daemon.wait(0.2):
                    done = daemon.stats.received + daemon.stats.duplicates
                    if not thread.is_alive() and done >= len(written) and daemon.status()["queue"] == 0:
                        if args.web is None:
                            break
                        if not told:  # the viewer stays up for the audience until Ctrl-C
                            told = True
                            print("demo: the camera is done; the viewer stays until Ctrl-C", file=sys.stderr)
        finally:
            stop.set()
            thread.join()
            if web is not None:
                web.stop()
            daemon.stop()
        s = daemon.stats
        print(f"demo: {s.accepted} stacked, {s.rejected} rejected of {s.received} frames; "
              f"total exposure {_hms(daemon.stacker.exptime)}", file=sys.stderr)
        for reason, n in printer.reasons.most_common():
            print(f"  rejected {n}: {reason}", file=sys.stderr)
        print(f"snapshots: {', '.join(sorted(str(p) for p in output.rglob('stack.*')))}", file=sys.stderr)
    return 0 if daemon.stats.accepted else 1


class _CameraStoppedError(Exception):
    """Raised inside the simulated camera's sleep to end the demo early."""


class _DemoPrinter:
    """Plain progress lines from the daemon's events."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.quiet = quiet
        self.reasons: Counter[str] = Counter()

    def __call__(self, event: Any) -> None:
        p = event.payload
        if event.topic == "frame" and p["verdict"] != "received":
            if p["verdict"] == "rejected":
                self.reasons[p["reason"]] += 1
            if self.quiet:
                return
            if p["verdict"] == "accepted":
                t = p["transform"] or {}
                detail = (f"stars {p['stars']:4d}  FWHM {p['fwhm'] or float('nan'):.2f}  "
                          f"shift ({t.get('dx', 0):+7.2f}, {t.get('dy', 0):+7.2f})  "
                          f"rot {t.get('rotation', 0):+7.3f} deg  latency {p['latency']:.2f} s")
            else:
                detail = p["reason"]
            print(f"[{p['seq']:3d}/{self.total}] {p['name']:<16} {p['verdict']:<8} {detail}", file=sys.stderr)
        elif event.topic == "snapshot" and not self.quiet:
            print(f"          snapshot of {p['frames']} frames -> {p['image']}", file=sys.stderr)


# -- livestack tui and keys ----------------------------------------------------------------------------

def _cmd_tui(args: argparse.Namespace) -> int:
    from livestack.clients.tui.app import run_tui

    run_tui(args.connect, args.control, Path(args.keys) if args.keys else None, lightcurve_bin=args.bin)
    return 0


def _cmd_web(args: argparse.Namespace) -> int:
    import threading

    from livestack.clients.bus import ClientKeys
    from livestack.clients.web.app import WebSettings
    from livestack.clients.web.server import WebServer

    config = _load(args, {"web.listen": args.listen})
    token = _control_token(args)
    keys = ClientKeys.load(args.keys) if args.keys else None
    settings = WebSettings(connect=args.connect, control=args.control, keys=keys, caption=config.web.caption,
                           control_token=token)
    _quiet_uvicorn(args.verbose)
    server = WebServer(settings, config.web.listen)
    stop = threading.Event()
    _install_signals(stop.set)
    server.start()
    try:
        _announce(server.url, token)
        stop.wait()
    finally:
        server.stop()
    return 0


def _web_beside(args: argparse.Namespace, config: Any, daemon: Any) -> Any:
    """The viewer beside a started daemon in this process (``--web``), connected to its sockets, serving;
    or None without ``--web``. The caller stops it."""
    if args.web is None:
        return None
    from livestack.clients.web.app import WebSettings
    from livestack.clients.web.server import WebServer

    if config.network.server_secret_key:
        raise LivestackError("--web connects to the daemon's own sockets without keys; with CURVE keys "
                             "configured, run `livestack web --keys DIR` beside the daemon instead")
    token = _control_token(args)
    settings = WebSettings(connect=_local(daemon.publish_endpoint), control=_local(daemon.control_endpoint),
                           caption=config.web.caption, control_token=token)
    _quiet_uvicorn(args.verbose)
    server = WebServer(settings, args.web or config.web.listen)
    server.start()
    _announce(server.url, token)
    return server


def _control_token(args: argparse.Namespace) -> str | None:
    """``--control-token TOKEN``, a new random one for ``--control-token`` alone, else the environment's."""
    import os
    import secrets

    given = args.control_token
    if given is None:
        given = os.environ.get("LIVESTACK_CONTROL_TOKEN") or None
    elif given == "":
        return secrets.token_urlsafe(18)
    if given is not None and len(given) < _MIN_TOKEN:
        raise LivestackError(f"a control token must have at least {_MIN_TOKEN} characters (or give "
                             "--control-token alone to have one made)")
    return given


_MIN_TOKEN = 12


def _announce(url: str, token: str | None) -> None:
    print(f"viewer: {url}  (kiosk: {url}?kiosk=1)", file=sys.stderr)
    if token is not None:
        print(f"control: {url}?token={token}  (keep this link private)", file=sys.stderr)


def _local(endpoint: str) -> str:
    """Where this process reaches its own daemon's socket (a wildcard bind is reached on loopback)."""
    return endpoint.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:").replace("tcp://[::]:", "tcp://[::1]:")


def _quiet_uvicorn(verbose: int) -> None:
    # uvicorn tells of each start and stop at info; livestack says what matters itself.
    if verbose < 2:
        logging.getLogger("uvicorn").setLevel(logging.WARNING)


def _cmd_keys(args: argparse.Namespace) -> int:
    from livestack.live.net import generate_keys

    public, secret = generate_keys(args.directory, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private)")
    return 0


# -- livestack config ----------------------------------------------------------------------------------

def _cmd_config(args: argparse.Namespace) -> int:
    from livestack.config import load_config, render_toml

    if args.check:
        load_config(args.check)
        print(f"{args.check}: valid")
        return 0
    sys.stdout.write(render_toml())
    return 0


# -- helpers -------------------------------------------------------------------------------------------

def _load(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    from livestack.config import load_config

    return load_config(args.config).with_overrides(overrides)


def _abs(value: str | None) -> str | None:
    """Command-line paths are relative to the current folder (config paths to the config file)."""
    return None if value is None else str(Path(value).expanduser().resolve())


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like 1600x1200, not {text!r}") from exc
    return w, h


def _indices(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise LivestackError(f"frame indices must be comma-separated numbers, not {text!r}") from exc


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:
        return ""
    return f"{value:.{digits}f}"


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m{s % 60:02d}s"


def _setup_logging(verbose: int, command: str = "") -> None:
    """Log to stderr; under systemd (JOURNAL_STREAM set) prefix syslog priorities for journald."""
    import os

    quiet_commands = ("stack", "masters", "restack", "compose", "simulate", "config", "keys", "tui")
    quiet = logging.WARNING if command in quiet_commands else logging.INFO
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else quiet
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _JournalFormatter(logging.Formatter):
    """``<N>`` syslog priority prefixes, which journald reads as the message's level."""

    _PRIORITY: ClassVar[dict[int, int]] = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                                           logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livestack", description="Live stacking of astronomical frames.")
    p.add_argument("--version", action="version", version=f"livestack {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("stack", help="stack files, folders or globs into one image")
    s.add_argument("paths", nargs="+", metavar="PATH", help="FITS files, folders or glob patterns")
    s.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output FITS file (picture beside it) or a folder for stack.fits and the picture")
    s.add_argument("--config", metavar="FILE", help="configuration file (default: built-in defaults)")
    s.add_argument("--method", choices=_METHODS, help="stacking method")
    s.add_argument("--reference", metavar="FILE", help="frame to align onto")
    s.add_argument("--bayer", choices=("RGGB", "BGGR", "GRBG", "GBRG"),
                   help="Bayer pattern for cameras that write none")
    s.add_argument("--interpolation", choices=("bilinear", "bicubic", "lanczos"))
    s.add_argument("--image-format", choices=("jpeg", "png"), help="format of the picture")
    s.add_argument("--report", metavar="FILE.csv", help="write one CSV row per frame")
    s.add_argument("--frames-csv", action="store_true",
                   help="also write the FRAMES table as CSV beside the FITS (stack.frames.csv)")
    s.add_argument("--masters", metavar="DIR", help="folder of calibration masters (overrides [calibration] "
                   "masters)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_stack)

    rs = sub.add_parser("restack", help="stack a session again from its journal, without re-aligning")
    rs.add_argument("state_dir", metavar="STATE_DIR", help="the daemon's state folder (holds journal.jsonl)")
    rs.add_argument("-o", "--output", default="restack.fits", metavar="OUT",
                    help="output FITS file (picture beside it) or a folder (default: restack.fits)")
    rs.add_argument("--method", choices=("mean", "kappa-sigma", "median"), help="stacking method")
    rs.add_argument("--exclude", nargs="+", metavar="ITEM",
                    help="frames to leave out: journal numbers (12), ranges (12-15), file names or globs")
    rs.add_argument("--session", type=int, metavar="N", help="session to stack (default: the last)")
    rs.add_argument("--config", metavar="FILE", help="configuration file (default: built-in defaults)")
    rs.add_argument("--interpolation", choices=("bilinear", "bicubic", "lanczos"))
    rs.add_argument("--image-format", choices=("jpeg", "png"), help="format of the picture")
    rs.add_argument("--frames-csv", action="store_true",
                    help="also write the FRAMES table as CSV beside the FITS")
    rs.set_defaults(func=_cmd_restack)

    sv = sub.add_parser("solve", help="plate-solve one frame or stack with a local solver")
    sv.add_argument("file", metavar="FILE", help="a FITS frame or stack (never modified)")
    sv.add_argument("-o", "--output", metavar="OUT.fits", help="write a copy of FILE with the solved WCS")
    sv.add_argument("--ra", type=float, metavar="DEG", help="pointing hint, degrees (default: the header's)")
    sv.add_argument("--dec", type=float, metavar="DEG", help="pointing hint, degrees")
    sv.add_argument("--scale", type=float, metavar="ARCSEC", help="pixel scale hint, arcseconds per pixel")
    sv.add_argument("--time-limit", type=float, metavar="S", help="seconds the solver may take")
    sv.add_argument("--command", metavar="TEMPLATE", help="another solver's command template")
    sv.add_argument("--config", metavar="FILE", help="configuration file (default: built-in defaults)")
    sv.set_defaults(func=_cmd_solve)

    ms = sub.add_parser("masters", help="build calibration masters (bias, dark, flat, dark-flat) from raw "
                        "files")
    ms.add_argument("paths", nargs="+", metavar="RAW", help="raw calibration FITS files, folders or globs")
    ms.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the masters")
    ms.add_argument("--method", choices=("kappa-sigma", "median"), default="kappa-sigma",
                    help="how frames are combined (default kappa-sigma)")
    ms.add_argument("--bayer", choices=("RGGB", "BGGR", "GRBG", "GBRG", "MONO"),
                    help="Bayer pattern for cameras that write none")
    ms.add_argument("--config", metavar="FILE", help="configuration file ([calibration] keys)")
    ms.set_defaults(func=_cmd_masters)

    ph = sub.add_parser("photometry", help="light curves of chosen stars, measured again from a journal")
    ph.add_argument("folder", metavar="STATE_OR_OUTPUT_DIR",
                    help="the daemon's state folder (holds journal.jsonl) or its output folder")
    ph.add_argument("--target", action="append", metavar="SPEC",
                    help="a star: 'x,y' on the reference or 'sky RA DEC' (degrees), optionally 'NAME=...'; "
                         "repeat for more (default: [photometry] targets)")
    ph.add_argument("-o", "--output", default="lightcurve.ecsv", metavar="FILE",
                    help="the light curve, ECSV (or CSV for a .csv name; default: lightcurve.ecsv)")
    ph.add_argument("--comparisons", type=int, metavar="N", help="comparison stars chosen automatically")
    ph.add_argument("--gain", type=float, metavar="E_PER_ADU", help="electrons per ADU")
    ph.add_argument("--site", metavar="LAT,LON[,H]", help="observatory, for BJD_TDB times")
    ph.add_argument("--session", type=int, metavar="N", help="session to measure (default: the last)")
    ph.add_argument("--config", metavar="FILE", help="configuration file (default: built-in defaults)")
    ph.set_defaults(func=_cmd_photometry)

    m = sub.add_parser("simulate", help="write simulated camera frames at a cadence")
    m.add_argument("outdir", metavar="OUTDIR")
    m.add_argument("--frames", type=int, default=20)
    m.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    m.add_argument("--size", default="1600x1200", help="WIDTHxHEIGHT")
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--bayer", choices=("RGGB", "BGGR", "GRBG", "GBRG"), help="write a colour mosaic")
    m.add_argument("--flip-at", type=int, metavar="N", help="meridian flip (180 deg) from frame N")
    m.add_argument("--bad", metavar="N,N", help="indices of bad frames (cloud, wind)")
    m.add_argument("--trails", metavar="N,N", help="indices of frames with a satellite trail")
    m.add_argument("--write-mode", choices=("atomic", "chunked", "rename", "mixed"), default="atomic")
    m.add_argument("--filters", metavar="CYCLE",
                   help="filter wheel cycle, e.g. L,R,G,B or R*5,G*5,B*5 (L R G B Ha OIII SII)")
    m.add_argument("--target", choices=("stars", "moon", "planet"), default="stars",
                   help="a star field, a crop of the Moon's surface, or a planet's disk")
    m.add_argument("--fixed-pattern", type=float, default=1.0, metavar="X",
                   help="moon/planet: the sensor's fixed pattern, in multiples of the target's contrast")
    m.add_argument("--hot-pixels", type=int, metavar="N", help="number of hot pixels on the sensor")
    m.add_argument("--blank", metavar="N,N", help="indices of frames with nothing in view")
    m.add_argument("--dither", type=float, default=0.0, metavar="PX",
                   help="largest random offset of each frame in x and y, pixels (a dithering mount)")
    m.add_argument("--barrel", type=float, default=0.0, metavar="K",
                   help="wide-field lens: barrel distortion, the fraction a corner star moves inwards "
                        "(0.01 = 1%%)")
    m.set_defaults(func=_cmd_simulate)

    o = sub.add_parser("compose", help="a colour composite from per-filter stack FITS files")
    o.add_argument("stacks", nargs="+", metavar="STACK", help="per-filter stacks (FILTER from the header, "
                   "else the folder name), or a colour stack")
    o.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output FITS file (picture beside it) or a folder for composite.fits and the picture")
    o.add_argument("--config", metavar="FILE", help="configuration file ([compose] section)")
    o.add_argument("--recipe", choices=("auto", "LRGB", "RGB", "SHO", "HOO", "mono"))
    o.add_argument("--combine", choices=("mean", "lupton"))
    o.add_argument("--scale", choices=("stars", "weights"))
    o.add_argument("--background", choices=("mesh", "level"))
    o.add_argument("--weights", metavar="F=W,...", help="per-filter weights, e.g. R=1.2,G=1,B=0.9")
    o.add_argument("--image-format", choices=("jpeg", "png"), help="format of the picture")
    o.set_defaults(func=_cmd_compose)

    r = sub.add_parser("run", help="the live daemon: watch a folder and stack what arrives")
    r.add_argument("--config", metavar="FILE", help="configuration file")
    r.add_argument("--watch", metavar="DIR", help="folder to watch (overrides [watch] folder)")
    r.add_argument("--output", metavar="DIR", help="snapshot folder (overrides [output] folder)")
    r.add_argument("--method", choices=_METHODS, help="stacking method")
    r.add_argument("--polling", action="store_true", help="poll the folder (network shares)")
    r.add_argument("--tui", action="store_true", help="show the dashboard when a terminal is attached")
    _web_options(r)
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="a simulated camera and the live daemon stacking its frames")
    d.add_argument("--output", default="demo-output", metavar="DIR", help="snapshot folder")
    d.add_argument("--frames", type=int, default=40)
    d.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    d.add_argument("--size", default="1600x1200", help="WIDTHxHEIGHT")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--config", metavar="FILE", help="configuration file")
    d.add_argument("--plain", action="store_true", help="plain progress lines even in a terminal")
    d.add_argument("--filters", metavar="CYCLE", help="a filter wheel, e.g. L,R,G,B or R*5,G*5,B*5: "
                   "per-filter stacks and a colour composite build live")
    _web_options(d)
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("tui", help="the dashboard of a running daemon, local or remote")
    t.add_argument("--connect", default="tcp://127.0.0.1:5555", metavar="ENDPOINT", help="event socket")
    t.add_argument("--control", default="tcp://127.0.0.1:5556", metavar="ENDPOINT", help="control socket")
    t.add_argument("--keys", metavar="DIR", help="folder with client.key_secret and server.key (CURVE)")
    t.add_argument("--bin", type=int, default=1, metavar="N",
                   help="photometry points averaged per point of the light curve (default 1)")
    t.set_defaults(func=_cmd_tui)

    w = sub.add_parser("web", help="the viewer in the browser, for a running daemon, local or remote")
    w.add_argument("--connect", default="tcp://127.0.0.1:5555", metavar="ENDPOINT", help="event socket")
    w.add_argument("--control", default="tcp://127.0.0.1:5556", metavar="ENDPOINT", help="control socket")
    w.add_argument("--keys", metavar="DIR", help="folder with client.key_secret and server.key (CURVE)")
    w.add_argument("--listen", metavar="HOST:PORT",
                   help="where to serve the page (default: [web] listen, 127.0.0.1:8080)")
    w.add_argument("--config", metavar="FILE", help="configuration file (for [web] caption and listen)")
    _token_option(w)
    w.set_defaults(func=_cmd_web)

    k = sub.add_parser("keys", help="make a CURVE key pair (NAME.key, NAME.key_secret)")
    k.add_argument("directory", metavar="DIR")
    k.add_argument("--name", default="server", help="file name stem (server, or a client's name)")
    k.set_defaults(func=_cmd_keys)

    c = sub.add_parser("config", help="print the default configuration, or check a file")
    c.add_argument("--check", metavar="FILE", help="validate a configuration file")
    c.set_defaults(func=_cmd_config)
    return p


def _web_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--web", nargs="?", const="", metavar="HOST:PORT",
                   help="serve the viewer in the browser too (default address: [web] listen)")
    _token_option(p)


def _token_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control-token", nargs="?", const="", metavar="TOKEN",
                   help="let pages that present TOKEN pause, snapshot and reset (alone: make one and print "
                        "it; default: $LIVESTACK_CONTROL_TOKEN, else no control)")


if __name__ == "__main__":
    sys.exit(main())
