"""area_resize.inter_area: cv2.INTER_AREA on two threads, pixel for pixel the same as one call."""
import os
import signal
import threading
import time

import cv2
import numpy as np
import pytest

from edge_runtime import area_resize
from edge_runtime.area_resize import SPLIT_MIN_PIXELS, _split_at, inter_area


@pytest.mark.parametrize("in_hw, out_wh", [((384, 384), (256, 256)), ((900, 900), (256, 256)),
                                           ((1024, 1280), (320, 256)), ((600, 800), (256, 192)),
                                           ((2048, 2448), (304, 256)), ((450, 700), (224, 144)),
                                           ((512, 640), (256, 208))])      # rows 512 / 208 inexact: columns
def test_area_resample_on_two_threads_is_bit_identical_to_one_inter_area(in_hw, out_wh):
    """The geometry stage's INTER_AREA runs its top and bottom halves on two threads where that is exact: every
    pixel must equal one cv2.resize (the score definition pins cv2.INTER_AREA)."""
    assert in_hw[0] * in_hw[1] >= SPLIT_MIN_PIXELS                                     # the split runs:
    assert _split_at(in_hw[0], out_wh[1]) is not None or _split_at(in_hw[1], out_wh[0]) is not None
    rng = np.random.default_rng(in_hw[0])
    for image in (rng.integers(0, 256, in_hw + (3,), dtype=np.uint8),            # noise: every rounding exercised
                  np.tile((np.arange(in_hw[1]) % 2 * 255).astype(np.uint8), (in_hw[0], 1)),   # 1-px stripes, gray
                  cv2.GaussianBlur(rng.integers(0, 256, in_hw + (3,), dtype=np.uint8), (5, 5), 2)):
        assert np.array_equal(inter_area(image, out_wh), cv2.resize(image, out_wh, interpolation=cv2.INTER_AREA))


def test_area_resample_splits_only_where_opencv_scale_is_the_exact_ratio():
    assert _split_at(384, 256) == 128 and _split_at(600, 192) == 96        # 1.5, 3.125: exact in binary
    assert _split_at(900, 256) == 128                                        # 3.515625: rows 0-449 | 450-899
    assert _split_at(874, 272) is None and _split_at(580, 272) is None      # x / 17: not a binary fraction
    assert _split_at(257, 256) is None                                       # 1 / (256 / 257) is not 257 / 256
    assert _split_at(200, 256) is None                                       # an enlargement: not the area path


def test_area_resample_works_in_a_forked_child_after_the_parent_used_its_helper_thread():
    image = np.random.default_rng(3).integers(0, 256, (384, 384, 3), dtype=np.uint8)
    expected = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.array_equal(inter_area(image, (256, 256)), expected)          # the parent's helper thread exists now
    pid = os.fork()
    if pid == 0:                                                       # the child: the parent's thread is gone
        os._exit(0 if np.array_equal(inter_area(image, (256, 256)), expected) else 1)
    deadline = time.monotonic() + 20   # without the at-fork reset the child waits forever on a thread it lacks
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's resample hung")
    assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0


def test_area_resample_keeps_its_helper_thread_off_the_callers_cpu():
    """Woken on the caller's CPU, the helper would run its half after the caller's while another core idles."""
    image = np.random.default_rng(4).integers(0, 256, (384, 384, 3), dtype=np.uint8)
    allowed = os.sched_getaffinity(os.getpid())
    cpu = min(allowed)
    seen = {}

    def caller():                                  # an inspection thread, on one known CPU
        os.sched_setaffinity(0, {cpu})
        seen["out"] = inter_area(image, (256, 256))
        seen["helper"] = os.sched_getaffinity(area_resize._helper_tid)

    t = threading.Thread(target=caller)
    t.start()
    t.join()
    out, helper_cpus = seen["out"], seen["helper"]
    assert np.array_equal(out, cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA))
    if len(allowed) > 1:                           # with one CPU there is nowhere else to go
        assert cpu not in helper_cpus and helper_cpus <= allowed


def test_area_resample_stays_on_the_callers_thread_when_its_budget_is_one(monkeypatch):
    """An inspection worker of a line with inference.workers > 1 runs on one thread: no helper for it."""
    class NoHelper:
        def submit(self, *args, **kwargs):
            raise AssertionError("the helper thread was used")

    image = np.random.default_rng(5).integers(0, 256, (384, 384, 3), dtype=np.uint8)
    expected = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)
    monkeypatch.setattr(area_resize, "_helper", NoHelper())
    monkeypatch.setattr(area_resize, "_place_helper", lambda: None)
    assert np.array_equal(inter_area(image, (256, 256), threads=1), expected)
    with pytest.raises(AssertionError, match="helper thread was used"):   # with two, it is (the check can fail)
        inter_area(image, (256, 256), threads=2)


@pytest.mark.parametrize("threads", [1, 2])
def test_pipeline_resamples_within_its_own_thread_budget(device_bundle, monkeypatch, threads):
    """Pipeline.inspect hands its thread count (a worker's inference.frame_threads) to the geometry's resample."""
    from edge_runtime import geometry
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.records import Frame, Verdict

    seen = []
    real = geometry.resample
    monkeypatch.setattr(geometry, "resample",
                        lambda img, size, method, threads=2: seen.append(threads) or real(img, size, method, threads))
    pipe = Pipeline(Bundle.load(device_bundle), threads=threads)
    assert set(seen) <= {threads}                           # the golden images of the position prior, if any
    seen.clear()
    pipe.apply_overrides(size_policy="resize")              # a frame larger than the bundle's: resampled
    frame = np.random.default_rng(6).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    result = pipe.inspect(Frame(frame_id=1, source="cam", image=frame))
    assert result.verdict is not Verdict.FAULT, result.error
    assert seen == [threads]
