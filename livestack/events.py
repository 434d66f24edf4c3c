"""Events: the versioned messages livestack publishes, and the control requests it answers.

This module is the whole contract between the daemon and its clients (the terminal UI, a web viewer, a
script): clients import it and nothing else of livestack's processing. It has no dependency beyond numpy.

Wire format (ZeroMQ PUB, multipart)::

    [topic (ascii), payload (UTF-8 JSON object)]                 # every event
    [topic, payload, preview (raw uint8 bytes)]                   # a `stack` event carrying a preview
    [topic, payload, picture (JPEG bytes)]                        # every `display` event

Every payload carries ``"v"`` (``SCHEMA_VERSION``), ``"topic"`` and ``"time"`` (ISO 8601 UTC). The fields of
each topic are listed in ``FIELDS``; a field whose type includes ``None`` may be null. A preview's shape is in
the payload's ``"preview"`` field (``[rows, columns, channels]``, dtype uint8, C order). A ``display`` event's
picture is the stack as people see it (stretched, gradient-flattened), encoded as JPEG; its length is the
payload's ``"bytes"``, its size ``"width"`` by ``"height"``. A field in ``OPTIONAL`` may be absent (null).

Control (ZeroMQ REP): a request is a JSON object ``{"cmd": NAME, ...}`` with NAME in ``COMMANDS``
(``set_reference`` takes ``"path"``; ``remove`` and ``reinclude`` take ``"seq"``, ``"name"`` (one or a list)
and/or ``"from"``/``"to"`` (ISO times), and an optional ``"reason"``); the reply is
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "one sentence"}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

__all__ = [
    "COMMANDS",
    "FIELDS",
    "OPTIONAL",
    "SCHEMA_VERSION",
    "TOPICS",
    "Event",
    "SchemaError",
    "decode",
    "decode_request",
    "encode",
    "error_reply",
    "make_event",
    "ok_reply",
    "utc_now_iso",
    "validate",
]

#: Bumped on any incompatible change of a payload; clients should ignore events of another version.
SCHEMA_VERSION = 1

TOPICS: tuple[str, ...] = ("frame", "stack", "snapshot", "status", "log", "display", "removal",
                          "photometry", "wcs")

#: Control requests the daemon answers.
COMMANDS: tuple[str, ...] = ("status", "pause", "resume", "snapshot", "reset", "set_reference", "shutdown",
                             "remove", "reinclude", "undo_last")

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
_OPT_DICT = (dict, type(None))
_OPT_LIST = (list, type(None))

#: Field name -> accepted JSON types, per topic. Common to all: v, topic, time.
FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "frame": {
        "seq": (int,),                # order of arrival in this daemon's life, from 1
        "path": (str,),               # the file as the daemon saw it
        "name": (str,),               # its base name
        "verdict": (str,),            # "received", "accepted" or "rejected"
        "reason": _OPT_STR,           # why it was rejected (null otherwise)
        "date_obs": _OPT_STR,         # start of exposure, ISO UTC
        "exptime": _OPT_NUM,          # seconds
        "object": _OPT_STR,
        "filter": _OPT_STR,
        "stars": (int, type(None)),
        "fwhm": _OPT_NUM,             # median, pixels
        "ellipticity": _OPT_NUM,
        "background": _OPT_NUM,
        "noise": _OPT_NUM,
        "sharpness": _OPT_NUM,        # surface stacks: 1e6 x variance of the Laplacian / mean^2 (null: stars)
        "calibration": _OPT_STR,      # the masters applied ("bias B; dark D x0.5; flat F") or why none
                                      #  matched, naming the key; null without a master library
        "defects": (int, type(None)), # hot and cold pixels replaced
        "sky": _OPT_NUM,              # sky level (star-masked, mean over channels), before normalisation
        "transparency": _OPT_NUM,     # matched stars' flux relative to the reference's, per second
        "weight": _OPT_NUM,           # the frame's weight in the stack (accepted frames)
        "transform": _OPT_DICT,       # {"matrix": [[a,b,tx],[c,d,ty]], "dx", "dy", "rotation", "scale",
                                      #  "inliers", "rms", "method", "distortion", "rms_before",
                                      #  "rms_after"}; dx, dy: frame centre's shift; distortion: a smooth
                                      #  correction is warped with (rms is then its residual);
                                      #  rms_before/after: the star pairs' RMS without and with one, when
                                      #  one was evaluated (else null)
        "timings": (dict,),           # stage name -> seconds
        "latency": _OPT_NUM,          # seconds from file complete to this event
        "session": (int,),            # stack session number (a reset or new OBJECT starts a new one)
    },
    "stack": {
        "frames": (int,),             # frames in the stack
        "exptime": _NUM,              # total exposure, seconds
        "method": (str,),
        "rejected_fraction": _NUM,
        "snr": _OPT_NUM,              # median signal-to-noise estimate of the stack
        "object": _OPT_STR,
        "filter": _OPT_STR,
        "reference": _OPT_STR,        # path of the reference frame
        "session": (int,),
        "preview": _OPT_LIST,         # [rows, columns, channels] when a preview part follows
        "filters": _OPT_LIST,         # the target's stacks: [{"filter", "frames", "exptime"}], one per filter
    },
    "snapshot": {
        "fits": _OPT_STR,             # path of the FITS snapshot
        "image": _OPT_STR,            # path of the PNG/JPEG snapshot
        "frames": (int,),
        "session": (int,),
        "reason": (str,),             # "interval", "request" or "shutdown"
        "filter": _OPT_STR,           # the filter of a per-filter stack's snapshot (null: the target's)
        "recipe": _OPT_STR,           # a colour composite's recipe (LRGB, RGB, SHO, HOO, mono), else null
    },
    "status": {
        "state": (str,),              # "starting", "waiting", "choosing" (a reference), "running", "paused",
                                      # "stalled", "failed", "stopping"
        "queue": (int,),              # frames waiting to be processed
        "lag": _NUM,                  # seconds the oldest waiting frame has waited
        "received": (int,),
        "accepted": (int,),
        "rejected": (int,),
        "exptime": _NUM,              # total exposure in the current stack
        "frames": (int,),             # frames in the current stack
        "uptime": _NUM,
        "started": (str,),            # ISO UTC
        "watch": (str,),
        "output": (str,),
        "method": (str,),
        "object": _OPT_STR,
        "filter": _OPT_STR,
        "session": (int,),
        "last_latency": _OPT_NUM,
        "insecure": (bool,),          # true when bound beyond loopback without keys (explicit opt-out)
        "problem": _OPT_STR,          # why the state is "stalled" (disk full) or "failed" (a thread died)
        "choosing": _OPT_STR,         # while "choosing": whose reference, frames at hand, seconds left
        "filters": _OPT_LIST,         # the current target's stacks: [{"filter", "frames", "exptime"}]
    },
    "log": {
        "level": (str,),              # "info", "warning" or "error"
        "message": (str,),
        "logger": (str,),
    },
    "display": {                      # the stack's picture for viewers; a JPEG part follows the payload
        "object": _OPT_STR,
        "filter": _OPT_STR,
        "session": (int,),
        "frames": (int,),             # frames in the stack pictured
        "exptime": _NUM,              # its total exposure, seconds
        "width": (int,),              # the picture's size, pixels
        "height": (int,),
        "bytes": (int,),              # length of the JPEG part
    },
    "removal": {
        "id": (int,),                 # the removal's number in the journal, from 1
        "action": (str,),             # "remove" or "reinclude"
        "seqs": (list,),              # the frames' journal numbers (frame.seq)
        "names": (list,),             # their file names
        "state": (str,),              # "started" (journaled), "done" or "failed"
        "how": (str,),                # "subtracted" (mean) or "re-integrated" (kappa-sigma, median)
        "frames": (int,),             # frames in the stack being served
        "reason": _OPT_STR,           # what the request said
        "session": (int,),
        "problems": (list,),          # files that changed or vanished, in words
    },
    "wcs": {                          # the reference was plate-solved: its stacks' snapshots carry the WCS
        "object": _OPT_STR,
        "session": (int,),
        "reference": (str,),          # path of the reference frame
        "ra": _NUM,                   # sky position of the frame's centre, ICRS degrees
        "dec": _NUM,
        "scale": _NUM,                # arcseconds per pixel
        "rotation": _NUM,             # degrees east of north of the image's up (+y)
        "stars": (int,),              # catalogue stars the solution matched
        "solver": (str,),
        "seconds": _NUM,              # how long the solver took
    },
    "photometry": {
        "seq": (int,),                # the frame's sequence number (as in its frame event)
        "name": (str,),               # the frame's file name
        "obs_time": _OPT_NUM,         # mid-exposure, a Julian date in time_scale (null without a time)
        "time_scale": (str,),         # "JD_UTC" or "BJD_TDB"
        "fwhm": _OPT_NUM,             # the frame's FWHM, pixels
        "aperture": _NUM,             # aperture radius used, pixels
        "comparisons": (int,),        # comparison stars of the plan
        "targets": (list,),           # [{"name", "magnitude", "error", "flux", "flux_err", "x", "y",
                                      #   "comparisons", "flags"}]: magnitude relative to the ensemble
        "object": _OPT_STR,
        "session": (int,),
    },
}

#: Fields a producer may leave out (a reader takes them as null): added after version 1 was first published.
OPTIONAL: dict[str, frozenset[str]] = {
    "frame": frozenset({"sharpness", "calibration", "defects", "sky", "transparency", "weight"}),
    "stack": frozenset({"filters"}),
    "snapshot": frozenset({"filter", "recipe"}),
    "status": frozenset({"problem", "filters", "choosing"}),
}

_VERDICTS = ("received", "accepted", "rejected")
_STATES = ("starting", "waiting", "choosing", "running", "paused", "stalled", "failed", "stopping")
_LEVELS = ("info", "warning", "error")
_REMOVAL_STATES = ("started", "done", "failed")


class SchemaError(ValueError):
    """A message does not follow the schema; the message says which field and why."""


@dataclass(frozen=True)
class Event:
    """One published event: its topic, its JSON payload and, for ``stack``, an optional preview.

    Attributes
    ----------
    topic : str
    payload : Mapping
        The decoded JSON object, including ``v``, ``topic`` and ``time``.
    preview : ndarray or None
        uint8 ``(rows, columns, channels)``, read-only.
    picture : bytes or None
        The JPEG of a ``display`` event.
    """

    topic: str
    payload: Mapping[str, Any]
    preview: np.ndarray | None = field(default=None, compare=False)
    picture: bytes | None = field(default=None, compare=False, repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.payload[key]


def utc_now_iso() -> str:
    """The current time as ISO 8601 UTC with a ``Z``-free ``+00:00`` offset."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def validate(payload: Mapping[str, Any]) -> None:
    """Check a payload against the schema.

    Parameters
    ----------
    payload : Mapping
        A decoded event payload.

    Raises
    ------
    SchemaError
        When the version, topic, a field's presence or type, or an enumerated value is wrong.
    """
    if payload.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"schema version {payload.get('v')!r} is not {SCHEMA_VERSION}")
    topic = payload.get("topic")
    if topic not in FIELDS:
        raise SchemaError(f"unknown topic {topic!r}; topics are {', '.join(TOPICS)}")
    if not isinstance(payload.get("time"), str):
        raise SchemaError(f"{topic} event has no 'time' string")
    for name, types in FIELDS[topic].items():
        if name not in payload:
            if name in OPTIONAL.get(topic, ()):
                continue
            raise SchemaError(f"{topic} event lacks the field {name!r}")
        value = payload[name]
        # bool is an int in Python; only accept it where bool is named.
        if isinstance(value, bool) and bool not in types:
            raise SchemaError(f"{topic}.{name} is a boolean, expected {_names(types)}")
        if not isinstance(value, types):
            raise SchemaError(f"{topic}.{name} is {type(value).__name__}, expected {_names(types)}")
    _check_enum(payload, "frame", "verdict", _VERDICTS)
    _check_enum(payload, "status", "state", _STATES)
    _check_enum(payload, "log", "level", _LEVELS)
    _check_enum(payload, "removal", "state", _REMOVAL_STATES)


