"""Video file or network stream source (rtsp://, http://...) through OpenCV's FFmpeg backend.

A file ends (exhausted) or loops; a stream that stops delivering raises SourceError so the daemon reconnects.

A frame of a file that the decoder cannot decode (OpenCV returns no image, then continues with the next frame)
is delivered as a frame without an image, which the pipeline reports as FAULT for that frame, unless the station
file accepts damaged frames (`accept_damaged_frames: true`: skipped, counted and logged). Without this a damaged
frame looked like the end of the file and every later part went uninspected, unreported.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2

from edge_runtime.records import Frame
from edge_runtime.sources.base import SOURCES, FrameSource, SourceError, escape_name
from edge_runtime.sources.camera_source import BACKENDS, CaptureFactory, CaptureLike, check_image, open_capture
from edge_runtime.sources.frozen_frames import FrozenFrameCheck

log = logging.getLogger(__name__)

# FFmpeg conceals a damaged frame with the previous frame's pixels and reports nothing through OpenCV: an MJPEG
# frame cut mid-data came out as its top half over the previous part's bottom half, a picture of no part (probe
# 112). `discardcorrupt` drops a packet the demuxer marks corrupt instead. OpenCV reads this variable at each open;
# options the environment already has (rtsp_transport;tcp) are kept, and so are its own fflags.
_options = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS", "")
if "fflags" not in _options:
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = "|".join(filter(None, [_options, "fflags;discardcorrupt"]))

# Failed reads in a row after which a file is taken to have ended (a damaged run this long ends it, logged).
MAX_DAMAGED_RUN = 30

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_stream_url(path: str) -> bool:
    return bool(_URL.match(path)) and not path.lower().startswith("file://")


STREAM_TIMEOUT_MAX_S = 8.0   # a stream's blocking open/read stays below the unit's 10 s watchdog


@dataclass(kw_only=True)
class VideoSourceConfig:
    type: Literal["video"] = "video"
    path: str                                  # a video file, or a stream URL such as rtsp://camera/stream1
    loop: bool = False                         # files only: start over at the end instead of being exhausted
    backend: Literal["any", "ffmpeg", "gstreamer"] = "any"
    # streams, FFmpeg backend: give up connecting after this long. The call blocks the line's loop, so both stay
    # well below the unit's 10 s watchdog (a hung camera is a FAULT and a reopen, not a killed daemon).
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0                # streams, FFmpeg backend: a stalled stream fails after this long
    accept_damaged_frames: bool = False        # files: skip frames the decoder cannot decode instead of FAULT each
    # A frame the line takes that repeats, bit for bit, one of the last frames it took is a frozen stream (an
    # encoder or relay resending its last picture): FAULT and reconnect, never that picture's verdict again (probe
    # 61: four defective parts passed OK on a frozen MJPEG stream). auto: fault for stream URLs, allow for files.
    # allow: a free-running line on an H.264 stream of a still scene (which can decode to identical frames).
    repeated_frames: Literal["auto", "fault", "allow"] = "auto"
    # Streams on a triggered line: how long a picture takes from the camera's sensor to this station (encoder,
    # network, decoder; an IP camera's RTSP stream is often 100-500 ms behind). The part's frame is the first one
    # received at least this long after the trigger: one received sooner was taken before the trigger, when the
    # part may not have been in place. Measure it: film a running stopwatch and compare with the station's clock.
    latency_ms: float = 0.0
    name: str | None = None

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path: must name a video file or stream URL")
        if self.loop and is_stream_url(self.path):
            raise ValueError("loop: applies only to video files, not stream URLs")
        if not 0 <= self.latency_ms <= 5000:
            raise ValueError(f"latency_ms: must be 0..5000, got {self.latency_ms}")
        if self.latency_ms and not is_stream_url(self.path):
            raise ValueError("latency_ms: applies only to stream URLs, not video files")
        for key in ("open_timeout_s", "read_timeout_s"):
            value = getattr(self, key)
            if not value > 0:
                raise ValueError(f"{key}: must be > 0, got {value}")
            if value > STREAM_TIMEOUT_MAX_S and is_stream_url(self.path):
                # Station files from before this limit (init wrote open_timeout_s: 10.0) still load: capped.
                log.warning("source.%s: %g s is above %g s (the unit's 10 s watchdog would kill a daemon blocked "
                            "that long): using %g s", key, value, STREAM_TIMEOUT_MAX_S, STREAM_TIMEOUT_MAX_S)
                setattr(self, key, STREAM_TIMEOUT_MAX_S)


@SOURCES.register(VideoSourceConfig)
class VideoSource(FrameSource):
    def __init__(self, cfg: VideoSourceConfig, start_frame_id: int = 0, capture_factory: CaptureFactory | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.is_stream = is_stream_url(cfg.path)
        self.name = escape_name(cfg.name or (f"video:{cfg.path}" if not self.is_stream else f"stream:{redact_url(cfg.path)}"))
        self._factory = capture_factory or open_capture
        self._cap: CaptureLike | None = None
        self._next_id = start_frame_id
        self._exhausted = False
        self._frames_since_open = 0
        self._frames_read = 0                  # position in the file, damaged frames included
        self._pending: list[Frame] = []        # read ahead while telling a damaged frame from the end of the file
        self.damaged_frames = 0
        checks = cfg.repeated_frames == "fault" or (cfg.repeated_frames == "auto" and self.is_stream)
        # Kept across reconnects: a stream that comes back with the same stale picture is still frozen.
        self.repeat_check: FrozenFrameCheck | None = FrozenFrameCheck(self.name) if checks else None
        # A capture thread in front (capture_queue.py) checks the frames the line takes instead of every frame
        # read: between two triggers a still scene may decode to identical frames, and those are no part's.
        self.check_repeats_on_read = True
        # Read by a triggered line's capture thread (capture_queue.py): frames received sooner after a trigger were
        # captured before it.
        self.trigger_latency_s = cfg.latency_ms / 1000.0

    @property
    def next_frame_id(self) -> int:
        return self._next_id

    def _params(self) -> list[int]:
        # Only the FFmpeg backend understands these, and OpenCV refuses to open with parameters it does not know.
        if self.is_stream and self.cfg.backend in ("any", "ffmpeg"):
            return [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.cfg.read_timeout_s * 1000),
            ]
        return []

    def open(self) -> None:
        self.close()
        if not self.is_stream and not Path(self.cfg.path).is_file():
            raise SourceError(f"{self.name}: no such video file")
        backend = BACKENDS[self.cfg.backend]
        if self.is_stream and self.cfg.backend == "any":
            backend = cv2.CAP_FFMPEG  # so the timeouts above apply
        t0 = time.monotonic()
        try:
            cap = self._factory(self.cfg.path, backend, self._params())
        except Exception as exc:  # cv2.error for some malformed targets
            raise SourceError(f"{self.name}: cannot open: {exc}") from exc
        if not cap.isOpened():
            cap.release()
            if self.is_stream and time.monotonic() - t0 >= 0.9 * self.cfg.open_timeout_s:
                raise SourceError(f"{self.name}: no answer within open_timeout_s {self.cfg.open_timeout_s:g} s "
                                  "(camera unreachable or not streaming)")
            raise SourceError(f"{self.name}: cannot open (unsupported codec, unreachable stream or not a video)")
        self._cap = cap
        self._exhausted = False
        self._frames_since_open = 0
        self._frames_read = 0
        self._pending.clear()

    def read(self, timeout: float) -> Frame | None:
        try:
            frame = self._read(timeout)
            if frame is not None and frame.image is not None and self.repeat_check is not None \
                    and self.check_repeats_on_read:
                self.repeat_check.check(frame.image)
            return frame
        except SourceError:
            # Drop the broken capture so the next open()/read() reconnects from scratch.
            self.close()
            raise

    def _read(self, timeout: float) -> Frame | None:
        if self._pending:
            return self._pending.pop(0)
        if self._exhausted:
            return None
        if self._cap is None:
            self.open()
        ok, image = self._read_once()
        if not ok and not self.is_stream:
            # One failed read is a damaged frame if a later one succeeds, the end of the file otherwise.
            damaged = 1
            while damaged < MAX_DAMAGED_RUN:
                ok, image = self._read_once()
                if ok:
                    return self._after_damage(damaged, image)
                damaged += 1
            self._frames_read += damaged
        if not ok and not self.is_stream:
            if not self.cfg.loop:
                self._note_missing()
                self._exhausted = True
                self.close()
                return None
            if self._frames_since_open == 0:
                raise SourceError(f"{self.name}: the file has no readable frames")
            # Reopen rather than seek: seeking is unreliable for some containers and codecs.
            self.open()
            ok, image = self._read_once()
            if not ok:
                raise SourceError(f"{self.name}: the file has no readable frames")
        if not ok:
            raise SourceError(f"{self.name}: stream read failed (stream ended or stalled)")
        return self._frame(image)

    def _note_missing(self) -> None:
        """At the end of a file: frames its header counts that were never decoded (dropped as corrupt) are said,
        once. A warning, not FAULT records: some containers only estimate the count (duration x fps)."""
        try:
            count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)) if self._cap is not None else 0
        except Exception:  # noqa: BLE001 - a backend without the property
            return
        read = self._frames_since_open + self.damaged_frames   # delivered, or FAULTed as damaged
        if count > read:
            log.warning("%s: the file's header counts %d frames, %d were read: %d dropped as corrupt or cut "
                        "(no part was inspected for them)", self.name, count, read, count - read)

    def _frame(self, image: object) -> Frame:
        frame = Frame(frame_id=self._next_id, source=self.name, image=check_image(image, self.name))
        self._next_id += 1
        self._frames_since_open += 1
        self._frames_read += 1
        return frame

    def _after_damage(self, damaged: int, image: object) -> Frame:
        """`damaged` frames could not be decoded before `image`: FAULT each (or skip them when accepted)."""
        first = self._frames_read
        self._frames_read += damaged
        self.damaged_frames += damaged
        if self.cfg.accept_damaged_frames:
            log.warning("%s: skipped %d damaged frame(s) at frame %d (accept_damaged_frames)", self.name, damaged, first)
            return self._frame(image)
        # No image: the pipeline reports each as FAULT, with the frame number in its source.
        for k in range(damaged):
            self._pending.append(Frame(frame_id=self._next_id, source=f"{self.name} frame {first + k} (damaged: "
                                                                          "the decoder returned no image)"))
            self._next_id += 1
        self._pending.append(self._frame(image))
        return self._pending.pop(0)

    def _read_once(self) -> tuple[bool, object]:
        assert self._cap is not None
        try:
            ok, image = self._cap.read()
        except Exception as exc:  # cv2.error from a broken stream
            raise SourceError(f"{self.name}: read failed: {exc}") from exc
        if ok and (image is None or getattr(image, "size", 0) == 0):
            raise SourceError(f"{self.name}: empty frame")
        return bool(ok), image

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    def close(self) -> None:
        if self._cap is not None:
            cap, self._cap = self._cap, None
            try:
                cap.release()
            except Exception as exc:
                log.warning("%s: release failed: %s", self.name, exc)


def redact_url(url: str) -> str:
    """Keep camera passwords out of logs, results and metrics: rtsp://user:secret@host -> rtsp://user:***@host."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", url)
