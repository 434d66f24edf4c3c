"""Fuzzing, bounded in time: the FITS reader on mutated files, the control socket of a live daemon.

The reader, given a real frame with its header cards rewritten, bytes flipped, cut short or padded with
garbage, returns a frame or raises ``FrameError``, nothing else, and never allocates more than the size limit
allows; ``check_fits`` answers for any bytes. The control socket answers any message hypothesis makes (bytes,
JSON of any shape, known commands with wrong fields, several parts) with a reply, and afterwards the daemon
still answers ``status``, publishes events and stacks a frame.

Hypothesis runs derandomized (the same examples every run: the suite must not flake) without a database, a few
seconds per test.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livestack import events
from livestack.clients.bus import ControlClient, Subscriber
from livestack.config import Config
from livestack.errors import FrameError
from livestack.live.daemon import Daemon
from livestack.live.notify import Notifier
from livestack.live.watch import check_fits
from livestack.simulate import SimConfig, simulate
from livestack.stages.frames import read_frame

#: The reader's size limit during the fuzz: what a mutated header may make it allocate is bounded by it.
MAX_PIXELS = 1_000_000
#: Peak of traced allocations allowed while one mutated file is read (float32 at the limit is 4 MB; a
#: debayered colour frame about four times that, plus astropy's parsing).
MEMORY_BOUND = 64 * 1024 * 1024

FUZZ = settings(max_examples=int(os.environ.get("LIVESTACK_FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize=not os.environ.get("LIVESTACK_FUZZ_RANDOM"), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Keywords whose values the reader interprets: where a mutation is most likely to find a hole.
KEYWORDS = ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "BZERO", "BSCALE", "BLANK", "BAYERPAT",
            "XBAYROFF", "YBAYROFF", "ROWORDER", "DATE-OBS", "TIME-OBS", "UT-OBS", "MJD-OBS", "EXPTIME",
            "EXPOSURE", "FILTER", "OBJECT", "CTYPE1", "CRVAL1", "CDELT1", "PCOUNT", "GCOUNT", "END")

#: Values a card may be given: numbers at the edges, text, FITS literals, nothing.
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["0", "-1", "1", "2", "3", "999", "8", "16", "-32", "-64", "64", "1E300", "-1E300", "NAN",
                     "INF", "1.5", "T", "F", "''", "'RGGB'", "'XYZW'", "'BOTTOM-UP'", "'2024-13-45T99:99:99'",
                     "'2024-03-09'", "'12:00:00'", "'99999-01-01T00:00:00'", "1E-300", "9" * 400, ""]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=70).map(repr),
)


def base_frame(color: bool) -> bytes:
    """A small real frame (BZERO-scaled uint16, with time, exposure, WCS and optionally a Bayer pattern)."""
    rng = np.random.default_rng(5)
    data = rng.integers(0, 60000, size=(48, 64), dtype=np.uint16)
    header = fits.Header()
    header["DATE-OBS"] = "2024-03-09T21:30:00.123"
    header["EXPTIME"] = 10.0
    header["OBJECT"] = "M42"
    header["FILTER"] = "L"
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = 83.8, -5.4
    header["CDELT1"], header["CDELT2"] = -0.0003, 0.0003
    header["CRPIX1"], header["CRPIX2"] = 32.0, 24.0
    if color:
        header["BAYERPAT"] = "RGGB"
        header["XBAYROFF"] = 0
        header["ROWORDER"] = "TOP-DOWN"
    buffer = io.BytesIO()
    fits.PrimaryHDU(data, header=header).writeto(buffer)
    return buffer.getvalue()


BASES = {False: base_frame(False), True: base_frame(True)}


def set_card(raw: bytes, keyword: str, value: str) -> bytes:
    """Rewrite (or add before END) one header card, keeping the 80-column layout."""
    card = f"{keyword:<8}= {value}"[:80].ljust(80).encode("ascii", "replace")
    if keyword == "END":
        card = value[:80].ljust(80).encode("ascii", "replace")
    header_end = raw.find(b"END" + b" " * 77)
    for offset in range(0, max(header_end, 0), 80):
        if raw[offset:offset + 8].rstrip() == keyword.encode():
            return raw[:offset] + card + raw[offset + 80:]
    if header_end >= 0 and raw[header_end + 80:header_end + 160].strip() == b"":
        return raw[:header_end] + card + raw[header_end:header_end + 80] + raw[header_end + 160:]
    return raw


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real frame, mutated in one to four ways."""
    raw = BASES[draw(st.booleans())]
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["card", "card", "card", "flip", "cut", "append", "splice"]))
        if how == "card":
            raw = set_card(raw, draw(st.sampled_from(KEYWORDS)), draw(VALUES))
        elif how == "flip":
            at = draw(st.integers(0, len(raw) - 1))
            raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
        elif how == "cut":
            raw = raw[:draw(st.integers(0, len(raw)))]
        elif how == "append":
            raw = raw + draw(st.binary(min_size=1, max_size=6000))
        else:
            at = draw(st.integers(0, len(raw)))
            raw = raw[:at] + draw(st.binary(min_size=1, max_size=200)) + raw[at:]
    return raw


