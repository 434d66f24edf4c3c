"""Provenance: which frames a stack was made of, as a FITS binary table and as CSV.

Public API:

- ``FrameRow``: frozen record of one frame received for a stack (one row of the table).
- ``FrameRow.from_facts(seq, hash, verdict, reason, facts, state)``: a row from the JSON-able facts that the
  pipeline gives per frame (``pipeline.frame_facts``) and the daemon journals with the frame.
- ``STATES``: ``stacked``, ``rejected``, ``removed``, ``removing``.
- ``COLUMNS``: the table's columns, in order (name, FITS format, unit, meaning).
- ``frames_hdu(rows) -> fits.BinTableHDU``: the ``FRAMES`` extension.
- ``frames_csv(rows) -> bytes``: the same rows as CSV (the matrix as six columns ``m00`` ... ``m12``).
- ``read_frames(hdu) -> list[FrameRow]``: rows back from a ``FRAMES`` extension.

Conventions. One row per frame received for the stack, in journal order: accepted, rejected and removed
frames alike. ``MATRIX`` is the 2x3 affine matrix frame -> reference, row-major ``[a, b, tx, c, d, ty]``
(``[x_ref, y_ref] = [[a, b], [c, d]] @ [x, y] + [tx, ty]``, x = column, y = row, pixel centres at integers),
the matrix ``stages.warp.warp`` resamples with (and, where ``DISTORTION`` is true, a smooth correction on top
of it whose coefficients the journal keeps). ``DX, DY`` are where the frame's centre lands on the
reference minus the centre (``Transform.centre_shift``). A value that was not measured (a rejected frame's
transform, a frame without calibration) is NaN in a floating column, -1 in an integer one and an empty string
in a text column: columns degrade, they never disappear, so readers can rely on the layout.
"""

from __future__ import annotations

import csv
import io
import math
import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits

__all__ = ["COLUMNS", "STATES", "FrameRow", "frames_csv", "frames_hdu", "read_frames"]

#: Where a frame stands: in the stack, rejected when it arrived, taken out after the fact, or being taken
#: out (a removal journaled whose re-integration has not finished).
STATES: tuple[str, ...] = ("stacked", "rejected", "removed", "removing")

#: Integer columns' null value (``TNULL``): counts are never negative.
INT_NULL = -1

