"""Configuration: ``config.toml`` loaded into frozen dataclasses, validated once.

Every key has a default, a type, a one-line description and, where it matters, the allowed values; the
top-level ``config.toml`` lists them all (a test keeps it in step with this module). An unknown key, a wrong
type or an impossible value raises ``ConfigError`` with one sentence naming the file, the key and what is
allowed. Command-line options override the file through ``with_overrides``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from livestack.errors import ConfigError

__all__ = [
    "AlignConfig",
    "CalibrationConfig",
    "ComposeConfig",
    "Config",
    "DetectConfig",
    "FramesConfig",
    "NetworkConfig",
    "OutputConfig",
    "PhotometryConfig",
    "RejectConfig",
    "StackConfig",
    "StateConfig",
    "WatchConfig",
    "WcsConfig",
    "WebConfig",
    "load_config",
    "render_toml",
]

_DEFAULT_PATTERNS = ("*.fit", "*.fits", "*.fts", "*.fit.fz", "*.fits.fz", "*.fts.fz",
                     "*.fit.gz", "*.fits.gz", "*.fts.gz")


def _key(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None, minimum: float | None = None,
         maximum: float | None = None, exclusive_min: bool = False, may_be_empty: bool = False) -> Any:
    """A configuration key: its default, description and bounds (``may_be_empty`` for a list)."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum,
            "exclusive_min": exclusive_min, "may_be_empty": may_be_empty}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class WatchConfig:
    """``[watch]``: which folder to watch and when a file counts as complete."""

    folder: str = _key("frames", "folder the capture program writes into (relative to the config file)")
    patterns: tuple[str, ...] = _key(_DEFAULT_PATTERNS,
                                     "file name patterns that are frames (case-insensitive)")
    recursive: bool = _key(True, "also watch subfolders, including ones made during the night")
    polling: bool = _key(False, "poll instead of OS events (network shares where inotify sees nothing)")
    settle: float = _key(2.0, "seconds a file's size and mtime must stay unchanged when polling",
                         minimum=0.0)
    poll_interval: float = _key(1.0, "seconds between polls when polling", minimum=0.0, exclusive_min=True)
    reconcile_interval: float = _key(30.0, "seconds between full scans that catch what events missed",
                                     minimum=0.0, exclusive_min=True)
    follow_symlinks: bool = _key(False, "read frames through symbolic links that lead outside the folder")
    warm_up: bool = _key(True, "at start, stack a few small simulated frames off the frame path, so that the "
                         "first frame does not wait for first calls (numba kernels, imports)")


@dataclass(frozen=True)
class FramesConfig:
    """``[frames]``: how frames are read."""

    bayer_pattern: str = _key("", "Bayer pattern for cameras that write none ('' = from the header; "
                              "MONO = treat every frame as mono)",
                              choices=("", "RGGB", "BGGR", "GRBG", "GBRG", "MONO"))
    max_megapixels: float = _key(100.0, "largest frame read (width x height, megapixels); larger ones are "
                                 "rejected from their header", minimum=0.0, exclusive_min=True)


@dataclass(frozen=True)
class CalibrationConfig:
    """``[calibration]``: master frames and defect pixels, applied to the raw mosaic before debayering."""

    masters: str = _key("", "folder of masters made by livestack masters ('' = no calibration frames)")
    temperature_tolerance: float = _key(5.0, "largest difference of set temperatures between a master and "
                                        "a light, Celsius", minimum=0.0)
    defects: str = _key("auto", "hot and cold pixels: from the matched master dark, from the frames "
                        "themselves, either (auto: the dark when one matches), or off",
                        choices=("auto", "dark", "frames", "off"))
    defect_sigma: float = _key(5.0, "a defect deviates by more than this many noise sigmas", minimum=0.0,
                               exclusive_min=True)
    defect_frames: int = _key(3, "frames in a row a pixel must be deviant in to count as a defect "
                              "(defects from the frames)", minimum=2)


