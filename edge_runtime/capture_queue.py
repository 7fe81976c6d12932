"""A capture thread with a one-slot queue in front of a free-running source, so capture overlaps inspection.

The thread reads the source continuously; the line takes the newest frame. With `when_full: drop` (live cameras
and streams) a frame the line did not take before the next one arrived is replaced, and every such frame is
counted (`dropped`): a free-running camera gets each frame inspected or its loss reported. With `wait` (replayed
folders and files) the thread waits for the slot instead, so a replay loses nothing. Source errors raised in
the thread reach the line at its next read, in order, so a lost camera still faults the line (not-OK outputs).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

from edge_runtime.records import Frame
from edge_runtime.sources.base import FrameSource, SourceError

log = logging.getLogger(__name__)

__all__ = ["CaptureConfig", "CaptureQueue", "is_live", "wrap_source"]


@dataclass(kw_only=True)
class CaptureConfig:
    """Station-file `capture:` section (or per line): how frames get from a free-running source to inspection."""

    # auto: a capture thread for live sources (camera, stream, paced replay) in free-run mode; on: for every
    # free-running source but a watch folder (its journal needs the line's own reads); off: the line reads the source itself between inspections (capture does not overlap).
    # A triggered line gets one only for a live source that cannot drop its buffered frames (a stream): see
    # wrap_source. Otherwise the frame read after the trigger is the part's frame.
    thread: Literal["auto", "on", "off"] = "auto"
    # What the thread does when the line has not taken the previous frame yet. auto: drop for live sources
    # (the newest frame wins, each replaced frame counted as dropped), wait for replays (nothing is lost).
    when_full: Literal["auto", "drop", "wait"] = "auto"
    # true: every frame is a part (a camera hardware-triggered by a photo-eye), so each frame dropped before
    # inspection is answered FAULT with its own id and record, in capture order; false: frames of a free-running
    # camera are samples, and drops are counted (edge_dropped_frames_total).
    every_frame_is_a_part: bool = False

    def validate(self) -> None:
        pass  # both fields are Literals: the schema has checked them


def is_live(source: FrameSource) -> bool:
    """A source whose frames come at their own pace whether or not anyone reads them (a camera, a stream)."""
    live = getattr(source, "live", None)
    if live is not None:
        return bool(live)
    from edge_runtime.sources.camera_source import CameraSource
    from edge_runtime.sources.video_source import VideoSource

    return isinstance(source, CameraSource) or (isinstance(source, VideoSource) and source.is_stream)


def wrap_source(source: FrameSource, cfg: CaptureConfig, free_run: bool) -> FrameSource:
    """The source behind a capture thread when `cfg` asks for one, else the source itself.

    A triggered line reads the source itself, except a live source that cannot drop what it buffered before a
    trigger (a network stream: FFmpeg and the socket hold every frame sent while the line waited, and a read after
    the trigger returned the oldest of them, seconds old, the previous part's picture). Such a source is read
    continuously by a thread that keeps only the newest frame, and the line takes the first frame that arrived
    after the trigger (`CaptureQueue.notify_trigger`), whatever `capture.thread` says: this is not a throughput
    option but the part's own frame. A camera drops its buffered frames itself (`notify_trigger`)."""
    if isinstance(source, CaptureQueue):
        return source
    if not free_run:
        if is_live(source) and not callable(getattr(source, "notify_trigger", None)):
            return CaptureQueue(source, drop=True, fresh_after_trigger=True)
        return source
    if cfg.thread == "off":
        return source
    if getattr(source, "acknowledges_reads", False):
        # A watch folder journals a file as done when the line comes back for the next one. A thread reads ahead:
        # files in its hands at a stop or crash were journaled and never inspected (probe 72: 2 of 60 parts lost
        # per SIGTERM, no record, no count). Such a source is read by the line itself.
        log.warning("%s: capture.thread: on does not apply to a watch folder (a file is journaled as done when "
                    "the next one is read): the line reads it itself", source.name)
        return source
    live = is_live(source)
    if cfg.thread == "auto" and not live:
        return source
    drop = cfg.when_full == "drop" or (cfg.when_full == "auto" and live)
    return CaptureQueue(source, drop=drop)


class CaptureQueue(FrameSource):
    """`source` read by its own thread into a one-slot queue. Same interface as a FrameSource.

    `dropped`: frames replaced in the slot before the line took them (drop mode), plus what the source itself
    reports as missed (`missed`, e.g. a paced replay that ticked while nobody read). `take_dropped()` returns
    the count since its last call (the line logs it against the next part)."""

    def __init__(self, source: FrameSource, *, drop: bool, read_timeout_s: float = 0.5,
                 fresh_after_trigger: bool = False) -> None:
        self.source = source
        self.drop = drop
        # Triggered line (wrap_source): frames replaced while no trigger waits are not parts, so not counted as
        # dropped, and a read after notify_trigger() returns only a frame the thread got after the trigger.
        self.fresh_after_trigger = fresh_after_trigger
        self._not_before: float | None = None   # time.monotonic() of the trigger being served
        self._slot_at = 0.0                      # when the thread got the frame in the slot (time.monotonic())
        self.name = source.name
        self._read_timeout_s = read_timeout_s
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._error: BaseException | None = None
        self._done = False                   # the thread has stopped (error, exhausted, or close)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue_dropped = 0
        self._reported = 0
        self.captured = 0                    # frames the thread got from the source
        # A source that refuses repeated pictures (a stream: VideoSource.repeat_check) is checked here, on the
        # frames the line takes: frames read while the line waits for a trigger are no part's, and a still scene
        # may decode to identical ones.
        self._repeat_check = getattr(source, "repeat_check", None)
        if self._repeat_check is not None:
            source.check_repeats_on_read = False

    # passthrough for what the line reads from its source (skipped files, next_frame_id, read_calls, ...)
    def __getattr__(self, name: str):
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    @property
    def dropped(self) -> int:
        if self.fresh_after_trigger:
            # Triggered: frames the source missed between triggers were no part's, like those replaced in the slot
            # (probe 72: a triggered paced line reported edge_dropped_frames_total 13 with every trigger answered).
            return self._queue_dropped
        return self._queue_dropped + int(getattr(self.source, "missed", 0) or 0)

    def take_dropped(self) -> int:
        total = self.dropped
        new, self._reported = total - self._reported, total
        return new

    def open(self) -> None:
        self.source.open()
        with self._cond:
            self._slot, self._error, self._done = None, None, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"capture:{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.source.read(self._read_timeout_s)
                if frame is None:
                    if self.source.exhausted:
                        return
                    continue
                got_at = time.monotonic()
                if frame.captured_mono is None or frame.captured_mono > got_at:
                    frame.captured_mono = got_at   # the line's deadline: a wall clock stepped back must not renew it
                with self._cond:
                    self.captured += 1
                    if self._slot is not None:
                        if self.drop:
                            if not self.fresh_after_trigger:
                                self._queue_dropped += 1   # the newest frame wins; the replaced one is counted
                        else:
                            self._cond.wait_for(lambda: self._slot is None or self._stop.is_set())
                            if self._stop.is_set():
                                self._queue_dropped += 1   # read from the source, never inspected: counted
                                return
                    self._slot, self._slot_at = frame, got_at
                    self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the line, which faults and reopens
            with self._cond:
                self._error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def probe(self) -> None:
        probe = getattr(self.source, "probe", None)   # the thread's errors reach the line through read()
        if callable(probe):
            probe()

    def notify_trigger(self, at_wall: float | None = None, at: float | None = None) -> None:
        """A trigger fired at `at` (time.monotonic(); default now): the next read returns a frame the thread got
        after it, never one buffered or taken while the line waited for the trigger."""
        # A stream's pictures arrive trigger_latency_s after the sensor took them (VideoSourceConfig.latency_ms).
        latency = float(getattr(self.source, "trigger_latency_s", 0.0) or 0.0)
        with self._cond:
            self._not_before = (time.monotonic() if at is None else at) + latency

    def _fresh(self) -> bool:
        """The slot holds a frame the line may take (caller holds _cond); a stale one is discarded."""
        if self._slot is None:
            return False
        if self._not_before is not None and self._slot_at < self._not_before:
            self._slot = None
            self._cond.notify_all()
            return False
        return True

    def read(self, timeout: float) -> Frame | None:
        with self._cond:
            self._cond.wait_for(lambda: self._fresh() or self._done, timeout)
            frame, self._slot = (self._slot, None) if self._fresh() else (None, None)
            if frame is not None:
                self._cond.notify_all()       # a waiting replay thread may put the next one
        if frame is not None:
            if self._repeat_check is not None and frame.image is not None:
                self._repeat_check.check(frame.image)   # SourceError: the line FAULTs and reconnects
            return frame
        with self._cond:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._done and not self.source.exhausted and not self._stop.is_set():
                raise SourceError(f"{self.name}: capture thread stopped")
            return None

    @property
    def exhausted(self) -> bool:
        with self._cond:
            return self._done and self._slot is None and self._error is None and self.source.exhausted

    def stop_capture(self) -> None:
        """Stop the thread; a frame it got that the line did not take is counted as dropped (take_dropped), never
        discarded unseen (probe 72: the frame in the slot at a stop had no record and no count)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            # The thread is at most one source read away from seeing the stop (read timeout bounds it).
            thread.join(self._read_timeout_s + 5.0)
            if thread.is_alive():
                log.error("%s: capture thread did not stop within %.1f s", self.name, self._read_timeout_s + 5.0)
        with self._cond:
            if self._slot is not None and not self.fresh_after_trigger:   # triggered: frames between parts
                self._queue_dropped += 1
            self._slot = None

    def close(self) -> None:
        self.stop_capture()
        self.source.close()