def test_the_reader_returns_a_frame_or_a_frame_error_for_any_mutated_file() -> None:
    folder = Path(tempfile.mkdtemp(prefix="livestack-fuzz-"))
    outcomes = {"frame": 0, "error": 0}

    @FUZZ
    @given(raw=mutated(), name=st.sampled_from(["m.fits", "m.fits.gz"]))
    def check(raw: bytes, name: str) -> None:
        path = folder / name
        path.write_bytes(raw if name == "m.fits" else _gzip(raw))
        check_fits(path)  # answers (complete, incomplete, invalid) for any bytes; raises only OSError
        tracemalloc.reset_peak()
        try:
            frame = read_frame(path, max_pixels=MAX_PIXELS)
        except FrameError as exc:
            assert str(exc).startswith(str(path)), exc
            outcomes["error"] += 1
        except Exception as exc:
            # Keep the file (hypothesis would print megabytes of bytes) and say what broke.
            kept = folder.parent / f"livestack-fuzz-failure{path.suffix}"
            shutil.copy(path, kept)
            raise AssertionError(f"read_frame raised {type(exc).__name__}: {exc} (the file: {kept})") from exc
        else:
            assert frame.data.dtype == np.float32 and frame.luminance.shape == frame.meta.shape
            assert frame.meta.shape[0] * frame.meta.shape[1] <= MAX_PIXELS
            outcomes["frame"] += 1
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < MEMORY_BOUND, f"reading took {peak / 2**20:.0f} MB"

    tracemalloc.start()
    try:
        check()
    finally:
        tracemalloc.stop()
        shutil.rmtree(folder, ignore_errors=True)
    # The mutations are not all fatal: both answers were exercised.
    assert outcomes["frame"] > 0 and outcomes["error"] > 0, outcomes


def _gzip(raw: bytes) -> bytes:
    import gzip
    return gzip.compress(raw, compresslevel=1)


# -- the control socket of a live daemon ---------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=10), children, max_size=5)),
    max_leaves=30,
)
#: Every command but shutdown (a valid one would, rightly, stop the daemon), and names that are none.
NAMES = st.sampled_from([c for c in events.COMMANDS if c != "shutdown"]) | st.text(max_size=20)


@st.composite
def requests(draw: st.DrawFn) -> list[bytes]:
    """One control message: its parts."""
    kind = draw(st.sampled_from(["bytes", "json", "command", "command", "parts", "deep"]))
    if kind == "bytes":
        return [draw(st.binary(max_size=3000))]
    if kind == "json":
        return [json.dumps(draw(JSON_VALUES)).encode()]
    if kind == "deep":
        depth = draw(st.integers(500, 40_000))
        return [b'{"cmd": "status", "x": ' + b"[" * depth + b"]" * draw(st.sampled_from([0, depth])) + b"}"]
    request: dict[str, Any] = {"cmd": draw(NAMES)}
    request.update(draw(st.dictionaries(st.sampled_from(["path", "seq", "frames", "x", "cmd"]), JSON_VALUES,
                                        max_size=3)))
    if request["cmd"] == "shutdown":
        request["cmd"] = "status"
    message = json.dumps(request).encode()
    if kind == "parts":
        return [message, *draw(st.lists(st.binary(max_size=50), min_size=1, max_size=3))]
    return [message]


def test_the_control_socket_answers_anything_and_the_daemon_goes_on(tmp_path: Path) -> None:
    staged = simulate(tmp_path / "staged", SimConfig(frames=1, interval=10.0, size=(480, 360), n_stars=250,
                                                     seed=51), sleep=lambda _s: None)
    (tmp_path / "frames").mkdir()
    config = Config(base=tmp_path).with_overrides({
        "watch.folder": "frames", "output.folder": "out", "watch.settle": 0.3, "watch.poll_interval": 0.1,
        "network.publish": "tcp://127.0.0.1:*", "network.control": "tcp://127.0.0.1:*",
        "output.every_frames": 0, "output.every_seconds": 0.0, "output.image_format": "png",
        "wcs.solve": "off"})
    daemon = Daemon(config, notifier=Notifier(environ={}))
    daemon.start()
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    answered = {"ok": 0, "error": 0}
    try:
        req.connect(daemon.control_endpoint)

        @FUZZ
        @given(parts=requests())
        def ask(parts: list[bytes]) -> None:
            req.send_multipart(parts)
            assert req.poll(20_000, zmq.POLLIN), f"no reply to {parts[0][:100]!r}"
            reply = json.loads(req.recv())
            assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
            if reply["ok"]:
                answered["ok"] += 1
            else:
                assert isinstance(reply["error"], str) and reply["error"]
                answered["error"] += 1

        ask()
        assert answered["error"] > 0
        with (ControlClient(daemon.control_endpoint, timeout=30) as control,
              Subscriber(daemon.publish_endpoint) as sub):
            control.request("resume")  # the fuzz may have paused it
            assert control.request("status")["ok"] is True
            assert all(t.is_alive() for t in threading.enumerate() if t.name.startswith("livestack-"))
            shutil.copy(staged[0], daemon.watch_dir / "after.fits")
            deadline = time.monotonic() + 30
            while True:
                event = sub.recv(max(0.0, deadline - time.monotonic()))
                assert event is not None, "no accepted frame after the fuzz"
                if event.topic == "frame" and event["verdict"] != "received":
                    assert event["verdict"] == "accepted", event["reason"]
                    break
    finally:
        req.close()
        ctx.term()
        daemon.stop()


@pytest.fixture(autouse=True)
def _quiet_numpy() -> Any:
    """Mutated BZERO/BSCALE overflow float32 on purpose: numpy's warnings are not what is tested."""
    with np.errstate(all="ignore"):
        yield
