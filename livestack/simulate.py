"""Simulate: a camera no one needs to own.

Renders a fixed, seeded star field (Moffat profiles, power-law fluxes) with sky gradient, noise, hot pixels,
drift and slow rotation, and writes it as FITS frames at a cadence. ``render_stars`` is the low-level
renderer the tests also use for star fields with known positions.

Public API:

- ``SimConfig``: frozen description of a simulated session (what the CLI's ``simulate`` options map onto).
- ``SimFrame``: one rendered exposure: uint16 pixels, header cards, the true transform, what went wrong.
- ``FieldStars``: the stars of the field as they fall on one frame (positions, fluxes, colours).
- ``render_frame(config, index) -> SimFrame``: render one frame, in memory, deterministically.
- ``field_stars(config, index) -> FieldStars``: where the field's stars land on a frame (no rendering).
- ``true_matrix(config, index) -> ndarray``: the 2x3 frame -> reference transform (no rendering).
- ``simulate(outdir, config, *, sleep=time.sleep, on_written=None) -> list[Path]``: write a session to disk,
  with a ``truth.csv`` sidecar.
- ``render_stars(shape, x, y, flux, ...) -> ndarray``: Moffat stars on a zero image.
- ``FILTER_BANDS``: what each simulated filter passes (star colours, sky, exposure), as data.
- ``parse_filters(text) -> tuple``: a filter wheel's cycle from ``"L,R,G,B"`` or ``"R*5,G*5,B*5"``.

Geometry. Pixel centres are at integers, ``x`` is the column and ``y`` the row. The sky is described in the
pixel frame of frame 0 (the reference). Frame ``i`` sees the sky moved by the cumulative drift
``D = i * drift`` and turned about the frame centre ``c = ((W - 1) / 2, (H - 1) / 2)`` by the cumulative
angle ``theta = i * rotation_per_frame`` (plus 180 degrees from ``flip_at`` on), counter-clockwise in
(x, y) pixel axes: a sky point ``s`` lands on ``p = c + R(theta) (s - c) + D``. The true transform of the
frame is the inverse, ``s = A p + t``, the same convention as ``align.Transform.matrix``.

Wide fields. ``dither`` adds to each frame after the first a seeded random offset of up to ``dither`` pixels
in x and in y (a mount dithering between exposures), on top of the drift. ``barrel`` bends the optics'
view radially about the frame centre: a point at distance ``r`` from the centre is drawn at
``r (1 - barrel (r / r_corner)**2)``, ``r_corner`` the distance of a corner pixel, so a corner star moves
inwards by ``barrel`` of its distance (0.01: 1% at the corners). The distortion is fixed to the camera, not
the sky, so a star seen at different places in two frames is bent by different amounts: no affine transform
maps one frame onto another exactly. ``true_matrix`` and ``truth.csv`` give the undistorted part.

Filter wheels. With ``filters`` set, frame ``i`` is taken through ``filters[i % len(filters)]``: each
star's flux is its colour response in that band (``FILTER_BANDS``), the sky is the band's share of the
light-polluted sky, the exposure is the band's (narrowband filters expose longer and still see fewer
stars), and FILTER is written to the header.

Colour frames. The R, G and B intensity planes (stars with slightly different colours, a tinted sky) are each
evaluated only at the sites of their own colour in the Bayer pattern, which is the same as rendering the
three planes and sampling them into the mosaic, at a third of the cost.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np
from astropy.io import fits

from livestack.errors import ConfigError

__all__ = [
    "BAYER_PATTERNS",
    "FILTER_BANDS",
    "SUBDIR_NAME",
    "TARGETS",
    "TRUTH_COLUMNS",
    "TRUTH_FILE",
    "WRITE_MODES",
    "FieldStars",
    "FilterBand",
    "SimConfig",
    "SimFrame",
    "Transit",
    "field_stars",
    "frame_fwhm",
    "parse_filters",
    "render_frame",
    "render_stars",
    "simulate",
    "true_matrix",
]

#: Bayer patterns the simulator can write, as seen from pixel (row 0, column 0).
BAYER_PATTERNS: tuple[str, ...] = ("RGGB", "GRBG", "GBRG", "BGGR")
#: How frames reach the disk: ``atomic`` (hidden temporary name, fsync, ``os.replace``), ``chunked``
#: (the final name written slowly, like a network copy), ``rename`` (``name.fits.part`` then a rename),
#: ``mixed`` (the three in turn: frame ``i`` uses ``("atomic", "chunked", "rename")[i % 3]``).
WRITE_MODES: tuple[str, ...] = ("atomic", "chunked", "rename", "mixed")
#: The sidecar with the truth of each frame, in the output folder.
TRUTH_FILE = "truth.csv"
#: Columns of ``truth.csv``. ``a, b, tx, c, d, ty`` is the 2x3 frame -> reference matrix row by row;
#: ``dx, dy`` is where the frame's centre lands on the reference minus the centre; ``rotation_deg`` is the
#: matrix's angle, ``atan2(c, a)`` in (-180, 180], as ``align.Transform.rotation`` reports it.
TRUTH_COLUMNS: tuple[str, ...] = (
    "index", "file", "kind", "trail", "a", "b", "tx", "c", "d", "ty", "dx", "dy", "rotation_deg",
)
#: What the simulated telescope points at (``SimConfig.target``).
TARGETS: tuple[str, ...] = ("stars", "moon", "planet")
#: The subfolder that every ``subdir_every``-th frame goes into.
SUBDIR_NAME = "night2"



@dataclass(frozen=True)
class FilterBand:
    """What one simulated filter passes.

    Attributes
    ----------
    star : tuple of float
        A star's flux through the filter is ``star[0] * R + star[1] * G + star[2] * B`` of its relative
        colour fluxes (G = 1), before the exposure factor.
    sky : float
        Sky level relative to ``SKY_LEVEL`` for the base exposure.
    exposure : float
        Exposure relative to ``SimConfig.exptime``; star and sky light scale with it.
    """

    star: tuple[float, float, float]
    sky: float
    exposure: float


#: The simulated filter wheel: broadband L, R, G, B under an orange, light-polluted sky (R's sky brightest,
#: B's darkest), and narrowband Ha, OIII, SII passing ~5-8% of a broadband filter's starlight and very
#: little sky, exposed 3x longer.
FILTER_BANDS: Mapping[str, FilterBand] = MappingProxyType({
    "L": FilterBand((0.9, 0.9, 0.9), 2.6, 1.0),
    "R": FilterBand((1.0, 0.0, 0.0), 1.25, 1.0),
    "G": FilterBand((0.0, 1.0, 0.0), 1.0, 1.0),
    "B": FilterBand((0.0, 0.0, 1.0), 0.75, 1.0),
    "Ha": FilterBand((0.07, 0.0, 0.0), 0.06, 3.0),
    "OIII": FilterBand((0.0, 0.04, 0.04), 0.05, 3.0),
    "SII": FilterBand((0.05, 0.0, 0.0), 0.04, 3.0),
})

_DEFAULT_START = datetime(2024, 3, 15, 21, 0, 0, tzinfo=UTC)

# The camera and the sky, in ADU (gain 1 e-/ADU, so Poisson noise is on ADU directly).
SKY_LEVEL = 800.0            # sky background at the frame centre
SKY_GRADIENT = 0.3           # fractional sky change across the frame (light pollution on one side)
SKY_TINT = (1.25, 1.0, 0.75)  # R, G, B sky relative to G: an orange, light-polluted sky
BIAS = 200.0                 # electronic offset, as real cameras add so that noise never clips at 0
READ_NOISE = 6.0             # Gaussian read noise, ADU rms
SATURATION = 65535           # the uint16 ceiling
FLUX_MIN = 500.0             # faintest star (total ADU): at the noise, as most stars of a real field are
FLUX_MAX = 2.0e6             # brightest star: a handful saturate, as in real frames
MOFFAT_BETA = 3.0            # typical of ground-based seeing
STAR_COLOUR_SPREAD = 0.35    # R = 1 + s k, G = 1, B = 1 - s k with colour index k uniform in [-1, 1]
HOT_PIXEL_FRACTION = 5e-5    # share of sensor pixels that are hot
HOT_PIXEL_RANGE = (2000.0, 40000.0)  # extra ADU of a hot pixel (log-uniform)
CLOUD_TRANSMISSION = 0.12    # star flux left in a cloudy frame
CLOUD_SKY_FACTOR = 2.5       # cloud lit by the town: the sky gets brighter while the stars fade
WIND_ELONGATION = 2.2        # major/minor axis of stars smeared by a gust
TRAIL_PEAK = 3000.0          # satellite trail, ADU above sky on its axis
TRAIL_SIGMA = 1.2            # Gaussian cross-section, pixels (FWHM about 3 px)
CHUNK_SECONDS = 0.25         # a chunked write delivers this many seconds' worth of bytes at a time

_TILE = 256                  # sky tiles, each with its own seed: the field does not depend on the frame count
_STAMP_BUDGET = 2_000_000    # stamp pixels rendered per batch, to bound memory with many or wide stars
_RGB = "RGB"
# Stream tags for numpy SeedSequence: independent random streams for each aspect of the simulation.
_TAG_TILE, _TAG_SENSOR, _TAG_NOISE, _TAG_EVENT = 1, 2, 3, 4
_TAG_DITHER = 6

_COMMENTS: Mapping[str, str] = MappingProxyType({
    "IMAGETYP": "type of exposure",
    "OBJECT": "target",
    "FILTER": "filter in the light path",
    "EXPTIME": "exposure time, s",
    "EXPOSURE": "exposure time, s",
    "DATE-OBS": "UTC start of exposure",
    "INSTRUME": "camera",
    "BAYERPAT": "colour filter pattern from the first pixel",
    "XBAYROFF": "Bayer pattern x offset",
    "YBAYROFF": "Bayer pattern y offset",
    "ROWORDER": "order of the rows in the image array",
    "GAIN": "electrons per ADU",
})


@dataclass(frozen=True)
class Transit:
    """A star of the field that dims as a planet crosses it (a trapezoid in time).

    Attributes
    ----------
    x, y : float
        Position on the reference frame (frame 0), pixels.
    flux : float
        Total flux out of transit, ADU.
    depth : float
        Fractional loss of light at mid-transit (0.02 for 2%).
    mid : float
        Mid-transit, seconds after the start of frame 0.
    duration : float
        First to fourth contact, seconds.
    ingress : float
        First to second contact, seconds (at most half the duration).
    """

    x: float
    y: float
    flux: float
    depth: float
    mid: float
    duration: float
    ingress: float

    def factor(self, t: float) -> float:
        """Share of the star's light seen at ``t`` seconds after the start of frame 0."""
        edge = abs(t - self.mid) - (self.duration / 2.0 - self.ingress)
        if edge <= 0:
            return 1.0 - self.depth
        if edge >= self.ingress:
            return 1.0
        return 1.0 - self.depth * (1.0 - edge / self.ingress)


