"""Compose: colour pictures from the per-filter stacks of one target (LRGB, RGB, narrowband palettes).

Public API:

- ``FILTER_ALIASES``: header FILTER names (lower case) -> the canonical slot names ``L R G B Ha OIII SII``.
- ``canonical_filter(name) -> str``: a FILTER value's canonical name, or the value itself (trimmed).
- ``Palette``: frozen recipe: the slots it needs, how each output channel mixes them, where luminance comes
  from. ``PALETTES`` holds them all (data, not code); ``RECIPE_ORDER`` is the automatic preference.
- ``choose_recipe(filters, named="auto") -> Palette``.
- ``Composite``: frozen result: linear ``(H, W, 3)`` image, optional display picture, FITS header cards.
- ``compose(stacks, ...) -> Composite``.
- ``parse_weights(text) -> dict``: ``"R=1.2, G=1"`` -> ``{"R": 1.2, "G": 1.0}``.

How a composite is made
-----------------------
1. *Slots.* Each stack goes to the slot of its filter (``canonical_filter``); a colour stack (``(H, W, 3)``,
   a one-shot-colour camera's debayered planes) feeds R, G and B where no mono stack fills them.
2. *Recipe.* The first of ``RECIPE_ORDER`` (LRGB > RGB > SHO > HOO > mono) whose slots are all present,
   or the one named; ``mono`` shows a single slot (L if present) in grey.
3. *Background.* Each slot's sky is removed: a smooth model (``mesh``: ``snapshot.flatten_background``,
   sep's mesh on a downsampled copy, the same model the pictures use) or one level (``level``: the median).
   Different skies per filter (a brighter R under light pollution, a dark narrowband sky) would otherwise
   tint the whole picture.
4. *Scale.* ``stars``: the stars found in both a slot and the recipe's reference slot (L, G, Ha or the
   only one) are paired by position (the stacks share one grid), their flux is summed in the same circle
   (``APERTURE_FWHM``) on both, and the slot is scaled by the median ratio, so that the average star comes
   out white; too few common stars leave the slot unscaled,
   and the header says so. ``weights``: the configured per-filter weights are the scale factors.
5. *Combine.* ``mean``: each output channel is the weighted mean of its slots, with the palette's
   coefficients times the per-filter weights (weights default to 1); luminance is L when the recipe has
   it, else synthesised as the weighted mean of the colour slots (the header says which), and replaces
   the colour image's own luminance additively (``rgb + (L - mean(rgb))``), which is linear and stays
   stable on the sky where a ratio would divide noise by noise. ``lupton``: the same linear image is also
   rendered with astropy's ``make_lupton_rgb`` (asinh on the summed intensity, so colours keep their hue
   into bright stars) for the picture.
6. *Pedestal.* The sky of every output channel is set to one common level (the median of the slots' sky
   levels after scaling), so the linear composite's sky is neutral and positive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import cv2
import numpy as np

from livestack.stages.detect import detect
from livestack.stages.neighbours import nearest
from livestack.stages.snapshot import flatten_background

__all__ = [
    "BACKGROUNDS",
    "COMBINES",
    "FILTER_ALIASES",
    "PALETTES",
    "RECIPES",
    "RECIPE_ORDER",
    "SCALES",
    "Composite",
    "Palette",
    "canonical_filter",
    "choose_recipe",
    "compose",
    "parse_weights",
]

#: Header FILTER values (compared trimmed and in lower case) and the slot each feeds.
FILTER_ALIASES: Mapping[str, str] = MappingProxyType({
    "l": "L", "lum": "L", "luminance": "L", "clear": "L", "cl": "L",
    "r": "R", "red": "R",
    "g": "G", "green": "G",
    "b": "B", "blue": "B",
    "ha": "Ha", "h-alpha": "Ha", "halpha": "Ha", "h_alpha": "Ha", "h-a": "Ha",
    "oiii": "OIII", "o3": "OIII", "o-iii": "OIII", "o_iii": "OIII",
    "sii": "SII", "s2": "SII", "s-ii": "SII", "s_ii": "SII",
})


@dataclass(frozen=True)
class Palette:
    """A recipe: which slots it needs and how the red, green and blue outputs mix them.

    Attributes
    ----------
    name : str
    needs : tuple of str
        Slots that must all be present.
    mix : tuple
        ``(red, green, blue)``, each a tuple of ``(slot, coefficient)``: the output channel is the weighted
        mean of those slots with these coefficients (times the per-filter weights).
    luminance : str or None
        The slot used as luminance, or None to synthesise it from the colour slots.
    reference : str
        The slot whose star fluxes the others are scaled to.
    """

    name: str
    needs: tuple[str, ...]
    mix: tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]
    luminance: str | None
    reference: str

    @property
    def colour_slots(self) -> tuple[str, ...]:
        """The slots the colour outputs use, in first-use order."""
        seen: dict[str, None] = {}
        for channel in self.mix:
            for slot, _ in channel:
                seen.setdefault(slot)
        return tuple(seen)


_SAME = (("R", 1.0),), (("G", 1.0),), (("B", 1.0),)

#: The recipes, as data. HOO's green is mostly OIII with some Ha, which gives the usual teal-and-red
#: rendering of emission nebulae instead of a pure red-and-cyan one.
PALETTES: Mapping[str, Palette] = MappingProxyType({
    "LRGB": Palette("LRGB", ("L", "R", "G", "B"), _SAME, "L", "L"),
    "RGB": Palette("RGB", ("R", "G", "B"), _SAME, None, "G"),
    "SHO": Palette("SHO", ("SII", "Ha", "OIII"), ((("SII", 1.0),), (("Ha", 1.0),), (("OIII", 1.0),)),
                   None, "Ha"),
    "HOO": Palette("HOO", ("Ha", "OIII"), ((("Ha", 1.0),), (("Ha", 0.3), ("OIII", 0.7)), (("OIII", 1.0),)),
                   None, "Ha"),
})

#: Automatic choice: the first recipe whose slots are all present; ``mono`` when none is.
RECIPE_ORDER: tuple[str, ...] = ("LRGB", "RGB", "SHO", "HOO", "mono")
#: What ``[compose] recipe`` accepts.
RECIPES: tuple[str, ...] = ("auto", *RECIPE_ORDER)
#: How channels are combined.
COMBINES: tuple[str, ...] = ("mean", "lupton")
#: How channels are scaled to one another.
SCALES: tuple[str, ...] = ("stars", "weights")
#: How each channel's sky is removed.
BACKGROUNDS: tuple[str, ...] = ("mesh", "level")

#: Slots a mono composite prefers, in order; any other filter comes after these, by name.
_MONO_ORDER = ("L", "G", "R", "B", "Ha", "OIII", "SII")
#: Fewest stars a slot and the reference slot must share for the flux ratio to be trusted.
MIN_COMMON_STARS = 5
#: Pixels within which two stacks' stars are taken as the same star (they share one grid).
MATCH_RADIUS = 1.5
#: Detection threshold (sky sigmas) for the stars that scale the channels: bright ones measure well.
SCALE_THRESHOLD = 10.0
#: Stars per slot used for the flux ratios.
SCALE_STARS = 300
#: Radius of the photometry aperture, in FWHM of the reference slot's stars: the same circle is summed on
#: every slot, so the ratio does not depend on how much of the wings a detection threshold would keep.
APERTURE_FWHM = 2.5
#: Lupton's softening ``Q`` and linear range ``stretch`` (in units of the composite's sky noise) for the
#: picture: faint sky detail stays linear, stars go logarithmic without losing their colour.
LUPTON_Q = 8.0
LUPTON_STRETCH_NOISE = 10.0
#: Black point of the Lupton picture, sky noise units below the sky.
LUPTON_SHADOWS = 2.0


@dataclass(frozen=True, eq=False)
class Composite:
    """A composite of one target's stacks.

    Attributes
    ----------
    image : ndarray
        ``(H, W, 3)`` float32 linear R, G, B, read-only; NaN where a slot it uses has no coverage.
    picture : ndarray or None
        ``(H, W, 3)`` uint8 rendered picture for ``lupton``; None for ``mean`` (stretch ``image`` as any
        stack is).
    recipe : str
    luminance : str
        The luminance slot, or ``"synthetic"``.
    slots : Mapping
        Slot -> the stack (filter name) that fed it.
    scales : Mapping
        Slot -> the factor its channel was multiplied by.
    cards : tuple
        ``(keyword, value, comment)`` FITS cards describing the recipe, for the composite's header.
    """

    image: np.ndarray
    picture: np.ndarray | None
    recipe: str
    luminance: str
    slots: Mapping[str, str]
    scales: Mapping[str, float]
    cards: tuple[tuple[str, Any, str], ...] = field(default=())


def canonical_filter(name: str) -> str:
    """The canonical name of a FILTER value (``"Red"`` -> ``"R"``), else the value trimmed.

    Parameters
    ----------
    name : str

    Returns
    -------
    str
    """
    trimmed = name.strip()
    return FILTER_ALIASES.get(trimmed.lower(), trimmed)


def choose_recipe(filters: Iterable[str], named: str = "auto") -> Palette:
    """The recipe for a set of slots.

    Parameters
    ----------
    filters : iterable of str
        Slot names present (canonical names; others are only usable by ``mono``).
    named : str
        ``"auto"`` or one of ``RECIPE_ORDER``.

    Returns
    -------
    Palette
        For ``mono``, a palette showing one slot in grey.

    Raises
    ------
    ValueError
        When ``named`` is unknown, its slots are not all present, or there is no slot at all.
    """
    present = list(dict.fromkeys(filters))
    if named not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, not {named!r}.")
    if not present:
        raise ValueError("There is no stack to compose.")
    candidates = RECIPE_ORDER if named == "auto" else (named,)
    for name in candidates:
        if name == "mono":
            ranked = sorted(present, key=lambda s: (_MONO_ORDER.index(s) if s in _MONO_ORDER
                                                    else len(_MONO_ORDER), s))
            slot = ranked[0]
            grey = ((slot, 1.0),)
            return Palette("mono", (slot,), (grey, grey, grey), slot, slot)
        palette = PALETTES[name]
        missing = [s for s in palette.needs if s not in present]
        if not missing:
            return palette
        if named != "auto":
            raise ValueError(f"The {name} recipe needs {', '.join(palette.needs)}; missing "
                             f"{', '.join(missing)}.")
    raise AssertionError("mono always matches")  # pragma: no cover


def parse_weights(text: str) -> dict[str, float]:
    """Per-filter weights from ``"R=1.2, G=1, Ha=0.8"`` (names canonicalised).

    Parameters
    ----------
    text : str
        Comma-separated ``FILTER=WEIGHT`` pairs; empty for none.

    Returns
    -------
    dict
        Canonical filter name -> positive weight.

    Raises
    ------
    ValueError
        For a malformed pair or a weight that is not a positive number.
    """
    weights: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weights must look like 'R=1.2, G=1.0' with positive numbers; "
                             f"{item.strip()!r} does not.")
        weights[canonical_filter(name)] = weight
    return weights


def compose(stacks: Mapping[str, np.ndarray], *, recipe: str = "auto", combine: str = "mean",
            scale: str = "stars", background: str = "mesh",
            weights: Mapping[str, float] | None = None) -> Composite:
    """Compose the stacks of one target into a colour image.

    Parameters
    ----------
    stacks : Mapping
        Filter name (as in the header, or canonical) -> linear stack ``(H, W)``, or ``(H, W, 3)`` for a
        colour camera's stack. All on one grid (the same shape).
    recipe : str
        ``"auto"`` or one of ``RECIPE_ORDER``.
    combine : str
        One of ``COMBINES``.
    scale : str
        One of ``SCALES``.
    background : str
        One of ``BACKGROUNDS``.
    weights : Mapping, optional
        Filter -> positive weight (default 1 each); names are canonicalised.

    Returns
    -------
    Composite

    Raises
    ------
    ValueError
        For an unknown option, stacks of different sizes, or a recipe whose slots are missing.
    """
    for option, value, allowed in (("combine", combine, COMBINES), ("scale", scale, SCALES),
                                   ("background", background, BACKGROUNDS)):
        if value not in allowed:
            raise ValueError(f"{option} must be one of {', '.join(allowed)}, not {value!r}.")
    planes, sources = _slots(stacks)
    palette = choose_recipe(planes, recipe)
    user = {canonical_filter(k): float(v) for k, v in (weights or {}).items()}
    used = list(dict.fromkeys([*palette.colour_slots, *([palette.luminance] if palette.luminance else [])]))

    skies: dict[str, float] = {}
    flat: dict[str, np.ndarray] = {}
    for slot in used:
        flat[slot], skies[slot] = _remove_background(planes[slot], background)
    scales = _scales(flat, palette, scale, user)
    notes: dict[str, str] = {}
    for slot in used:
        if isinstance(scales[slot], str):
            notes[slot] = str(scales[slot])
            scales[slot] = 1.0
    factors = {slot: float(scales[slot]) for slot in used}
    scaled = {slot: _scaled_in_place(flat[slot], factors[slot]) for slot in used}
    # In ``weights`` mode the weights were the scale; the mixes then use the palette's coefficients alone.
    mix_weight = {slot: (user.get(slot, 1.0) if scale == "stars" else 1.0) for slot in used}

    # Planes are kept apart (contiguous) until the end: reductions over a strided colour axis cost 5x more.
    planes_out = [_weighted_mean([(scaled[s], k * mix_weight[s]) for s, k in channel])
                  for channel in palette.mix]
    if palette.name == "mono":
        lum_label = palette.reference
    else:
        if palette.luminance is not None:
            luminance = scaled[palette.luminance]
            lum_label = palette.luminance
        else:
            luminance = _weighted_mean([(scaled[s], mix_weight[s]) for s in palette.colour_slots])
            lum_label = "synthetic"
        delta = planes_out[0] + planes_out[1]
        delta += planes_out[2]
        delta *= np.float32(-1.0 / 3.0)
        delta += luminance
        for plane in planes_out:
            plane += delta
    pedestal = float(np.median([skies[s] * factors[s] for s in used]))
    rgb: np.ndarray = cv2.merge(planes_out)
    picture = _lupton(rgb) if combine == "lupton" else None
    rgb += np.float32(pedestal)
    rgb.setflags(write=False)
    cards = _cards(palette, combine, scale, background, lum_label, sources, factors, mix_weight, notes,
                   pedestal)
    return Composite(image=rgb, picture=picture, recipe=palette.name, luminance=lum_label,
                     slots=MappingProxyType({s: sources[s] for s in used}),
                     scales=MappingProxyType(factors), cards=cards)


# --------------------------------------------------------------------------------------------------------
# Private helpers
# --------------------------------------------------------------------------------------------------------


def _slots(stacks: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Slot -> 2-D plane, and slot -> the stack that fed it; colour stacks fill free R, G, B slots."""
    planes: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    shapes = {name: np.shape(image)[:2] for name, image in stacks.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name or 'unfiltered'} {s[0]}x{s[1]}" for name, s in shapes.items())
        raise ValueError(f"Stacks to compose must share one grid (the same size), not {listing}.")
    colour: list[tuple[str, np.ndarray]] = []
    for name, image in stacks.items():
        data = np.asarray(image, dtype=np.float32)
        if data.ndim == 3 and data.shape[2] == 3:
            colour.append((name, data))
        elif data.ndim == 2:
            slot = canonical_filter(name)
            planes[slot] = data
            sources[slot] = name
        else:
            raise ValueError(f"The {name or 'unfiltered'} stack is {data.shape}; a stack to compose is "
                             "(H, W) or (H, W, 3).")
    for name, data in colour:
        for c, slot in enumerate("RGB"):
            if slot not in planes:
                planes[slot] = data[:, :, c]
                sources[slot] = f"{name or 'colour'}[{slot}]"
    return planes, sources


