"""The capture thread's one-slot queue: newest frame wins and each dropped frame is counted (live sources), replays
lose nothing, a lost camera still reaches the line as a SourceError, and a triggered line gets no queue."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_runtime.capture_queue import CaptureConfig, CaptureQueue, wrap_source
from edge_runtime.records import Frame
from edge_runtime.sources import SourceError
from doubles import ScriptedSource
from edge_runtime.sources.base import FrameSource


class LiveCounter(FrameSource):
    """A live test source: frame i every `period_s`, `n` frames, then exhausted; `fail_after` raises instead."""

    live = True

    def __init__(self, n: int, period_s: float = 0.0005, fail_after: int | None = None) -> None:
        self.n, self.period_s, self.fail_after = n, period_s, fail_after
        self.i = 0
        self.name = "live"

    def read(self, timeout: float) -> Frame | None:
        if self.fail_after is not None and self.i >= self.fail_after:
            raise SourceError("camera unplugged")
        if self.i >= self.n:
            return None
        time.sleep(self.period_s)
        self.i += 1
        return Frame(frame_id=self.i - 1, source="live", image=np.zeros((4, 4), np.uint8))

    @property
    def exhausted(self) -> bool:
        return self.i >= self.n


def drain(q: CaptureQueue, slow_s: float) -> list[int]:
    taken = []
    while True:
        frame = q.read(1.0)
        if frame is None:
            if q.exhausted:
                return taken
            continue
        taken.append(frame.frame_id)
        time.sleep(slow_s)


def test_drop_mode_newest_wins_and_every_frame_is_inspected_or_counted():
    q = CaptureQueue(LiveCounter(300), drop=True)
    q.open()
    taken = drain(q, slow_s=0.003)   # the reader is ~6x slower than the camera
    q.close()
    assert q.dropped > 0 and len(taken) + q.dropped == 300
    assert taken == sorted(taken) and taken[-1] == 299, "frames keep their order and the newest one wins"
    assert q.take_dropped() == q.dropped and q.take_dropped() == 0


def test_wait_mode_loses_nothing():
    q = CaptureQueue(LiveCounter(100), drop=False)
    q.open()
    taken = drain(q, slow_s=0.001)
    q.close()
    assert taken == list(range(100)) and q.dropped == 0


def test_lost_camera_reaches_the_reader_after_the_frames_before_it():
    q = CaptureQueue(LiveCounter(100, fail_after=3), drop=False)
    q.open()
    got = [q.read(1.0).frame_id for _ in range(3)]
    with pytest.raises(SourceError, match="camera unplugged"):
        q.read(1.0)
    q.close()
    assert got == [0, 1, 2]


def test_reopen_after_close_restarts_the_thread():
    src = LiveCounter(10)
    q = CaptureQueue(src, drop=False)
    q.open()
    assert q.read(1.0).frame_id == 0
    q.close()
    assert not [t for t in threading.enumerate() if t.name == "capture:live"]
    q.open()
    assert q.read(1.0) is not None
    q.close()


def test_who_gets_a_capture_thread():
    live, replay = LiveCounter(1), ScriptedSource(steps=[b"x"])
    auto = CaptureConfig()
    assert isinstance(wrap_source(live, auto, free_run=True), CaptureQueue)
    assert wrap_source(live, auto, free_run=True).drop is True
    assert wrap_source(replay, auto, free_run=True) is replay, "a replay is read directly unless asked"
    forced = wrap_source(replay, CaptureConfig(thread="on"), free_run=True)
    assert isinstance(forced, CaptureQueue) and forced.drop is False, "a replay behind a thread waits, never drops"
    assert wrap_source(live, auto, free_run=False) is live, "a triggered line reads the trigger's own frame"
    assert wrap_source(live, CaptureConfig(thread="off"), free_run=True) is live
