"""Frames of a free-running line inspected by several worker threads at once, answered in frame order.

Two threads on one frame do not run twice as fast as one (stages and the re-check are partly serial); two
frames in flight, each on one core, inspect 1.25x the frames per second on a 2-core x86 (bottle: 113-123 vs
92-97 frames/s, benchmarks/README.md "Frames in flight"), at a longer time per frame. The line's loop stays the
only thread that drives the outputs: it submits frames here and publishes what comes back strictly in the order
the frames were captured, so the outputs see the same begin_part / publish sequence as with one worker
(edge_runtime/line.py). At most `workers` frames are in flight; when all are, the loop waits on the oldest, so
a hung inspection still stops the loop (and with it the watchdog pings) after `workers` frames, as with one.
"""
from __future__ import annotations

import collections
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from edge_runtime.pipeline import Pipeline
from edge_runtime.records import Frame, InspectionResult, Verdict

__all__ = ["Finished", "InFlight"]


@dataclass(frozen=True)
class Finished:
    frame_id: int
    started: float          # time.monotonic() of capture (the deadline runs from here)
    result: InspectionResult


@dataclass(frozen=True)
class _Job:
    frame_id: int
    started: float
    submitted: float
    source: str
    pipeline: Pipeline
    future: Future


class InFlight:
    """Up to `workers` frames being inspected, oldest first."""

    def __init__(self, workers: int, name: str = "line") -> None:
        if workers < 2:
            raise ValueError(f"workers: InFlight needs at least 2, got {workers}")
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"inspect-{name}")
        self._jobs: collections.deque[_Job] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def full(self) -> bool:
        return len(self._jobs) >= self.workers

    @property
    def oldest_id(self) -> int | None:
        """Frame id of the oldest frame in flight (the next to be answered)."""
        jobs = self._jobs
        return jobs[0].frame_id if jobs else None

    @property
    def oldest_since(self) -> float | None:
        """time.monotonic() at which the oldest frame in flight was handed to a worker (health: stalled)."""
        jobs = self._jobs
        return jobs[0].submitted if jobs else None

    def submit(self, pipeline: Pipeline, frame: Frame, frame_id: int, started: float) -> None:
        """Start inspecting `frame` (its id already set) on a free worker. The caller keeps `len(self) < workers`."""
        if self.full:
            raise RuntimeError("InFlight.submit: every worker is busy; publish the oldest frame first")
        self._jobs.append(_Job(frame_id, started, time.monotonic(), frame.source, pipeline,
                               self._pool.submit(pipeline.inspect, frame)))

    def finished(self, wait_oldest: bool = False) -> list[Finished]:
        """The frames done so far, in capture order, up to the first one still running (a later frame that is
        done waits for it). `wait_oldest`: block until the oldest is done first."""
        out = []
        while self._jobs and (self._jobs[0].future.done() or (wait_oldest and not out)):
            job = self._jobs.popleft()
            out.append(Finished(job.frame_id, job.started, _result(job)))
        return out

    def drain(self) -> list[Finished]:
        """Every frame in flight, waited for, in capture order."""
        out = []
        while self._jobs:
            out += self.finished(wait_oldest=True)
        return out

    def close(self) -> None:
        """Stop the workers (after `drain`; anything still queued is cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _result(job: _Job) -> InspectionResult:
    try:
        return job.future.result()
    except BaseException as exc:  # noqa: BLE001 - Pipeline.inspect never raises; if a worker did, the part is not OK
        p = job.pipeline
        return InspectionResult(frame_id=job.frame_id, source=job.source, verdict=Verdict.FAULT, score=None,
                                normalized_score=None, threshold=p.threshold,
                                timings_ms={"total": (time.monotonic() - job.submitted) * 1000.0},
                                bundle_id=p.bundle.bundle_id, error=f"internal error in an inspection worker: "
                                                                    f"{type(exc).__name__}: {exc}")