@dataclass(frozen=True)
class SimConfig:
    """A simulated observing session.

    Frame indices are 0-based; frame ``i`` is written as ``sim_{i+1:04d}.fits``. Frame 0 is the reference of
    the true transforms.

    Attributes
    ----------
    frames : int
        Number of frames (CLI ``--frames``).
    interval : float
        Seconds slept between two frames (CLI ``--interval``).
    size : tuple of int
        ``(width, height)`` in pixels (CLI ``--size WxH``).
    seed : int
        Seed of everything random: the star field, the sensor, the noise (CLI ``--seed``). Non-negative.
    n_stars : int
        Expected number of stars on one frame (the field density is ``n_stars / (width * height)``).
    fwhm : float
        Star FWHM in pixels.
    drift : tuple of float
        ``(dx, dy)``: how far the stars move across the image per frame, pixels.
    rotation_per_frame : float
        How far the star pattern turns about the frame centre per frame, degrees counter-clockwise in
        (x, y) pixel axes.
    flip_at : int or None
        First frame after a meridian flip: from it on the image is also turned 180 degrees about its centre
        (CLI ``--flip-at``). At least 1, since frame 0 is the reference.
    bayer : str or None
        None for a mono camera, else one of ``BAYER_PATTERNS`` (CLI ``--bayer``).
    bad_frames : tuple of int
        Bad frames, alternately cloud and wind in increasing index order (CLI ``--bad``).
    cloud_frames, wind_frames : tuple of int
        Frames explicitly cloudy (star flux cut to ``CLOUD_TRANSMISSION``, sky raised by
        ``CLOUD_SKY_FACTOR``) or shaken by wind (stars elongated by ``WIND_ELONGATION``).
    trails : tuple of int
        Frames crossed by a satellite trail (CLI ``--trails``).
    write_mode : str
        One of ``WRITE_MODES`` (CLI ``--write-mode``).
    chunk_rate : float
        Bytes per second of a ``chunked`` write.
    exptime : float
        Seconds, written to EXPTIME.
    object_name : str
        Written to OBJECT.
    filter : str or None
        Written to FILTER; None leaves the card out.
    filters : tuple of str
        A filter wheel's cycle (names from ``FILTER_BANDS``): frame ``i`` is taken through
        ``filters[i % len(filters)]`` and ``filter`` is ignored (CLI ``--filters``, see ``parse_filters``).
        Empty: every frame through ``filter``, rendered as a clear filter.
    start : datetime
        UTC start of frame 0; frame ``i`` starts ``i * interval`` later. A naive datetime is taken as UTC.
    subdir_every : int
        Every ``k``-th frame (frames ``k-1, 2k-1, ...``) goes into ``SUBDIR_NAME/``; 0 never.
    target : str
        One of ``TARGETS`` (CLI ``--target``): ``"stars"`` (a star field), ``"moon"`` (a crop of lunar
        surface filling the frame) or ``"planet"`` (a banded, limb-darkened disk on a dark sky). The
        starless targets get a seeing blur that changes from frame to frame and the sensor's fixed pattern.
    fixed_pattern : float
        Starless targets: standard deviation of the sensor's additive fixed pattern (per-pixel offsets,
        column offsets, amplifier glow), as a multiple of the standard deviation of the target's own
        light over the reference frame (CLI ``--fixed-pattern``).
    hot_pixels : int or None
        Number of hot pixels on the sensor; None for ``HOT_PIXEL_FRACTION`` of the pixels.
    blank_frames : tuple of int
        Frames with nothing in view (the sky or the sensor alone): a cap, a cloud bank, a slew.
    seeing_jitter : float
        Relative RMS change of the FWHM from frame to frame (seeing that comes and goes); 0 keeps ``fwhm``.
    transit : Transit or None
        A star that dims in a transit, for light curves; its time is the frame's mid-exposure.
    dither : float
        Largest random offset of a frame, pixels in x and in y, on top of the drift (CLI ``--dither``).
    barrel : float
        Radial (barrel) distortion of the optics: how far a corner star is drawn towards the centre, as a
        fraction of its distance (CLI ``--barrel``; 0.01 is 1% at the corners). Negative: pincushion.
        Star fields only.

    Raises
    ------
    ConfigError
        When a value is out of range, naming the field and what is allowed.
    """

    frames: int = 40
    interval: float = 2.0
    size: tuple[int, int] = (1600, 1200)
    seed: int = 0
    n_stars: int = 800
    fwhm: float = 3.0
    drift: tuple[float, float] = (1.2, -0.7)
    rotation_per_frame: float = 0.02
    flip_at: int | None = None
    bayer: str | None = None
    bad_frames: tuple[int, ...] = ()
    cloud_frames: tuple[int, ...] = ()
    wind_frames: tuple[int, ...] = ()
    trails: tuple[int, ...] = ()
    write_mode: str = "atomic"
    chunk_rate: float = 1e6
    exptime: float = 10.0
    object_name: str = "SIM-FIELD"
    filter: str | None = "L"
    filters: tuple[str, ...] = ()
    start: datetime = _DEFAULT_START
    subdir_every: int = 0
    target: str = "stars"
    fixed_pattern: float = 1.0
    hot_pixels: int | None = None
    blank_frames: tuple[int, ...] = ()
    seeing_jitter: float = 0.0
    transit: Transit | None = None
    dither: float = 0.0
    barrel: float = 0.0

    def __post_init__(self) -> None:
        # Accept lists from a CLI or a notebook; store tuples so the value stays immutable and hashable.
        for name in ("bad_frames", "cloud_frames", "wind_frames", "trails", "blank_frames"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        object.__setattr__(self, "filters", tuple(str(f) for f in self.filters))
        if len(tuple(self.size)) != 2 or len(tuple(self.drift)) != 2:
            raise ConfigError("simulate: size and drift must each have two values.")
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        object.__setattr__(self, "drift", (float(self.drift[0]), float(self.drift[1])))
        if self.start.tzinfo is None:
            object.__setattr__(self, "start", self.start.replace(tzinfo=UTC))
        self._validate()

    def _validate(self) -> None:
        problems: list[str] = []
        numbers = {"interval": self.interval, "fwhm": self.fwhm, "drift": self.drift[0] + self.drift[1],
                   "rotation_per_frame": self.rotation_per_frame, "chunk_rate": self.chunk_rate,
                   "exptime": self.exptime, "fixed_pattern": self.fixed_pattern, "dither": self.dither,
                   "barrel": self.barrel, "seeing_jitter": self.seeing_jitter}
        # An infinite interval, dither or pattern would pass the range checks below and fail deep inside.
        problems.extend(f"{name} must be a finite number, not {value}" for name, value in numbers.items()
                        if not math.isfinite(value))
        if self.frames < 1:
            problems.append(f"frames must be at least 1, not {self.frames}")
        if self.interval < 0:
            problems.append(f"interval must be >= 0 seconds, not {self.interval}")
        if min(self.size) < 2:
            problems.append(f"size must be at least 2x2 pixels, not {self.size[0]}x{self.size[1]}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, not {self.seed}")
        if self.n_stars < 0:
            problems.append(f"n_stars must be >= 0, not {self.n_stars}")
        if not self.fwhm > 0:
            problems.append(f"fwhm must be > 0 pixels, not {self.fwhm}")
        if self.flip_at is not None and self.flip_at < 1:
            problems.append(f"flip_at must be at least 1 (frame 0 is the reference), not {self.flip_at}")
        if self.bayer is not None and self.bayer not in BAYER_PATTERNS:
            problems.append(f"bayer must be one of {', '.join(BAYER_PATTERNS)} or None, not {self.bayer!r}")
        if self.write_mode not in WRITE_MODES:
            problems.append(f"write_mode must be one of {', '.join(WRITE_MODES)}, not {self.write_mode!r}")
        if not self.chunk_rate > 0:
            problems.append(f"chunk_rate must be > 0 bytes/s, not {self.chunk_rate}")
        if not self.exptime > 0:
            problems.append(f"exptime must be > 0 seconds, not {self.exptime}")
        if not 0 <= self.seeing_jitter < 0.5:
            problems.append(f"seeing_jitter must be in [0, 0.5), not {self.seeing_jitter}")
        if self.transit is not None and not (0 <= self.transit.depth < 1 and self.transit.duration > 0
                                             and 0 < self.transit.ingress <= self.transit.duration / 2):
            problems.append("transit needs 0 <= depth < 1 and 0 < ingress <= duration / 2")
        if not self.dither >= 0:
            problems.append(f"dither must be >= 0 pixels, not {self.dither}")
        if not -0.1 <= self.barrel <= 0.1:
            problems.append(f"barrel must be between -0.1 and 0.1 (10% at the corners), not {self.barrel}")
        if self.subdir_every < 0:
            problems.append(f"subdir_every must be >= 0, not {self.subdir_every}")
        if self.target not in TARGETS:
            problems.append(f"target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        elif self.barrel and self.target != "stars":
            # The lens bends star positions; a moon or planet drawn unbent would say otherwise in silence.
            problems.append(f"barrel bends a star field only, not a {self.target}")
        if not self.fixed_pattern >= 0:
            problems.append(f"fixed_pattern must be >= 0, not {self.fixed_pattern}")
        if self.hot_pixels is not None and not 0 <= self.hot_pixels <= self.size[0] * self.size[1]:
            problems.append(f"hot_pixels must be between 0 and the number of pixels, not {self.hot_pixels}")
        for name in ("bad_frames", "cloud_frames", "wind_frames", "trails", "blank_frames"):
            outside = [i for i in getattr(self, name) if not 0 <= i < self.frames]
            if outside:
                problems.append(f"{name} {outside} are outside frames 0..{self.frames - 1}")
        unknown = sorted(set(self.filters) - set(FILTER_BANDS))
        if unknown:
            problems.append(f"filters {', '.join(unknown)} are not simulated "
                            f"(known: {', '.join(FILTER_BANDS)})")
        if self.filters and self.bayer is not None:
            problems.append("filters are for a mono camera with a filter wheel, not a colour camera (bayer)")
        both = set(self.cloud_frames) & set(self.wind_frames)
        if both:
            problems.append(f"frames {sorted(both)} cannot be both cloud_frames and wind_frames")
        if problems:
            raise ConfigError("simulate: " + "; ".join(problems) + ".")


@dataclass(frozen=True, eq=False)
class SimFrame:
    """One rendered exposure.

    Attributes
    ----------
    index : int
        0-based frame index.
    name : str
        Path of the file relative to the output folder, ``/``-separated (``sim_0001.fits`` or
        ``night2/sim_0003.fits``).
    data : ndarray
        ``(height, width)`` uint16, read-only: the image (a raw Bayer mosaic for a colour camera).
    header : Mapping
        The cards the camera writes (keyword -> value), read-only; BZERO/BSCALE are added on writing.
    matrix : ndarray
        ``(2, 3)`` float64, read-only: the true transform mapping this frame's pixel ``(x, y)`` onto the
        reference's (frame 0): ``[x0, y0] = matrix[:, :2] @ [x, y] + matrix[:, 2]``.
    kind : str
        ``"good"``, ``"cloud"``, ``"wind"`` or ``"blank"``.
    has_trail : bool
        True when a satellite trail crosses the frame.
    seeing : float
        Starless targets: FWHM of this frame's seeing blur, pixels (0 for star fields).
    """

    index: int
    name: str
    data: np.ndarray
    header: Mapping[str, str | int | float]
    matrix: np.ndarray
    kind: str
    has_trail: bool
    seeing: float = 0.0

    @property
    def rotation_deg(self) -> float:
        """The matrix's rotation, degrees counter-clockwise in (x, y) pixel axes, in (-180, 180]."""
        angle = math.degrees(math.atan2(self.matrix[1, 0], self.matrix[0, 0]))
        return angle + 360.0 if angle <= -180.0 else angle

    @property
    def centre_shift(self) -> tuple[float, float]:
        """``(dx, dy)``: where the frame's centre lands on the reference, minus the centre."""
        rows, cols = self.data.shape
        centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0])
        moved = self.matrix[:, :2] @ centre + self.matrix[:, 2] - centre
        return float(moved[0]), float(moved[1])


