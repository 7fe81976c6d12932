"""A live camera that delivers the same image again is not delivering images: FAULT, never a verdict.

A V4L2 loopback or GigE bridge whose producer died, or an RTSP decoder repeating its last picture, answers
every grab with success and the same pixels; each "part" was scored on one old picture and passed OK with a
new frame id (probe 35: 196 OK in 10 s from one frozen picture, READY up). A real sensor's noise makes two
frames of even a still scene differ in almost every row, so a frame whose sampled rows equal the previous
frame's, bit for bit, is the same picture delivered again. Flat frames (a capped lens, lights off) are left to
the score: they repeat on a healthy camera, and they carry no part to pass.
"""
from __future__ import annotations

import numpy as np

from edge_runtime.sources.base import SourceError

ROW_STEP = 8          # every 8th row is compared: ~1/8 of a frame's bytes, well under a millisecond at 5 MP
FLAT_SPREAD = 2       # a sample whose pixel values span no more than this is flat: a repeat means nothing


class FrozenFrameCheck:
    """`check(image)`: raise SourceError when `image` repeats the previous frame. Kept across reopen: a device
    that comes back with the same stale picture is still frozen."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._previous: np.ndarray | None = None
        self.repeats = 0

    def check(self, image: np.ndarray) -> None:
        sample = np.ascontiguousarray(image[::ROW_STEP])
        previous, self._previous = self._previous, sample
        if previous is None or previous.shape != sample.shape or not np.array_equal(previous, sample):
            return
        if int(sample.max()) - int(sample.min()) <= FLAT_SPREAD:
            return
        self.repeats += 1
        raise SourceError(f"{self.name}: this frame is the previous one again, bit for bit: the camera delivers no "
                          "new images (a frozen driver or stream, a dead producer behind a loopback device)")