def make_event(topic: str, preview: np.ndarray | None = None, picture: bytes | None = None,
               **fields: Any) -> Event:
    """Build and validate an event.

    Parameters
    ----------
    topic : str
        One of ``TOPICS``.
    preview : ndarray, optional
        uint8 ``(rows, columns)`` or ``(rows, columns, channels)``; only for ``stack``.
    picture : bytes, optional
        A JPEG; required for ``display`` and only for it.
    **fields
        The topic's fields (see ``FIELDS``); ``preview`` shape and a picture's ``bytes`` are filled in here.

    Returns
    -------
    Event

    Raises
    ------
    SchemaError
        When the fields do not follow the schema.
    """
    payload: dict[str, Any] = {"v": SCHEMA_VERSION, "topic": topic, "time": utc_now_iso()}
    payload.update(fields)
    image: np.ndarray | None = None
    if preview is not None:
        if topic != "stack":
            raise SchemaError("only stack events carry a preview")
        image = np.ascontiguousarray(preview, dtype=np.uint8)
        if image.ndim == 2:
            image = image[:, :, np.newaxis]
        if image.ndim != 3:
            raise SchemaError("a preview is a 2-D or 3-D uint8 image")
        image.flags.writeable = False
        payload["preview"] = list(image.shape)
    elif topic == "stack":
        payload.setdefault("preview", None)
    if (picture is not None) != (topic == "display"):
        raise SchemaError("a display event carries a picture, and no other event does")
    if picture is not None:
        _check_jpeg(picture)
        payload["bytes"] = len(picture)
    validate(payload)
    return Event(topic, payload, image, bytes(picture) if picture is not None else None)


