"""Live camera source through OpenCV (V4L2 on Linux): one decoded BGR frame per read, never a stale one after a trigger.

cv2.VideoCapture sits behind `CaptureFactory` so tests can hand in a fake capture object.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import cv2
import numpy as np

from edge_runtime.records import Frame
from edge_runtime.sources.base import FrameSource, SourceError

log = logging.getLogger(__name__)

BACKENDS = {"any": cv2.CAP_ANY, "v4l2": cv2.CAP_V4L2, "ffmpeg": cv2.CAP_FFMPEG, "gstreamer": cv2.CAP_GSTREAMER}


class CaptureLike(Protocol):
    """The part of cv2.VideoCapture the sources use."""

    def isOpened(self) -> bool: ...
    def set(self, prop: int, value: float) -> bool: ...
    def get(self, prop: int) -> float: ...
    def grab(self) -> bool: ...
    def retrieve(self) -> tuple[bool, Any]: ...
    def read(self) -> tuple[bool, Any]: ...
    def release(self) -> None: ...


# (device index, path or URL; OpenCV backend id; open parameters as [prop, value, ...]) -> capture
CaptureFactory = Callable[[int | str, int, list[int]], CaptureLike]


def open_capture(target: int | str, api_preference: int, params: list[int]) -> CaptureLike:
    """The real factory. Open parameters a backend does not know make OpenCV refuse to open, so pass few."""
    if params:
        return cv2.VideoCapture(target, api_preference, params)
    return cv2.VideoCapture(target, api_preference)


def check_image(image: Any, where: str) -> np.ndarray:
    """An empty or missing frame is a lost camera/stream, not something to inspect."""
    if image is None or not isinstance(image, np.ndarray) or image.size == 0:
        raise SourceError(f"{where}: empty frame")
    return image


@dataclass(kw_only=True)
class CameraSourceConfig:
    type: Literal["camera"] = "camera"
    device: int | str = 0                  # index, or a path such as /dev/video0 or /dev/v4l/by-id/... (stable)
    backend: Literal["any", "v4l2", "gstreamer"] = "any"
    width: int | None = None               # requests; the driver may pick something else (logged)
    height: int | None = None
    fps: float | None = None
    fourcc: str | None = None              # e.g. "MJPG" or "YUYV"
    buffer_size: int = 1                   # CAP_PROP_BUFFERSIZE: keep the driver queue short so frames are fresh
    drain_frames: int = 1                  # buffered frames discarded after a trigger before the real capture
    name: str | None = None

    def validate(self) -> None:
        if isinstance(self.device, int) and self.device < 0:
            raise ValueError(f"device: index must be >= 0, got {self.device}")
        if isinstance(self.device, str) and not self.device.startswith("/dev/"):
            raise ValueError(f"device: expected an index or a /dev/... path, got {self.device!r}")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key}: must be > 0, got {value}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps: must be > 0, got {self.fps}")
        if self.fourcc is not None and len(self.fourcc) != 4:
            raise ValueError(f"fourcc: must be 4 characters, got {self.fourcc!r}")
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size: must be >= 1, got {self.buffer_size}")
        if self.drain_frames < 0:
            raise ValueError(f"drain_frames: must be >= 0, got {self.drain_frames}")


class CameraSource(FrameSource):
    """Free-running reads return the newest frame the driver holds. For triggered capture the daemon calls
    `notify_trigger()` once the trigger fires; the next read then discards what was buffered before it."""

    def __init__(self, cfg: CameraSourceConfig, start_frame_id: int = 0, capture_factory: CaptureFactory | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.name = cfg.name or f"camera:{cfg.device}"
        self._factory = capture_factory or open_capture
        self._cap: CaptureLike | None = None
        self._next_id = start_frame_id
        self._drain_pending = False

    @property
    def next_frame_id(self) -> int:
        return self._next_id

    def open(self) -> None:
        self.close()
        cfg = self.cfg
        try:
            cap = self._factory(cfg.device, BACKENDS[cfg.backend], [])
        except Exception as exc:  # OpenCV raises cv2.error for some bad targets instead of returning closed
            raise SourceError(f"{self.name}: cannot open camera: {exc}") from exc
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"{self.name}: cannot open camera {cfg.device!r}")
        # FOURCC before the size: with V4L2 the pixel format decides which sizes exist.
        requests: list[tuple[str, int, float]] = []
        if cfg.fourcc:
            requests.append(("fourcc", cv2.CAP_PROP_FOURCC, float(cv2.VideoWriter.fourcc(*cfg.fourcc))))
        if cfg.width:
            requests.append(("width", cv2.CAP_PROP_FRAME_WIDTH, float(cfg.width)))
        if cfg.height:
            requests.append(("height", cv2.CAP_PROP_FRAME_HEIGHT, float(cfg.height)))
        if cfg.fps:
            requests.append(("fps", cv2.CAP_PROP_FPS, float(cfg.fps)))
        requests.append(("buffer_size", cv2.CAP_PROP_BUFFERSIZE, float(cfg.buffer_size)))
        for key, prop, value in requests:
            accepted = cap.set(prop, value)
            actual = cap.get(prop)
            if not accepted or actual != value:
                # Not fatal: many drivers round sizes/rates. The log says what the station really runs at.
                log.warning("%s: requested %s=%s, camera reports %s", self.name, key, value, actual)
        self._cap = cap
        self._drain_pending = False

    def notify_trigger(self) -> None:
        """The trigger just fired: the next read must show the part as it is now, not a buffered frame."""
        self._drain_pending = True

    def read(self, timeout: float) -> Frame | None:
        # `timeout` is not enforceable through cv2.VideoCapture; a camera that stops delivering fails grab()
        # after the driver's own timeout, which raises SourceError below.
        if self._cap is None:
            self.open()
        cap = self._cap
        assert cap is not None
        try:
            image = self._grab_and_retrieve(cap)
            image = check_image(image, self.name)
        except SourceError:
            # Drop the broken capture so the next open()/read() starts from a fresh device handle.
            self.close()
            raise
        frame = Frame(frame_id=self._next_id, source=self.name, image=image)
        self._next_id += 1
        return frame

    def _grab_and_retrieve(self, cap: CaptureLike) -> object:
        try:
            if self._drain_pending:
                self._drain_pending = False
                for _ in range(self.cfg.drain_frames):
                    if not cap.grab():
                        raise SourceError(f"{self.name}: grab failed while draining stale frames")
            if not cap.grab():
                raise SourceError(f"{self.name}: grab failed (camera disconnected?)")
            ok, image = cap.retrieve()
        except SourceError:
            raise
        except Exception as exc:  # cv2.error from a dying driver
            raise SourceError(f"{self.name}: read failed: {exc}") from exc
        if not ok:
            raise SourceError(f"{self.name}: retrieve failed")
        return image

    def close(self) -> None:
        if self._cap is not None:
            cap, self._cap = self._cap, None
            try:
                cap.release()
            except Exception as exc:  # releasing a vanished device must not mask the original fault
                log.warning("%s: release failed: %s", self.name, exc)
