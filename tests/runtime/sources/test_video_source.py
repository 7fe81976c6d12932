import time

import cv2
import numpy as np
import pytest

from edge_runtime.schema import ConfigError, convert
from edge_runtime.sources import SourceConfig, SourceError, VideoSource, VideoSourceConfig, build_source
from edge_runtime.sources.video_source import is_stream_url

LEVELS = [0, 60, 120, 180, 240]


@pytest.fixture
def video(tmp_path):
    """A real 5-frame MJPG .avi whose frames are flat grey levels, so frame order is checkable after compression."""
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (32, 24))
    assert writer.isOpened()
    for level in LEVELS:
        writer.write(np.full((24, 32, 3), level, np.uint8))
    writer.release()
    return path


def level(frame) -> int:
    return int(round(float(frame.image.mean())))


def test_file_plays_once_then_is_exhausted(video):
    src = VideoSource(VideoSourceConfig(path=str(video)), start_frame_id=10)
    src.open()
    frames = []
    while (f := src.read(1.0)) is not None:
        frames.append(f)
    assert len(frames) == 5
    for frame, want in zip(frames, LEVELS):
        assert abs(level(frame) - want) <= 3  # MJPG is lossy
    assert [f.frame_id for f in frames] == list(range(10, 15))
    assert frames[0].image.shape == (24, 32, 3) and frames[0].image.dtype == np.uint8
    assert src.exhausted
    assert src.read(1.0) is None


def test_file_loops(video):
    src = build_source(VideoSourceConfig(path=str(video), loop=True))
    src.open()
    frames = [src.read(1.0) for _ in range(12)]
    assert all(f is not None for f in frames)
    assert abs(level(frames[5]) - LEVELS[0]) <= 3 and abs(level(frames[11]) - LEVELS[1]) <= 3
    assert frames[-1].frame_id == 11
    assert not src.exhausted


def test_missing_file_raises_source_error(tmp_path):
    src = VideoSource(VideoSourceConfig(path=str(tmp_path / "none.avi")))
    with pytest.raises(SourceError, match="no such video file"):
        src.open()


def test_not_a_video_raises_source_error(tmp_path):
    bogus = tmp_path / "bogus.avi"
    bogus.write_bytes(b"this is not a video container")
    src = VideoSource(VideoSourceConfig(path=str(bogus)))
    with pytest.raises(SourceError, match="cannot open"):
        src.open()


class StreamCapture:
    def __init__(self, frames):
        self.frames = list(frames)
        self.released = False

    def isOpened(self):
        return True

    def read(self):
        return (True, self.frames.pop(0)) if self.frames else (False, None)

    def release(self):
        self.released = True


def test_stream_failure_raises_and_uses_ffmpeg_timeouts():
    calls = []
    cap = StreamCapture([np.ones((2, 2, 3), np.uint8)])

    def factory(target, api, params):
        calls.append((target, api, params))
        return cap

    src = VideoSource(VideoSourceConfig(path="rtsp://user:pw@10.0.0.5/stream1", open_timeout_s=3, read_timeout_s=2),
                      capture_factory=factory)
    src.open()
    assert calls == [("rtsp://user:pw@10.0.0.5/stream1", cv2.CAP_FFMPEG,
                      [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 3000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 2000])]
    assert src.read(1.0).frame_id == 0
    with pytest.raises(SourceError, match="stream read failed") as err:
        src.read(1.0)
    assert "pw" not in str(err.value) and "pw" not in src.name  # credentials stay out of logs and results
    assert not src.exhausted  # a stream is never "done": the daemon reconnects
    assert cap.released
    cap.frames = [np.full((2, 2, 3), 9, np.uint8)]
    assert src.read(1.0).frame_id == 1  # the retry reconnected through the factory
    assert len(calls) == 2


def test_empty_stream_frame_raises():
    src = VideoSource(VideoSourceConfig(path="http://cam/video"),
                      capture_factory=lambda *a: StreamCapture([np.zeros((0,), np.uint8)]))
    src.open()
    with pytest.raises(SourceError, match="empty frame"):
        src.read(1.0)


def test_config_rules():
    assert is_stream_url("rtsp://x/y") and not is_stream_url("/data/clip.avi")
    cfg = convert({"type": "video", "path": "/data/clip.avi", "loop": True}, SourceConfig, "source")
    assert isinstance(cfg, VideoSourceConfig) and cfg.loop
    with pytest.raises(ConfigError, match="loop"):
        convert({"type": "video", "path": "rtsp://cam/1", "loop": True}, SourceConfig, "source")
    # The blocking open/read of a stream stays below the unit's 10 s watchdog, by default and when set.
    assert VideoSourceConfig(path="rtsp://cam/1").open_timeout_s < 10
    # A station file from before the cap (init wrote 10.0) still loads: capped for a stream, unused for a file.
    assert convert({"type": "video", "path": "rtsp://cam/1", "open_timeout_s": 10}, SourceConfig, "source").open_timeout_s == 8
    assert convert({"type": "video", "path": "/data/clip.avi", "open_timeout_s": 10}, SourceConfig, "source").open_timeout_s == 10
    with pytest.raises(ConfigError, match="open_timeout_s: must be > 0"):
        convert({"type": "video", "path": "rtsp://cam/1", "open_timeout_s": 0}, SourceConfig, "source")


def test_a_stream_that_never_answers_says_it_timed_out():
    class Hung(StreamCapture):
        def isOpened(self):
            return False

    def slow_factory(*_):
        time.sleep(0.12)                      # the open blocked for its whole timeout
        return Hung([])

    src = VideoSource(VideoSourceConfig(path="rtsp://10.0.0.9/s", open_timeout_s=0.1), capture_factory=slow_factory)
    with pytest.raises(SourceError, match="no answer within open_timeout_s 0.1 s"):
        src.open()