def encode(event: Event) -> list[bytes]:
    """The multipart message of an event: ``[topic, json]``, or with a preview or picture part."""
    parts = [event.topic.encode("ascii"), json.dumps(event.payload, separators=(",", ":")).encode()]
    if event.preview is not None:
        parts.append(event.preview.tobytes())
    elif event.picture is not None:
        parts.append(event.picture)
    return parts


def decode(parts: list[bytes]) -> Event:
    """Parse and validate a multipart message.

    Parameters
    ----------
    parts : list of bytes
        As received from a SUB socket.

    Returns
    -------
    Event

    Raises
    ------
    SchemaError
        When the message is malformed or does not follow the schema.
    """
    if len(parts) not in (2, 3):
        raise SchemaError(f"an event has 2 or 3 parts, this one has {len(parts)}")
    try:
        topic = parts[0].decode("ascii")
        payload = json.loads(parts[1])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"an event is not ascii topic plus JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise SchemaError("an event payload is not a JSON object")
    if payload.get("topic") != topic:
        raise SchemaError(f"topic part {topic!r} differs from the payload's {payload.get('topic')!r}")
    validate(payload)
    if topic == "display":
        if len(parts) != 3 or len(parts[2]) != payload["bytes"]:
            raise SchemaError(f"a display event needs its picture of {payload['bytes']} bytes as a 3rd part")
        _check_jpeg(parts[2])
        return Event(topic, payload, None, parts[2])
    preview: np.ndarray | None = None
    if len(parts) == 3:
        shape = payload.get("preview")
        if not isinstance(shape, list) or len(shape) != 3:
            raise SchemaError("a preview part came without its shape in 'preview'")
        rows, cols, channels = (int(n) for n in shape)
        if rows * cols * channels != len(parts[2]):
            raise SchemaError(f"preview of {len(parts[2])} bytes does not match shape {shape}")
        preview = np.frombuffer(parts[2], dtype=np.uint8).reshape(rows, cols, channels)
    return Event(topic, payload, preview)