def _remove_background(plane: np.ndarray, mode: str) -> tuple[np.ndarray, float]:
    """The plane with its sky at 0, and the sky level that was removed (its median)."""
    # flatten_background removes the mesh model and adds its median level back; the median comes off next.
    flattened = flatten_background(plane) if mode == "mesh" else np.array(plane, dtype=np.float32)
    sky = _median_sky(flattened)
    flattened -= np.float32(sky)
    return flattened, sky


def _median_sky(plane: np.ndarray) -> float:
    sample = _sample(plane)
    return float(np.median(sample)) if sample.size else 0.0


def _noise(plane: np.ndarray) -> float:
    sample = _sample(plane)
    if sample.size == 0:
        return 1.0
    mad = float(np.median(np.abs(sample - np.median(sample))))
    return 1.4826 * mad if mad > 0 else float(np.std(sample)) or 1.0


def _sample(plane: np.ndarray) -> np.ndarray:
    step = max(1, int(math.sqrt(plane.size / 250_000)))
    values = plane[::step, ::step]
    return values[np.isfinite(values)]


def _scales(flat: Mapping[str, np.ndarray], palette: Palette, scale: str,
            user: Mapping[str, float]) -> dict[str, float | str]:
    """Slot -> scale factor, or a note (str) saying why a slot could not be scaled by its stars."""
    if scale == "weights":
        return {slot: user.get(slot, 1.0) for slot in flat}
    reference = palette.reference if palette.reference in flat else next(iter(flat))
    out: dict[str, float | str] = {reference: 1.0}
    ref_stars, _ = detect(flat[reference], threshold=SCALE_THRESHOLD, max_stars=SCALE_STARS)
    radius = APERTURE_FWHM * (float(np.median(ref_stars.fwhm)) if len(ref_stars) else 3.0)
    for slot, plane in flat.items():
        if slot == reference:
            continue
        stars, _ = detect(plane, threshold=SCALE_THRESHOLD, max_stars=SCALE_STARS)
        common = _common(ref_stars.x, ref_stars.y, stars.x, stars.y)
        ratio = None
        if common.size >= MIN_COMMON_STARS:
            x, y = ref_stars.x[common], ref_stars.y[common]
            mine, theirs = _aperture(plane, x, y, radius), _aperture(flat[reference], x, y, radius)
            good = np.isfinite(mine) & np.isfinite(theirs) & (mine > 0) & (theirs > 0)
            if good.sum() >= MIN_COMMON_STARS:
                ratio = float(np.median(mine[good] / theirs[good]))
        out[slot] = (1.0 / ratio) if ratio else f"unscaled: {common.size} stars in common with {reference}"
    return out