@dataclass(frozen=True)
class DetectConfig:
    """``[detect]``: star detection."""

    threshold: float = _key(5.0, "detection threshold in background sigmas", minimum=0.0, exclusive_min=True)
    binning: int = _key(0, "detect on a binned image: 1, 2 or 4, or 0 for automatic by frame size",
                        choices=(0, 1, 2, 4))
    max_stars: int = _key(1000, "brightest stars kept per frame", minimum=10)


@dataclass(frozen=True)
class AlignConfig:
    """``[align]``: registration onto the reference and its validation."""

    reference: str = _key("", "frame to align onto ('' = the best of the first frames, see "
                          "reference_window)")
    reference_window: int = _key(5, "the reference is chosen among this many first frames of a stack (most "
                                 "stars, then smallest FWHM; 1 = the first frame with enough stars)",
                                 minimum=1)
    reference_wait: float = _key(2.0, "seconds the first frame of a stack waits for others to arrive before "
                                 "the reference is chosen among those at hand (at most 60)", minimum=0.0,
                                 maximum=60.0)
    reference_folder: str = _key("", "another folder whose frames set_reference may name (besides the "
                                 "watched folder)")
    reference_min_stars: int = _key(15, "stars a frame needs to become the reference", minimum=3)
    model: str = _key("similarity", "transform model", choices=("similarity", "affine"))
    interpolation: str = _key("bicubic", "warp interpolation (bilinear blurs undersampled stars)",
                              choices=("bilinear", "bicubic", "lanczos"))
    min_inliers: int = _key(8, "matched stars needed to accept a frame", minimum=3)
    min_matched_fraction: float = _key(0.2, "fraction of the reference's stars in view that must match",
                                       minimum=0.0, maximum=1.0)
    max_rms: float = _key(1.0, "largest residual RMS of matched stars, pixels", minimum=0.0,
                          exclusive_min=True)
    min_spread: float = _key(0.2, "matched stars must span this fraction of the frame in each axis",
                             minimum=0.0, maximum=1.0)
    match_radius: float = _key(3.0, "pixels within which a predicted star matches", minimum=0.0,
                               exclusive_min=True)
    max_stars: int = _key(500, "brightest stars used for matching", minimum=10)
    triangle_stars: int = _key(50, "brightest stars used by the rotation-invariant fallback", minimum=5)
    distortion: str = _key("auto", "correct a wide field's smooth distortion beyond the affine fit: off, on "
                           "(when enough stars cover the frame) or auto (only when it measurably lowers the "
                           "residuals)", choices=("off", "auto", "on"))
    max_fwhm_factor: float = _key(1.6, "reject frames whose FWHM exceeds the reference's by this factor "
                                  "(0 = off)", minimum=0.0)
    min_star_fraction: float = _key(0.3, "reject frames with fewer stars than this fraction of the "
                                    "reference's (clouds)", minimum=0.0, maximum=1.0)
    max_ellipticity: float = _key(0.5, "reject frames whose stars are more elongated than this (1 - b/a)",
                                  minimum=0.0, maximum=1.0)
    mode: str = _key("auto", "align on stars, on the surface of the Moon, Sun or a planet, or auto (the "
                     "surface when the reference frame has too few stars)",
                     choices=("auto", "stars", "surface"))
    surface_min_confidence: float = _key(7.0, "surface: smallest phase-correlation confidence (peak over "
                                         "side-lobes, in their standard deviations)", minimum=0.0,
                                         exclusive_min=True)
    surface_max_jump: float = _key(0.0, "surface: reject frames that moved more than this from the previous "
                                   "frame, pixels (0 = no limit)", minimum=0.0)
    keep_sharpest: float = _key(100.0, "surface: stack only frames among the sharpest this percent of those "
                                "seen so far (100 = all)", minimum=0.0, maximum=100.0, exclusive_min=True)