def decode_request(raw: bytes) -> dict[str, Any]:
    """Parse a control request.

    Parameters
    ----------
    raw : bytes
        The request as received on the REP socket.

    Returns
    -------
    dict
        The request, with ``cmd`` one of ``COMMANDS``.

    Raises
    ------
    SchemaError
        With a sentence suitable for the error reply.
    """
    try:
        request = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError("the request is not JSON") from exc
    except RecursionError as exc:
        raise SchemaError("the request is nested too deeply to be read") from exc
    except ValueError as exc:
        # Python refuses integers of more than 4300 digits (int_max_str_digits), the only other ValueError.
        raise SchemaError("the request holds a number too long to be read") from exc
    if not isinstance(request, dict):
        raise SchemaError('the request is not a JSON object like {"cmd": "status"}')
    cmd = request.get("cmd")
    if cmd not in COMMANDS:
        raise SchemaError(f"unknown command {cmd!r}; commands are {', '.join(COMMANDS)}")
    if cmd == "set_reference" and not isinstance(request.get("path"), str):
        raise SchemaError("set_reference needs a 'path' string naming a frame")
    if cmd in ("remove", "reinclude"):
        _check_selection(cmd, request)
    return request


def ok_reply(**result: Any) -> bytes:
    """A success reply carrying ``result``."""
    return json.dumps({"ok": True, "result": result}).encode()


def error_reply(message: str) -> bytes:
    """An error reply carrying one sentence."""
    return json.dumps({"ok": False, "error": message}).encode()


def _check_jpeg(data: bytes) -> None:
    # The start-of-image and end-of-image markers: a cut or foreign part is refused, not shown half.
    if not (data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"):
        raise SchemaError("a display picture is not a whole JPEG")


def _check_selection(cmd: str, request: Mapping[str, Any]) -> None:
    """``remove``/``reinclude`` name frames by ``seq``, ``name`` or a ``from``/``to`` DATE-OBS range."""
    seq, name = request.get("seq"), request.get("name")
    seqs = seq if isinstance(seq, list) else [] if seq is None else [seq]
    names = name if isinstance(name, list) else [] if name is None else [name]
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seqs):
        raise SchemaError(f"{cmd}: 'seq' is a journal number or a list of them")
    if any(not isinstance(n, str) or not n for n in names):
        raise SchemaError(f"{cmd}: 'name' is a file name or a list of them")
    for key in ("from", "to", "reason"):
        if request.get(key) is not None and not isinstance(request[key], str):
            raise SchemaError(f"{cmd}: {key!r} is a string")
    if not seqs and not names and not request.get("from") and not request.get("to"):
        raise SchemaError(f"{cmd} needs 'seq' (journal numbers), 'name' (file names) or 'from'/'to' "
                          "(ISO times)")


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check_enum(payload: Mapping[str, Any], topic: str, name: str, allowed: tuple[str, ...]) -> None:
    if payload["topic"] == topic and payload[name] not in allowed:
        raise SchemaError(f"{topic}.{name} is {payload[name]!r}; allowed: {', '.join(allowed)}")
