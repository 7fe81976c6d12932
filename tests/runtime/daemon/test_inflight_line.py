"""A free-running line with several frames in flight (inference.workers > 1): every frame gets the same answer it
gets with one worker, answers go out in capture order (a slow frame is never overtaken), a hung inspection still
stops the loop and its heartbeat, and a line that halts or loses its camera answers what was in flight safely."""
from __future__ import annotations

import threading
import time

import pytest

from edge_runtime.config import load_station
from edge_runtime.daemon import Station
from edge_runtime.inflight import InFlight
from edge_runtime.outputs import build_output
from doubles import FullDiskLog, RecordingOutput
from edge_runtime.records import Verdict
from edge_runtime.schema import ConfigError
from edge_runtime.sources import SourceError
from doubles import ScriptedSource

WAIT = {"when_full": "wait"}   # the capture thread never replaces a frame: every frame is inspected


class LiveScripted(ScriptedSource):
    live = True   # a camera: the line puts it behind a capture thread in free run


def answers(rec: RecordingOutput) -> list[tuple[int, str, float | None]]:
    """(frame id counted from the run's first, verdict, score); a second run continues the saved id counter."""
    first = rec.results[0].frame_id if rec.results else 0
    return [(r.frame_id - first, r.verdict.value, r.score) for r in rec.results]


def run_free(small_bundle, write_station, steps, workers: int, station_cls=Station, **sections):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source={"type": "scripted"}, capture=WAIT,
                                     inference={"threads": 2, "workers": workers},
                                     recovery={"read_timeout_s": 0.1, "exit_when_exhausted": True}, **sections))
    station = station_cls(cfg, source=LiveScripted(steps=list(steps)), outputs=[rec])
    assert station.run() == 0
    return station, rec


def test_two_workers_give_every_frame_the_answer_one_worker_gives(small_bundle, write_station, part_images_bytes):
    steps = part_images_bytes * 4   # good and defective parts, 16 frames
    one, rec1 = run_free(small_bundle, write_station, steps, workers=1)
    two, rec2 = run_free(small_bundle, write_station, steps, workers=2)
    assert two.line._inflight is not None and one.line._inflight is None
    assert answers(rec2) == answers(rec1)
    assert [r.frame_id for r in rec2.results] == sorted(r.frame_id for r in rec2.results)
    assert {v for _, v, _ in answers(rec2)} >= {"OK", "NG"}
    # Each part's begin_part and its verdict reach the outputs back to back, in capture order.
    first = rec2.results[0].frame_id
    parts = [(name, (arg if name == "begin_part" else arg.frame_id) - first) for name, arg in rec2.calls
             if name in ("begin_part", "publish")]
    assert parts == [(m, fid) for fid, _, _ in answers(rec1) for m in ("begin_part", "publish")]


class HangOnce(Station):
    """The third frame's inspection blocks until `release` is set (a hung driver, a stuck kernel)."""

    release = threading.Event()
    hung = threading.Event()

    def _load(self) -> bool:
        loaded = super()._load()
        if loaded:
            inspect, seen = self.pipeline.inspect, []

            def maybe_hang(frame):
                seen.append(frame.frame_id)
                if len(seen) == 3:
                    self.hung.set()
                    self.release.wait(60)
                return inspect(frame)

            self.pipeline.inspect = maybe_hang
        return loaded