def damage_frame(path, index: int) -> None:
    """Zero the index-th JPEG of an MJPG .avi (up to its EOI) so FFmpeg cannot decode that frame."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    end = data.index(b"\xff\xd9", starts[index]) + 2
    data[starts[index]:end] = b"\x00" * (end - starts[index])
    path.write_bytes(bytes(data))


def test_damaged_frame_in_a_file_is_a_fault_not_the_end_of_the_file(video, small_bundle):
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.records import Verdict

    damage_frame(video, 2)
    src = VideoSource(VideoSourceConfig(path=str(video)))
    src.open()
    frames = []
    while (f := src.read(1.0)) is not None:
        frames.append(f)
    # Before: the damaged frame ended the file and frames 3 and 4 were never inspected nor reported.
    assert len(frames) == 5 and [f.frame_id for f in frames] == list(range(5))
    assert frames[2].image is None and "frame 2 (damaged" in frames[2].source
    assert [abs(level(frames[i]) - LEVELS[i]) <= 3 for i in (0, 1, 3, 4)] == [True] * 4
    assert src.damaged_frames == 1
    result = Pipeline(Bundle.load(small_bundle), threads=1).inspect(frames[2])
    assert result.verdict is Verdict.FAULT and "damaged" in result.error


def test_damaged_frames_are_skipped_when_the_station_accepts_them(video):
    damage_frame(video, 2)
    src = VideoSource(VideoSourceConfig(path=str(video), accept_damaged_frames=True))
    src.open()
    frames = []
    while (f := src.read(1.0)) is not None:
        frames.append(f)
    assert [abs(level(f) - want) <= 3 for f, want in zip(frames, [0, 60, 180, 240])] == [True] * 4
    assert len(frames) == 4 and src.damaged_frames == 1


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)


def test_a_frozen_stream_is_a_fault_not_the_same_picture_inspected_again():
    """Probe 61: an MJPEG camera whose encoder stuck kept sending its last picture; every part was answered that
    picture's OK. A stream frame repeating an earlier one bit for bit is a SourceError (the line FAULTs and
    reconnects); a video file replaying a still scene, or a stream set to allow it, is read as it comes."""
    frozen = [_picture(1), _picture(2), _picture(2)]
    src = VideoSource(VideoSourceConfig(path="http://cam/mjpeg"), capture_factory=lambda *a: StreamCapture(frozen))
    src.open()
    assert src.read(1.0) is not None and src.read(1.0) is not None
    with pytest.raises(SourceError, match="repeats an earlier one, bit for bit"):
        src.read(1.0)
    allowed = VideoSource(VideoSourceConfig(path="http://cam/mjpeg", repeated_frames="allow"),
                          capture_factory=lambda *a: StreamCapture([_picture(2)] * 3))
    allowed.open()
    assert all(allowed.read(1.0) is not None for _ in range(3))
    assert VideoSource(VideoSourceConfig(path="clip.mp4")).repeat_check is None      # auto: files replay as they are
    assert VideoSource(VideoSourceConfig(path="clip.mp4", repeated_frames="fault")).repeat_check is not None


def test_stream_latency_is_validated_against_the_line_read_timeout(tmp_path):
    with pytest.raises(ValueError, match="latency_ms: applies only to stream URLs"):
        VideoSourceConfig(path="clip.mp4", latency_ms=100).validate()
    with pytest.raises(ValueError, match="latency_ms: must be 0..5000"):
        VideoSourceConfig(path="rtsp://cam/1", latency_ms=-1).validate()
    from edge_runtime.config import load_station
    station = tmp_path / "station.yaml"
    station.write_text("bundle: b\nsource: {type: video, path: 'rtsp://cam/1', latency_ms: 900}\n")
    with pytest.raises(Exception, match=r"source.latency_ms: 900 ms leaves no time .* raise that to at least 1.15"):
        load_station(station)
    station.write_text("bundle: b\nsource: {type: video, path: 'rtsp://cam/1', latency_ms: 900}\n"
                       "recovery: {read_timeout_s: 1.5}\n")
    assert load_station(station).source.latency_ms == 900


def test_a_frame_cut_mid_data_is_not_delivered_as_the_previous_frames_pixels(tmp_path, caplog):
    """Probe 112: FFmpeg conceals a damaged frame with the previous frame's pixels and OpenCV reports nothing: an
    MJPEG frame cut mid-data came out as its own top over the previous part's bottom, a picture of no part. Corrupt
    packets are dropped (OPENCV_FFMPEG_CAPTURE_OPTIONS fflags;discardcorrupt) and the shortfall is logged."""
    rng = np.random.default_rng(0)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 5, (128, 96))
    frames = [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(5)]
    for f in frames:
        writer.write(f)
    writer.release()
    data = path.read_bytes()
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    assert len(starts) == 5
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[:(starts[3] + starts[4]) // 2])              # frame 4 cut in the middle of its data
    src = VideoSource(VideoSourceConfig(path=str(cut)))
    src.open()
    read = []
    with caplog.at_level("WARNING"):
        while (f := src.read(1.0)) is not None:
            read.append(f.image)
    assert len(read) == 3, "the cut frame is not delivered"
    bottom = [float(np.abs(r[60:].astype(int) - read[2][60:]).mean()) for r in read[:3]]
    assert bottom[2] == 0 and min(bottom[:2]) > 20                    # three distinct pictures, no concealed copy
    assert "frames, 3 were read" in caplog.text