@dataclass(frozen=True, eq=False)
class FieldStars:
    """The field's stars as they fall on one frame (those whose profile touches it).

    Attributes
    ----------
    x, y : ndarray
        Centres in the frame's pixels, float64, read-only.
    flux : ndarray
        Total flux in ADU before clouds, float64, read-only (for colour frames, the G-channel flux).
    rgb : ndarray
        ``(N, 3)`` float64, read-only: relative R, G, B flux of each star (G = 1).
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    rgb: np.ndarray


def true_matrix(config: SimConfig, index: int) -> np.ndarray:
    """The true transform of a frame, without rendering it.

    Parameters
    ----------
    config : SimConfig
    index : int
        0-based frame index.

    Returns
    -------
    ndarray
        ``(2, 3)`` float64: frame ``index`` pixel ``(x, y)`` -> reference (frame 0) pixel.

    Raises
    ------
    ConfigError
        When ``index`` is not a frame of the session.
    """
    _check_index(config, index)
    forward = _forward(config, index)
    linear_inv = forward[:, :2].T  # a rotation: its inverse is its transpose
    result = np.empty((2, 3))
    result[:, :2] = linear_inv
    result[:, 2] = -linear_inv @ forward[:, 2]
    return result


def field_stars(config: SimConfig, index: int) -> FieldStars:
    """Where the field's stars land on a frame.

    The field is fixed by the seed and infinite: it is drawn tile by tile of the reference's pixel plane,
    so it does not depend on the number of frames, and drift or rotation never empty the frame.

    Parameters
    ----------
    config : SimConfig
    index : int
        0-based frame index.

    Returns
    -------
    FieldStars
        The stars whose profile touches the frame, in frame pixels.

    Raises
    ------
    ConfigError
        When ``index`` is not a frame of the session.
    """
    _check_index(config, index)
    width, height = config.size
    margin = _stamp_half(config.fwhm * (1.0 + 4.0 * config.seeing_jitter), WIND_ELONGATION) + 1.0
    inverse = true_matrix(config, index)
    # Barrel distortion draws stars from beyond the edges inwards: look that much further out.
    reach = margin + abs(config.barrel) * 1.5 * math.hypot(width, height) / 2.0
    corners = np.array([[-reach, -reach], [width - 1 + reach, -reach],
                        [-reach, height - 1 + reach], [width - 1 + reach, height - 1 + reach]])
    sky_corners = corners @ inverse[:, :2].T + inverse[:, 2]
    tx0, ty0 = np.floor(sky_corners.min(axis=0) / _TILE).astype(int)
    tx1, ty1 = np.floor(sky_corners.max(axis=0) / _TILE).astype(int)
    density = config.n_stars / float(width * height)
    parts = [_tile_stars(config.seed, density, tx, ty)
             for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
    sky = np.concatenate(parts, axis=0) if parts else np.empty((0, 6))
    if config.transit is not None:
        tr = config.transit
        seen = tr.flux * tr.factor(index * config.interval + config.exptime / 2.0)
        sky = np.vstack([sky, [tr.x, tr.y, seen, 1.0, 1.0, 1.0]])
    forward = _forward(config, index)
    xy = sky[:, :2] @ forward[:, :2].T + forward[:, 2]
    if config.barrel:
        xy = _bend(xy, config.size, config.barrel)
    keep = ((xy[:, 0] >= -margin) & (xy[:, 0] <= width - 1 + margin)
            & (xy[:, 1] >= -margin) & (xy[:, 1] <= height - 1 + margin))
    return FieldStars(x=_frozen(xy[keep, 0]), y=_frozen(xy[keep, 1]), flux=_frozen(sky[keep, 2]),
                      rgb=_frozen(sky[keep, 3:6]))


def frame_fwhm(config: SimConfig, index: int) -> float:
    """The stars' FWHM on one frame: ``fwhm`` changed by the seeing jitter, deterministically."""
    if config.seeing_jitter == 0:
        return config.fwhm
    change = np.random.default_rng([config.seed, _TAG_EVENT, index, 1]).standard_normal()
    return config.fwhm * float(np.clip(1.0 + config.seeing_jitter * change, 0.5, 2.0))