def test_a_hung_frame_is_never_overtaken_and_stops_the_heartbeat(small_bundle, write_station, part_images_bytes):
    HangOnce.release.clear()
    HangOnce.hung.clear()
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source={"type": "scripted"}, capture=WAIT,
                                     inference={"threads": 2, "workers": 2},
                                     recovery={"read_timeout_s": 0.1, "exit_when_exhausted": True}))
    station = HangOnce(cfg, source=LiveScripted(steps=part_images_bytes * 2), outputs=[rec])
    runner = threading.Thread(target=station.run, daemon=True)
    runner.start()
    try:
        assert HangOnce.hung.wait(30)
        time.sleep(0.5)   # the frame after the hung one finishes meanwhile; the loop waits on the hung one
        published = [r.frame_id for r in rec.results]
        beats = rec.heartbeats
        time.sleep(0.5)
        assert rec.heartbeats == beats, "the loop kept reporting while an inspection hung"
        assert len(published) == 2 and [r.frame_id for r in rec.results] == published, \
            "a later frame's verdict went out before the hung frame's"
        assert station.line.status().busy_s > 0.9   # /healthz reports the stall
        # As with one worker, the last verdict is withdrawn while the next part (the hung one) is inspected.
        last = [(name, arg) for name, arg in rec.calls if name in ("begin_part", "publish")][-1]
        assert last == ("begin_part", published[-1] + 1), last
    finally:
        HangOnce.release.set()
    runner.join(30)
    assert not runner.is_alive()
    assert [r.frame_id for r in rec.results] == sorted(r.frame_id for r in rec.results)
    assert len(rec.results) == 8 and all(r.verdict is not Verdict.FAULT for r in rec.results)


def test_a_halt_turns_answers_still_in_flight_into_fault(small_bundle, write_station, part_images_bytes, wait_until,
                                                          tmp_path):
    good = part_images_bytes[:2] * 4
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source={"type": "scripted"}, capture=WAIT,
                                     inference={"threads": 2, "workers": 2},
                                     recovery={"read_timeout_s": 0.1, "exit_when_exhausted": True},
                                     outputs=[{"type": "result_log", "path": str(tmp_path / "results.jsonl"), "fsync": "never",
                                               "on_record_failure": "halt"}]))
    station = Station(cfg, source=LiveScripted(steps=good), outputs=[FullDiskLog(cfg.outputs[0]), rec])
    runner = threading.Thread(target=station.run, daemon=True)
    runner.start()
    wait_until(lambda: station.fault_reason and station.fault_reason.startswith("halted"), what="halt")
    wait_until(lambda: len(rec.results) >= 2, what="the frame in flight answered")
    station.request_stop()
    runner.join(30)
    assert rec.results and all(r.verdict is Verdict.FAULT for r in rec.results), answers(rec)
    assert "halted: record" in rec.results[1].error and "before this part's verdict went out" in rec.results[1].error
    assert rec.ready is False


def test_frames_in_flight_are_answered_before_a_lost_camera_faults_the_line(small_bundle, write_station,
                                                                           part_images_bytes, stop_on_fault):
    rec = RecordingOutput()
    cfg = load_station(write_station(bundle=small_bundle, source={"type": "scripted"}, capture=WAIT,
                                     inference={"threads": 2, "workers": 2},
                                     recovery={"read_timeout_s": 0.1, "backoff_initial_s": 5, "backoff_max_s": 5}))
    station = Station(cfg, source=LiveScripted(steps=part_images_bytes[:3] + [SourceError("camera unplugged")]),
                      outputs=[rec])
    stop_on_fault(station, "camera unplugged")
    station.run()
    assert [r.verdict is not Verdict.FAULT for r in rec.results] == [True, True, True]
    fault_at = next(i for i, (name, arg) in enumerate(rec.calls) if name == "set_fault" and arg
                    and "camera unplugged" in arg)
    last_publish = max(i for i, (name, _) in enumerate(rec.calls) if name == "publish")
    assert last_publish < fault_at, "a verdict went out after the line had faulted"


def test_workers_are_checked_and_a_triggered_line_keeps_one(small_bundle, write_station, part_images_bytes,
                                                            wait_until):
    with pytest.raises(ConfigError, match=r"inference\.workers: must be 1-8"):
        load_station(write_station(bundle=small_bundle, source={"type": "scripted"}, inference={"workers": 0}))
    cfg = load_station(write_station(bundle=small_bundle, source={"type": "scripted"}, trigger={"type": "software"},
                                     inference={"threads": 2, "workers": 2}))
    assert cfg.inference.frame_threads == 1
    station = Station(cfg, source=ScriptedSource(steps=part_images_bytes[:1]), outputs=[RecordingOutput()])
    runner = threading.Thread(target=station.run, daemon=True)
    runner.start()
    wait_until(lambda: station.status().state == "ready", what="READY")
    station.request_stop()
    runner.join(30)
    assert station.line._inflight is None


