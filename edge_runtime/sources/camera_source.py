"""Live camera source through OpenCV (V4L2 on Linux): one decoded BGR frame per read, never a stale one after a trigger.

cv2.VideoCapture sits behind `CaptureFactory` so tests can hand in a fake capture object. Every driver call
(open, grab, retrieve, release) runs in the capture's own worker thread and is waited for at most
`read_timeout_ms` / `open_timeout_ms`: OpenCV's V4L2 backend waits 10 s for a frame, as long as the unit's
watchdog, so a stalled camera would get the daemon killed instead of the designed FAULT and backoff. A call
that overruns raises SourceError; the handle is abandoned and released by its worker once the driver returns.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import cv2
import numpy as np

from edge_runtime.records import Frame
from edge_runtime.sources.base import SOURCES, FrameSource, SourceError, escape_name
from edge_runtime.sources.frozen_frames import FrozenFrameCheck

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


def camera_node(device: int | str) -> str:
    """The device node a station file's `device` names: an index N is /dev/videoN (V4L2), a path is itself."""
    return f"/dev/video{device}" if isinstance(device, int) else str(device)


def _node_id(node: str, strict: bool = False) -> tuple[int, int] | None:
    """(inode, device number) of the device node, links followed; None when it cannot be read (strict: raise)."""
    try:
        st = os.stat(node)
    except OSError:
        if strict:
            raise
        return None
    return st.st_ino, st.st_rdev


CAMERA_QUEUE_MAX = 32   # VIDEO_MAX_FRAME: the most buffers a V4L2 driver queues


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
    read_timeout_ms: int = 2000            # a frame (drain included) not delivered within this is a stalled camera:
                                           # SourceError -> FAULT and reopen with backoff (below the 10 s watchdog)
    open_timeout_ms: int = 5000            # opening and configuring the device
    # A frame identical to the previous one, bit for bit, is a frozen camera (a sensor's noise never repeats):
    # FAULT and reopen. "allow" only for a loopback device fed by a video stream (a still scene decodes to
    # identical frames there).
    repeated_frames: Literal["fault", "allow"] = "fault"
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
        # V4L2 drivers queue at most 32 buffers; a drain longer than that only makes every part wait (and FAULT
        # past read_timeout_ms) for frames no driver holds.
        if not 1 <= self.buffer_size <= CAMERA_QUEUE_MAX:
            raise ValueError(f"buffer_size: must be 1..{CAMERA_QUEUE_MAX}, got {self.buffer_size}")
        if not 0 <= self.drain_frames <= CAMERA_QUEUE_MAX:
            raise ValueError(f"drain_frames: must be 0..{CAMERA_QUEUE_MAX}, got {self.drain_frames}")
        # Both stay below the unit's WatchdogSec=10 so a stall is reported, not killed.
        if not 1 <= self.read_timeout_ms <= 8000:
            raise ValueError(f"read_timeout_ms: must be 1..8000, got {self.read_timeout_ms}")
        if not 1 <= self.open_timeout_ms <= 8000:
            raise ValueError(f"open_timeout_ms: must be 1..8000, got {self.open_timeout_ms}")


# Handles whose worker is still blocked in the driver after a timeout; no new handle is opened beyond this many.
MAX_STUCK_WORKERS = 2