def render_frame(config: SimConfig, index: int) -> SimFrame:
    """Render one frame of the session, deterministically.

    Parameters
    ----------
    config : SimConfig
    index : int
        0-based frame index.

    Returns
    -------
    SimFrame
        The uint16 image (sky gradient, stars, hot pixels, Poisson and read noise, a trail or a bad-frame
        defect when the config asks), its header cards and its true transform.

    Raises
    ------
    ConfigError
        When ``index`` is not a frame of the session.
    """
    _check_index(config, index)
    width, height = config.size
    shape = (height, width)
    kind = _kind(config, index)
    has_trail = index in config.trails
    events = np.random.default_rng([config.seed, _TAG_EVENT, index])
    if config.target != "stars":
        return _render_surface(config, index, kind, has_trail, events)

    stars = field_stars(config, index)
    band = _band(config, index)
    flux = stars.flux * (0.0 if kind == "blank" else CLOUD_TRANSMISSION if kind == "cloud" else 1.0)
    if band is not None:
        flux = flux * (stars.rgb @ np.asarray(band.star)) * band.exposure
    elongation, angle = 1.0, 0.0
    if kind == "wind":
        elongation, angle = WIND_ELONGATION, float(events.uniform(0.0, 180.0))
    cell = _cell_channels(config.bayer)
    site_gain = None if cell is None else stars.rgb[:, cell]
    light = _render_moffat(shape, stars.x, stars.y, flux, fwhm=frame_fwhm(config, index), beta=MOFFAT_BETA,
                           elongation=elongation, angle_deg=angle, site_gain=site_gain)

    sky_factor = 1.0 if band is None else band.sky * band.exposure
    light += _sky(config, cell) * (sky_factor * (CLOUD_SKY_FACTOR if kind == "cloud" else 1.0))
    if has_trail:
        _add_trail(light, events)
    hot_rows, hot_cols, hot_values = _hot_pixels(config)
    light[hot_rows, hot_cols] += hot_values

    noise = np.random.default_rng([config.seed, _TAG_NOISE, index])
    image = noise.poisson(light).astype(np.float32)
    image += noise.standard_normal(shape, dtype=np.float32) * np.float32(READ_NOISE)
    image += np.float32(BIAS)
    np.rint(image, out=image)
    np.clip(image, 0, SATURATION, out=image)

    return SimFrame(index=index, name=_file_name(config, index), data=_frozen(image.astype(np.uint16)),
                    header=MappingProxyType(_header(config, index)),
                    matrix=_frozen(true_matrix(config, index)), kind=kind, has_trail=has_trail)