@dataclass(frozen=True)
class StackConfig:
    """``[stack]``: how aligned frames are combined."""

    method: str = _key("kappa-sigma", "stacking method (max: no alignment, star trails; mean-without-max: "
                        "each pixel's largest sample left out)",
                        choices=("mean", "kappa-sigma", "median", "max", "mean-without-max"))
    kappa: float = _key(3.0, "kappa-sigma rejection threshold, in sigmas", minimum=0.0, exclusive_min=True)
    warmup: int = _key(5, "frames before kappa-sigma starts rejecting", minimum=2)
    median_disk_budget: float = _key(20.0, "gigabytes each median stack's cube of frames may take on "
                                     "disk (width x height x channels x 4 bytes a frame); beyond it the "
                                     "stack goes on as kappa-sigma over every frame (0 = no limit)",
                                     minimum=0.0)
    new_session_on_object: bool = _key(True, "each OBJECT is stacked apart, in its own subfolder (off: one "
                                       "stack for all)")
    normalise: str = _key("additive", "match each frame's sky to the reference's before stacking: add the "
                          "difference, scale by the stars' flux then add, or none",
                          choices=("additive", "scale", "none"))
    weights: str = _key("noise", "frame weights: inverse variance of the normalised sky, that times the "
                        "transparency, or equal", choices=("noise", "noise+transparency", "none"))


@dataclass(frozen=True)
class RejectConfig:
    """``[reject]``: relative rejection against the running median of the night (per target and filter)."""

    relative: bool = _key(True, "reject frames that are one-sided outliers against the night so far")
    warmup: int = _key(5, "accepted frames before relative rejection starts", minimum=3)
    kappa: float = _key(5.0, "reject beyond this many robust sigmas (1.4826 MAD) of the running median",
                        minimum=0.0, exclusive_min=True)
    window: int = _key(50, "the running median covers the last this many accepted frames", minimum=3)


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: snapshots of the stack."""

    folder: str = _key("livestack-output", "where snapshots go (relative to the config file)")
    every_frames: int = _key(5, "write a snapshot every this many stacked frames (0 = off)", minimum=0)
    every_seconds: float = _key(60.0, "write a snapshot at least this often while stacking (0 = off)",
                                minimum=0.0)
    image_format: str = _key("jpeg", "format of the picture for people", choices=("jpeg", "png"))
    history: bool = _key(False, "also keep numbered copies of each snapshot")
    flatten_background: bool = _key(True, "remove sky gradients from pictures and previews (not from FITS)")
    crop_coverage: float = _key(0.5, "cut the picture to a rectangle covered by at least this share of the "
                                "frames (0 = no cut)", minimum=0.0, maximum=1.0)
    blank: str = _key("nan", "what pixels no frame covered hold in the FITS data (zero for tools that "
                      "mishandle NaN)", choices=("nan", "zero"))
    frames_csv: bool = _key(False, "also write the FRAMES provenance table as CSV beside each snapshot "
                            "(stack.frames.csv)")


@dataclass(frozen=True)
class ComposeConfig:
    """``[compose]``: colour composites of a target's per-filter stacks."""

    recipe: str = _key("auto", "recipe ('auto' = the first possible of LRGB, RGB, SHO, HOO, mono)",
                       choices=("auto", "LRGB", "RGB", "SHO", "HOO", "mono"))
    combine: str = _key("mean", "combine channels by weighted mean, or render the picture with Lupton's "
                        "asinh", choices=("mean", "lupton"))
    scale: str = _key("stars", "scale channels to one another by common stars' flux, or by the weights",
                      choices=("stars", "weights"))
    background: str = _key("mesh", "remove each channel's sky as a smooth model (mesh) or one level",
                           choices=("mesh", "level"))
    weights: str = _key("", "per-filter weights, e.g. 'R=1.2, G=1.0, B=0.9' (unnamed filters weigh 1)")
    every_seconds: float = _key(15.0, "rebuild the live composite at most this often, when a channel "
                                "changed (0 = only on request and at shutdown)", minimum=0.0)

    def __post_init__(self) -> None:
        for item in self.weights.split(","):
            name, sep, value = item.partition("=")
            if not item.strip():
                continue
            try:
                weight = float(value)
            except ValueError:
                weight = -1.0
            if not sep or not name.strip() or not weight > 0 or weight == float("inf"):
                raise ConfigError(f"[compose] weights must look like 'R=1.2, G=1.0' with positive numbers; "
                                  f"{item.strip()!r} does not")


