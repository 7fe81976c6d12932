"""A live camera that delivers a picture it already delivered is not delivering images: FAULT, never a verdict.

A V4L2 loopback or GigE bridge whose producer died, a driver cycling through its last few buffers, or an RTSP
decoder repeating its last picture answers every grab with success; each "part" was scored on one old picture
and passed OK with a new frame id (probe 35: 196 OK in 10 s from one frozen picture, READY up). A real sensor's
noise makes two frames of even a still scene differ somewhere in every row that holds any mid-tone, so a frame
whose sampled rows are, nearly all, bit for bit the rows of one of the last few frames is a picture delivered
again. "Nearly all": a frozen picture under a live overlay (a timestamp) still repeats most rows (probe 36).

Only informative rows count: a row that is flat or clipped throughout (a capped lens, lights off, a backlit
silhouette at 0 and 255) repeats on a healthy camera too (probe 36: a clipped silhouette scene faulted 39 of 40
frames), and a frame with too few informative rows is left to the score.
"""
from __future__ import annotations

import collections

import numpy as np

from edge_runtime.sources.base import SourceError

SAMPLE_ROWS = 64       # rows compared per frame (every h/64th, at least every 8th): well under 1 ms at 5 MP
HISTORY = 4            # a frame is compared with this many before it (drivers cycle through 2-4 buffers)
FLAT_SPREAD = 2        # a row whose values span no more than this carries no noise to tell frames apart
REPEATED_SHARE = 0.9   # this share of the informative rows identical to one earlier frame: the same picture
MIN_INFORMATIVE = 8    # fewer informative rows than this: nothing to judge by
PEEK_ROWS = 8          # rows looked at first: under half of them repeated and the frame is new


class FrozenFrameCheck:
    """`check(image)`: raise SourceError when `image` repeats one of the last HISTORY frames. Kept across
    reopen: a device that comes back with the same stale picture is still frozen."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._history: collections.deque[np.ndarray] = collections.deque(maxlen=HISTORY)
        self.repeats = 0

    def check(self, image: np.ndarray) -> None:
        step = max(8, image.shape[0] // SAMPLE_ROWS)
        sample = np.ascontiguousarray(image[::step]).reshape(len(range(0, image.shape[0], step)), -1)
        earlier = [old for old in self._history if old.shape == sample.shape]
        self._history.append(sample)
        informative = self._informative(sample, image.dtype)
        if int(informative.sum()) < MIN_INFORMATIVE:
            return
        for old in reversed(earlier):
            # A first look at a few rows settles the common case (a new picture differs in nearly every row).
            head = informative[:PEEK_ROWS]
            if head.sum() >= MIN_INFORMATIVE // 2 and \
                    (old[:PEEK_ROWS] == sample[:PEEK_ROWS]).all(axis=1)[head].mean() < 0.5:
                continue
            same = (old == sample).all(axis=1)[informative]
            if same.mean() >= REPEATED_SHARE:
                self.repeats += 1
                raise SourceError(f"{self.name}: this frame repeats an earlier one, bit for bit in "
                                  f"{int(same.sum())} of {len(same)} sampled rows: the camera delivers no new images "
                                  "(a frozen driver or stream, a dead producer behind a loopback device)")

    @staticmethod
    def _informative(sample: np.ndarray, dtype) -> np.ndarray:
        top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else None
        lo, hi = sample.min(axis=1).astype(np.int64), sample.max(axis=1).astype(np.int64)
        rows = hi - lo > FLAT_SPREAD
        if top is not None:   # a row holding nothing but the two clipping levels carries no sensor noise
            candidates = np.flatnonzero(rows & (lo == 0) & (hi == top))
            if len(candidates):
                sub = sample[candidates]
                rows[candidates[((sub == 0) | (sub == top)).all(axis=1)]] = False
        return rows
