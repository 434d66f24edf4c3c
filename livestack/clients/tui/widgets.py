"""Widgets the dashboard needs beyond Textual's: the stack preview in half blocks, a labelled plot, a light
curve with error bars."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import Sparkline, Static

__all__ = ["HALF_BLOCK", "LightCurveView", "Plot", "PreviewView", "bin_points", "fit_preview"]

#: The upper half block: its foreground paints the upper pixel of a cell, its background the lower one.
HALF_BLOCK = "▀"


def fit_preview(image: np.ndarray, columns: int, rows: int) -> np.ndarray:
    """Resample an image to fit a block of terminal cells, two pixels per cell, keeping its aspect.

    Parameters
    ----------
    image : ndarray
        uint8 ``(height, width, channels)`` with 1 to 4 channels.
    columns, rows : int
        The size of the block in cells; it holds ``columns`` by ``2 * rows`` square pixels.

    Returns
    -------
    ndarray
        uint8 ``(h, w, 3)`` RGB with ``w <= columns`` and ``h <= 2 * rows`` (empty when nothing fits);
        one channel becomes grey.
    """
    height, width = image.shape[:2]
    if columns <= 0 or rows <= 0 or height == 0 or width == 0:
        return np.zeros((0, 0, 3), np.uint8)
    scale = min(columns / width, 2 * rows / height)
    out_w = max(1, min(columns, round(width * scale)))
    out_h = max(1, min(2 * rows, round(height * scale)))
    # Average the source pixels that fall into each output pixel: a sky preview shrunk by picking one
    # pixel in ten would lose the faint stars and flicker from one refresh to the next.
    y_starts, y_counts = _bins(height, out_h)
    x_starts, x_counts = _bins(width, out_w)
    rgb = _as_rgb(image).astype(np.float32)
    summed = np.add.reduceat(np.add.reduceat(rgb, y_starts, axis=0), x_starts, axis=1)
    counts = np.outer(y_counts, x_counts)[:, :, np.newaxis]
    return np.clip(np.rint(summed / counts), 0, 255).astype(np.uint8)


class PreviewView(Widget):
    """The latest stack preview, drawn with half blocks and centred in the widget."""

    DEFAULT_CSS = """
    PreviewView {
        width: 1fr;
        height: 1fr;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._image: np.ndarray | None = None
        self._strips: list[Strip] | None = None
        self._strips_size: tuple[int, int] = (0, 0)

    @property
    def image(self) -> np.ndarray | None:
        """The preview being shown (uint8 rows, columns, channels), or None."""
        return self._image

    def show(self, image: np.ndarray | None) -> None:
        """Show a new preview.

        Parameters
        ----------
        image : ndarray or None
            uint8 ``(rows, columns, channels)``, or None to clear.
        """
        self._image = image
        self._strips = None
        self.refresh()

    def render_line(self, y: int) -> Strip:
        """Draw one line of cells (Textual's line API)."""
        width, height = self.size.width, self.size.height
        if self._strips is None or self._strips_size != (width, height):
            self._strips = self._draw(width, height)
            self._strips_size = (width, height)
        return self._strips[y] if 0 <= y < len(self._strips) else Strip.blank(width, self.rich_style)

    def _draw(self, width: int, height: int) -> list[Strip]:
        base = self.rich_style
        if self._image is None:
            return self._message(width, height, "no preview yet", base)
        pixels = fit_preview(self._image, width, height)
        pix_h, pix_w = pixels.shape[:2]
        if pix_h == 0:
            return self._message(width, height, "", base)
        cell_rows = (pix_h + 1) // 2
        top = (height - cell_rows) // 2
        left = (width - pix_w) // 2
        blank = Strip.blank(width, base)
        strips = [blank] * height
        styles: dict[tuple[int, ...], Style] = {}
        for row in range(cell_rows):
            upper = pixels[2 * row]
            lower = pixels[2 * row + 1] if 2 * row + 1 < pix_h else None
            segments = [Segment(" " * left, base)] if left else []
            for col in range(pix_w):
                key = tuple(upper[col]) + (() if lower is None else tuple(lower[col]))
                style = styles.get(key)
                if style is None:
                    style = base + Style(
                        color=Color.from_rgb(*upper[col]),
                        bgcolor=None if lower is None else Color.from_rgb(*lower[col]),
                    )
                    styles[key] = style
                segments.append(Segment(HALF_BLOCK, style))
            strips[top + row] = Strip(Segment.simplify(segments)).extend_cell_length(width, base)
        return strips

    @staticmethod
    def _message(width: int, height: int, text: str, base: Style) -> list[Strip]:
        strips = [Strip.blank(width, base)] * height
        if height and text:
            line = text[:width].center(width)
            strips[height // 2] = Strip([Segment(line, base + Style(dim=True))], width)
        return strips


class Plot(Horizontal):
    """A sparkline with a label naming it and showing the latest value.

    Parameters
    ----------
    title : str
        What is plotted, e.g. ``FWHM``.
    unit : str
        Appended to the latest value.
    fmt : str
        A format spec for the latest value, e.g. ``.2f``.
    """

    DEFAULT_CSS = """
    Plot {
        height: 1;
    }
    Plot > .plot--label {
        width: 20;
    }
    Plot > Sparkline {
        width: 1fr;
    }
    """

    def __init__(self, title: str, unit: str = "", fmt: str = ".1f", *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        self.unit = unit
        self.fmt = fmt
        self._label = Static(self._text(None), classes="plot--label")
        self._spark = Sparkline([], summary_function=_mean)

    def compose(self) -> ComposeResult:
        """The label, then the sparkline."""
        yield self._label
        yield self._spark

    @property
    def data(self) -> list[float]:
        """The plotted values."""
        return list(self._spark.data or [])

    def plot(self, values: Sequence[float]) -> None:
        """Replace the plotted values; the label shows the last.

        Parameters
        ----------
        values : sequence of float
            Oldest first.
        """
        self._spark.data = list(values)
        self._label.update(self._text(values[-1] if values else None))

    def _text(self, latest: float | None) -> str:
        value = "\u2013" if latest is None else f"{latest:{self.fmt}}{self.unit}"
        return f"{self.title} {value}"


def bin_points(points: Sequence[tuple[float, float, float]],
               columns: int) -> list[tuple[float, float, float]]:
    """Average ``(time, magnitude, error)`` points down to at most ``columns``, consecutive points together.

    Each bin's magnitude is the inverse-variance weighted mean of its points and its error that mean's error,
    so a binned point is as certain as its points together are.
    """
    if columns <= 0 or not points:
        return []
    data = np.asarray(points, dtype=np.float64)
    starts, _counts = _bins(len(data), min(columns, len(data)))
    out = []
    for chunk in np.split(data, starts[1:]):
        weights = 1.0 / np.maximum(chunk[:, 2], 1e-9) ** 2
        mean = float(np.sum(weights * chunk[:, 1]) / weights.sum())
        out.append((float(chunk[:, 0].mean()), mean, float(1.0 / np.sqrt(weights.sum()))))
    return out


class LightCurveView(Widget):
    """A target's differential magnitude over the night: a dot per column, its error bar above and below.

    Brighter is up (smaller magnitudes at the top), as astronomers draw light curves. With more points than
    columns, consecutive points are binned (``bin_points``).
    """

    DEFAULT_CSS = """
    LightCurveView {
        width: 1fr;
        height: 8;
    }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._points: list[tuple[float, float, float]] = []

    @property
    def points(self) -> list[tuple[float, float, float]]:
        """The points shown (before binning)."""
        return self._points

    def plot(self, points: Sequence[tuple[float, float, float]]) -> None:
        """Show ``(time, magnitude, error)`` points."""
        self._points = list(points)
        self.refresh()

    def render_line(self, y: int) -> Strip:
        """Draw one line of cells (Textual's line API)."""
        width, height = self.size.width, self.size.height
        base = self.rich_style
        rows = self._draw(width, height)
        if 0 <= y < len(rows):
            return Strip([Segment(rows[y], base)], width)
        return Strip.blank(width, base)

    def _draw(self, width: int, height: int) -> list[str]:
        if width <= 0 or height <= 0:
            return []
        if not self._points:
            lines = [" " * width] * height
            lines[height // 2] = "no photometry yet"[:width].center(width)
            return lines
        binned = bin_points(self._points, width)
        mags = np.array([p[1] for p in binned])
        errs = np.array([p[2] for p in binned])
        low, high = float(np.min(mags - errs)), float(np.max(mags + errs))
        if high - low < 1e-4:
            low, high = low - 5e-5, high + 5e-5
        cells = [[" "] * width for _ in range(height)]

        def row_of(mag: float) -> int:  # brighter (smaller) magnitudes at the top
            return round((mag - low) / (high - low) * (height - 1))

        left = (width - len(binned)) // 2
        for i, (mag, err) in enumerate(zip(mags, errs, strict=True)):
            col = left + i
            top, bottom, centre = row_of(mag - err), row_of(mag + err), row_of(mag)
            for r in range(top, bottom + 1):
                cells[r][col] = "│"
            cells[centre][col] = "●"
        return ["".join(line) for line in cells]


def _bins(size: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    # Where each of `parts` output pixels starts in the source, and how many source pixels it averages;
    # np.add.reduceat takes a single pixel where a start repeats (enlarging), which the count of 1 matches.
    edges = np.floor(np.linspace(0, size, parts + 1)).astype(np.intp)
    starts = np.minimum(edges[:-1], size - 1)
    counts = np.maximum(edges[1:], starts + 1) - starts
    return starts, counts


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.shape[2] >= 3:
        return image[:, :, :3]
    # One channel (or a grey plus alpha) is drawn as grey.
    return np.repeat(image[:, :, :1], 3, axis=2)