@dataclass(frozen=True)
class StateConfig:
    """``[state]``: the journal and checkpoints that make restarts exact."""

    folder: str = _key("", "state folder ('' = .livestack-state inside the output folder)")
    checkpoint_every_frames: int = _key(10, "checkpoint the accumulators every this many frames",
                                        minimum=1)
    checkpoint_every_seconds: float = _key(120.0, "and at least this often while frames arrive",
                                           minimum=0.0, exclusive_min=True)


@dataclass(frozen=True)
class NetworkConfig:
    """``[network]``: ZeroMQ event and control sockets."""

    publish: str = _key("tcp://127.0.0.1:5555", "PUB endpoint for events")
    control: str = _key("tcp://127.0.0.1:5556", "REP endpoint for control requests")
    preview_interval: float = _key(5.0, "seconds between preview images attached to stack events "
                                   "(0 = none)", minimum=0.0)
    preview_size: int = _key(160, "longest side of the preview image, pixels", minimum=16, maximum=1024)
    server_secret_key: str = _key("", "CURVE server secret certificate (livestack keys); '' = no CURVE")
    authorized_keys: str = _key("", "folder of client public certificates (*.key) allowed to connect")
    insecure_remote: bool = _key(False, "allow binding beyond loopback without keys (loudly logged)")


@dataclass(frozen=True)
class WebConfig:
    """``[web]``: the browser viewer, and the pictures of the stack the daemon publishes for it."""

    listen: str = _key("127.0.0.1:8080", "HOST:PORT the viewer serves on; beyond loopback anyone on that "
                       "network can read the page")
    caption: str = _key("", "a line shown under the picture (a welcome, the telescope, the club)")
    display_interval: float = _key(5.0, "seconds between pictures of the stack published for viewers "
                                   "(0 = none)", minimum=0.0)
    display_size: int = _key(2048, "longest side of those pictures, pixels (0 = the stack's own size)",
                             minimum=0)


@dataclass(frozen=True)
class PhotometryConfig:
    """``[photometry]``: light curves of chosen stars, measured on every accepted frame."""

    targets: tuple[str, ...] = _key(
        (), "stars to measure: 'x,y' on the reference frame or 'sky RA DEC' in degrees (needs a WCS), each "
            "optionally 'NAME=...'; [] = no photometry", may_be_empty=True)
    comparisons: int = _key(10, "comparison stars, chosen as the brightest clean ones of the reference",
                            minimum=1)
    exclude: tuple[str, ...] = _key((), "known variables never used as comparisons (same forms as targets)",
                                    may_be_empty=True)
    aperture: float = _key(2.0, "aperture radius, in FWHM of each frame", minimum=0.0, exclusive_min=True)
    annulus_inner: float = _key(3.0, "background annulus inner radius, in FWHM", minimum=0.0,
                                exclusive_min=True)
    annulus_outer: float = _key(5.0, "background annulus outer radius, in FWHM", minimum=0.0,
                                exclusive_min=True)
    gain: float = _key(0.0, "electrons per ADU (0 = GAIN or EGAIN from the header, else 1, with a warning)",
                       minimum=0.0)
    saturation: float = _key(0.0, "ADU at which the sensor clips (0 = SATURATE or DATAMAX from the header, "
                                  "else a plateau at the reference's maximum)", minimum=0.0)
    site: str = _key("", "observatory 'latitude,longitude[,height]' (degrees, east positive; metres) for "
                         "BJD_TDB times ('' = SITELAT/SITELONG from the header; unknown = JD UTC)")


