"""Filters and colour: per-filter stacks on one grid, composites, the simulated filter wheel, star trails."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from livestack.cli import main
from livestack.config import Config
from livestack.errors import ConfigError
from livestack.pipeline import Stacker
from livestack.simulate import SimConfig, field_stars, parse_filters, render_frame, simulate
from livestack.stages.compose import RECIPE_ORDER, canonical_filter, choose_recipe, compose, parse_weights
from livestack.stages.detect import detect
from livestack.stages.snapshot import StackInfo, write_fits

SIZE = (480, 360)
WHEEL = ("L", "R", "G", "B", "Ha", "OIII")


def _config(**overrides: object) -> Config:
    return Config().with_overrides({k.replace("__", "."): v for k, v in overrides.items()})


def _sim(**fields: object) -> SimConfig:
    base: dict[str, object] = {"interval": 0.0, "size": SIZE, "n_stars": 300, "seed": 3,
                               "rotation_per_frame": 0.05, "drift": (1.5, -0.8)}
    base.update(fields)
    return SimConfig(**base)  # type: ignore[arg-type]


def _no_sleep(seconds: float) -> None:
    del seconds


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimConfig, Stacker, list]:
    """Two turns of an L, R, G, B, Ha, OIII wheel, stacked (mean) onto one grid."""
    folder = tmp_path_factory.mktemp("wheel")
    sim = _sim(frames=2 * len(WHEEL), filters=WHEEL)
    paths = simulate(folder, sim, sleep=_no_sleep)
    stacker = Stacker(_config(stack__method="mean"), workdir=folder)
    results = [stacker.process(p) for p in paths]
    return sim, stacker, results


# --- the simulated filter wheel -------------------------------------------------------------------------


def test_parse_filters_expands_repeats_and_refuses_unknown_names() -> None:
    assert parse_filters("L,R,G,B") == ("L", "R", "G", "B")
    assert parse_filters("R*2, G*2,B") == ("R", "R", "G", "G", "B")
    for bad in ("", "R*0", "R*x", "V"):
        with pytest.raises(ConfigError):
            parse_filters(bad)


def test_wheel_frames_carry_their_filter_exposure_and_sky() -> None:
    sim = _sim(frames=6, filters=WHEEL)
    frames = [render_frame(sim, i) for i in range(6)]
    assert [f.header["FILTER"] for f in frames] == list(WHEEL)
    assert frames[4].header["EXPTIME"] == 3 * frames[0].header["EXPTIME"]
    skies = {f.header["FILTER"]: float(np.median(f.data)) for f in frames}
    # An orange, light-polluted sky: brightest through L, then R, G, B; narrowband darkest.
    assert skies["L"] > skies["R"] > skies["G"] > skies["B"] > skies["Ha"]
    stars = {f.header["FILTER"]: detect(f.data)[1].stars for f in frames}
    assert stars["Ha"] < 0.7 * stars["L"] and stars["OIII"] < 0.7 * stars["L"]


def test_cli_simulate_writes_the_wheel(tmp_path: Path) -> None:
    assert main(["simulate", str(tmp_path), "--frames", "4", "--interval", "0", "--size", "64x48",
                 "--filters", "R*2,B"]) == 0
    names = [fits.getheader(tmp_path / f"sim_{i:04d}.fits")["FILTER"] for i in range(1, 5)]
    assert names == ["R", "R", "B", "R"]


# --- per-filter stacks on one grid ---------------------------------------------------------------------


def test_every_filter_stacks_onto_the_targets_one_grid(wheel: tuple[SimConfig, Stacker, list]) -> None:
    sim, stacker, results = wheel
    assert all(r.accepted for r in results), [(r.path, r.reason) for r in results if not r.accepted]
    assert sum(r.reference for r in results) == 1
    assert stacker.filters == WHEEL
    assert {s.filter: s.frames for s in stacker.summary()} == dict.fromkeys(WHEEL, 2)
    assert {s.filter: s.exptime for s in stacker.summary()}["Ha"] == 2 * 3 * sim.exptime
    assert stacker.count == len(results)
    assert stacker.info("R").filter == "R" and stacker.info("R").ncombine == 2


def test_common_stars_of_the_filter_stacks_coincide_within_a_tenth_of_a_pixel(
        wheel: tuple[SimConfig, Stacker, list]) -> None:
    sim, stacker, _ = wheel
    truth = field_stars(sim, 0)  # where the stars are on the reference (frame 0)
    tree = cKDTree(np.column_stack([truth.x, truth.y]))
    offsets = {}
    for name in WHEEL:
        image = stacker.result(name)
        assert image is not None
        stars, _ = detect(np.nan_to_num(image, nan=float(np.nanmedian(image))), threshold=10.0)
        inner = (stars.x > 20) & (stars.x < SIZE[0] - 20) & (stars.y > 20) & (stars.y < SIZE[1] - 20)
        distance, index = tree.query(np.column_stack([stars.x[inner], stars.y[inner]]))
        close = distance < 1.0
        assert close.sum() >= 8, name
        offsets[name] = np.column_stack([stars.x[inner][close] - truth.x[index[close]],
                                         stars.y[inner][close] - truth.y[index[close]]])
        assert np.hypot(*np.median(offsets[name], axis=0)) < 0.1, (name, np.median(offsets[name], axis=0))
    # And the filters against one another: the systematic offset between any two stacks.
    centres = np.array([np.median(o, axis=0) for o in offsets.values()])
    assert np.abs(centres[:, None, :] - centres[None, :, :]).max() < 0.1


def test_a_new_filter_midway_starts_its_stack_on_the_same_grid(tmp_path: Path) -> None:
    sim = _sim(frames=6, filters=("L", "L", "L", "L", "R", "R"))
    stacker = Stacker(_config(stack__method="mean"), workdir=tmp_path)
    results = [stacker.process(p) for p in simulate(tmp_path, sim, sleep=_no_sleep)]
    assert all(r.accepted for r in results)
    assert stacker.filters == ("L", "R")
    assert stacker.reference_meta is not None and stacker.reference_meta.path == results[0].path
    assert stacker.count_of("R") == 2 and stacker.count_of("L") == 4
    # The R stack's stars sit where the L stack's do.
    l_stars, _ = detect(np.nan_to_num(stacker.result("L"), nan=1000.0), threshold=10.0)
    r_stars, _ = detect(np.nan_to_num(stacker.result("R"), nan=1000.0), threshold=10.0)
    distance, index = cKDTree(np.column_stack([l_stars.x, l_stars.y])).query(
        np.column_stack([r_stars.x, r_stars.y]))
    close = distance < 1.0
    assert close.sum() >= 8
    assert abs(float(np.median(r_stars.x[close] - l_stars.x[index[close]]))) < 0.1
    assert abs(float(np.median(r_stars.y[close] - l_stars.y[index[close]]))) < 0.1


def test_a_narrowband_frame_with_too_few_stars_is_rejected_with_a_reason(tmp_path: Path) -> None:
    sim = _sim(frames=3, filters=("L", "Ha", "L"))
    stacker = Stacker(_config(stack__method="mean", align__min_inliers=25), workdir=tmp_path)
    results = [stacker.process(p) for p in simulate(tmp_path, sim, sleep=_no_sleep)]
    assert [r.verdict for r in results] == ["accepted", "rejected", "accepted"]
    assert results[1].reason is not None and "needed to be aligned" in results[1].reason
    assert stacker.filters == ("L",)


def test_clouds_are_judged_against_the_filters_own_first_frame(tmp_path: Path) -> None:
    # Ha shows far fewer stars than L: judged against L it would look cloudy; against Ha it is fine.
    sim = _sim(frames=4, filters=("L", "Ha", "Ha", "L"))
    stacker = Stacker(_config(stack__method="mean", align__min_star_fraction=0.6), workdir=tmp_path)
    results = [stacker.process(p) for p in simulate(tmp_path, sim, sleep=_no_sleep)]
    assert all(r.accepted for r in results), [r.reason for r in results]


def test_filter_names_are_canonical() -> None:
    assert canonical_filter(" Red ") == "R" and canonical_filter("H-alpha") == "Ha"
    assert canonical_filter("O3") == "OIII" and canonical_filter("Lum") == "L"
    assert canonical_filter("L-eXtreme") == "L-eXtreme"


def test_checkpoint_of_several_filters_resumes_exactly(tmp_path: Path) -> None:
    sim = _sim(frames=8, filters=("L", "R", "G", "B"))
    paths = simulate(tmp_path / "frames", sim, sleep=_no_sleep)
    config = _config(stack__method="kappa-sigma", stack__warmup=2)
    whole = Stacker(config, workdir=tmp_path)
    for p in paths:
        whole.process(p)
    first = Stacker(config, workdir=tmp_path)
    for p in paths[:5]:
        first.process(p)
    arrays, meta = first.checkpoint()
    resumed = Stacker(config, workdir=tmp_path)
    resumed.restore(arrays, meta)
    for p in paths[5:]:
        resumed.process(p)
    assert resumed.filters == whole.filters
    for name in whole.filters:
        np.testing.assert_array_equal(resumed.result(name), whole.result(name))
        assert resumed.info(name) == whole.info(name)


# --- composites ------------------------------------------------------------------------------------------


def _stacks(stacker: Stacker, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        image = stacker.result(name)
        assert image is not None
        out[name] = image
    return out


@pytest.mark.parametrize(("names", "recipe", "combine", "background"), [
    (("L", "R", "G", "B"), "LRGB", "mean", "mesh"),
    (("L", "R", "G", "B"), "LRGB", "mean", "level"),
    (("L", "R", "G", "B"), "LRGB", "lupton", "mesh"),
    (("R", "G", "B"), "RGB", "mean", "mesh"),
    (("Ha", "OIII"), "HOO", "mean", "mesh"),
])
def test_composite_sky_is_neutral(wheel: tuple[SimConfig, Stacker, list], names: tuple[str, ...], recipe: str,
                                  combine: str, background: str) -> None:
    _, stacker, _ = wheel
    stacks = _stacks(stacker, names)
    raw = [float(np.nanmedian(stacks[c])) for c in names]
    assert max(raw) > 1.05 * min(raw)  # the channels' skies really differ (light pollution, narrowband)
    result = compose(stacks, combine=combine, background=background)
    assert result.recipe == recipe
    medians = [float(np.nanmedian(result.image[:, :, c])) for c in range(3)]
    assert max(medians) - min(medians) < 0.01 * np.mean(medians), medians
    if result.picture is not None:
        sky = [float(np.median(result.picture[:, :, c])) for c in range(3)]
        assert max(sky) - min(sky) <= 2, sky
        assert 10 < np.mean(sky) < 120


def test_only_ha_and_oiii_give_hoo(wheel: tuple[SimConfig, Stacker, list]) -> None:
    _, stacker, _ = wheel
    result = compose(_stacks(stacker, ("Ha", "OIII")))
    assert result.recipe == "HOO"
    cards = {k: v for k, v, _ in result.cards}
    assert cards["CHAN_R"] == "Ha" and cards["CHAN_B"] == "OIII" and "OIII" in cards["CHAN_G"]


def test_recipes_are_chosen_in_order() -> None:
    assert RECIPE_ORDER == ("LRGB", "RGB", "SHO", "HOO", "mono")
    assert choose_recipe(["L", "R", "G", "B", "Ha", "OIII", "SII"]).name == "LRGB"
    assert choose_recipe(["R", "G", "B", "Ha", "OIII", "SII"]).name == "RGB"
    assert choose_recipe(["Ha", "OIII", "SII", "L"]).name == "SHO"
    assert choose_recipe(["Ha", "OIII", "L"]).name == "HOO"
    mono = choose_recipe(["R", "L", "Ha"])
    assert mono.name == "mono" and mono.reference == "L"
    assert choose_recipe(["L", "R", "G", "B"], "HOO" if False else "RGB").name == "RGB"
    with pytest.raises(ValueError, match="needs SII, Ha, OIII; missing SII"):
        choose_recipe(["Ha", "OIII"], "SHO")


def test_missing_l_is_synthesised_and_the_header_says_so(wheel: tuple[SimConfig, Stacker, list],
                                                         tmp_path: Path) -> None:
    _, stacker, _ = wheel
    paths = []
    for name in ("R", "G", "B"):
        folder = tmp_path / name
        folder.mkdir()
        path = folder / "stack.fits"
        info = stacker.info(name)
        write_fits(path, stacker.result(name), StackInfo(info.ncombine, info.exptime, info.date_obs,
                                                         info.date_end, info.method, "SIM-FIELD", name))
        paths.append(str(path))
    out = tmp_path / "rgb.fits"
    assert main(["compose", *paths, "-o", str(out), "--image-format", "png"]) == 0
    with fits.open(out) as hdul:
        header, data = hdul[0].header, hdul[0].data
    assert data.shape == (3, SIZE[1], SIZE[0])
    assert header["RECIPE"] == "RGB" and header["LUMSRC"] == "synthetic" and header["LUMSYNTH"] is True
    assert header["NCOMBINE"] == 6 and header["CHANORD"] == "RGB"
    assert out.with_suffix(".png").stat().st_size > 0
    # With equal weights the synthetic luminance is the colour image's own: the composite is R, G, B scaled.
    scales = [header[f"SCALE{i}"] for i in (1, 2, 3)]
    assert [header[f"SLOT{i}"] for i in (1, 2, 3)] == ["R", "G", "B"]
    assert scales[1] == 1.0  # G is the reference of RGB


def test_compose_cli_names_filters_by_folder_and_refuses_other_grids(tmp_path: Path) -> None:
    a = tmp_path / "Ha" / "stack.fits"
    b = tmp_path / "OIII" / "stack.fits"
    for path, shape in ((a, (40, 50)), (b, (40, 60))):
        path.parent.mkdir()
        fits.PrimaryHDU(np.ones(shape, dtype=np.float32)).writeto(path)
    assert main(["compose", str(a), str(b), "-o", str(tmp_path / "out")]) == 2


def test_star_flux_scaling_recovers_a_known_ratio() -> None:
    rng = np.random.default_rng(5)
    from livestack.simulate import render_stars

    shape = (300, 400)
    x, y = rng.uniform(15, 385, 120), rng.uniform(15, 285, 120)
    flux = rng.uniform(2e4, 2e5, 120)
    stars = render_stars(shape, x, y, flux, fwhm=3.0)
    planes = {}
    for name, gain, sky in (("R", 1.0, 900.0), ("G", 0.5, 500.0), ("B", 0.25, 300.0)):
        planes[name] = (gain * stars + sky + rng.normal(0, 5.0, shape)).astype(np.float32)
    result = compose(planes, background="level")
    assert result.scales["G"] == 1.0
    assert result.scales["R"] == pytest.approx(0.5, rel=0.02)
    assert result.scales["B"] == pytest.approx(2.0, rel=0.02)
    weighted = compose(planes, scale="weights", weights={"R": 2.0})
    assert dict(weighted.scales) == {"R": 2.0, "G": 1.0, "B": 1.0}


def test_a_colour_stack_feeds_the_rgb_slots() -> None:
    rng = np.random.default_rng(6)
    image = (rng.normal(0, 5.0, (60, 80, 3)) + np.array([900.0, 700.0, 500.0])).astype(np.float32)
    result = compose({"": image}, scale="weights", background="level")
    assert result.recipe == "RGB" and set(result.slots) == {"R", "G", "B"}
    assert result.slots["R"] == "colour[R]"
    medians = [float(np.median(result.image[:, :, c])) for c in range(3)]
    assert max(medians) - min(medians) < 0.01 * np.mean(medians)


def test_parse_weights() -> None:
    assert parse_weights("Red=1.2, G=1, ") == {"R": 1.2, "G": 1.0}
    for bad in ("R", "R=0", "R=-1", "=2", "R=x"):
        with pytest.raises(ValueError):
            parse_weights(bad)
    with pytest.raises(ConfigError, match="weights"):
        _config(compose__weights="R=nope")


# --- star trails -------------------------------------------------------------------------------------------


def test_max_mode_trails_follow_the_skys_rotation(tmp_path: Path) -> None:
    step, frames = 0.5, 19
    sim = _sim(frames=frames, size=(400, 400), n_stars=300, drift=(0.0, 0.0), rotation_per_frame=step,
               filters=())
    stacker = Stacker(_config(stack__method="max"), workdir=tmp_path)
    results = [stacker.process(p) for p in simulate(tmp_path / "frames", sim, sleep=_no_sleep)]
    assert all(r.accepted for r in results)
    assert all(np.allclose(r.transform.matrix, [[1, 0, 0], [0, 1, 0]]) for r in results)
    image = stacker.result()
    assert image is not None
    sky = float(np.median(image))
    truth = field_stars(sim, 0)
    centre = np.array([199.5, 199.5])
    radius = np.hypot(truth.x - centre[0], truth.y - centre[1])
    angle = np.degrees(np.arctan2(truth.y - centre[1], truth.x - centre[0]))
    total = step * (frames - 1)
    checked = 0
    for k in np.argsort(-truth.flux):
        r, a = radius[k], angle[k]
        if not 80 < r < 180 or truth.flux[k] < 5e3:
            continue
        # Stars near this one's arc would lengthen it: only isolated arcs are measured.
        others = np.delete(np.arange(len(truth.x)), k)
        near = np.abs(radius[others] - r) < 8
        span = (angle[others] - a + 180) % 360 - 180
        if np.any(near & (span > -10) & (span < total + 10) & (truth.flux[others] > 0.05 * truth.flux[k])):
            continue
        # Sample the max stack along the star's circle, from well before its arc to well after.
        phi = np.radians(np.arange(a - 8, a + total + 8, 0.05))
        values = map_coordinates(image, [centre[1] + r * np.sin(phi), centre[0] + r * np.cos(phi)], order=1)
        lifted = values - sky
        bright = lifted > 0.5 * np.median(lifted[(phi >= np.radians(a)) & (phi <= np.radians(a + total))])
        run = np.flatnonzero(bright)
        length_px = (run[-1] - run[0]) * math.radians(0.05) * r
        fwhm_px = sim.fwhm
        # The trail at half its height is the arc plus one FWHM (half at each end).
        assert length_px - fwhm_px == pytest.approx(math.radians(total) * r, abs=2.0), (r, a, length_px)
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_livestack_stack_writes_each_filter_and_the_composite(tmp_path: Path) -> None:
    simulate(tmp_path / "frames", _sim(frames=6, filters=("R", "G", "B")), sleep=_no_sleep)
    out = tmp_path / "out"
    assert main(["stack", str(tmp_path / "frames"), "-o", str(out), "--method", "mean", "-q",
                 "--image-format", "png"]) == 0
    for name in ("R", "G", "B"):
        with fits.open(out / name / "stack.fits") as hdul:
            assert hdul[0].header["FILTER"] == name and hdul[0].header["NCOMBINE"] == 2
            assert [r["FILTER"] for r in hdul["FRAMES"].data] == [name, name]
    with fits.open(out / "stack.fits") as hdul:
        assert hdul[0].data.shape[0] == 3 and hdul[0].header["RECIPE"] == "RGB"
        assert hdul[0].header["NCOMBINE"] == 6 and hdul[0].header["LUMSYNTH"] is True
    assert (out / "stack.png").stat().st_size > 0


def test_the_dashboard_shows_each_filters_frames_and_exposure() -> None:
    from datetime import UTC

    from livestack.clients.tui.demo import demo_events
    from livestack.clients.tui.model import Dashboard

    model = Dashboard(UTC)
    for event in demo_events(frames=24):
        model.apply(event)
    counts = model.filter_counts()
    assert [name for name, _ in counts] == ["L", "R", "G", "B"]
    assert dict(counts)["L"] == "8 (4m 00s)"
    assert sum(int(text.split()[0]) for _, text in counts) == int(model.counters()["stacked"])
    single = Dashboard(UTC)
    for event in demo_events(frames=1):
        single.apply(event)
    assert single.filter_counts() == []  # one filter: the header says it all