def simulate(outdir: str | Path, config: SimConfig, *, sleep: Callable[[float], object] = time.sleep,
             on_written: Callable[[Path], object] | None = None) -> list[Path]:
    """Write a simulated session to a folder, frame by frame, at the config's cadence.

    Before each frame appears, its row is in ``outdir/truth.csv`` (rewritten atomically each time; columns
    ``TRUTH_COLUMNS``), so a watcher that sees a frame can always look up its truth.

    Parameters
    ----------
    outdir : str or Path
        Output folder, created when missing.
    config : SimConfig
    sleep : callable
        Called with ``config.interval`` between frames and, in chunked writes, with the seconds each chunk
        takes; inject a recorder in tests.
    on_written : callable or None
        Called with the path of each frame once it is complete.

    Returns
    -------
    list of Path
        The frames written, in order.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    paths: list[Path] = []
    for index in range(config.frames):
        frame = render_frame(config, index)
        if index:
            sleep(config.interval)
        path = outdir / frame.name
        path.parent.mkdir(parents=True, exist_ok=True)
        rows.append(_truth_row(frame))
        _write_truth(outdir / TRUTH_FILE, rows)
        payload = _fits_bytes(frame)
        mode = _write_mode(config, index)
        if mode == "chunked":
            _write_chunked(path, payload, config.chunk_rate, sleep)
        elif mode == "rename":
            _write_renamed(path, payload)
        else:
            _write_atomic(path, payload)
        paths.append(path)
        if on_written is not None:
            on_written(path)
    return paths


def parse_filters(text: str) -> tuple[str, ...]:
    """A filter wheel's cycle from ``"L,R,G,B"`` or ``"R*5,G*5,B*5"`` (a name repeated ``*N`` times).

    Parameters
    ----------
    text : str

    Returns
    -------
    tuple of str
        One entry per frame of the cycle.

    Raises
    ------
    ConfigError
        For an empty cycle, a bad repeat count or a filter not in ``FILTER_BANDS``.
    """
    cycle: list[str] = []
    for item in text.split(","):
        name, star, count = item.strip().partition("*")
        name = name.strip()
        try:
            repeat = int(count) if star else 1
        except ValueError:
            repeat = 0
        if repeat < 1:
            raise ConfigError(f"simulate: {item.strip()!r} in the filters must be NAME or NAME*COUNT with a "
                              "positive count.")
        if name not in FILTER_BANDS:
            raise ConfigError(f"simulate: filter {name!r} is not simulated "
                              f"(known: {', '.join(FILTER_BANDS)}).")
        cycle += [name] * repeat
    return tuple(cycle)


def render_stars(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray,
                 fwhm: float = 3.0, beta: float = 3.0, elongation: float = 1.0,
                 angle_deg: float = 0.0) -> np.ndarray:
    """Render Moffat stars onto a zero float64 image.

    Each star is drawn on a square stamp of half-width ``ceil(max(4 * fwhm * elongation, 6))`` pixels.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, columns)`` of the image.
    x, y : ndarray
        Star centres, x = column, y = row, pixel centres at integers.
    flux : ndarray
        Total flux of each star (the integral of its profile).
    fwhm : float
        Full width at half maximum along the minor axis, pixels.
    beta : float
        Moffat power index.
    elongation : float
        Ratio of major to minor axis (1 for round stars; > 1 for wind or tracking errors).
    angle_deg : float
        Position angle of the major axis, degrees from +x.

    Returns
    -------
    ndarray
        float64 image of the stars alone.
    """
    x, y, flux = (np.asarray(v, dtype=np.float64).ravel() for v in (x, y, flux))
    if not x.shape == y.shape == flux.shape:
        raise ValueError("x, y and flux must have the same length.")
    return _render_moffat(shape, x, y, flux, fwhm=fwhm, beta=beta, elongation=elongation,
                          angle_deg=angle_deg, site_gain=None)


# ---------------------------------------------------------------------------------------------------------
# Private helpers


def _render_moffat(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, *,
                   fwhm: float, beta: float, elongation: float, angle_deg: float,
                   site_gain: np.ndarray | None) -> np.ndarray:
    """Vectorised Moffat renderer: all stamps of a batch at once, summed with ``bincount``.

    ``site_gain`` is ``(N, 2, 2)`` or None: star ``k`` contributes ``site_gain[k, row % 2, col % 2]`` times
    its profile at a pixel, which is how the colour planes are sampled into a Bayer mosaic.
    """
    rows, cols = shape
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    half = int(_stamp_half(fwhm, elongation))
    offsets = np.arange(-half, half + 1)
    off_y, off_x = offsets[:, None], offsets[None, :]
    cos_t, sin_t = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    norm = (beta - 1.0) / (np.pi * alpha * alpha * elongation)
    cx_all = np.floor(x + 0.5).astype(np.int64)
    cy_all = np.floor(y + 0.5).astype(np.int64)
    # Stars whose stamp cannot touch the image cost nothing further.
    near = (cx_all >= -half) & (cy_all >= -half) & (cx_all <= cols + half) & (cy_all <= rows + half)
    picked = np.flatnonzero(near)
    image = np.zeros(rows * cols, dtype=np.float64)
    side = 2 * half + 1
    batch = max(1, _STAMP_BUDGET // (side * side))
    for first in range(0, picked.size, batch):
        ids = picked[first:first + batch]
        cx, cy = cx_all[ids][:, None, None], cy_all[ids][:, None, None]
        dx = off_x - (x[ids] - cx_all[ids])[:, None, None]
        dy = off_y - (y[ids] - cy_all[ids])[:, None, None]
        u = (dx * cos_t + dy * sin_t) / elongation
        v = -dx * sin_t + dy * cos_t
        stamp = (flux[ids] * norm)[:, None, None] * (1.0 + (u * u + v * v) / (alpha * alpha)) ** (-beta)
        r = cy + off_y
        c = cx + off_x
        inside = (r >= 0) & (r < rows) & (c >= 0) & (c < cols)
        r, c = np.broadcast_to(r, inside.shape)[inside], np.broadcast_to(c, inside.shape)[inside]
        weights = stamp[inside]
        if site_gain is not None:
            star = np.broadcast_to(np.arange(ids.size)[:, None, None], inside.shape)[inside]
            weights = weights * site_gain[ids][star, r % 2, c % 2]
        image += np.bincount(r * cols + c, weights=weights, minlength=rows * cols)
    return image.reshape(shape)


def _stamp_half(fwhm: float, elongation: float) -> float:
    """Half-width of a star's stamp, pixels (far enough out that the cut-off wing is below the noise)."""
    return float(np.ceil(max(4.0 * fwhm * elongation, 6.0)))


