import os

import cv2
import numpy as np
import pytest
from pathlib import Path

from edge_runtime.schema import ConfigError, convert
from edge_runtime.sources import CameraSource, CameraSourceConfig, SourceConfig, SourceError, build_source


class FakeCapture:
    """Behaves like a V4L2 capture whose driver keeps `buffered` old frames: grab() takes the oldest one."""

    def __init__(self, frames=None, opened=True, clamp=None):
        self.frames = list(frames if frames is not None else [])
        self.opened = opened
        self.props: dict[int, float] = {}
        self.clamp = clamp or {}        # prop -> value the "driver" really applies
        self.set_calls: list[int] = []
        self.grabbed = None
        self.grabs = 0
        self.released = False

    def isOpened(self):
        return self.opened

    def set(self, prop, value):
        self.set_calls.append(prop)
        self.props[prop] = self.clamp.get(prop, value)
        return True

    def get(self, prop):
        return self.props.get(prop, 0.0)

    def grab(self):
        self.grabs += 1
        if not self.frames:
            return False
        self.grabbed = self.frames.pop(0)
        return True

    def retrieve(self):
        if self.grabbed is None:
            return False, None
        image, self.grabbed = self.grabbed, None
        return True, image

    def read(self):
        return self.retrieve() if self.grab() else (False, None)

    def release(self):
        self.released = True


def img(value: int) -> np.ndarray:
    return np.full((4, 6, 3), value, np.uint8)


def make(cap: FakeCapture, **cfg):
    opened_with = []

    def factory(target, api, params):
        opened_with.append((target, api, params))
        return cap

    return CameraSource(CameraSourceConfig(**cfg), capture_factory=factory), opened_with


