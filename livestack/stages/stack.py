"""Stack: running accumulators that each cost O(pixels) per frame.

Public API (one small interface, three methods):

- ``Accumulator`` protocol: ``add(image, footprint, weight=1.0)``, ``result() -> ndarray`` (float32, NaN
  where never covered), ``result_later(step=1, sample=False, into=None) -> Callable[[], ndarray]`` (the
  same in two steps: what must be read now, and the costly rest, which may run while frames are added;
  ``step > 1`` gives it ``step`` times smaller, block means for pictures or a sample for statistics, read
  without making the whole stack; ``into`` a caller's buffer for the whole stack), ``coverage -> ndarray``
  (count of frames per pixel: int32, or uint16 for kappa-sigma under ``NARROW_COUNTS`` frames),
  ``count -> int``, ``rejected_fraction -> float``, ``method -> str``, ``state() -> dict[str, ndarray]`` and
  ``restore(state)`` for checkpoints.
- ``MeanStack(shape)``, ``KappaSigmaStack(shape, kappa=3.0, warmup=5)``,
  ``MedianStack(shape, directory, max_frames=...)``, ``MaxStack(shape)`` (star trails),
  ``MeanWithoutMaxStack(shape)`` (one satellite per pixel removed when too few frames are in for
  kappa-sigma).
- ``make_accumulator(method, shape, *, kappa, warmup, directory) -> Accumulator``.
- ``load_compiled()``: pay numba's once-per-process loading now rather than on a first frame.
- ``MeanStack.subtract(image, footprint, weight=1.0)``: takes back a frame that ``add`` added (the same
  image, footprint and weight), exactly up to float32 rounding; the clipping methods have no such inverse
  (a removed frame changed which samples were clipped, or the order statistics), so they are re-integrated.

``shape`` is ``(H, W)`` for mono or ``(H, W, C)`` for colour; footprints are always ``(H, W)`` bool.

A pixel of a frame counts only where its footprint is True *and* every channel is finite: values outside
the footprint (NaN, zero or garbage) never reach the stack, and a NaN inside the footprint cannot poison
it. ``coverage`` counts, per pixel, the frames that offered such a value (kappa-sigma rejections do not
lower it). ``state()`` returns copies, so a checkpoint can be written while stacking goes on.

The hot loops are numba kernels (``parallel=True`` over rows, ``cache=True`` so that only the first
process on a machine pays the compile). They run on numba's own worker threads, which end with each call.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numba
import numpy as np

from livestack.errors import StateError

__all__ = [
    "METHODS",
    "Accumulator",
    "KappaSigmaStack",
    "MaxStack",
    "MeanStack",
    "MeanWithoutMaxStack",
    "MedianStack",
    "load_compiled",
    "make_accumulator",
]

METHODS: tuple[str, ...] = ("mean", "kappa-sigma", "median", "max", "mean-without-max")

WARMUP_MEMORY_BUDGET: int = 1 << 30
"""Bytes the kappa-sigma warm-up may hold: it buffers at most this much of whole float32 frames."""

MIN_WARMUP_FRAMES: int = 3
"""The fewest warm-up frames a median can use to outvote one outlier; kept even above the budget."""

MIN_TEST_SAMPLES: int = 3
"""Accepted samples a pixel needs before kappa-sigma tests new ones: fewer give no usable sigma."""

NARROW_COUNTS: int = int(np.iinfo(np.uint16).max)
"""Kappa-sigma keeps its per-pixel counts (accepted samples, coverage) as uint16 while the stack has fewer
frames than this, and as int32 from then on: 4 bytes per pixel less for any night of under 65,535 frames."""

MAD_TO_SIGMA: float = 1.4826
"""Median absolute deviation to standard deviation, for normal noise."""

MEDIAN_MEMORY_BUDGET: int = 256 << 20
"""Bytes of cube ``MedianStack.result()`` reads at a time (one row of every frame at the least)."""

_CUBE_PREFIX = "median-"
_CUBE_SUFFIX = ".cube"
_CHUNK_PIXELS = 256  # pixels per numba task in the median kernel: one scratch allocation per task
_MEDIAN_SAMPLE = 50_000  # values sampled to bracket the noise floor's median


def load_compiled() -> None:
    """Load numba's compiled machinery now, with the mean's kernel on a 2 x 2 stack.

    The first compiled call of a process loads numba's type registries (and, through its BLAS check,
    scipy.linalg): ~0.3 s on an idle machine, seconds on a loaded one. A daemon calls this before it says it
    is ready, so that the first frame's wait does not include it; the other kernels then load from the
    cache in a few milliseconds each.
    """
    MeanStack((2, 2)).add(np.zeros((2, 2), dtype=np.float32), np.ones((2, 2), dtype=bool))


class Accumulator(Protocol):
    """What every stacking method offers."""

    method: str

    @property
    def count(self) -> int: ...

    @property
    def coverage(self) -> np.ndarray: ...

    @property
    def rejected_fraction(self) -> float: ...

    def add(self, image: np.ndarray, footprint: np.ndarray, weight: float = 1.0,
            owned: bool = False) -> None:
        """Add an aligned frame; ``owned``: the caller gives ``image`` up (the stack may keep or alter it)."""

    def settle(self) -> bool: ...

    @property
    def settled(self) -> bool:
        """False while ``settle`` has work to do."""

    @property
    def keeps_frames(self) -> bool:
        """True while ``add(owned=True)`` may keep the image itself (kappa-sigma's warm-up)."""

    def result(self) -> np.ndarray: ...

    def result_later(self, step: int = 1, sample: bool = False,
                     into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Callable[[], np.ndarray]:
        """``result`` in two steps: this call reads what it needs of the stack now (under the caller's
        lock); calling what it returns gives the stack as it was then, and may run while frames are added.

        ``step`` > 1 makes it ``ceil(H / step) x ceil(W / step)``: each pixel the mean of the covered
        values of a ``step x step`` block (a picture for people), or with ``sample`` the block's first
        pixel (``result()[::step, ::step]``, for statistics); NaN where none is covered. A stack with
        running moments reads that much of them and no more (``_reduced``).

        ``into``: given the whole stack's shape, the writeable C-contiguous float32 array to write it in
        (a caller's buffer kept from one call to the next: on a virtual machine a new 100 MB array costs up
        to ~200 ms of page faults). A stack with running moments writes the whole stack there; the others,
        and smaller stacks, may ignore it.
        """

    def state(self) -> dict[str, np.ndarray]: ...

    def restore(self, state: dict[str, np.ndarray]) -> None: ...


class _Tally:
    """What every accumulator reports alike: the frames added and the per-pixel coverage."""

    _count: int
    _coverage: np.ndarray

    @property
    def count(self) -> int:
        """Frames added."""
        return self._count

    @property
    def coverage(self) -> np.ndarray:
        """``(H, W)`` int32 (uint16 for kappa-sigma under ``NARROW_COUNTS`` frames): frames that offered a
        valid value at each pixel (read-only view)."""
        return _readonly(self._coverage)

    @property
    def rejected_fraction(self) -> float:
        """Rejected over offered samples: 0 for an accumulator that keeps every sample."""
        return 0.0

    def settle(self) -> bool:
        """Do what an ``add`` left for later (nothing, but for kappa-sigma's warm-up); True if it did any."""
        return False

    @property
    def settled(self) -> bool:
        """False while ``settle`` has work to do (never, but for kappa-sigma's warm-up)."""
        return True

    @property
    def keeps_frames(self) -> bool:
        """Whether ``add(owned=True)`` may keep the image itself: never, but for kappa-sigma's warm-up."""
        return False

    def result(self) -> np.ndarray:
        """The stack so far (each method's own)."""
        raise NotImplementedError

    def result_later(self, step: int = 1, sample: bool = False,
                     into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Callable[[], np.ndarray]:
        """``result`` computed now, made smaller (``step`` > 1) and handed out later (see
        ``Accumulator.result_later``; ``into`` is not used)."""
        image = self.result()
        return lambda: _smaller(image, step, sample)


class MeanStack(_Tally):
    """Weighted mean: per pixel, a running float32 weighted mean and a float32 sum of weights.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` or ``(H, W, C)``.

    Notes
    -----
    Each sample moves the mean by ``(value - mean) * weight / sum(weights)``, computed in float64 and stored
    as float32. Stored as sums, float32 would lose a frame's worth of digits to the growing total; a running
    mean keeps its own scale, so each frame adds one float32 rounding (~6e-8 relative) and the error after
    ``n`` frames is ~``6e-8 * sqrt(n)`` of the mean, far below the stack's noise. Memory: 4 bytes per pixel
    and channel for the mean, plus 8 per pixel (weights, coverage); float64 sums took 8 and 12.
    """

    method: str = "mean"

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._shape = _check_shape(shape)
        height, width, channels = _shape3(self._shape)
        self._mean = np.zeros((height, width, channels), dtype=np.float32)
        self._weight = np.zeros((height, width), dtype=np.float32)
        self._coverage = np.zeros((height, width), dtype=np.int32)
        self._count = 0

    def add(self, image: np.ndarray, footprint: np.ndarray, weight: float = 1.0,
            owned: bool = False) -> None:
        """Add an aligned frame.

        Parameters
        ----------
        image : ndarray
            The stack's shape; values outside the footprint are ignored.
        footprint : ndarray
            bool ``(H, W)``.
        weight : float
            Positive, finite.

        Raises
        ------
        ValueError
            If the shapes differ from the stack's or the weight is not positive and finite.
        """
        image3, mask, weight = _check_frame(self._shape, image, footprint, weight)
        _mean_add(image3, mask, weight, self._mean, self._weight, self._coverage)
        self._count += 1

    def subtract(self, image: np.ndarray, footprint: np.ndarray, weight: float = 1.0) -> None:
        """Take back a frame added before, with the same image, footprint and weight.

        The mean becomes ``(sum(weights) * mean - weight * value) / (sum(weights) - weight)``, the mean of
        the other frames up to float32 rounding; where no frame is left the mean and weight are set to
        exactly zero, so rounding cannot leave a tiny weight that would make the mean explode.

        Parameters
        ----------
        image, footprint, weight
            As given to ``add``.

        Raises
        ------
        ValueError
            If the shapes differ from the stack's, the weight is not positive and finite, or the stack is
            empty.
        """
        image3, mask, weight = _check_frame(self._shape, image, footprint, weight)
        if self._count == 0:
            raise ValueError("The stack is empty: there is no frame to take back.")
        _mean_subtract(image3, mask, weight, self._mean, self._weight, self._coverage)
        self._count -= 1

    def result(self) -> np.ndarray:
        """The weighted mean, float32, NaN where never covered."""
        return self.result_later()()

    def result_later(self, step: int = 1, sample: bool = False,
                     into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Callable[[], np.ndarray]:
        """``result`` in two steps (see ``Accumulator.result_later``); all of it is read at this call."""
        image = _reduced(self._mean, self._coverage[:, :, None], step, sample, self._shape, into)
        return lambda: image

    def state(self) -> dict[str, np.ndarray]:
        """Copies of everything needed to resume (see ``restore``)."""
        return {
            "method": np.array(self.method),
            "shape": np.array(self._shape, dtype=np.int64),
            "count": np.array(self._count, dtype=np.int64),
            "mean": self._mean.copy(),
            "weight": self._weight.copy(),
            "coverage": self._coverage.copy(),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Resume from a ``state()`` of a stack of the same method and shape.

        A state that holds float64 sums (``sum``, from before the running mean) is turned into the mean.

        Raises
        ------
        StateError
            If the state is of another method or shape, or misses an array.
        """
        _check_state(state, self.method, self._shape, ("count", "weight", "coverage"))
        weight = _take(state, "weight", self._weight.shape, np.float64)
        if "mean" in state:
            self._mean = _take(state, "mean", self._mean.shape, np.float32)
        elif "sum" in state:
            total = _take(state, "sum", self._mean.shape, np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(weight[:, :, None] > 0, total / weight[:, :, None], 0.0)
            self._mean = mean.astype(np.float32)
        else:
            raise StateError("The mean state lacks mean.")
        self._weight = weight.astype(np.float32)
        self._coverage = _take(state, "coverage", self._coverage.shape, np.int32)
        self._count = int(state["count"])


class KappaSigmaStack(_Tally):
    """Kappa-sigma clipped mean, streamed: a running weighted mean and variance per pixel and channel.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` or ``(H, W, C)``.
    kappa : float
        A sample further than ``kappa`` sigma from the pixel's running mean is rejected.
    warmup : int
        Frames buffered before streaming starts (see Notes).
    warmup_budget : int
        Bytes the warm-up buffer may use; caps ``warmup`` (never below ``MIN_WARMUP_FRAMES``).

    Notes
    -----
    *Warm-up.* A running mean cannot judge its first samples, so the first ``warmup`` frames (at most
    ``warmup_budget`` bytes of them, but at least ``MIN_WARMUP_FRAMES``) are buffered. Once the buffer is full
    (at the next ``add``, or earlier at ``settle``), each pixel and channel is initialised from its buffered
    samples: those further than ``kappa * 1.4826 * MAD`` from their median are rejected (a satellite trail in
    frame 2 does not poison the stack), the rest seed the running mean and variance. Until then ``result()``
    returns that robust combination of the frames buffered so far. Judging costs two streaming passes over the
    buffer and a second look at the few pixels whose samples spread wider than the limit's least value
    (``_judge``). The moments are written over four buffered frames and the others go back, so the warm-up's
    end needs no memory beyond the buffer and one plane of variances (but for a frame that a pending
    ``result_later`` still reads, whose slot is a new array).

    *Noise floor.* Sigma from a handful of samples is often far too small by chance, and a pixel whose sigma
    is too small rejects every later good sample: it freezes. So sigma never goes below a floor per channel,
    the typical noise of one frame: the median over pixels of the warm-up samples' variance, corrected for
    the median of a chi-square (``_noise_floor``). It is set when the warm-up is judged and kept; star
    pixels, noisier than the sky, use their own larger sigma.

    *Streaming.* Each later sample is tested against ``kappa * max(sigma, floor)`` around its pixel's
    running mean and, when accepted, folded in with West's weighted form of Welford's update. The mean is
    weighted; sigma is ``sqrt(M2 / sum(w) * n / (n - 1))`` with ``n`` accepted samples (the unweighted
    sample variance when all weights are equal). A pixel with fewer than ``MIN_TEST_SAMPLES`` samples, at
    the warm-up or after, accepts all: so a pixel seen by fewer than 3 warm-up frames (the field's edge
    while the mount drifts) is not protected from an outlier among its first samples. Channels are clipped
    independently.

    ``rejected_fraction`` is rejected samples over samples offered (per channel, within footprints),
    counting the warm-up frames once they are judged; 0 during the warm-up.

    The clipping is symmetric and does not bias the mean. A sky level drifting by more than kappa sigma of
    one frame would be rejected from then on, and a floor set under a dark sky is too low once the moon is
    up: normalise the background before stacking.

    Memory: mean, M2 and weight sum as float32 and the accepted count, 14 bytes per pixel and channel, plus
    the coverage, 2 bytes per pixel; float32 is enough because Welford's update never subtracts large sums.
    The counts are uint16 until the stack reaches ``NARROW_COUNTS`` frames and int32 from then on
    (``coverage`` is uint16 or int32 accordingly). The warm-up holds ``4 * warmup`` bytes per pixel and
    channel, and 4 more while it is judged.
    """

    method: str = "kappa-sigma"

    def __init__(self, shape: tuple[int, ...], kappa: float = 3.0, warmup: int = 5, *,
                 warmup_budget: int = WARMUP_MEMORY_BUDGET) -> None:
        self._shape = _check_shape(shape)
        if not (math.isfinite(kappa) and kappa > 0):
            raise ValueError(f"kappa must be a positive number, not {kappa}.")
        if int(warmup) != warmup or warmup < 1:
            raise ValueError(f"warmup must be a positive whole number of frames, not {warmup}.")
        self._kappa = float(kappa)
        height, width, channels = _shape3(self._shape)
        frame_bytes = height * width * channels * 4
        affordable = max(MIN_WARMUP_FRAMES, int(warmup_budget) // frame_bytes)
        self._warmup = min(int(warmup), affordable)
        self._dims = (height, width, channels)
        self._coverage = np.zeros((height, width), dtype=_count_type(0))
        self._count = 0
        self._offered = 0
        self._rejected = 0
        # Warm-up: frames with NaN where not valid (one array each, so that the judged warm-up can give
        # the ones it does not reuse back), and their weights.
        self._buffer: list[np.ndarray] = []
        self._buffer_weights = np.zeros(self._warmup, dtype=np.float64)
        self._buffered = 0
        # The warm-up stacks handed out by ``result_later`` and not yet computed: their frames are not
        # written over when the warm-up ends.
        self._lent: weakref.WeakSet[_WarmupResult] = weakref.WeakSet()
        # Streaming state, allocated when the warm-up ends.
        self._mean: np.ndarray | None = None
        self._m2 = np.zeros(0, dtype=np.float32)
        self._wsum = np.zeros(0, dtype=np.float32)
        self._n = np.zeros(0, dtype=self._coverage.dtype)
        self._floor = np.zeros(channels, dtype=np.float64)

    @property
    def warmup(self) -> int:
        """Frames buffered before streaming (``warmup`` capped by the memory budget)."""
        return self._warmup

    @property
    def rejected_fraction(self) -> float:
        """Rejected over offered samples since the warm-up was judged (0 before)."""
        return self._rejected / self._offered if self._offered else 0.0

    def add(self, image: np.ndarray, footprint: np.ndarray, weight: float = 1.0,
            owned: bool = False) -> None:
        """Add an aligned frame (see the class Notes for what happens to it).

        Parameters
        ----------
        image : ndarray
            The stack's shape; values outside the footprint are ignored.
        footprint : ndarray
            bool ``(H, W)``.
        weight : float
            Positive, finite.
        owned : bool
            The caller gives ``image`` up: during the warm-up it becomes the buffered frame itself (NaN
            written where it is not valid) instead of being copied into a new one.

        Raises
        ------
        ValueError
            If the shapes differ from the stack's or the weight is not positive and finite.
        """
        copied = not (image.dtype == np.float32 and image.flags.c_contiguous)  # by _check_frame
        image3, mask, weight = _check_frame(self._shape, image, footprint, weight)
        self.settle()
        if self._count >= NARROW_COUNTS and self._coverage.dtype != np.int32:
            # This frame could take a count past uint16's range: every count is widened once, exactly.
            self._coverage = self._coverage.astype(np.int32)
            if self._mean is not None:
                self._n = self._n.astype(np.int32)
        if self._mean is None:
            if image3.flags.writeable and (owned or copied):
                slot = image3
                _mask_copy(image3, mask, slot, self._coverage)
            else:
                slot = np.empty(self._dims, dtype=np.float32)
                _mask_copy(image3, mask, slot, self._coverage)
            self._buffer.append(slot)
            self._buffer_weights[self._buffered] = weight
            self._buffered += 1
            self._count += 1
            return
        offered = np.zeros(self._dims[0], dtype=np.int64)
        rejected = np.zeros(self._dims[0], dtype=np.int64)
        _kappa_add(image3, mask, weight, self._kappa, MIN_TEST_SAMPLES, self._floor, self._mean, self._m2,
                   self._wsum, self._n, self._coverage, offered, rejected)
        self._offered += int(offered.sum())
        self._rejected += int(rejected.sum())
        self._count += 1

    @property
    def keeps_frames(self) -> bool:
        """True during the warm-up, whose buffer keeps an owned frame as one of its slots."""
        return self._mean is None

    @property
    def settled(self) -> bool:
        """False while a full warm-up buffer waits to be judged (see ``settle``)."""
        return not (self._mean is None and self._buffered >= self._warmup)

    def settle(self) -> bool:
        """Judge a full warm-up buffer now, if one waits; True if it did.

        The frame that fills the buffer is only buffered: the judging (a robust pass over every buffered
        frame, the costliest step of the stack's life) is done by the next ``add``, or earlier by a call to
        this, so that a live caller can do it after the frame's verdict has gone out. Either way the stack
        is the same, bit for bit; ``result`` and ``state`` before it give the same stack too.
        """
        if self.settled:
            return False
        self._finish_warmup()
        return True

    def result(self) -> np.ndarray:
        """The clipped mean, float32, NaN where never covered (the robust warm-up combination before)."""
        return self.result_later()()

    def result_later(self, step: int = 1, sample: bool = False,
                     into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Callable[[], np.ndarray]:
        """``result`` in two steps (see ``Accumulator.result_later``).

        During the warm-up the costly part, the robust combination of the buffered frames, is left to the
        call of what this returns: it keeps references to those frames, and a warm-up judged meanwhile
        writes its moments over none of them (it takes new arrays for the slots they would have been).
        After it, all of the (possibly smaller) stack is read at this call (the whole one ``into`` the
        caller's array, if given); the warm-up's takes a new array.
        """
        if self._mean is None:
            if not self._buffer:
                empty = np.full(self._shape, np.nan, dtype=np.float32)
                return lambda: _smaller(empty, step, sample)
            later = _WarmupResult(tuple(self._buffer), self._buffer_weights[: self._buffered].copy(),
                                  self._kappa, self._shape, step, sample)
            self._lent.add(later)
            return later
        image = _reduced(self._mean, self._n, step, sample, self._shape, into)
        return lambda: image

    def state(self) -> dict[str, np.ndarray]:
        """Copies of everything needed to resume: the warm-up buffer while warming up, else the moments."""
        state = {
            "method": np.array(self.method),
            "shape": np.array(self._shape, dtype=np.int64),
            "count": np.array(self._count, dtype=np.int64),
            "offered": np.array(self._offered, dtype=np.int64),
            "rejected": np.array(self._rejected, dtype=np.int64),
            "coverage": self._coverage.copy(),
        }
        if self._mean is None:
            state["buffer"] = (np.stack(self._buffer) if self._buffer
                               else np.zeros((0, *self._dims), dtype=np.float32))
            state["buffer_weights"] = self._buffer_weights[: self._buffered].copy()
        else:
            state.update(mean=self._mean.copy(), m2=self._m2.copy(), wsum=self._wsum.copy(), n=self._n.copy(),
                         floor=self._floor.copy())
        return state

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Resume from a ``state()`` of a stack of the same method and shape.

        A state taken during the warm-up resumes the warm-up with this stack's ``warmup`` (ending it at once
        if the state already buffered that many frames).

        Raises
        ------
        StateError
            If the state is of another method or shape, or misses an array.
        """
        _check_state(state, self.method, self._shape, ("count", "offered", "rejected", "coverage"))
        self._count = int(state["count"])
        # Older states hold int32 counts: taken as this stack's count type (no count exceeds the frames).
        counts = _count_type(self._count)
        self._coverage = _take(state, "coverage", self._dims[:2], counts)
        self._offered = int(state["offered"])
        self._rejected = int(state["rejected"])
        if "buffer" in state:
            buffer = np.asarray(state["buffer"], dtype=np.float32)
            weights = np.asarray(state["buffer_weights"], dtype=np.float64)
            if buffer.shape[1:] != self._dims or weights.shape != buffer.shape[:1]:
                raise StateError("The kappa-sigma warm-up buffer in the state does not fit this stack.")
            size = max(self._warmup, buffer.shape[0])
            self._buffer = [np.array(frame) for frame in buffer]
            self._buffer_weights = np.zeros(size, dtype=np.float64)
            self._buffer_weights[: buffer.shape[0]] = weights
            self._buffered = buffer.shape[0]
            self._mean = None
            if self._buffered >= self._warmup:
                self._finish_warmup()
            return
        missing = [key for key in ("mean", "m2", "wsum", "n", "floor") if key not in state]
        if missing:
            raise StateError(f"The kappa-sigma state lacks {', '.join(missing)}.")
        self._mean = _take(state, "mean", self._dims, np.float32)
        self._m2 = _take(state, "m2", self._dims, np.float32)
        self._wsum = _take(state, "wsum", self._dims, np.float32)
        self._n = _take(state, "n", self._dims, counts)
        self._floor = _take(state, "floor", self._dims[2:], np.float64)
        self._buffer = []
        self._buffered = 0

    def _finish_warmup(self) -> None:
        # The moments are written over buffered frames that no pending ``result_later`` still reads; the
        # buffer's other frames go back.
        lent = {id(frame) for later in list(self._lent) for frame in later.frames}
        free = [frame for frame in self._buffer if id(frame) not in lent]
        slots = [*free[:4], *(np.empty(self._dims, dtype=np.float32) for _ in range(4 - min(4, len(free))))]
        weights = self._buffer_weights[: self._buffered]
        mean, self._m2, self._wsum, n, self._floor, offered, rejected = _judge(
            tuple(self._buffer), weights, self._kappa, slots)
        del free, slots
        self._offered += offered
        self._rejected += rejected
        self._mean = mean
        self._buffer = []  # the frames beyond the four that now hold the moments go back now
        self._buffered = 0
        # The counts in the stack's count type; the buffered frame that held them as int32 goes back.
        self._n = n.astype(self._coverage.dtype)
        del n


class _WarmupResult:
    """A kappa-sigma warm-up's stack, computed when called from the frames it was given (``result_later``)."""

    def __init__(self, frames: tuple[np.ndarray, ...], weights: np.ndarray, kappa: float,
                 shape: tuple[int, ...], step: int = 1, sample: bool = False) -> None:
        self.frames = frames
        self._weights = weights
        self._kappa = kappa
        self._shape = shape
        self._step = step
        self._sample = sample

    def __call__(self) -> np.ndarray:
        """The robust combination of the frames, float32, NaN where none covered (made smaller as asked);
        the frames go back."""
        if not self.frames:
            raise RuntimeError("a warm-up stack taken with result_later is computed once")
        mean, _, _, n, _, _, _ = _judge(self.frames, self._weights, self._kappa, None)
        self.frames = ()  # only now: a warm-up judged meanwhile leaves them alone while they are listed
        return _reduced(mean, n, self._step, self._sample, self._shape)


def _judge(frames: tuple[np.ndarray, ...], weights: np.ndarray, kappa: float, slots: list[np.ndarray] | None,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Robust moments of buffered warm-up frames: mean, M2, weight sum, accepted count, noise floor,
    offered, rejected.

    Two passes over the buffer. The first measures each pixel's sample variance, for the noise floor.
    The second takes the moments of a row's samples and gives a second look only to the pixels whose
    reach (how far a sample can lie from the median) exceeds ``kappa * floor``, the least the limit can
    be: most sky pixels have nothing to clip.

    ``slots`` (the warm-up's end): four frame-sized float32 arrays for mean, M2, weight sum and count,
    which may be frames of the buffer: each pixel's samples are all read before its moments are written, so
    the judged warm-up needs no memory beyond the buffer and one plane of variances. None (a result during
    the warm-up): only mean and count are wanted, and the M2 and weight sums returned are meaningless; with
    fewer frames than ``MIN_TEST_SAMPLES`` nothing can be clipped, so the floor, which only sets the limit,
    is not measured (0 is returned for it).
    """
    dims = frames[0].shape
    channels = dims[2]
    if slots is None and len(frames) < MIN_TEST_SAMPLES:
        floor = np.zeros(channels, dtype=np.float64)
    else:
        variance = np.empty(dims, dtype=np.float32)
        counts = np.zeros((dims[0], channels, len(frames) + 1), dtype=np.int64)
        _sample_variance(frames, variance, counts)
        floor = _noise_floor(variance, counts.sum(axis=0))
        del variance  # before the moments are allocated: the two never coexist
    if slots is not None:
        mean, m2, wsum, n = slots[0], slots[1], slots[2], slots[3].view(np.int32)
    else:
        # Only the mean and the count are wanted: M2 and the weight sums share one scratch.
        mean = np.empty(dims, dtype=np.float32)
        m2 = wsum = np.empty(dims, dtype=np.float32)
        n = np.empty(dims, dtype=np.int32)
    offered = np.zeros(dims[0], dtype=np.int64)
    rejected = np.zeros(dims[0], dtype=np.int64)
    _robust_init(frames, weights, kappa, MAD_TO_SIGMA, MIN_TEST_SAMPLES, floor, mean, m2, wsum, n, offered,
                 rejected)
    return mean, m2, wsum, n, floor, int(offered.sum()), int(rejected.sum())


class MedianStack(_Tally):
    """Exact per-pixel median of every frame, from a cube of frames kept on disk.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` or ``(H, W, C)``.
    directory : str or PathLike
        Where the cube file goes (created on the first frame, named ``median-*.cube``); nothing else in it
        is touched.
    max_frames : int, optional
        Refuse frames beyond this many (bounds the disk: ``H * W * C * 4`` bytes per frame).
    memory_budget : int
        Bytes of cube ``result()`` holds at a time.

    Notes
    -----
    Each frame is written as raw float32 (native byte order), NaN where not valid, at offset
    ``count * frame_bytes``: a crash mid-append leaves a partial frame that the next append overwrites and
    ``restore`` truncates. ``result()`` reads row blocks of every frame into one reused buffer (never a
    memory map, whose resident pages grow to the cube's size) and takes the NaN-ignoring median, the mean
    of the two middle values for an even count, as ``np.nanmedian`` does. Weights are ignored: a weighted
    median would need every frame's weight at every pixel, and the median's point is to ignore outliers,
    not to rank frames. Delete the cube with ``discard()`` when the stack is done with.
    """

    method: str = "median"

    def __init__(self, shape: tuple[int, ...], directory: str | os.PathLike[str],
                 max_frames: int | None = None, *, memory_budget: int = MEDIAN_MEMORY_BUDGET) -> None:
        self._shape = _check_shape(shape)
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be a positive number of frames or None, not {max_frames}.")
        if memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive number of bytes, not {memory_budget}.")
        self._directory = Path(directory)
        self._max_frames = max_frames
        self._budget = int(memory_budget)
        self._dims = _shape3(self._shape)
        self._frame_bytes = self._dims[0] * self._dims[1] * self._dims[2] * 4
        self._coverage = np.zeros(self._dims[:2], dtype=np.int32)
        self._count = 0
        self._path: Path | None = None
        self._scratch: np.ndarray | None = None

    @property
    def cube_path(self) -> Path | None:
        """The cube file, or None before the first frame."""
        return self._path

    @property
    def frame_bytes(self) -> int:
        """Bytes each frame takes in the cube: ``H * W * C * 4`` (float32)."""
        return self._frame_bytes

    def frames(self) -> Iterator[np.ndarray]:
        """The frames in the cube, in the order they were added, one at a time (NaN where not valid).

        Yields
        ------
        ndarray
            float32 of the stack's shape; a new array each time.
        """
        if self._path is None:
            return
        with open(self._path, "rb", buffering=0) as cube:
            for k in range(self._count):
                frame = np.empty(self._dims, dtype=np.float32)
                _read_exact(cube, frame, k * self._frame_bytes)
                yield frame.reshape(self._shape)

    def add(self, image: np.ndarray, footprint: np.ndarray, weight: float = 1.0, owned: bool = False) -> None:
        """Append an aligned frame to the cube (``weight`` is checked, then ignored).

        Raises
        ------
        ValueError
            If the shapes differ from the stack's, the weight is not positive and finite, or the cube already
            holds ``max_frames``.
        OSError
            If the cube cannot be written (the frame is then not counted).
        """
        image3, mask, _ = _check_frame(self._shape, image, footprint, weight)
        if self._max_frames is not None and self._count >= self._max_frames:
            raise ValueError(f"The median cube is full ({self._max_frames} frames); start a new stack.")
        if self._scratch is None:
            self._scratch = np.empty(self._dims, dtype=np.float32)
        coverage = self._coverage.copy()  # committed only once the frame is safely written
        _mask_copy(image3, mask, self._scratch, coverage)
        if self._path is None:
            self._directory.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=_CUBE_PREFIX, suffix=_CUBE_SUFFIX, dir=self._directory)
            os.close(handle)
            self._path = Path(name)
        with open(self._path, "r+b") as cube:
            cube.seek(self._count * self._frame_bytes)
            cube.write(self._scratch.data.cast("B"))
        self._coverage = coverage
        self._count += 1

    def result(self) -> np.ndarray:
        """The exact NaN-ignoring median, float32, NaN where never covered."""
        height, width, channels = self._dims
        median = np.full(self._dims, np.nan, dtype=np.float32)
        if self._count == 0 or self._path is None:
            return median.reshape(self._shape)
        rows, cols = _block_shape(self._count, height, width, channels, self._budget)
        block = np.empty((self._count, rows, cols, channels), dtype=np.float32)
        out = np.empty((rows, cols, channels), dtype=np.float32)
        with open(self._path, "rb", buffering=0) as cube:
            for y0 in range(0, height, rows):
                y1 = min(y0 + rows, height)
                for x0 in range(0, width, cols):
                    x1 = min(x0 + cols, width)
                    self._read_block(cube, block[:, : y1 - y0, : x1 - x0], y0, x0)
                    # Whole buffers go to the kernel so that it compiles once, whatever the block's size.
                    _nanmedian_block(block, y1 - y0, x1 - x0, out)
                    median[y0:y1, x0:x1] = out[: y1 - y0, : x1 - x0]
        return median.reshape(self._shape)

    def state(self) -> dict[str, np.ndarray]:
        """The cube's file name (in ``directory``), frame count and coverage; the cube is synced to disk."""
        if self._path is not None:
            with open(self._path, "r+b") as cube:
                os.fsync(cube.fileno())
        return {
            "method": np.array(self.method),
            "shape": np.array(self._shape, dtype=np.int64),
            "count": np.array(self._count, dtype=np.int64),
            "coverage": self._coverage.copy(),
            "cube": np.array(self._path.name if self._path is not None else ""),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Adopt the cube a ``state()`` names (looked for in this stack's directory).

        Bytes beyond the recorded frames (a frame half-written when the daemon died) are truncated.

        Raises
        ------
        StateError
            If the state is of another method or shape, or the cube is missing or shorter than recorded.
        """
        _check_state(state, self.method, self._shape, ("count", "coverage", "cube"))
        count = int(state["count"])
        name = str(state["cube"])
        if Path(name).name != name:
            raise StateError(f"The median state names {name!r}, which is not a plain file name.")
        coverage = _take(state, "coverage", self._dims[:2], np.int32)
        if count == 0 and not name:
            self._path, self._count, self._coverage = None, 0, coverage
            return
        path = self._directory / name
        expected = count * self._frame_bytes
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise StateError(f"The median cube {path} cannot be found.") from exc
        if size < expected:
            raise StateError(f"The median cube {path} holds {size} bytes, fewer than {count} frames need.")
        if size > expected:
            os.truncate(path, expected)
        self._path, self._count, self._coverage = path, count, coverage

    def discard(self) -> None:
        """Delete the cube file; the stack is empty afterwards."""
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self._path = None
        self._count = 0
        self._coverage = np.zeros(self._dims[:2], dtype=np.int32)

    def _read_block(self, cube: io.FileIO, view: np.ndarray, y0: int, x0: int) -> None:
        """Fill ``view`` (frames, rows, cols, C) from the cube, starting at row ``y0``, column ``x0``."""
        width, channels = self._dims[1], self._dims[2]
        rows, cols = view.shape[1], view.shape[2]
        pixel = channels * 4
        for k in range(view.shape[0]):
            frame_offset = k * self._frame_bytes
            if cols == width:  # whole rows: one contiguous read per frame
                _read_exact(cube, view[k], frame_offset + y0 * width * pixel)
            else:
                for r in range(rows):
                    _read_exact(cube, view[k, r], frame_offset + ((y0 + r) * width + x0) * pixel)


class MaxStack(_Tally):
    """Per-pixel maximum: star trails when the frames are not aligned (a fixed camera under a turning sky).

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` or ``(H, W, C)``.

    Notes
    -----
    Each channel keeps its own maximum. Weights are checked and ignored (a maximum has no use for them).
    Memory: 4 bytes per pixel and channel, plus the coverage.
    """

    method: str = "max"

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._shape = _check_shape(shape)
        self._dims = _shape3(self._shape)
        self._max = np.full(self._dims, -np.inf, dtype=np.float32)
        self._coverage = np.zeros(self._dims[:2], dtype=np.int32)
        self._count = 0

    def add(self, image: np.ndarray, footprint: np.ndarray, weight: float = 1.0, owned: bool = False) -> None:
        """Fold a frame into the maximum (``weight`` is checked, then ignored).

        Raises
        ------
        ValueError
            If the shapes differ from the stack's or the weight is not positive and finite.
        """
        image3, mask, _ = _check_frame(self._shape, image, footprint, weight)
        _max_add(image3, mask, self._max, self._coverage)
        self._count += 1

    def result(self) -> np.ndarray:
        """The per-pixel maximum, float32, NaN where never covered."""
        covered = (self._coverage > 0)[:, :, None]
        return np.where(covered, self._max, np.float32(np.nan)).reshape(self._shape)

    def state(self) -> dict[str, np.ndarray]:
        """Copies of everything needed to resume."""
        return {
            "method": np.array(self.method),
            "shape": np.array(self._shape, dtype=np.int64),
            "count": np.array(self._count, dtype=np.int64),
            "max": self._max.copy(),
            "coverage": self._coverage.copy(),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Resume from a ``state()`` of a stack of the same method and shape.

        Raises
        ------
        StateError
            If the state is of another method or shape, or misses an array.
        """
        _check_state(state, self.method, self._shape, ("count", "max", "coverage"))
        self._max = _take(state, "max", self._dims, np.float32)
        self._coverage = _take(state, "coverage", self._dims[:2], np.int32)
        self._count = int(state["count"])


class MeanWithoutMaxStack(_Tally):
    """Weighted mean of each pixel's samples without its largest one: one satellite or plane per pixel goes.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` or ``(H, W, C)``.

    Notes
    -----
    Per pixel and channel: the float64 sums of ``weight * value`` and of the weights (as ``MeanStack``), and
    the largest sample with its weight. ``result()`` is ``(sum - w_max * max) / (wsum - w_max)``, which
    removes one outlier per pixel from the first frames on, where kappa-sigma cannot yet judge any; a pixel
    covered by a single frame keeps that frame's value. The cost is a small bias: the mean of the rest is
    lower than the true mean by about ``0.85 sigma / (n - 1)`` for ``n`` samples of Gaussian noise (the
    expected maximum of ``n`` samples is ``~sigma * sqrt(2 ln n)`` above the mean), negligible against
    the sky level once a handful of frames are in.

    Memory: 8 bytes per pixel and channel for the sum, 8 for the maximum and its weight, 12 per pixel.
    """

    method: str = "mean-without-max"

    def __init__(self, shape: tuple[int, ...]) -> None:
        self._shape = _check_shape(shape)
        self._dims = _shape3(self._shape)
        self._sum = np.zeros(self._dims, dtype=np.float64)
        self._weight = np.zeros(self._dims[:2], dtype=np.float64)
        self._top = np.full(self._dims, -np.inf, dtype=np.float32)
        self._top_weight = np.zeros(self._dims, dtype=np.float32)
        self._coverage = np.zeros(self._dims[:2], dtype=np.int32)
        self._count = 0

    @property
    def rejected_fraction(self) -> float:
        """Samples left out (one per pixel covered twice or more) over samples offered."""
        offered = int(self._coverage.sum(dtype=np.int64))
        return int(np.count_nonzero(self._coverage >= 2)) / offered if offered else 0.0

    def add(self, image: np.ndarray, footprint: np.ndarray, weight: float = 1.0,
            owned: bool = False) -> None:
        """Add an aligned frame.

        Raises
        ------
        ValueError
            If the shapes differ from the stack's or the weight is not positive and finite.
        """
        image3, mask, weight = _check_frame(self._shape, image, footprint, weight)
        _mean_top_add(image3, mask, weight, self._sum, self._weight, self._top, self._top_weight,
                      self._coverage)
        self._count += 1

    def result(self) -> np.ndarray:
        """The mean without each pixel's maximum, float32, NaN where never covered."""
        single = (self._coverage == 1)[:, :, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            rest = (self._sum - self._top_weight * self._top.astype(np.float64)) / (
                self._weight[:, :, None] - self._top_weight)
            mean = np.where(single, self._top.astype(np.float64), rest)
        mean[self._coverage == 0] = np.nan
        return mean.astype(np.float32).reshape(self._shape)

    def state(self) -> dict[str, np.ndarray]:
        """Copies of everything needed to resume."""
        return {
            "method": np.array(self.method),
            "shape": np.array(self._shape, dtype=np.int64),
            "count": np.array(self._count, dtype=np.int64),
            "sum": self._sum.copy(),
            "weight": self._weight.copy(),
            "top": self._top.copy(),
            "top_weight": self._top_weight.copy(),
            "coverage": self._coverage.copy(),
        }

    def restore(self, state: dict[str, np.ndarray]) -> None:
        """Resume from a ``state()`` of a stack of the same method and shape.

        Raises
        ------
        StateError
            If the state is of another method or shape, or misses an array.
        """
        _check_state(state, self.method, self._shape,
                     ("count", "sum", "weight", "top", "top_weight", "coverage"))
        self._sum = _take(state, "sum", self._dims, np.float64)
        self._weight = _take(state, "weight", self._dims[:2], np.float64)
        self._top = _take(state, "top", self._dims, np.float32)
        self._top_weight = _take(state, "top_weight", self._dims, np.float32)
        self._coverage = _take(state, "coverage", self._dims[:2], np.int32)
        self._count = int(state["count"])


def make_accumulator(method: str, shape: tuple[int, ...], *, kappa: float = 3.0, warmup: int = 5,
                     directory: str | os.PathLike[str] | None = None) -> Accumulator:
    """Create the accumulator of a stacking method.

    Parameters
    ----------
    method : str
        One of ``METHODS``.
    shape : tuple of int
        ``(H, W)`` or ``(H, W, C)``.
    kappa, warmup
        For ``"kappa-sigma"`` (see ``KappaSigmaStack``).
    directory : str or PathLike, optional
        Where ``"median"`` keeps its cube; required for it.

    Returns
    -------
    Accumulator

    Raises
    ------
    ValueError
        If the method is unknown, or a median has no directory.
    """
    if method == "mean":
        return MeanStack(shape)
    if method == "kappa-sigma":
        return KappaSigmaStack(shape, kappa=kappa, warmup=warmup)
    if method == "median":
        if directory is None:
            raise ValueError("The median stack needs a directory for its frame cube.")
        return MedianStack(shape, directory)
    if method == "max":
        return MaxStack(shape)
    if method == "mean-without-max":
        return MeanWithoutMaxStack(shape)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}.")


# --- checks and small helpers -------------------------------------------------------------------------


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    dims = tuple(int(n) for n in shape)
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise ValueError(f"shape must be (H, W) or (H, W, C) with positive sizes, not {tuple(shape)}.")
    return dims


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return shape[0], shape[1], shape[2] if len(shape) == 3 else 1


def _check_frame(shape: tuple[int, ...], image: np.ndarray, footprint: np.ndarray,
                 weight: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The image as C-contiguous float32 ``(H, W, C)``, the footprint as bool, the weight as float."""
    if image.shape != shape:
        raise ValueError(f"The image is {image.shape} but the stack is {shape}.")
    if footprint.shape != shape[:2]:
        raise ValueError(f"The footprint is {footprint.shape} but the stack's pixels are {shape[:2]}.")
    weight = float(weight)
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a positive number, not {weight}.")
    image3 = np.ascontiguousarray(image, dtype=np.float32).reshape(_shape3(shape))
    return image3, np.ascontiguousarray(footprint, dtype=np.bool_), weight


def _check_state(state: dict[str, np.ndarray], method: str, shape: tuple[int, ...],
                 keys: tuple[str, ...]) -> None:
    if "method" not in state or str(state["method"]) != method:
        raise StateError(f"The state is not of a {method} stack.")
    if "shape" not in state or tuple(int(n) for n in np.asarray(state["shape"])) != shape:
        raise StateError(f"The state's shape does not match this stack's {shape}.")
    missing = [key for key in keys if key not in state]
    if missing:
        raise StateError(f"The {method} state lacks {', '.join(missing)}.")


def _count_type(frames: int) -> type[np.generic]:
    """Kappa-sigma's per-pixel count type for a stack of ``frames`` frames (see ``NARROW_COUNTS``)."""
    return np.uint16 if frames < NARROW_COUNTS else np.int32


def _take(state: dict[str, np.ndarray], key: str, shape: tuple[int, ...],
          dtype: type[np.generic]) -> np.ndarray:
    """A private, writable, C-contiguous copy of ``state[key]``, checked against ``shape``."""
    value = np.asarray(state[key])
    if value.shape != tuple(shape):
        raise StateError(f"The state's {key} is {value.shape}, not {tuple(shape)}.")
    return np.array(value, dtype=dtype, order="C", copy=True)


def _reduced(values: np.ndarray, counts: np.ndarray, step: int, sample: bool, shape: tuple[int, ...],
             into: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> np.ndarray:
    """A float32 stack of ``shape``'s kind from running ``values`` ``(H, W, C)``, covered (and finite)
    where ``counts`` ``(H, W, 1 or C)`` is above zero, NaN elsewhere; ``step``, ``sample`` and ``into``
    (used for the whole stack) as in ``Accumulator.result_later``.

    Block means read each value once and write only the small result: at 26 MP a preview's block means
    take ~10 ms on two cores, where the whole stack takes 30 ms to write (up to ~200 ms of page faults on a
    virtual machine whose memory is handed back between frames).
    """
    if step < 1:
        raise ValueError(f"step must be at least 1, not {step}.")
    if step == 1:
        out = np.empty(shape, dtype=np.float32) if into is None else into(shape)
        if out.shape != tuple(shape) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"into gave a {out.dtype} {out.shape} array for a float32 {shape} stack.")
        _masked(values, counts, out.reshape(values.shape))
        return out
    if sample:
        picked = np.where(counts[::step, ::step] > 0, values[::step, ::step], np.float32(np.nan))
    else:
        height, width, channels = values.shape
        picked = np.empty((-(-height // step), -(-width // step), channels), dtype=np.float32)
        _block_mean(values, counts, step, picked)
    return picked.reshape(picked.shape[:2]) if len(shape) == 2 else picked


def _smaller(image: np.ndarray, step: int, sample: bool) -> np.ndarray:
    """``image`` (a ``result``, NaN where never covered) made ``step`` times smaller (``_reduced``)."""
    if step == 1:
        return image
    planes = image if image.ndim == 3 else image[:, :, np.newaxis]
    finite = np.isfinite(planes).view(np.uint8)
    return _reduced(planes, finite, step, sample, image.shape)


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _noise_floor(variance: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Typical one-frame noise per channel of a warm-up, from each pixel's sample variance.

    The median over pixels of the unbiased sample variance, divided by the median of chi-square over its
    degrees of freedom ``k`` (Wilson-Hilferty: ``(1 - 2 / (9 k))**3``), so that it estimates the variance
    itself; the median ignores stars, trails and cosmic rays, which touch few pixels. Zero when no pixel
    has two samples. ``counts[c, m]`` is the number of pixels with ``m`` samples in channel ``c``, and
    ``variance`` NaN where a pixel has fewer than two.
    """
    channels = variance.shape[2]
    floor = np.zeros(channels, dtype=np.float64)
    for c in range(channels):
        histogram = counts[c, 2:]
        usable = int(histogram.sum())
        if usable == 0:
            continue
        cumulative = np.cumsum(histogram)
        low = int(np.searchsorted(cumulative, (usable - 1) // 2, side="right")) + 2
        high = int(np.searchsorted(cumulative, usable // 2, side="right")) + 2
        dof = (low + high) / 2.0 - 1.0  # the median sample count, as np.median gives it
        chi2_median = (1.0 - 2.0 / (9.0 * dof)) ** 3
        floor[c] = math.sqrt(_median_ignoring_nan(variance[:, :, c], usable) / chi2_median)
    return floor


def _median_ignoring_nan(plane: np.ndarray, usable: int) -> float:
    """``np.nanmedian(plane)`` of a float32 plane with ``usable`` non-NaN values, without sorting it all.

    The median lies, with overwhelming odds, between two order statistics of a strided sample of the plane;
    one parallel pass counts the values below that bracket and in it, a second gathers the few in it, and
    only those are partitioned (17 ms against np.median's 70 ms at 8.3 MP). When the bracket misses (a
    pathological plane), ``np.nanmedian`` decides.
    """
    step = max(1, int(math.sqrt(plane.size / _MEDIAN_SAMPLE)))
    sample = plane[::step, ::step].ravel()
    sample = np.sort(sample[~np.isnan(sample)])  # 50,000 values: a few milliseconds
    first, second = (usable - 1) // 2, usable // 2
    if sample.size < 100:
        return float(np.nanmedian(plane))
    # The median's rank in the sample varies by about sqrt(size) / 2: six of those either side.
    margin = 3.0 * math.sqrt(sample.size) + 2.0
    where = first / usable * sample.size
    low = float(sample[int(where - margin)]) if where - margin >= 0 else -np.inf
    high = float(sample[int(where + margin)]) if where + margin < sample.size else np.inf
    below = np.zeros(plane.shape[0], dtype=np.int64)
    inside = np.zeros(plane.shape[0], dtype=np.int64)
    _count_range(plane, low, high, below, inside)
    start = int(below.sum())
    if not (start <= first and second < start + int(inside.sum())):
        return float(np.nanmedian(plane))
    offsets = np.concatenate(([0], np.cumsum(inside)))
    middle = np.empty(int(offsets[-1]), dtype=np.float32)
    _gather_range(plane, low, high, offsets, middle)
    middle.partition([first - start, second - start])
    # The mean of the two middle values in float32, exactly as np.median computes it.
    return float(np.mean(middle[[first - start, second - start]]))


def _block_shape(count: int, height: int, width: int, channels: int, budget: int) -> tuple[int, int]:
    """Rows and columns of a median block so that ``count`` frames of it fit in ``budget`` bytes.

    Whole rows when at least one fits (one contiguous read per frame), else part of one row.
    """
    row_bytes = count * width * channels * 4
    if row_bytes <= budget:
        return min(height, budget // row_bytes), width
    return 1, max(1, min(width, budget // (count * channels * 4)))


def _read_exact(cube: io.FileIO, target: np.ndarray, offset: int) -> None:
    """Read ``target.nbytes`` at ``offset`` into the contiguous ``target``."""
    memory = target.data.cast("B")
    done = 0
    cube.seek(offset)
    while done < len(memory):
        got = cube.readinto(memory[done:])
        if not got:
            raise StateError("The median cube is shorter than its frame count: it was changed under us.")
        done += got


# --- numba kernels -------------------------------------------------------------------------------------
# Each takes (H, W, C) float32 images and (H, W) bool footprints; "valid" means inside the footprint with
# every channel finite. Per-row counters avoid races between prange workers.


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _masked(values: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out = values`` where ``counts`` (one plane, or one per channel) is above zero, NaN elsewhere."""
    height, width, channels = values.shape
    planes = counts.shape[2]
    for y in numba.prange(height):
        for c in range(channels):
            plane = c if planes > 1 else 0
            for x in range(width):  # unit stride for a mono stack: the compiler vectorises it
                out[y, x, c] = values[y, x, c] if counts[y, x, plane] > 0 else np.float32(np.nan)


@numba.njit(parallel=True, cache=True, fastmath={"reassoc"}, nogil=True)
def _block_mean(values: np.ndarray, counts: np.ndarray, step: int,
                out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i, j, c]``: the mean of ``values[y, x, c]`` over the ``step x step`` block at ``(i, j)``
    where ``counts[y, x, c]`` (or ``counts[y, x, 0]`` for one plane of counts) is above zero; NaN for a
    block with none. One row of blocks per task."""
    height, width, channels = values.shape
    rows, cols = out.shape[0], out.shape[1]
    planes = counts.shape[2]
    for i in numba.prange(rows):
        totals = np.zeros((cols, channels))
        taken = np.zeros((cols, channels), dtype=np.int64)
        # Row after row, each read once from left to right.
        for y in range(i * step, min(i * step + step, height)):
            for c in range(channels):
                plane = c if planes > 1 else 0
                for j in range(cols):
                    total = 0.0
                    count = 0
                    for x in range(j * step, min(j * step + step, width)):
                        if counts[y, x, plane] > 0:
                            total += values[y, x, c]
                            count += 1
                    totals[j, c] += total
                    taken[j, c] += count
        for j in range(cols):
            for c in range(channels):
                out[i, j, c] = np.float32(totals[j, c] / taken[j, c]) if taken[j, c] else np.float32(np.nan)


@numba.njit(cache=True, inline="always", nogil=True)
def _valid(image: np.ndarray, footprint: np.ndarray, y: int, x: int) -> bool:  # pragma: no cover
    if not footprint[y, x]:
        return False
    for c in range(image.shape[2]):  # noqa: SIM110 - numba compiles no generator expressions
        if not np.isfinite(image[y, x, c]):
            return False
    return True


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _mean_add(image: np.ndarray, footprint: np.ndarray, weight: float, mean: np.ndarray,
              weights: np.ndarray, coverage: np.ndarray) -> None:  # pragma: no cover - compiled
    height, width, channels = image.shape
    for y in numba.prange(height):
        for x in range(width):
            if _valid(image, footprint, y, x):
                total = np.float64(weights[y, x]) + weight
                share = weight / total
                for c in range(channels):
                    centre = np.float64(mean[y, x, c])
                    mean[y, x, c] = np.float32(centre + (np.float64(image[y, x, c]) - centre) * share)
                weights[y, x] = np.float32(total)
                coverage[y, x] += 1


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _mean_subtract(image: np.ndarray, footprint: np.ndarray, weight: float, mean: np.ndarray,
                   weights: np.ndarray, coverage: np.ndarray) -> None:  # pragma: no cover - compiled
    height, width, channels = image.shape
    for y in numba.prange(height):
        for x in range(width):
            if _valid(image, footprint, y, x) and coverage[y, x] > 0:
                coverage[y, x] -= 1
                if coverage[y, x] == 0:
                    for c in range(channels):
                        mean[y, x, c] = 0.0
                    weights[y, x] = 0.0
                else:
                    total = np.float64(weights[y, x])
                    rest = total - weight
                    for c in range(channels):
                        moment = total * np.float64(mean[y, x, c]) - weight * np.float64(image[y, x, c])
                        mean[y, x, c] = np.float32(moment / rest)
                    weights[y, x] = np.float32(rest)


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _max_add(image: np.ndarray, footprint: np.ndarray, top: np.ndarray,
             coverage: np.ndarray) -> None:  # pragma: no cover - compiled
    height, width, channels = image.shape
    for y in numba.prange(height):
        for x in range(width):
            if _valid(image, footprint, y, x):
                for c in range(channels):
                    top[y, x, c] = max(top[y, x, c], image[y, x, c])
                coverage[y, x] += 1


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _mean_top_add(image: np.ndarray, footprint: np.ndarray, weight: float, total: np.ndarray,
                  weights: np.ndarray, top: np.ndarray, top_weight: np.ndarray,
                  coverage: np.ndarray) -> None:  # pragma: no cover - compiled
    height, width, channels = image.shape
    for y in numba.prange(height):
        for x in range(width):
            if _valid(image, footprint, y, x):
                for c in range(channels):
                    value = image[y, x, c]
                    total[y, x, c] += weight * np.float64(value)
                    if value > top[y, x, c]:
                        top[y, x, c] = value
                        top_weight[y, x, c] = weight
                weights[y, x] += weight
                coverage[y, x] += 1


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _mask_copy(image: np.ndarray, footprint: np.ndarray, out: np.ndarray,
               coverage: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out`` = image where valid, NaN elsewhere; count the valid pixels into ``coverage``. ``out`` may be
    ``image`` itself (each pixel is read before it is written)."""
    height, width, channels = image.shape
    nan = np.float32(np.nan)
    for y in numba.prange(height):
        for x in range(width):
            if _valid(image, footprint, y, x):
                for c in range(channels):
                    out[y, x, c] = image[y, x, c]
                coverage[y, x] += 1
            else:
                for c in range(channels):
                    out[y, x, c] = nan


def _kappa_add(image: np.ndarray, footprint: np.ndarray, weight: float, kappa: float, min_test: int,
               floor: np.ndarray, mean: np.ndarray, m2: np.ndarray, wsum: np.ndarray, n: np.ndarray,
               coverage: np.ndarray, offered: np.ndarray, rejected: np.ndarray) -> None:
    """One frame into the running moments.

    Mono goes through a 2-D plane kernel: the fused per-pixel loop over a run-time channel count does not
    vectorise and ran 4x slower (29 ms against 7 ms at 8.3 MP). The plane kernel tests the footprint and
    the value itself and counts the coverage in the same pass (a separate validity pass first cost ~40% of
    the mono add). Colour (three channels) goes through ``_kappa_rgb``, which runs the same update over
    each row's samples as one plane (8.3 MP: ~47 ms against ~135 ms for the fused per-pixel loop, which
    does not vectorise); other channel counts keep that loop.
    """
    if image.shape[2] == 3:
        _kappa_rgb(image, footprint, weight, kappa, min_test, floor, mean, m2, wsum, n, coverage, offered,
                   rejected)
        return
    if image.shape[2] > 1:
        _kappa_add_pixels(image, footprint, weight, kappa, min_test, floor, mean, m2, wsum, n, coverage,
                          offered, rejected)
        return
    _kappa_plane(image[:, :, 0], footprint, weight, kappa, min_test, float(floor[0]), mean[:, :, 0],
                 m2[:, :, 0], wsum[:, :, 0], n[:, :, 0], coverage, offered, rejected)


@numba.njit(cache=True, inline="always", nogil=True)
def _kappa_update(value: float, centre: float, m2: float, total: float, accepted: int, weight: float,
                  kappa2: float, floor2: float,
                  min_test: int) -> tuple[bool, float, float, float]:  # pragma: no cover - compiled
    """One sample's test and Welford update, shared by every kappa-sigma kernel: (rejected, mean, M2, weight).

    ``|delta| > kappa * max(sigma, floor)``, squared and without divisions (the hot path); the floor's
    square times the weight sum times ``accepted - 1``, in that order, so every kernel gives the same bits.
    """
    delta = value - centre
    if accepted >= min_test:
        spread = m2 * accepted
        floor_spread = floor2 * total * (accepted - 1)
        if delta * delta * total * (accepted - 1) > kappa2 * max(spread, floor_spread):
            return True, centre, m2, total
    total += weight
    centre += delta * weight / total
    return False, centre, m2 + weight * delta * (value - centre), total


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _kappa_add_pixels(image: np.ndarray, footprint: np.ndarray, weight: float, kappa: float, min_test: int,
               floor: np.ndarray, mean: np.ndarray, m2: np.ndarray, wsum: np.ndarray, n: np.ndarray,
                      coverage: np.ndarray, offered: np.ndarray,
                      rejected: np.ndarray) -> None:  # pragma: no cover - compiled
    height, width, channels = image.shape
    for y in numba.prange(height):
        row_offered = 0
        row_rejected = 0
        for x in range(width):
            if not _valid(image, footprint, y, x):
                continue
            coverage[y, x] += 1
            for c in range(channels):
                accepted = n[y, x, c]
                row_offered += 1
                out, centre, spread, total = _kappa_update(
                    np.float64(image[y, x, c]), np.float64(mean[y, x, c]), np.float64(m2[y, x, c]),
                    np.float64(wsum[y, x, c]), accepted, weight, kappa * kappa, floor[c] * floor[c], min_test)
                if out:
                    row_rejected += 1
                    continue
                m2[y, x, c] = np.float32(spread)
                mean[y, x, c] = np.float32(centre)
                wsum[y, x, c] = np.float32(total)
                n[y, x, c] = accepted + 1
        offered[y] += row_offered
        rejected[y] += row_rejected


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _kappa_rgb(image: np.ndarray, footprint: np.ndarray, weight: float, kappa: float, min_test: int,
               floor: np.ndarray, mean: np.ndarray, m2: np.ndarray, wsum: np.ndarray, n: np.ndarray,
               coverage: np.ndarray, offered: np.ndarray, rejected: np.ndarray) -> None:  # pragma: no cover
    """One RGB frame into the moments: ``_kappa_add_pixels``'s update, sample for sample, two steps a row.

    A pixel's validity (inside the footprint, all three channels finite) is decided first, into one flag
    per sample; then the row's ``3 * W`` interleaved samples are updated as one plane, a loop that
    vectorises like the mono one (the channel only picks the noise floor).
    """
    height, width, _ = image.shape
    samples = width * 3
    kappa2 = kappa * kappa
    floor2 = np.empty(samples, dtype=np.float64)
    for j in range(samples):
        floor2[j] = floor[j % 3] * floor[j % 3]
    flat_image = image.reshape(height, samples)
    flat_mean = mean.reshape(height, samples)
    flat_m2 = m2.reshape(height, samples)
    flat_wsum = wsum.reshape(height, samples)
    flat_n = n.reshape(height, samples)
    for y in numba.prange(height):
        usable = np.empty(samples, dtype=np.bool_)
        for x in range(width):
            valid = (footprint[y, x] and np.isfinite(image[y, x, 0]) and np.isfinite(image[y, x, 1])
                     and np.isfinite(image[y, x, 2]))
            if valid:
                coverage[y, x] += 1
            usable[3 * x] = valid
            usable[3 * x + 1] = valid
            usable[3 * x + 2] = valid
        row_offered = 0
        row_rejected = 0
        for j in range(samples):
            if not usable[j]:
                continue
            accepted = flat_n[y, j]
            row_offered += 1
            out, centre, spread, total = _kappa_update(
                np.float64(flat_image[y, j]), np.float64(flat_mean[y, j]), np.float64(flat_m2[y, j]),
                np.float64(flat_wsum[y, j]), accepted, weight, kappa2, floor2[j], min_test)
            if out:
                row_rejected += 1
                continue
            flat_m2[y, j] = np.float32(spread)
            flat_mean[y, j] = np.float32(centre)
            flat_wsum[y, j] = np.float32(total)
            flat_n[y, j] = accepted + 1
        offered[y] += row_offered
        rejected[y] += row_rejected


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _kappa_plane(image: np.ndarray, footprint: np.ndarray, weight: float, kappa: float, min_test: int,
                 floor: float, mean: np.ndarray, m2: np.ndarray, wsum: np.ndarray, n: np.ndarray,
                 coverage: np.ndarray, offered: np.ndarray,
                 rejected: np.ndarray) -> None:  # pragma: no cover - compiled
    """One mono plane into the moments: pixels inside the footprint with a finite value count into
    ``coverage`` and are offered to the test."""
    height, width = image.shape
    kappa2 = kappa * kappa
    floor2 = floor * floor
    for y in numba.prange(height):
        row_offered = 0
        row_rejected = 0
        for x in range(width):
            value = np.float64(image[y, x])
            if not (footprint[y, x] and np.isfinite(value)):
                continue
            coverage[y, x] += 1
            accepted = n[y, x]
            row_offered += 1
            out, centre, spread, total = _kappa_update(
                value, np.float64(mean[y, x]), np.float64(m2[y, x]), np.float64(wsum[y, x]), accepted, weight,
                kappa2, floor2, min_test)
            if out:
                row_rejected += 1
                continue
            m2[y, x] = np.float32(spread)
            mean[y, x] = np.float32(centre)
            wsum[y, x] = np.float32(total)
            n[y, x] = accepted + 1
        offered[y] += row_offered
        rejected[y] += row_rejected


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _sample_variance(buffer: tuple[np.ndarray, ...], variance: np.ndarray,
                     counts: np.ndarray) -> None:  # pragma: no cover - compiled
    """Unbiased variance of each pixel's non-NaN buffered samples (NaN below two);
    ``counts[y, c, m]`` += pixels of row ``y`` with ``m`` samples in channel ``c``.

    Frame by frame along a row, so that the loops stream the buffer and vectorise; the mean first, then the
    squared deviations (the row stays in cache between the two).
    """
    frames = len(buffer)
    height, width, channels = buffer[0].shape
    for y in numba.prange(height):
        total = np.empty(width, dtype=np.float64)
        spread = np.empty(width, dtype=np.float64)
        count = np.empty(width, dtype=np.int64)
        for c in range(channels):
            total[:] = 0.0
            spread[:] = 0.0
            count[:] = 0
            for f in range(frames):
                plane = buffer[f]
                for x in range(width):
                    value = np.float64(plane[y, x, c])
                    if value == value:  # not NaN
                        total[x] += value
                        count[x] += 1
            for x in range(width):
                if count[x]:
                    total[x] /= count[x]
            for f in range(frames):
                plane = buffer[f]
                for x in range(width):
                    value = np.float64(plane[y, x, c])
                    if value == value:
                        delta = value - total[x]
                        spread[x] += delta * delta
            for x in range(width):
                m = count[x]
                counts[y, c, m] += 1
                variance[y, x, c] = np.float32(spread[x] / (m - 1)) if m >= 2 else np.float32(np.nan)


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _count_range(plane: np.ndarray, low: float, high: float, below: np.ndarray,
                 inside: np.ndarray) -> None:  # pragma: no cover - compiled
    """Per row: values under ``low`` into ``below``, in ``[low, high]`` into ``inside`` (NaN in neither)."""
    height, width = plane.shape
    for y in numba.prange(height):
        under = 0
        within = 0
        for x in range(width):
            value = plane[y, x]
            if value < low:
                under += 1
            elif value <= high:
                within += 1
        below[y] = under
        inside[y] = within


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _gather_range(plane: np.ndarray, low: float, high: float, offsets: np.ndarray,
                  out: np.ndarray) -> None:  # pragma: no cover - compiled
    """The values in ``[low, high]``, row ``y``'s from ``out[offsets[y]]`` on (see ``_count_range``).

    Every value is written to a row scratch and only the cursor's advance depends on it: a branch on
    noise would mispredict at every other pixel (7 ms against 50 ms at 8.3 MP).
    """
    height, width = plane.shape
    for y in numba.prange(height):
        scratch = np.empty(width, dtype=np.float32)
        kept = 0
        for x in range(width):
            value = plane[y, x]
            scratch[kept] = value
            kept += (value >= low) & (value <= high)
        at = offsets[y]
        for j in range(kept):
            out[at + j] = scratch[j]


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _robust_init(buffer: tuple[np.ndarray, ...], weights: np.ndarray, kappa: float, mad_to_sigma: float,
                 min_test: int, floor: np.ndarray, mean: np.ndarray, m2: np.ndarray, wsum: np.ndarray,
                 n: np.ndarray, offered: np.ndarray,
                 rejected: np.ndarray) -> None:  # pragma: no cover - compiled
    """Median/MAD-clip each pixel's buffered samples, then the weighted mean and M2 of the kept ones.

    Row by row: first the weighted moments of every sample and each pixel's reach, the larger of
    (highest - second lowest) and (second highest - lowest): from three samples on the median lies between
    the second lowest and the second highest, so no sample lies further than the reach from it. The limit
    is at least ``kappa * floor``; a pixel with less reach keeps every sample. The others (a few per cent of
    the sky, more on stars) are clipped: median and MAD from sorting their handful of samples (the mean of
    the two middle ones for an even count), then the moments of the kept ones in frame order. The means and
    squared deviations come in two passes (West's running update gives the same to rounding, with a
    division per sample).

    The outputs may be frames of ``buffer`` itself: a pixel's samples are all read before its moments are
    written, and nothing else reads them.
    """
    frames = len(buffer)
    height, width, channels = buffer[0].shape
    for y in numba.prange(height):
        weighted = np.empty(width, dtype=np.float64)
        weight = np.empty(width, dtype=np.float64)
        low = np.empty(width, dtype=np.float64)
        low2 = np.empty(width, dtype=np.float64)
        high = np.empty(width, dtype=np.float64)
        high2 = np.empty(width, dtype=np.float64)
        count = np.empty(width, dtype=np.int64)
        deviations = np.empty(width, dtype=np.float64)
        values = np.empty(frames, dtype=np.float64)
        ranked = np.empty(frames, dtype=np.float64)
        order = np.empty(frames, dtype=np.int64)
        row_offered = 0
        row_rejected = 0
        for c in range(channels):
            weighted[:] = 0.0
            weight[:] = 0.0
            low[:] = np.inf
            low2[:] = np.inf
            high[:] = -np.inf
            high2[:] = -np.inf
            count[:] = 0
            deviations[:] = 0.0
            for f in range(frames):
                w = weights[f]
                plane = buffer[f]
                for x in range(width):
                    value = np.float64(plane[y, x, c])
                    if value == value:  # not NaN
                        weighted[x] += w * value
                        weight[x] += w
                        low2[x] = min(low2[x], max(low[x], value))
                        low[x] = min(low[x], value)
                        high2[x] = max(high2[x], min(high[x], value))
                        high[x] = max(high[x], value)
                        count[x] += 1
            for x in range(width):
                if count[x]:
                    weighted[x] /= weight[x]
            for f in range(frames):
                w = weights[f]
                plane = buffer[f]
                for x in range(width):
                    value = np.float64(plane[y, x, c])
                    if value == value:
                        delta = value - weighted[x]
                        deviations[x] += w * delta * delta
            limit_floor = kappa * floor[c]
            for x in range(width):
                m = count[x]
                row_offered += m
                centre = weighted[x]
                spread = deviations[x]
                total = weight[x]
                reach = max(high[x] - low2[x], high2[x] - low[x])
                if m >= min_test and reach > limit_floor:
                    m = 0
                    for f in range(frames):
                        value = np.float64(buffer[f][y, x, c])
                        if value == value:
                            values[m] = value
                            order[m] = f
                            m += 1
                    _sort_into(values, ranked, m, False, 0.0)
                    median = _sorted_median(ranked, m)
                    _sort_into(values, ranked, m, True, median)
                    limit = kappa * max(mad_to_sigma * _sorted_median(ranked, m), floor[c])
                    kept = 0
                    for j in range(m):
                        if abs(values[j] - median) <= limit:
                            values[kept] = values[j]
                            order[kept] = order[j]
                            kept += 1
                    if kept < m:
                        row_rejected += m - kept
                        m = kept
                        total = 0.0
                        moment = 0.0
                        for j in range(kept):
                            w = weights[order[j]]
                            total += w
                            moment += w * values[j]
                        centre = moment / total if kept else 0.0
                        spread = 0.0
                        for j in range(kept):
                            delta = values[j] - centre
                            spread += weights[order[j]] * delta * delta
                mean[y, x, c] = np.float32(centre)
                m2[y, x, c] = np.float32(spread)
                wsum[y, x, c] = np.float32(total)
                n[y, x, c] = m
        offered[y] += row_offered
        rejected[y] += row_rejected


@numba.njit(cache=True, inline="always", nogil=True)
def _sort_into(values: np.ndarray, ranked: np.ndarray, m: int, deviations: bool,
               centre: float) -> None:  # pragma: no cover - compiled
    """``ranked[:m]`` = ``values[:m]`` sorted, or their distances from ``centre`` sorted (``deviations``).

    Odd-even transposition: ``m`` rounds of min/max exchanges, no data-dependent branch (an insertion sort
    of random noise mispredicts most of its compares, and a warm-up holds only a handful of samples).
    """
    for j in range(m):
        ranked[j] = abs(values[j] - centre) if deviations else values[j]
    for step in range(m):
        for j in range(step % 2, m - 1, 2):
            a = ranked[j]
            b = ranked[j + 1]
            ranked[j] = min(a, b)
            ranked[j + 1] = max(a, b)


@numba.njit(cache=True, inline="always", nogil=True)
def _sorted_median(ranked: np.ndarray, m: int) -> float:  # pragma: no cover - compiled
    half = m // 2
    if m % 2:
        return ranked[half]
    return 0.5 * (ranked[half - 1] + ranked[half])


@numba.njit(parallel=True, cache=True, fastmath=False, nogil=True)
def _nanmedian_block(block: np.ndarray, rows: int, cols: int,
                     out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[y, x, c]`` = median of the non-NaN ``block[:, y, x, c]`` (NaN if none), for the first
    ``rows`` rows and ``cols`` columns."""
    frames = block.shape[0]
    channels = block.shape[3]
    chunks = (cols + _CHUNK_PIXELS - 1) // _CHUNK_PIXELS
    for task in numba.prange(rows * chunks):
        y = task // chunks
        x0 = (task % chunks) * _CHUNK_PIXELS
        scratch = np.empty(frames, dtype=np.float64)
        for x in range(x0, min(x0 + _CHUNK_PIXELS, cols)):
            for c in range(channels):
                m = 0
                for f in range(frames):
                    value = block[f, y, x, c]
                    if not np.isnan(value):
                        scratch[m] = value
                        m += 1
                out[y, x, c] = np.float32(_median(scratch, m)) if m else np.float32(np.nan)


@numba.njit(cache=True, nogil=True)
def _median(values: np.ndarray, m: int) -> float:  # pragma: no cover - compiled
    """Median of ``values[:m]`` (reordered in place); the mean of the two middle values for even ``m``.

    Both middle values are float32 samples, so their float64 mean rounds to the float32 that numpy's
    float32 ``(a + b) / 2`` gives.
    """
    half = m // 2
    upper = _select(values, m, half)
    if m % 2:
        return upper
    lower = values[0]
    for j in range(1, half):  # after selection every value left of `half` is <= upper
        lower = max(lower, values[j])
    return 0.5 * (lower + upper)


@numba.njit(cache=True, nogil=True)
def _select(values: np.ndarray, m: int, k: int) -> float:  # pragma: no cover - compiled
    """Hoare quickselect: reorder ``values[:m]`` so that ``values[k]`` is the k-th smallest; return it."""
    lo = 0
    hi = m - 1
    while lo < hi:
        pivot = values[(lo + hi) // 2]
        i = lo
        j = hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return values[k]