def _tile_stars(seed: int, density: float, tx: int, ty: int) -> np.ndarray:
    """The stars of one sky tile: ``(N, 6)`` rows of ``x, y, flux, r, g, b`` in reference pixels."""
    rng = np.random.default_rng([seed, _TAG_TILE, _zigzag(tx), _zigzag(ty)])
    count = int(rng.poisson(density * _TILE * _TILE))
    out = np.empty((count, 6))
    out[:, 0] = (tx + rng.random(count)) * _TILE
    out[:, 1] = (ty + rng.random(count)) * _TILE
    # dN/dF ~ F^-2 between FLUX_MIN and FLUX_MAX, by inverting its cumulative distribution.
    out[:, 2] = FLUX_MIN / (1.0 - rng.random(count) * (1.0 - FLUX_MIN / FLUX_MAX))
    colour = rng.uniform(-1.0, 1.0, count) * STAR_COLOUR_SPREAD
    out[:, 3] = 1.0 + colour
    out[:, 4] = 1.0
    out[:, 5] = 1.0 - colour
    return out


def _zigzag(n: int) -> int:
    """Map any integer to a distinct non-negative one (SeedSequence wants non-negative entropy)."""
    return 2 * n if n >= 0 else -2 * n - 1


def _cos_sin_deg(angle_deg: float) -> tuple[float, float]:
    """cos and sin of an angle in degrees, exact at multiples of 90 (so a pure flip is exactly -1, 0)."""
    turns = angle_deg / 90.0
    if turns == round(turns):
        return ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[round(turns) % 4]
    rad = math.radians(angle_deg)
    return math.cos(rad), math.sin(rad)


def _forward(config: SimConfig, index: int) -> np.ndarray:
    """The 2x3 reference -> frame map: ``p = c + R(theta) (s - c) + D``."""
    width, height = config.size
    angle = index * config.rotation_per_frame
    if config.flip_at is not None and index >= config.flip_at:
        angle += 180.0
    cos_t, sin_t = _cos_sin_deg(angle)
    rotation = np.array([[cos_t, -sin_t], [sin_t, cos_t]])
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    drift = index * np.asarray(config.drift)
    if config.dither and index > 0:
        drift = drift + np.random.default_rng([config.seed, _TAG_DITHER, index]).uniform(
            -config.dither, config.dither, 2)
    result = np.empty((2, 3))
    result[:, :2] = rotation
    result[:, 2] = centre - rotation @ centre + drift
    return result


def _bend(xy: np.ndarray, size: tuple[int, int], barrel: float) -> np.ndarray:
    """Positions ``(N, 2)`` moved radially about the frame centre by the optics' barrel distortion."""
    width, height = size
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    offset = xy - centre
    corner_sq = float(np.sum(centre**2))
    factor = 1.0 - barrel * np.sum(offset**2, axis=1) / corner_sq
    return centre + offset * factor[:, None]


def _kind(config: SimConfig, index: int) -> str:
    if index in config.blank_frames:
        return "blank"
    if index in config.cloud_frames:
        return "cloud"
    if index in config.wind_frames:
        return "wind"
    bad = sorted(set(config.bad_frames))
    if index in bad:
        return ("cloud", "wind")[bad.index(index) % 2]
    return "good"


def _cell_channels(bayer: str | None) -> np.ndarray | None:
    """``(2, 2)`` channel index (0 R, 1 G, 2 B) of each site of the Bayer cell, or None for mono."""
    if bayer is None:
        return None
    return np.array([[_RGB.index(bayer[0]), _RGB.index(bayer[1])],
                     [_RGB.index(bayer[2]), _RGB.index(bayer[3])]])


def _sky(config: SimConfig, cell: np.ndarray | None) -> np.ndarray:
    """Sky background with a linear gradient fixed to the sensor, tinted per Bayer site for colour."""
    width, height = config.size
    direction = np.random.default_rng([config.seed, _TAG_SENSOR, 0]).uniform(0.0, 2.0 * np.pi)
    gx = SKY_GRADIENT * np.cos(direction) * (np.arange(width) - (width - 1) / 2.0) / width
    gy = SKY_GRADIENT * np.sin(direction) * (np.arange(height) - (height - 1) / 2.0) / height
    sky = SKY_LEVEL * (1.0 + np.add.outer(gy, gx))
    if cell is not None:
        tint = np.asarray(SKY_TINT)[cell]
        sky *= tint[(np.arange(height) % 2)[:, None], (np.arange(width) % 2)[None, :]]
    return sky