@dataclass(frozen=True)
class WcsConfig:
    """``[wcs]``: sky coordinates for stacks whose reference frame carries none, by a local plate solver."""

    solve: str = _key("auto", "plate-solve the reference: 'auto' when it has no WCS and its header gives a "
                              "pointing or a pixel scale, 'always' (blind if need be), 'off' never",
                      choices=("auto", "always", "off"))
    command: str = _key("", "solver command template ('' = astrometry.net's solve-field); see the README for "
                            "its placeholders")
    time_limit: float = _key(60.0, "seconds the solver may take per reference", minimum=1.0)


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``base`` is the folder relative paths are resolved against."""

    watch: WatchConfig = field(default_factory=WatchConfig)
    frames: FramesConfig = field(default_factory=FramesConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    reject: RejectConfig = field(default_factory=RejectConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    state: StateConfig = field(default_factory=StateConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    web: WebConfig = field(default_factory=WebConfig)
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)
    wcs: WcsConfig = field(default_factory=WcsConfig)
    base: Path = field(default=Path("."), compare=False)

    def path(self, value: str) -> Path:
        """Resolve a configured path against the config file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base / p)

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "the command line") -> Config:
        """A copy with ``{"section.key": value}`` overrides applied and validated.

        Parameters
        ----------
        overrides : Mapping
            Dotted keys such as ``"stack.method"``; None values are ignored.
        source : str
            Named in error messages.

        Returns
        -------
        Config

        Raises
        ------
        ConfigError
            For an unknown key or an invalid value.
        """
        tables: dict[str, dict[str, Any]] = {}
        for dotted, value in overrides.items():
            if value is None:
                continue
            section, _, key = dotted.partition(".")
            tables.setdefault(section, {})[key] = value
        return _build(tables, source, base=self.base, start=self)


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a configuration file.

    Parameters
    ----------
    path : str or Path, optional
        A TOML file. None gives the defaults, with paths relative to the current folder.

    Returns
    -------
    Config

    Raises
    ------
    ConfigError
        When the file cannot be read or parsed, or a key is unknown, of the wrong type or impossible.
    """
    if path is None:
        return Config(base=Path.cwd())
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such configuration file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from exc
    return _build(data, str(path), base=path.resolve().parent, start=Config())


def render_toml() -> str:
    """The default configuration as commented TOML: every key, its default and what it means."""
    lines = ["# livestack configuration: every key with its default. Relative paths are relative to",
             "# this file's folder. Command-line options override these values.", ""]
    for section in dataclasses.fields(Config):
        if section.name == "base":
            continue
        cls = get_type_hints(Config)[section.name]
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            comment = meta["doc"]
            if meta.get("choices"):
                comment += " (" + " | ".join(_toml_value(c) for c in meta["choices"]) + ")"
            lines.append(f"{f.name} = {_toml_value(f.default)}  # {comment}")
        lines.append("")
    return "\n".join(lines)


_SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name != "base"}


def _build(data: Mapping[str, Any], source: str, *, base: Path, start: Config) -> Config:
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; sections are "
                              f"{', '.join('[' + s + ']' for s in _SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table of keys")
        current = getattr(start, name)
        sections[name] = _build_section(name, type(current), table, current, source)
    return dataclasses.replace(start, base=base, **sections)


def _build_section(name: str, cls: type, table: Mapping[str, Any], current: Any, source: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r} in [{name}]; keys are {', '.join(fields)}")
        values[key] = _check(f"[{name}] {key}", hints[key], raw, fields[key].metadata, source)
    return dataclasses.replace(current, **values)


def _check(label: str, hint: Any, raw: Any, meta: Mapping[str, Any], source: str) -> Any:
    value: Any
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{source}: {label} must be true or false, not {raw!r}")
        value = raw
    elif hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{source}: {label} must be a whole number, not {raw!r}")
        value = raw
    elif hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{source}: {label} must be a number, not {raw!r}")
        value = float(raw)
    elif hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{source}: {label} must be a string, not {raw!r}")
        value = raw
    else:  # tuple[str, ...]
        empty_ok = bool(meta.get("may_be_empty"))
        strings = isinstance(raw, list | tuple) and all(isinstance(v, str) for v in raw)
        if not strings or not (raw or empty_ok):
            kind = "a list of strings" if empty_ok else "a non-empty list of strings"
            raise ConfigError(f"{source}: {label} must be {kind}, not {raw!r}")
        value = tuple(raw)
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        allowed = ", ".join(_toml_value(c) for c in choices)
        raise ConfigError(f"{source}: {label} is {_toml_value(value)}; allowed: {allowed}")
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and (value < low or (meta.get("exclusive_min") and value == low)):
        relation = "greater than" if meta.get("exclusive_min") else "at least"
        raise ConfigError(f"{source}: {label} must be {relation} {low}, not {value}")
    if high is not None and value > high:
        raise ConfigError(f"{source}: {label} must be at most {high}, not {value}")
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