def test_open_requests_format_size_rate_and_a_short_buffer():
    cap = FakeCapture()
    src, opened_with = make(cap, device="/dev/video2", backend="v4l2", width=640, height=480, fps=30, fourcc="MJPG")
    src.open()
    assert opened_with == [("/dev/video2", cv2.CAP_V4L2, [])]
    # fourcc first: with V4L2 the pixel format decides which sizes are possible
    assert cap.set_calls[0] == cv2.CAP_PROP_FOURCC
    assert cap.props[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter.fourcc(*"MJPG")
    assert cap.props[cv2.CAP_PROP_FRAME_WIDTH] == 640
    assert cap.props[cv2.CAP_PROP_FRAME_HEIGHT] == 480
    assert cap.props[cv2.CAP_PROP_FPS] == 30
    assert cap.props[cv2.CAP_PROP_BUFFERSIZE] == 1


def test_driver_rounding_is_logged_not_fatal(caplog):
    cap = FakeCapture(frames=[img(1)], clamp={cv2.CAP_PROP_FRAME_WIDTH: 1280.0})
    src, _ = make(cap, device=0, width=1000)
    src.open()
    assert "camera reports 1280.0" in caplog.text
    assert src.read(1.0).image.shape == (4, 6, 3)


def test_free_run_reads_consecutive_frames_with_ids():
    cap = FakeCapture(frames=[img(1), img(2), img(3)])
    src = CameraSource(CameraSourceConfig(device=0), start_frame_id=100, capture_factory=lambda *a: cap)
    src.open()
    frames = [src.read(1.0) for _ in range(3)]
    assert [int(f.image[0, 0, 0]) for f in frames] == [1, 2, 3]
    assert [f.frame_id for f in frames] == [100, 101, 102]
    assert frames[0].source == "camera:0" and frames[0].encoded is None


def test_trigger_drains_the_stale_buffered_frame():
    # Frame 1 sat in the driver buffer since before the trigger; frame 2 is exposed after it.
    cap = FakeCapture(frames=[img(1), img(2), img(3)])
    src, _ = make(cap, device=0, drain_frames=1)
    src.open()
    src.notify_trigger()
    assert int(src.read(1.0).image[0, 0, 0]) == 2
    assert int(src.read(1.0).image[0, 0, 0]) == 3  # drained only once per trigger


def test_drain_depth_follows_config():
    cap = FakeCapture(frames=[img(1), img(2), img(3), img(4)])
    src, _ = make(cap, device=0, buffer_size=2, drain_frames=2)
    src.open()
    src.notify_trigger()
    assert int(src.read(1.0).image[0, 0, 0]) == 3


def test_a_driver_that_keeps_more_buffers_than_asked_is_drained_to_its_depth(caplog):
    """buffer_size 1 asked, the driver keeps 4 (and says so): the four frames taken before the trigger are all
    discarded, so the part is judged on a frame exposed after it, not on the previous part."""
    import cv2

    cap = FakeCapture(frames=[img(1), img(2), img(3), img(4), img(5)], clamp={cv2.CAP_PROP_BUFFERSIZE: 4.0})
    src, _ = make(cap, device=0, buffer_size=1, drain_frames=1)
    src.open()
    src.notify_trigger()
    assert int(src.read(1.0).image[0, 0, 0]) == 5
    assert "queues 4 frames: draining 4 after each trigger" in caplog.text


def test_cannot_open_raises_source_error_and_releases():
    cap = FakeCapture(opened=False)
    src, _ = make(cap, device=3)
    with pytest.raises(SourceError, match="cannot open camera 3") as err:
        src.open()
    assert cap.released
    if not Path("/dev/video3").exists():
        assert "(/dev/video3: no such device); `edge-runtime cameras` lists the cameras" in str(err.value)
    cap = FakeCapture(opened=False)
    src, _ = make(cap, device="/dev/null")     # there, but not a camera that opens
    with pytest.raises(SourceError, match=r"/dev/null: the device is there but would not open \(busy"):
        src.open()


def test_grab_failure_raises_source_error():
    cap = FakeCapture(frames=[img(1)])
    src, _ = make(cap, device=0)
    src.open()
    src.read(1.0)
    with pytest.raises(SourceError, match="grab failed"):
        src.read(1.0)


def test_read_after_failure_reopens_the_camera():
    caps = [FakeCapture(frames=[img(1)]), FakeCapture(frames=[img(2)])]
    first = caps[0]
    src = CameraSource(CameraSourceConfig(device=0), capture_factory=lambda *a: caps.pop(0))
    src.open()
    src.read(1.0)
    with pytest.raises(SourceError):
        src.read(1.0)
    assert first.released            # the broken handle is not reused
    frame = src.read(1.0)            # the daemon's retry: a fresh capture
    assert int(frame.image[0, 0, 0]) == 2 and frame.frame_id == 1


def test_empty_frame_raises_source_error():
    cap = FakeCapture(frames=[np.zeros((0, 0, 3), np.uint8)])
    src, _ = make(cap, device=0)
    src.open()
    with pytest.raises(SourceError, match="empty frame"):
        src.read(1.0)


def test_cv2_exception_becomes_source_error():
    cap = FakeCapture(frames=[img(1)])

    def broken_grab():
        raise cv2.error("driver died")

    cap.grab = broken_grab
    src, _ = make(cap, device=0)
    src.open()
    with pytest.raises(SourceError, match="driver died"):
        src.read(1.0)


def test_reopen_releases_previous_capture():
    caps = [FakeCapture(frames=[img(1)]), FakeCapture(frames=[img(2)])]
    src = CameraSource(CameraSourceConfig(device=0), capture_factory=lambda *a: caps.pop(0))
    src.open()
    first = src._cap
    src.open()
    assert first.released
    assert int(src.read(1.0).image[0, 0, 0]) == 2
    src.close()
    assert src._cap is None


def test_config_validation_and_build():
    cfg = convert({"type": "camera", "device": "/dev/v4l/by-id/usb-cam", "fourcc": "YUYV"}, SourceConfig, "source")
    assert isinstance(build_source(cfg), CameraSource)
    with pytest.raises(ConfigError, match="fourcc"):
        convert({"type": "camera", "fourcc": "MJPEG"}, SourceConfig, "source")
    with pytest.raises(ConfigError, match="device"):
        convert({"type": "camera", "device": "video0"}, SourceConfig, "source")
    with pytest.raises(ConfigError, match="buffer_size"):
        convert({"type": "camera", "buffer_size": 0}, SourceConfig, "source")


# ---- stalled cameras -----------------------------------------------------------------------------------------

import threading  # noqa: E402


class StallingCapture(FakeCapture):
    """A capture whose grab() blocks, as V4L2 does for 10 s when the camera stops delivering."""

    def __init__(self, frames=None):
        super().__init__(frames)
        self.stall = threading.Event()     # set: grab() blocks until `unblock` is set
        self.unblock = threading.Event()
        self.release_event = threading.Event()

    def grab(self):
        if self.stall.is_set():
            self.unblock.wait(30)
            return False
        return super().grab()

    def release(self):
        super().release()
        self.release_event.set()


def test_stalled_grab_becomes_a_source_error_within_read_timeout_and_the_handle_is_released_later():
    first, second = StallingCapture([img(1)]), StallingCapture([img(2)])
    caps = [first, second]
    src = CameraSource(CameraSourceConfig(read_timeout_ms=200), capture_factory=lambda *a: caps.pop(0))
    assert src.read(1.0).image[0, 0, 0] == 1
    first.stall.set()
    with pytest.raises(SourceError, match=r"camera:0: reading a frame did not return within 200 ms \(camera stalled\)"):
        src.read(1.0)
    # The handle is not released under the driver's feet while grab() is still blocked ...
    assert not first.released and src.stuck_calls == 1
    # ... the next read opens a fresh handle and the line goes on ...
    assert src.read(1.0).image[0, 0, 0] == 2
    # ... and the stalled one is released as soon as the driver lets go.
    first.unblock.set()
    assert first.release_event.wait(10)
    src.close()
    assert second.released


def test_stalled_open_becomes_a_source_error_and_stuck_handles_are_bounded():
    gate = threading.Event()

    def hanging_factory(target, api, params):
        gate.wait(30)
        return FakeCapture([img(3)])

    src = CameraSource(CameraSourceConfig(open_timeout_ms=100), capture_factory=hanging_factory)
    try:
        for _ in range(2):
            with pytest.raises(SourceError, match="opening the camera did not return within 100 ms"):
                src.open()
        # Two handles are still blocked in the driver: no third is opened on top of them.
        with pytest.raises(SourceError, match="2 earlier camera calls are still blocked in the driver"):
            src.open()
    finally:
        gate.set()


def test_read_timeout_is_validated_below_the_watchdog():
    with pytest.raises(ConfigError, match="read_timeout_ms: must be 1..8000, got 10000"):
        convert({"type": "camera", "read_timeout_ms": 10000}, SourceConfig, "source")


def textured(seed: int, shape=(240, 320, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def with_noise(image: np.ndarray, seed: int) -> np.ndarray:
    """The same scene exposed again: sensor noise of +-1 on a tenth of the pixels (every row gets some)."""
    rng = np.random.default_rng(seed)
    noise = (rng.random(image.shape) < 0.1) * rng.choice([-1, 1], image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def reads(frames, **cfg) -> list:
    """What each read gives: the frame, or the SourceError (the source reopens the same device after one)."""
    cap = FakeCapture(frames=list(frames))
    src = CameraSource(CameraSourceConfig(device=0, **cfg), capture_factory=lambda *a: cap)
    out = []
    for _ in frames:
        try:
            out.append(src.read(1.0))
        except SourceError as exc:
            out.append(exc)
    return out


def test_a_frozen_camera_repeating_its_last_picture_is_a_lost_camera_not_a_part():
    """Probe 35: a capture answering every grab with the same picture had 196 parts passed OK in 10 s."""
    still = textured(1)
    cap = FakeCapture(frames=[textured(0), still, still.copy(), textured(2)])
    src = CameraSource(CameraSourceConfig(device=0), capture_factory=lambda *a: cap)
    src.open()
    assert src.read(1.0) is not None and src.read(1.0) is not None
    with pytest.raises(SourceError, match=r"camera:0: this frame repeats an earlier one, bit for bit in 30 of 30"):
        src.read(1.0)
    assert cap.released, "a frozen capture is closed and reopened like a lost one"


def test_a_still_scene_on_a_live_sensor_is_new_frames_a_frozen_one_is_not_even_after_a_reopen():
    scene = textured(3)
    got = reads([with_noise(scene, i) for i in range(6)])
    assert all(not isinstance(r, SourceError) for r in got), "sensor noise in every row: new pictures"
    caps = [FakeCapture(frames=[scene]), FakeCapture(frames=[scene.copy()])]
    src = CameraSource(CameraSourceConfig(device=0), capture_factory=lambda *a: caps.pop(0))
    src.open()
    src.read(1.0)
    src.close()
    src.open()
    with pytest.raises(SourceError, match="repeats an earlier one"):
        src.read(1.0)


def test_a_driver_cycling_through_its_buffers_and_a_frozen_picture_under_a_live_overlay_are_frozen():
    """Probe 36: a frozen driver cycling through 2-4 buffers, and a frozen picture whose timestamp overlay still
    changes, had passed the check (it compared one frame back, every row)."""
    a, b, c = textured(4), textured(5), textured(6)
    cycling = reads([a, b, c, a.copy(), b.copy()])
    assert [isinstance(r, SourceError) for r in cycling] == [False, False, False, True, True]
    frozen = textured(7)
    overlaid = []
    for i in range(3):
        frame = frozen.copy()
        frame[:48] = textured(100 + i)[:48]          # a live overlay over the top fifth (probe 38: 10% passed)
        overlaid.append(frame)
    assert [isinstance(r, SourceError) for r in reads(overlaid)] == [False, True, True]
    six = [textured(20 + i) for i in range(6)]       # probe 38: five or more buffers passed a 4-frame history
    assert [isinstance(r, SourceError) for r in reads(six + [f.copy() for f in six])] == [False] * 6 + [True] * 6


def test_flat_and_clipped_scenes_and_allowed_repeats_are_delivered():
    """A capped lens or lights off, and a backlit silhouette clipped to 0 and 255, repeat on a healthy camera
    (probe 36: a clipped silhouette scene faulted 39 of 40 frames); a loopback device fed by a stream repeats
    on a still scene: `repeated_frames: allow`."""
    flat = np.full((240, 320, 3), 17, np.uint8)
    silhouette = np.zeros((240, 320, 3), np.uint8)
    silhouette[:, 100:220] = 255
    mono12 = np.zeros((240, 320), np.uint16)          # probe 38: a 12-bit camera clips at 4095, not 65535
    mono12[:, 100:220] = 4095
    for frames in ([flat] * 3, [silhouette] * 3, [mono12] * 3, [mono12 << 4] * 3):
        assert all(not isinstance(r, SourceError) for r in reads(frames))
    still = textured(8)
    assert all(not isinstance(r, SourceError) for r in reads([still] * 3, repeated_frames="allow"))


@pytest.fixture
def device_node():
    """A stand-in for a camera's /dev node (CameraSourceConfig wants a /dev path): a file in /dev/shm."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        pytest.skip("no writable /dev/shm")
    node = shm / f"edge-runtime-test-video-{os.getpid()}"
    node.touch()
    yield node
    node.unlink(missing_ok=True)


def test_a_camera_unplugged_or_replaced_while_the_line_waits_is_lost_at_the_probe(device_node):
    """Probe 101: a USB camera unplugged while a triggered line waited left READY up until the next trigger (the
    open handle reports nothing until it is read); the line probes its source while it waits."""
    src = CameraSource(CameraSourceConfig(device=str(device_node)), capture_factory=lambda *a: FakeCapture())
    src.open()
    src.probe()                                     # there: nothing to say
    device_node.unlink()
    with pytest.raises(SourceError, match="the camera is gone"):
        src.probe()
    device_node.touch()                             # plugged back: a new node, while the handle is the old device's
    with pytest.raises(SourceError, match="is another device now"):
        src.probe()
    src.close()
    src.open()
    src.probe()                                     # reopened on the device there now


def test_a_camera_whose_node_cannot_be_read_at_open_is_not_probed():
    src = CameraSource(CameraSourceConfig(device=7), capture_factory=lambda *a: FakeCapture())
    src.open()                                      # /dev/video7 is not there: a fake capture opened anyway
    src.probe()