def _common(rx: np.ndarray, ry: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the reference stars that a star of the other list lies within ``MATCH_RADIUS`` of."""
    if len(rx) == 0 or len(x) == 0:
        return np.empty(0, dtype=np.int64)
    distance, _ = nearest(np.column_stack([x, y]), np.column_stack([rx, ry]), MATCH_RADIUS)
    return np.flatnonzero(np.isfinite(distance))


def _aperture(plane: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Sums in circles (sep), NaN where the circle touches an uncovered pixel."""
    import sep

    holes = ~np.isfinite(plane)
    if not holes.any():
        total, _, _ = sep.sum_circle(np.ascontiguousarray(plane, dtype=np.float32), x, y, radius, subpix=5)
        return np.asarray(total, dtype=np.float64)
    data = np.where(holes, np.float32(0.0), plane).astype(np.float32, copy=False)
    total, _, _ = sep.sum_circle(data, x, y, radius, subpix=5)
    touched, _, _ = sep.sum_circle(holes.astype(np.float32), x, y, radius, subpix=1)
    total = np.where(touched > 0, np.nan, total)
    return np.asarray(total, dtype=np.float64)


def _scaled_in_place(plane: np.ndarray, factor: float) -> np.ndarray:
    if factor != 1.0:
        plane *= np.float32(factor)
    return plane


def _weighted_mean(terms: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """A new plane: the mean of the planes with these weights."""
    total = sum(w for _, w in terms)
    first, w0 = terms[0]
    out = first * np.float32(w0 / total)
    for plane, w in terms[1:]:
        out += plane * np.float32(w / total)
    return out


def _lupton(rgb: np.ndarray) -> np.ndarray:
    """astropy's asinh picture of a background-free linear image (NaN shown black)."""
    from astropy.visualization import make_lupton_rgb

    noise = float(np.median([_noise(rgb[:, :, c]) for c in range(3)]))
    clean = np.nan_to_num(rgb, nan=-LUPTON_SHADOWS * noise)
    # astropy divides by the summed intensity, which is 0 on black pixels: its NaN there is masked by it.
    with np.errstate(invalid="ignore", divide="ignore"):
        picture: np.ndarray = make_lupton_rgb(clean[:, :, 0], clean[:, :, 1], clean[:, :, 2],
                                              minimum=-LUPTON_SHADOWS * noise,
                                              stretch=LUPTON_STRETCH_NOISE * noise, Q=LUPTON_Q)
    return picture


def _mix_text(channel: tuple[tuple[str, float], ...], weight: Mapping[str, float]) -> str:
    if len(channel) == 1:
        return channel[0][0]
    total = sum(k * weight[s] for s, k in channel)
    return " + ".join(f"{k * weight[s] / total:.2f} {s}" for s, k in channel)


def _cards(palette: Palette, combine: str, scale: str, background: str, luminance: str,
           sources: Mapping[str, str], factors: Mapping[str, float], weights: Mapping[str, float],
           notes: Mapping[str, str], pedestal: float) -> tuple[tuple[str, Any, str], ...]:
    cards: list[tuple[str, Any, str]] = [
        ("RECIPE", palette.name, "composite recipe"),
        ("COMBINE", combine, "mean or lupton"),
        ("SCALEBY", scale, "channels scaled by stars or weights"),
        ("BKGMODE", background, "sky removed: mesh model or level"),
        ("LUMSRC", luminance, "luminance slot, or synthetic"),
        ("LUMSYNTH", luminance == "synthetic", "luminance synthesised from colour"),
        ("PEDESTAL", round(pedestal, 4), "common sky level of every channel"),
    ]
    # Comments are cut to fit one 80-character card whatever the values (long filter names included).
    for c, label in enumerate(("R", "G", "B")):
        cards.append((f"CHAN_{label}", _mix_text(palette.mix[c], weights)[:40], f"{label} plane"))
    for i, slot in enumerate(factors, start=1):
        cards.append((f"SLOT{i}", slot[:30], f"from {sources[slot]}"[:30]))
        cards.append((f"SCALE{i}", round(factors[slot], 6), notes.get(slot, f"scale of {slot}")[:40]))
        cards.append((f"WEIGHT{i}", weights[slot], f"weight of {slot}"[:40]))
    return tuple(cards)