def _hot_pixels(config: SimConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and extra ADU of the hot pixels: a property of the sensor, the same every frame."""
    width, height = config.size
    rng = np.random.default_rng([config.seed, _TAG_SENSOR, 1])
    count = (max(1, round(HOT_PIXEL_FRACTION * width * height)) if config.hot_pixels is None
             else config.hot_pixels)
    flat = rng.choice(width * height, size=count, replace=False)
    low, high = np.log(HOT_PIXEL_RANGE[0]), np.log(HOT_PIXEL_RANGE[1])
    values = np.exp(rng.uniform(low, high, count))
    return flat // width, flat % width, values


def _add_trail(light: np.ndarray, rng: np.random.Generator) -> None:
    """Add a straight satellite trail at a random angle through a random point of the frame's central half.

    The central half keeps the trail long (at least about half the short side), as a real pass is.
    """
    height, width = light.shape
    x0, y0 = rng.uniform(0.25 * width, 0.75 * width), rng.uniform(0.25 * height, 0.75 * height)
    theta = rng.uniform(0.0, np.pi)
    cos_t, sin_t = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    # Perpendicular distance of each pixel from the line, evaluated by rows to keep memory small.
    cols = np.arange(width, dtype=np.float32) - np.float32(x0)
    for row in range(height):
        distance = cols * sin_t - np.float32(row - y0) * cos_t
        light[row] += TRAIL_PEAK * np.exp(-0.5 * (distance / np.float32(TRAIL_SIGMA)) ** 2)


def _header(config: SimConfig, index: int) -> dict[str, str | int | float]:
    start = config.start.astimezone(UTC) + timedelta(seconds=index * config.interval)
    cards: dict[str, str | int | float] = {
        "IMAGETYP": "Light",
        "OBJECT": config.object_name,
    }
    band = _band(config, index)
    if config.filters:
        cards["FILTER"] = config.filters[index % len(config.filters)]
    elif config.filter is not None:
        cards["FILTER"] = config.filter
    cards["EXPTIME"] = float(config.exptime * (band.exposure if band is not None else 1.0))
    cards["DATE-OBS"] = start.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    cards["INSTRUME"] = "livestack simulator"
    cards["GAIN"] = 1.0
    if config.bayer is not None:
        cards["BAYERPAT"] = config.bayer
        cards["XBAYROFF"] = 0
        cards["YBAYROFF"] = 0
        cards["ROWORDER"] = "TOP-DOWN"
    return cards


def _band(config: SimConfig, index: int) -> FilterBand | None:
    """The filter of a frame on the wheel, or None without a wheel."""
    if not config.filters:
        return None
    return FILTER_BANDS[config.filters[index % len(config.filters)]]


def _file_name(config: SimConfig, index: int) -> str:
    name = f"sim_{index + 1:04d}.fits"
    if config.subdir_every and (index + 1) % config.subdir_every == 0:
        return f"{SUBDIR_NAME}/{name}"
    return name


def _write_mode(config: SimConfig, index: int) -> str:
    if config.write_mode == "mixed":
        return ("atomic", "chunked", "rename")[index % 3]
    return config.write_mode


def _check_index(config: SimConfig, index: int) -> None:
    if not 0 <= index < config.frames:
        raise ConfigError(f"simulate: frame index {index} is outside frames 0..{config.frames - 1}.")


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


def _fits_bytes(frame: SimFrame) -> bytes:
    """The whole FITS file in memory: uint16 pixels stored as BITPIX 16 with BZERO 32768."""
    header = fits.Header()
    for key, value in frame.header.items():
        header[key] = (value, _COMMENTS.get(key, ""))
    buffer = io.BytesIO()
    fits.PrimaryHDU(data=frame.data, header=header).writeto(buffer)
    return buffer.getvalue()


def _truth_row(frame: SimFrame) -> list[str]:
    (a, b, tx), (c, d, ty) = frame.matrix.tolist()
    dx, dy = frame.centre_shift
    numbers = [a, b, tx, c, d, ty, dx, dy, frame.rotation_deg]
    return [str(frame.index), frame.name, frame.kind, str(int(frame.has_trail)), *(repr(n) for n in numbers)]


def _write_truth(path: Path, rows: list[list[str]]) -> None:
    """Rewrite the truth sidecar atomically, so a reader never sees half a row."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(TRUTH_COLUMNS)
    writer.writerows(rows)
    _write_atomic(path, text.getvalue().encode("utf-8"))


def _write_atomic(path: Path, payload: bytes) -> None:
    """Hidden temporary name in the same folder, fsync, then ``os.replace``: the file appears whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_renamed(path: Path, payload: bytes) -> None:
    """Write ``name.fits.part`` in full, then rename it: what many capture programs do (without fsync)."""
    temporary = path.with_name(f"{path.name}.part")
    try:
        temporary.write_bytes(payload)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_chunked(path: Path, payload: bytes, rate: float, sleep: Callable[[float], object]) -> None:
    """Write the final name slowly, like a copy over a network share: the file is visible while it grows.

    The file is created empty, then each chunk lands after the time it takes at ``rate`` bytes/s. An
    interruption leaves a truncated file, as an interrupted copy does.
    """
    chunk = max(1, round(rate * CHUNK_SECONDS))
    with open(path, "wb") as handle:
        for first in range(0, len(payload), chunk):
            piece = payload[first:first + chunk]
            sleep(len(piece) / rate)
            handle.write(piece)
            handle.flush()


# ---------------------------------------------------------------------------------------------------------
# Starless targets: the Moon and a planet, seen through seeing, on a sensor with a fixed pattern.
#
# The target is drawn once per session in the sky plane (frame 0's pixels plus a margin that every frame's
# view stays inside). The continuous sky is the cubic spline through those samples: every frame samples that
# one function at its transformed pixel grid (scipy's ``map_coordinates``, exact at any position), so the
# frames agree with their known transforms to the arithmetic's precision. (OpenCV's bicubic ``remap`` would
# not: its kernel is not an interpolating spline of one function, and it rounds positions to 1/32 px; frames
# rendered that way sat 0.02-0.04 px from their stated shifts, a third of the registration tolerance.)
# Each frame then
# gets its own seeing blur, the sensor's fixed pattern (which stays put while the target moves), hot
# pixels, Poisson and read noise.

MOON_LEVEL = 12000.0          # mean lunar surface brightness, ADU
MOON_TERMINATOR = 0.35        # fractional fall of the sunlight across the frame towards the terminator
PLANET_LEVEL = 20000.0        # planet's disk centre, ADU
PLANET_RADIUS = 0.3           # planet's radius as a fraction of the frame's shorter side
PLANET_LIMB_DARKENING = 0.6   # linear limb-darkening coefficient
SURFACE_SKY = 300.0           # sky beside a planet or on a blank frame, ADU
SEEING_FWHM = (1.8, 3.6)      # per-frame seeing blur, FWHM in pixels, uniform in this range
SURFACE_CLOUD_TRANSMISSION = 0.1  # target light left in a cloud-covered frame
SURFACE_CLOUD_BLUR = 14.0     # FWHM of the cloud's scattering blur, pixels
SURFACE_CLOUD_HAZE = 0.2      # cloud glow added, as a fraction of the target's mean level
FIXED_PATTERN_MIX = (0.05, 0.6, 0.8)  # std of per-pixel offsets, column offsets, amplifier glow (unscaled)
PRNU = 0.01                   # per-pixel gain spread (photo-response non-uniformity)
DUST_DEPTH = 0.05             # light lost at the centre of a dust shadow
DUST_RADIUS = (0.04, 0.09)    # dust shadows' radius range, fraction of the frame's shorter side

_TAG_SURFACE = 5


@dataclass(frozen=True, eq=False)
class _Scene:
    """A starless target in the sky plane: ``image[y + margin, x + margin]`` is sky pixel ``(x, y)``."""

    image: np.ndarray
    coefficients: np.ndarray  # cubic spline coefficients of ``image`` (scipy.ndimage.spline_filter)
    margin: int
    contrast: float   # std of the target's light over frame 0, ADU
    level: float      # mean of the target's light over frame 0, ADU


@dataclass(frozen=True, eq=False)
class _Sensor:
    """What stays put on the sensor whatever it points at."""

    gain: np.ndarray      # per-pixel multiplicative response (PRNU and dust shadows)
    offset: np.ndarray    # additive fixed pattern, zero mean, unit std
    offset_floor: float   # -min(offset): added so the scaled pattern never goes negative


def _render_surface(config: SimConfig, index: int, kind: str, has_trail: bool,
                    events: np.random.Generator) -> SimFrame:
    width, height = config.size
    scene = _scene(config)
    sensor = _sensor(config)
    matrix = true_matrix(config, index)
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    map_x = matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2] + scene.margin
    map_y = matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2] + scene.margin
    del xs, ys
    light: np.ndarray = _spline().map_coordinates(scene.coefficients, (map_y, map_x), output=np.float32,
                                                order=3, mode="mirror", prefilter=False)
    del map_x, map_y
    seeing = float(events.uniform(*SEEING_FWHM))
    if kind == "cloud":
        light = _blur(light * np.float32(SURFACE_CLOUD_TRANSMISSION), SURFACE_CLOUD_BLUR)
        light = light + np.float32(SURFACE_CLOUD_HAZE * scene.level)
    elif kind == "blank":
        light = np.full(light.shape, SURFACE_SKY, dtype=np.float32)
    light = np.asarray(_blur(light, seeing), dtype=np.float64)
    if has_trail:
        _add_trail(light, events)
    light *= sensor.gain
    scale = config.fixed_pattern * scene.contrast
    light += scale * (sensor.offset + sensor.offset_floor)
    hot_rows, hot_cols, hot_values = _hot_pixels(config)
    light[hot_rows, hot_cols] += hot_values
    noise = np.random.default_rng([config.seed, _TAG_NOISE, index])
    image = noise.poisson(np.maximum(light, 0.0)).astype(np.float32)
    image += noise.standard_normal(light.shape, dtype=np.float32) * np.float32(READ_NOISE)
    image += np.float32(BIAS)
    np.rint(image, out=image)
    np.clip(image, 0, SATURATION, out=image)
    return SimFrame(index=index, name=_file_name(config, index), data=_frozen(image.astype(np.uint16)),
                    header=MappingProxyType(_header(config, index)), matrix=_frozen(matrix), kind=kind,
                    has_trail=has_trail, seeing=seeing)


def _blur(image: np.ndarray, fwhm: float) -> np.ndarray:
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return np.asarray(cv2.GaussianBlur(np.asarray(image, dtype=np.float32), (0, 0), sigma,
                                       borderType=cv2.BORDER_REFLECT))


def _spline() -> Any:
    """scipy.ndimage, imported only when a starless target is drawn (it costs start-up time otherwise)."""
    from scipy import ndimage

    return ndimage


@functools.lru_cache(maxsize=2)
def _scene(config: SimConfig) -> _Scene:
    """The target in the sky plane, drawn once per session (the same for every frame)."""
    width, height = config.size
    travel = math.hypot(*config.drift) * config.frames
    turn = (math.hypot(width, height) - min(width, height)) / 2.0
    margin = math.ceil(travel + turn) + 32
    rows, cols = height + 2 * margin, width + 2 * margin
    rng = np.random.default_rng([config.seed, _TAG_SURFACE, 0])
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    x -= np.float32(margin + (width - 1) / 2.0)
    y -= np.float32(margin + (height - 1) / 2.0)
    if config.target == "moon":
        detail = _fractal(rng, (rows, cols), slope=3.0)
        maria = _fractal(rng, (rows, cols), slope=4.0, cutoff=0.02)
        albedo = (1.0 + 0.12 * detail - 0.12 * np.tanh(2.0 * maria) + 0.35 * _craters(rng, (rows, cols)))
        sunlight = 1.0 - MOON_TERMINATOR * (0.5 + 0.5 * np.tanh(x / np.float32(0.6 * width)))
        image = MOON_LEVEL * np.clip(albedo, 0.05, None) * sunlight
    else:
        radius = PLANET_RADIUS * min(width, height)
        r2 = (x * x + y * y) / np.float32(radius * radius)
        mu = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
        latitude = y / np.float32(radius)
        bands = 1.0 + 0.15 * np.sin(9.0 * latitude) + 0.06 * np.sin(23.0 * latitude + 1.0)
        bands += 0.05 * _fractal(rng, (rows, cols), slope=3.0)
        disk = (1.0 - PLANET_LIMB_DARKENING * (1.0 - mu)) * bands
        # A soft edge (0.7 px) so that the limb is band-limited, as the sky plane must be.
        edge = 0.5 - 0.5 * np.tanh((np.sqrt(r2) - 1.0) * np.float32(radius / 0.7))
        image = SURFACE_SKY + PLANET_LEVEL * disk * edge
    image = _blur(image, 1.5)
    view = image[margin:margin + height, margin:margin + width]
    coefficients = _spline().spline_filter(image, order=3, output=np.float32, mode="mirror")
    return _Scene(image=_frozen(image), coefficients=_frozen(coefficients), margin=margin,
                  contrast=float(view.std()), level=float(view.mean()))


@functools.lru_cache(maxsize=2)
def _sensor(config: SimConfig) -> _Sensor:
    """The sensor's fixed pattern: per-pixel offsets, column offsets, amplifier glow, gain, dust shadows."""
    width, height = config.size
    rng = np.random.default_rng([config.seed, _TAG_SENSOR, 7])
    white, columns, glow = FIXED_PATTERN_MIX
    offset = white * rng.standard_normal((height, width), dtype=np.float32)
    offset += np.float32(columns) * rng.standard_normal(width, dtype=np.float32)[None, :]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    corner = np.exp(-np.hypot(x - (width - 1), y) / np.float32(0.15 * min(width, height)))
    offset += np.float32(glow) * (corner - corner.mean()) / np.float32(max(float(corner.std()), 1e-12))
    offset -= offset.mean()
    offset /= np.float32(offset.std())
    gain = 1.0 + PRNU * rng.standard_normal((height, width))
    for _ in range(max(1, round(width * height / 400_000))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(*DUST_RADIUS) * min(width, height)
        ring = np.hypot(x - cx, y - cy) / radius
        gain *= 1.0 - DUST_DEPTH * np.exp(-(ring ** 8))
    return _Sensor(gain=_frozen(gain), offset=_frozen(offset), offset_floor=float(-offset.min()))


def _fractal(rng: np.random.Generator, shape: tuple[int, int], slope: float,
             cutoff: float = 0.25) -> np.ndarray:
    """Unit-std Gaussian noise with a power spectrum falling as ``k ** -slope`` up to ``cutoff`` cycles/px."""
    rows, cols = shape
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    ky = np.fft.fftfreq(rows)[:, None]
    kx = np.fft.rfftfreq(cols)[None, :]
    k = np.hypot(kx, ky)
    k[0, 0] = 1.0
    spectrum *= k ** (-slope / 2.0) * np.exp(-(k / cutoff) ** 2)
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=shape).astype(np.float32)
    return field / np.float32(max(float(field.std()), 1e-12))


def _craters(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Bowl-shaped craters: a dark floor inside a bright rim, sizes log-uniform from 3 to 40 px."""
    rows, cols = shape
    out = np.zeros(shape, dtype=np.float32)
    count = max(1, rows * cols // 2500)
    radii = np.exp(rng.uniform(math.log(3.0), math.log(40.0), count))
    centres = rng.uniform((0.0, 0.0), (cols, rows), (count, 2))
    depth = rng.uniform(0.4, 1.0, count)
    for (cx, cy), radius, d in zip(centres, radii, depth, strict=True):
        half = math.ceil(1.6 * radius)
        x0, x1 = max(0, int(cx) - half), min(cols, int(cx) + half + 1)
        y0, y1 = max(0, int(cy) - half), min(rows, int(cy) + half + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        r = np.hypot(xx - cx, yy - cy) / radius
        floor = -0.5 / (1.0 + np.exp((r - 0.8) / 0.06))
        rim = 0.6 * np.exp(-(((r - 1.0) / 0.12) ** 2))
        out[y0:y1, x0:x1] += (d * (floor + rim)).astype(np.float32)
    return out