class CaptureWorker:
    """One thread that makes every call on one capture handle, so the caller can stop waiting for a stalled one.

    `call(fn, timeout_s, what)` returns fn()'s result or raises what fn raised; after `timeout_s` it raises
    SourceError and the worker is abandoned: it finishes the blocked call, runs the cleanup given to
    `abandon()` (releasing the handle) and exits."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False
        self.blocked = False   # a call overran its timeout and may still be inside the driver
        self.thread = threading.Thread(target=self._serve, name=f"capture-{name}", daemon=True)
        self.thread.start()

    def call(self, fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
        if self.abandoned:
            raise SourceError(f"{self.name}: capture handle was abandoned after a stalled call")
        done = threading.Event()
        box: dict[str, Any] = {}
        self._requests.put((fn, done, box))
        if not done.wait(timeout_s):
            self.blocked = True
            raise SourceError(f"{self.name}: {what} did not return within {timeout_s * 1000:.0f} ms (camera stalled)")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def abandon(self, cleanup: Callable[[], None] | None = None) -> None:
        """Stop using this worker: it runs `cleanup` after whatever call it is blocked in, then exits."""
        self.abandoned = True
        if cleanup is not None:
            self._requests.put((cleanup, threading.Event(), {}))
        self._requests.put(None)

    def _serve(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            fn, done, box = item
            try:
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller, who decides
                box["error"] = exc
            finally:
                done.set()


@SOURCES.register(CameraSourceConfig)
class CameraSource(FrameSource):
    """Free-running reads return the newest frame the driver holds. For triggered capture the daemon calls
    `notify_trigger()` once the trigger fires; the next read then discards what was buffered before it."""

    def __init__(self, cfg: CameraSourceConfig, start_frame_id: int = 0, capture_factory: CaptureFactory | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.name = escape_name(cfg.name or f"camera:{cfg.device}")
        self._factory = capture_factory or open_capture
        self._cap: CaptureLike | None = None
        self._worker: CaptureWorker | None = None
        self._stuck: list[CaptureWorker] = []     # abandoned workers, until their blocked call returns
        self._next_id = start_frame_id
        self._frozen = FrozenFrameCheck(self.name)
        self._drain_pending = False
        self._queued = self.cfg.buffer_size   # frames the driver says it queues (read back at open)
        self._node_id: tuple[int, int] | None = None   # (inode, device number) of the node opened (probe)

    @property
    def next_frame_id(self) -> int:
        return self._next_id

    @property
    def stuck_calls(self) -> int:
        """Driver calls that overran their timeout and have not returned yet."""
        self._stuck = [w for w in self._stuck if w.thread.is_alive()]
        return len(self._stuck)

    def open(self) -> None:
        self.close()
        if self.stuck_calls >= MAX_STUCK_WORKERS:
            raise SourceError(f"{self.name}: {self.stuck_calls} earlier camera calls are still blocked in the driver; "
                              "not opening another handle")
        worker = CaptureWorker(self.name)
        opened: list[CaptureLike] = []
        try:
            worker.call(lambda: self._open_in_worker(opened), self.cfg.open_timeout_ms / 1000.0, "opening the camera")
        except BaseException:
            # Release whatever the driver hands back, whenever it does.
            worker.abandon(lambda: [c.release() for c in opened])
            self._stuck.append(worker)
            raise
        self._cap, self._worker = opened[0], worker
        self._drain_pending = False
        self._node_id = _node_id(camera_node(self.cfg.device))

    def _open_in_worker(self, opened: list[CaptureLike]) -> None:
        cfg = self.cfg
        try:
            cap = self._factory(cfg.device, BACKENDS[cfg.backend], [])
        except Exception as exc:  # OpenCV raises cv2.error for some bad targets instead of returning closed
            raise SourceError(f"{self.name}: cannot open camera: {exc}") from exc
        if not cap.isOpened():
            cap.release()
            node = camera_node(cfg.device)
            why = ("no such device" if node.startswith("/dev/") and not os.path.exists(node)
                   else "the device is there but would not open (busy in another program, or no permission: the "
                        "video group)")
            raise SourceError(f"{self.name}: cannot open camera {cfg.device!r} ({node}: {why}); "
                              "`edge-runtime cameras` lists the cameras this machine has")
        opened.append(cap)
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
        # A driver that keeps more buffers than asked (V4L2 often queues 4) holds that many frames taken before a
        # trigger: the drain after a trigger covers every one it reports, so the part is never judged on an
        # older frame. (A driver that hides its queue needs drain_frames set to its depth.)
        reported = cap.get(cv2.CAP_PROP_BUFFERSIZE)
        self._queued = int(reported) if isinstance(reported, (int, float)) and 1 <= reported <= 64 else cfg.buffer_size
        if max(cfg.drain_frames, self._queued) > cfg.drain_frames:
            log.warning("%s: the driver queues %d frames: draining %d after each trigger (drain_frames: %d)",
                        self.name, self._queued, self._queued, cfg.drain_frames)

    def probe(self) -> None:
        """While a triggered line waits: the device node opened is still there and the same device. A USB camera
        unplugged between two parts had left READY up until the next trigger, whose part was then FAULT (probe
        101); replugged, it is a new node, and the handle held is dead."""
        if self._cap is None or self._node_id is None:
            return   # not open, or opened by a node we could not stat (nothing to compare)
        node = camera_node(self.cfg.device)
        try:
            now = _node_id(node, strict=True)
        except OSError as exc:
            raise SourceError(f"{self.name}: the camera is gone ({node}: {exc.strerror or exc}; unplugged?)") from exc
        if now != self._node_id:
            raise SourceError(f"{self.name}: {node} is another device now (the camera was unplugged and plugged "
                              "back while the line waited)")

    def notify_trigger(self, at_wall: float | None = None, at: float | None = None) -> None:
        """The trigger just fired: the next read must show the part as it is now, not a buffered frame."""
        self._drain_pending = True

    def read(self, timeout: float) -> Frame | None:
        # The daemon's `timeout` is how long to wait for a trigger; a camera read is bounded by read_timeout_ms.
        if self._cap is None:
            self.open()
        cap, worker = self._cap, self._worker
        assert cap is not None and worker is not None
        try:
            image = worker.call(lambda: self._grab_and_retrieve(cap), self.cfg.read_timeout_ms / 1000.0,
                                "reading a frame")
            image = check_image(image, self.name)
            if self.cfg.repeated_frames == "fault":
                self._frozen.check(image)
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
                for _ in range(max(self.cfg.drain_frames, self._queued)):
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
        cap, worker = self._cap, self._worker
        self._cap = self._worker = None
        if cap is None or worker is None:
            return

        def release() -> None:
            try:
                cap.release()
            except Exception as exc:  # releasing a vanished device must not mask the original fault
                log.warning("%s: release failed: %s", self.name, exc)

        # Released by the worker, after any call still blocked in the driver; waited for only briefly.
        worker.abandon(release)
        if not worker.blocked:
            worker.thread.join(self.cfg.read_timeout_ms / 1000.0)
        if worker.thread.is_alive():
            self._stuck.append(worker)
            log.warning("%s: camera handle still blocked in the driver; it is released when the call returns", self.name)