#: (name, FITS TFORM letter, unit, meaning); ``A`` columns get the width of their longest value.
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("SEQ", "J", "", "journal sequence number"),
    ("FILE", "A", "", "file as received"),
    ("HASH", "A", "", "content hash of the file's bytes"),
    ("DATE_OBS", "A", "", "UTC start of the exposure"),
    ("EXPTIME", "D", "s", "exposure"),
    ("FILTER", "A", "", "filter"),
    ("OBJECT", "A", "", "target"),
    ("MASTERS", "A", "", "calibration masters applied"),
    ("MATRIX", "6D", "", "affine frame -> reference [a, b, tx, c, d, ty]"),
    ("DX", "D", "pix", "shift of the frame centre, x"),
    ("DY", "D", "pix", "shift of the frame centre, y"),
    ("ROTATION", "D", "deg", "rotation"),
    ("SCALE", "D", "", "scale"),
    ("INLIERS", "J", "", "stars matched in the fit"),
    ("RESIDUAL", "D", "pix", "RMS residual of the fit"),
    ("RESIDUAL_BEFORE", "D", "pix", "RMS residual without a distortion correction"),
    ("RESIDUAL_AFTER", "D", "pix", "RMS residual with a distortion correction"),
    ("DISTORTION", "L", "", "warped with a distortion correction"),
    ("STARS", "J", "", "stars detected"),
    ("FWHM", "D", "pix", "median FWHM"),
    ("ELLIPTICITY", "D", "", "median 1 - b/a"),
    ("BACKGROUND", "D", "adu", "median sky level"),
    ("NOISE", "D", "adu", "sky noise"),
    ("WEIGHT", "D", "", "weight in the stack"),
    ("VERDICT", "A", "", "accepted or rejected on arrival"),
    ("REASON", "A", "", "why it was rejected or removed"),
    ("STATE", "A", "", "stacked, rejected, removed or removing"),
    ("REFERENCE", "L", "", "the frame the stack is aligned to"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class FrameRow:
    """One frame received for a stack.

    Attributes
    ----------
    seq : int
        Journal sequence number (``livestack stack``: position in the run, from 1).
    file : str
    hash : str
        ``live.state.content_hash`` of the file; empty when unknown.
    date_obs : str or None
        ISO 8601 UTC.
    exptime : float or None
    filter, object : str or None
    masters : str or None
        Calibration masters applied, e.g. ``"bias=bias.fits; flat=flat_L.fits"``.
    matrix : tuple of 6 float or None
        Frame -> reference, row-major.
    dx, dy, rotation, scale, residual : float or None
    residual_before, residual_after : float or None
        The matched stars' RMS residual without and with a wide field's distortion correction, when one was
        evaluated (``Transform.rms_before``, ``rms_after``).
    distortion : bool
        True when the frame was warped with a distortion correction beyond ``matrix`` (its coefficients are in
        the journal's facts).
    inliers : int or None
    stars : int or None
    fwhm, ellipticity, background, noise, weight : float or None
    verdict : str
        ``accepted`` or ``rejected``.
    reason : str or None
        Why it was rejected, or removed.
    state : str
        One of ``STATES``.
    reference : bool
    """

    seq: int
    file: str
    hash: str = ""
    date_obs: str | None = None
    exptime: float | None = None
    filter: str | None = None
    object: str | None = None
    masters: str | None = None
    matrix: tuple[float, ...] | None = None
    dx: float | None = None
    dy: float | None = None
    rotation: float | None = None
    scale: float | None = None
    inliers: int | None = None
    residual: float | None = None
    residual_before: float | None = None
    residual_after: float | None = None
    distortion: bool = False
    stars: int | None = None
    fwhm: float | None = None
    ellipticity: float | None = None
    background: float | None = None
    noise: float | None = None
    weight: float | None = None
    verdict: str = "accepted"
    reason: str | None = None
    state: str = "stacked"
    reference: bool = False

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, not {self.state!r}.")
        if self.matrix is not None:
            matrix = tuple(float(v) for v in self.matrix)
            if len(matrix) != 6:
                raise ValueError(f"matrix must hold 6 numbers, not {len(matrix)}.")
            object.__setattr__(self, "matrix", matrix)

    @classmethod
    def from_facts(cls, seq: int, hash: str, verdict: str, reason: str | None, facts: Mapping[str, Any],
                   state: str | None = None) -> FrameRow:
        """A row from a frame's facts (``pipeline.frame_facts``, or a journal entry's ``facts``).

        Parameters
        ----------
        seq : int
        hash : str
        verdict : str
        reason : str or None
        facts : mapping
            Keys as ``FrameRow``'s attributes plus ``path``; missing keys are left unknown.
        state : str, optional
            Default: ``stacked`` for an accepted frame, ``rejected`` otherwise.

        Returns
        -------
        FrameRow
        """
        matrix = facts.get("matrix")
        return cls(
            seq=seq, file=str(facts.get("path", "")), hash=hash, date_obs=facts.get("date_obs"),
            exptime=_num(facts.get("exptime")), filter=facts.get("filter"), object=facts.get("object"),
            masters=facts.get("masters"), matrix=None if matrix is None else tuple(matrix),
            dx=_num(facts.get("dx")), dy=_num(facts.get("dy")), rotation=_num(facts.get("rotation")),
            scale=_num(facts.get("scale")), inliers=_int(facts.get("inliers")),
            residual=_num(facts.get("residual")), residual_before=_num(facts.get("residual_before")),
            residual_after=_num(facts.get("residual_after")), distortion=facts.get("distortion") is not None,
            stars=_int(facts.get("stars")),
            fwhm=_num(facts.get("fwhm")),
            ellipticity=_num(facts.get("ellipticity")), background=_num(facts.get("background")),
            noise=_num(facts.get("noise")), weight=_num(facts.get("weight")), verdict=verdict, reason=reason,
            state=state or ("stacked" if verdict == "accepted" else "rejected"),
            reference=bool(facts.get("reference", False)))


def frames_hdu(rows: Sequence[FrameRow]) -> fits.BinTableHDU:
    """The ``FRAMES`` binary-table extension: one row per frame, columns as in ``COLUMNS``.

    Parameters
    ----------
    rows : sequence of FrameRow
        May be empty (the table then has no rows but all its columns).

    Returns
    -------
    astropy.io.fits.BinTableHDU
        ``EXTNAME = 'FRAMES'``; header cards ``NFRAMES``, ``NSTACKED``, ``NREJECT``, ``NREMOVED`` count the
        rows by state. Text is ASCII (other characters are escaped as ``\\xNN``/``\\uNNNN``).
    """
    # Column by column from one pass over the rows: a live stack rewrites this table at every snapshot, and
    # a night has thousands of rows.
    cells = list(zip(*map(_CELLS, rows), strict=True)) if rows else [()] * len(COLUMNS)
    columns = []
    for (name, form, unit, _), values in zip(COLUMNS, cells, strict=True):
        if form == "A":
            text = [b"" if v is None else str(v).encode("ascii", "backslashreplace") for v in values]
            width = max(1, max(map(len, text), default=0))
            array: np.ndarray = np.array(text, dtype=f"S{width}")
            columns.append(fits.Column(name=name, format=f"{width}A", array=array))
            continue
        if form == "J":
            array = np.array([INT_NULL if v is None else v for v in values], dtype=np.int32)
            columns.append(fits.Column(name=name, format="J", null=INT_NULL, array=array))
        elif form == "L":
            array = np.array(values, dtype=bool)
            columns.append(fits.Column(name=name, format="L", array=array))
        elif form == "6D":
            array = np.array([_NAN6 if v is None else v for v in values],
                             dtype=np.float64).reshape(len(rows), 6)
            columns.append(fits.Column(name=name, format="6D", array=array))
        else:
            array = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
            columns.append(fits.Column(name=name, format="D", unit=unit or None, array=array))
    # Filled from its records rather than by ``BinTableHDU.from_columns``, whose constructor imports
    # astropy.table (0.1-0.3 s of a short ``livestack stack``) only to ask whether it was given a Table; the
    # file written is the same byte for byte.
    hdu = fits.BinTableHDU(name="FRAMES")
    hdu.data = fits.FITS_rec.from_columns(fits.ColDefs(columns))
    for number, (_, _, _, meaning) in enumerate(COLUMNS, start=1):
        hdu.header.comments[f"TTYPE{number}"] = meaning
    counts = Counter(row.state for row in rows)
    hdu.header["NFRAMES"] = (len(rows), "frames received for this stack")
    hdu.header["NSTACKED"] = (counts["stacked"], "frames in the stack")
    hdu.header["NREJECT"] = (counts["rejected"], "frames rejected on arrival")
    hdu.header["NREMOVED"] = (counts["removed"] + counts["removing"], "frames taken out after the fact")
    return hdu


def read_frames(hdu: fits.BinTableHDU) -> list[FrameRow]:
    """The rows of a ``FRAMES`` extension (as written by ``frames_hdu``).

    Parameters
    ----------
    hdu : astropy.io.fits.BinTableHDU

    Returns
    -------
    list of FrameRow
    """
    data = hdu.data
    out: list[FrameRow] = []
    for i in range(len(data)):
        record: dict[str, Any] = {}
        for name, form, _, _ in COLUMNS:
            value = data[name][i]
            if form == "A":
                text = value.decode("ascii") if isinstance(value, bytes) else str(value)
                record[name] = text or None
            elif form == "J":
                record[name] = None if int(value) == INT_NULL else int(value)
            elif form == "L":
                record[name] = bool(value)
            elif form == "6D":
                matrix = tuple(float(v) for v in value)
                record[name] = None if not all(math.isfinite(v) for v in matrix) else matrix
            else:
                record[name] = None if not math.isfinite(float(value)) else float(value)
        out.append(FrameRow(**{_ATTRIBUTE.get(k, k.lower()): v for k, v in record.items()
                               if k not in ("FILE", "HASH", "VERDICT", "STATE")},
                            file=record["FILE"] or "", hash=record["HASH"] or "",
                            verdict=record["VERDICT"] or "", state=record["STATE"] or "stacked"))
    return out


def frames_csv(rows: Sequence[FrameRow]) -> bytes:
    """The rows as CSV (UTF-8): the table's columns, with ``MATRIX`` as ``m00 m01 m02 m10 m11 m12``.

    Parameters
    ----------
    rows : sequence of FrameRow

    Returns
    -------
    bytes
        Header line plus one line per row; unknown values are empty.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header: list[str] = []
    for name, _, _, _ in COLUMNS:
        header += _MATRIX_CSV if name == "MATRIX" else [name.lower()]
    writer.writerow(header)
    for row in rows:
        line: list[str] = []
        for name, _, _, _ in COLUMNS:
            value = _value(row, name)
            if name == "MATRIX":
                line += [repr(v) for v in value] if value is not None else [""] * 6
            elif value is None:
                line.append("")
            elif isinstance(value, bool):
                line.append("true" if value else "false")
            elif isinstance(value, float):
                line.append(repr(value))
            else:
                line.append(str(value))
        writer.writerow(line)
    return out.getvalue().encode("utf-8")


# --- private helpers -----------------------------------------------------------------------------------

_MATRIX_CSV = ["m00", "m01", "m02", "m10", "m11", "m12"]
_ATTRIBUTE = {"DATE_OBS": "date_obs"}
#: A row's values in the order of ``COLUMNS``, in one call.
_CELLS = operator.attrgetter(*(_ATTRIBUTE.get(name, name.lower()) for name, _, _, _ in COLUMNS))
_NAN6 = (math.nan,) * 6


def _value(row: FrameRow, column: str) -> Any:
    return getattr(row, _ATTRIBUTE.get(column, column.lower()))


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    return None if value is None or isinstance(value, bool) else int(value)