def test_inflight_answers_in_submission_order_even_when_a_later_frame_finishes_first():
    from edge_runtime.records import Frame, InspectionResult

    gate = threading.Event()

    class Pipe:   # stands in for Pipeline: frame 0 waits for the gate, frame 1 answers at once
        threshold = 1.0
        bundle = type("B", (), {"bundle_id": "b"})()

        def inspect(self, frame):
            if frame.frame_id == 0:
                gate.wait(10)
            if frame.frame_id == 2:
                raise RuntimeError("worker bug")
            return InspectionResult(frame_id=frame.frame_id, source="s", verdict=Verdict.OK, score=0.1,
                                    normalized_score=0.1, threshold=1.0, timings_ms={}, bundle_id="b")

    inflight = InFlight(2)
    with pytest.raises(ValueError):
        InFlight(1)
    for fid in (0, 1):
        inflight.submit(Pipe(), Frame(frame_id=fid, source="s"), fid, time.monotonic())
    assert inflight.full
    with pytest.raises(RuntimeError, match="every worker is busy"):
        inflight.submit(Pipe(), Frame(frame_id=9, source="s"), 9, 0.0)
    time.sleep(0.2)
    assert inflight.finished() == [] and inflight.oldest_since is not None   # 1 is done, 0 is not: nothing yet
    gate.set()
    assert [f.frame_id for f in inflight.finished(wait_oldest=True)] in ([0], [0, 1])
    inflight.submit(Pipe(), Frame(frame_id=2, source="s"), 2, time.monotonic())
    rest = inflight.drain()
    assert [x.frame_id for x in rest][-1] == 2 and rest[-1].result.verdict is Verdict.FAULT
    assert "worker bug" in rest[-1].result.error and len(inflight) == 0 and inflight.oldest_since is None
    inflight.close()


def blas_threads() -> list[int]:
    """Threads of each pthreads BLAS in the process (numpy's, OpenCV's OpenBLAS). faiss's OpenBLAS is an
    OpenMP build: its threads follow OpenMP (told to sleep when idle, see edge_runtime.nn_search.import_faiss)."""
    from threadpoolctl import threadpool_info

    return [i["num_threads"] for i in threadpool_info()
            if i["user_api"] == "blas" and i.get("threading_layer") != "openmp"]


def test_blas_stays_on_one_thread_while_the_station_runs_and_is_handed_back(small_bundle, write_station,
                                                                            part_images_bytes):
    """The re-check's per-frame BLAS limit must not let go between frames (OpenBLAS would wake and spin a
    thread each time), and the process gets its BLAS threads back when the station stops."""
    from threadpoolctl import threadpool_limits

    from edge_runtime.nn_search import single_threaded_blas

    seen: list[list[int]] = []

    class Watch(Station):
        def _load(self) -> bool:
            loaded = super()._load()
            inspect = self.pipeline.inspect

            def watched(frame):
                seen.append(blas_threads())
                return inspect(frame)

            self.pipeline.inspect = watched
            return loaded

    with threadpool_limits(limits=2, user_api="blas"):
        assert set(blas_threads()) == {2}
        run_free(small_bundle, write_station, part_images_bytes, workers=2, station_cls=Watch)
        assert seen and all(set(s) == {1} for s in seen), seen
        assert set(blas_threads()) == {2}
        # Nested and overlapping users of the limit: the last one out restores, not the first.
        with single_threaded_blas():
            with single_threaded_blas():
                assert set(blas_threads()) == {1}
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {2}
