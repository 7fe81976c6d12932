"""A live camera that delivers a picture it already delivered is not delivering images: FAULT, never a verdict.

A V4L2 loopback or GigE bridge whose producer died, a driver cycling through its last few buffers, or an RTSP
decoder repeating its last picture answers every grab with success; each "part" was scored on one old picture
and passed OK with a new frame id (probe 35: 196 OK in 10 s from one frozen picture, READY up). A real sensor's
noise makes two frames of even a still scene differ somewhere in every row that holds any mid-tone, so a frame
whose sampled rows are, mostly, bit for bit the rows of one of the last eight frames is a picture delivered
again. "Mostly" (three quarters): a frozen picture under a live overlay still repeats most rows (probes 36, 38).

Only informative rows count: a row that is flat or clipped throughout (a capped lens, lights off, a backlit
silhouette at 0 and 255) repeats on a healthy camera too (probe 36: a clipped silhouette scene faulted 39 of 40
frames), and a frame with too few informative rows is left to the score.
"""
from __future__ import annotations

import collections

import numpy as np

from edge_runtime.sources.base import SourceError

SAMPLE_ROWS = 64       # rows compared per frame (every h/64th, at least every 8th): well under 1 ms at 5 MP
HISTORY = 8            # a frame is compared with this many before it (drivers cycle through a few buffers)
FLAT_SPREAD = 2        # a row whose values span no more than this carries no noise to tell frames apart
# This share of the informative rows identical to one earlier frame: the same picture (a live sensor repeats
# none of them; an overlay over a frozen picture changes a few).
REPEATED_SHARE = 0.75
MIN_INFORMATIVE = 8    # fewer informative rows than this: nothing to judge by
PEEK_ROWS = 8          # rows looked at first: under half of the informative ones repeated and the frame is new


class FrozenFrameCheck:
    """`check(image)`: raise SourceError when `image` repeats one of the last HISTORY frames. Kept across
    reopen: a device that comes back with the same stale picture is still frozen."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._history: collections.deque[np.ndarray] = collections.deque(maxlen=HISTORY)

    def check(self, image: np.ndarray) -> None:
        step = max(8, image.shape[0] // SAMPLE_ROWS)
        rows = image[::step]
        sample = np.ascontiguousarray(rows).reshape(rows.shape[0], -1)
        earlier = [old for old in self._history if old.shape == sample.shape]
        self._history.append(sample)
        informative = self._informative(sample)
        if int(informative.sum()) < MIN_INFORMATIVE:
            return
        # A first look at a few rows spread over the frame settles the common case (a new picture differs in
        # nearly every row); spread, so an overlay along one edge cannot decide it.
        peek = np.unique(np.linspace(0, len(sample) - 1, PEEK_ROWS).astype(int))
        peek = peek[informative[peek]]
        for old in reversed(earlier):
            if len(peek) >= MIN_INFORMATIVE // 2 and (old[peek] == sample[peek]).all(axis=1).mean() < 0.5:
                continue
            same = (old == sample).all(axis=1)[informative]
            if same.mean() >= REPEATED_SHARE:
                raise SourceError(f"{self.name}: this frame repeats an earlier one, bit for bit in "
                                  f"{int(same.sum())} of {len(same)} sampled rows: the camera delivers no new images "
                                  "(a frozen driver or stream, a dead producer behind a loopback device)")

    @staticmethod
    def _informative(sample: np.ndarray) -> np.ndarray:
        lo, hi = sample.min(axis=1).astype(np.int64), sample.max(axis=1).astype(np.int64)
        rows = hi - lo > FLAT_SPREAD
        # A row holding nothing but the frame's darkest and brightest levels carries no sensor noise: clipped
        # (the levels are the frame's own: a 12-bit camera in uint16 clips at 4095 or 65520, not 65535; a black
        # level may sit above 0; probe 38).
        bottom, top = int(lo.min()), int(hi.max())
        candidates = np.flatnonzero(rows & (lo == bottom) & (hi == top))
        if len(candidates):
            sub = sample[candidates]
            rows[candidates[((sub == bottom) | (sub == top)).all(axis=1)]] = False
        return rows
