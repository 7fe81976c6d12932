"""The output bus: the one place that decides in which order a part's outputs are driven and what a failure means.

For one part, `publish()` runs, in the inspection loop's thread:

    1. deadline   time since the trigger (or since capture, in free run) > inference.deadline_ms -> FAULT
    2. record     the critical records (the result log: append + fsync). A part whose record cannot be written
                  is FAULT on every line output, never OK; the bus reports it (RecordFailure) and the station
                  faults or halts (`on_record_failure`). The PLC therefore never gets a verdict the log lacks,
                  and a log written before the one that failed gets a superseding FAULT record (all agree).
    3. deadline   checked again after the record: if writing it took the part past its deadline, the lines get
                  FAULT and a superseding FAULT record with the same frame id is appended (the later one wins);
                  a superseding record that cannot be written takes the superseded one with it (result_log) and is
                  a record failure like 2.
    4. lines      line outputs (GPIO, Modbus, serial): the PLC's verdict
    5. records    the other records (NG image store), after the lines, off the critical path

Both orderings asked of a line station hold: what the PLC sees is on record (2 before 4), and nothing slow sits
between the verdict and the PLC: the only disk write before the lines is the one append+fsync of the result log,
and the deadline covers it (3).

Slow outputs (`Output.slow`: serial, the NG image store) get a worker thread each with a bounded queue, so a PLC
that stops reading the serial line or a slow disk never stalls the loop. When a queue is full the oldest queued
call is dropped (for a RES line the PLC then sees no verdict for that part, which it must treat as not-OK);
drops, late deliveries (a verdict delivered more than `late_after_s` after it was queued) and errors are counted
(edge_output_dropped_total, edge_output_late_total, edge_output_errors_total) and logged. A line output's verdict
still queued when its part's deadline (inference.deadline_ms from the trigger) has passed is never sent
(edge_output_expired_total): the controller has timed out on that part and could take it for the next one's.

Failure policy, the same for every output: an OutputError or any other exception from one output is logged and
counted, and never stops the other outputs or the inspection; only the critical record changes the verdict. A
line output whose last verdict or state call failed may still show the controller the previous part's OK, so
the line reads `line_output_fault()` and stays in FAULT, READY down on the other outputs, until a call succeeds.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from edge_runtime.outputs.base import Output, OutputError
from edge_runtime.records import InspectionResult, Verdict

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 64
DEFAULT_LATE_AFTER_S = 0.5
_CLOSE_TIMEOUT_S = 5.0
# Calls that set what a line output shows the controller; one that fails leaves it unknown (heartbeat and
# acknowledge are not among them: a missed toggle or ACK is caught by the controller's own watchdog/timeout).
_STATE_METHODS = frozenset({"start", "begin_part", "publish", "set_ready", "set_fault"})
# Calls a full worker queue drops last: what they say (READY, the fault) stands until the next one.
_KEEP_WHEN_FULL = frozenset({"start", "set_ready", "set_fault", "close"})


@dataclass(frozen=True)
class RecordFailure:
    """The critical record of a part could not be written."""

    output: str
    reason: str
    halt: bool           # the output asks the station to stop inspecting (on_record_failure: halt)


@dataclass
class BusCounters:
    errors: int = 0      # calls that raised
    dropped: int = 0     # calls dropped from a full worker queue
    late: int = 0        # verdicts delivered by a worker later than late_after_s after they were queued
    expired: int = 0     # verdicts a worker never sent: the part's deadline passed while they were queued
    record_failures: int = 0


class _Worker:
    """Runs one slow output's calls in order on its own thread; the queue is bounded, the oldest call goes first."""

    def __init__(self, bus: "OutputBus", output: Output, maxsize: int) -> None:
        self.bus = bus
        self.output = output
        self.maxsize = maxsize
        self._queue: collections.deque[tuple[str, tuple, float]] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"output:{output.name}", daemon=True)
        self._thread.start()

    def submit(self, method: str, args: tuple, expires: float | None = None) -> None:
        """Queue one call; `expires` (time.monotonic()): a verdict not delivered by then is never delivered."""
        with self._cond:
            if self._closing:
                return
            if method == "heartbeat" and any(m == "heartbeat" for m, _, _, _ in self._queue):
                return   # one waiting is enough: the loop's every round must not fill the queue (probe 77)
            if method != "close" and len(self._queue) >= self.maxsize:
                # The oldest call the PLC can do without goes first: a verdict not sent reads as not-OK, a READY or
                # fault change not sent leaves it reading READY (probe 77: heartbeats pushed out RDY 0).
                victim = next((i for i, (m, _, _, _) in enumerate(self._queue) if m not in _KEEP_WHEN_FULL), 0)
                dropped, dropped_args, _, _ = self._queue[victim]
                del self._queue[victim]
                self.bus._dropped(self.output, dropped, dropped_args)
            self._queue.append((method, args, time.monotonic(), expires))
            if method == "close":
                self._closing = True
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                method, args, queued, expires = self._queue.popleft()
            if expires is not None and time.monotonic() > expires:
                # The controller's wait for this part is over (it has rejected it, and may have triggered the next):
                # a verdict sent now would be read as the answer to a later part.
                self.bus._expired(self.output, args[0], time.monotonic() - queued, late_when_queued=expires <= queued)
                continue
            self.bus._call(self.output, method, *args)
            if method == "publish" and time.monotonic() - queued > self.bus.late_after_s:
                self.bus._late(self.output, args[0], time.monotonic() - queued)
            if method == "close":
                return


class OutputBus:
    """Drives a station's outputs in the order above. Methods are called from the inspection loop, except
    acknowledge(), which the serial receiver or an HTTP thread may call."""

    def __init__(self, outputs: list[Output], *, queue_size: int = DEFAULT_QUEUE_SIZE,
                 late_after_s: float = DEFAULT_LATE_AFTER_S) -> None:
        self.outputs = list(outputs)
        self.critical = [o for o in self.outputs if o.critical_record]
        self.lines = [o for o in self.outputs if not o.critical_record and o.role == "line"]
        self._line_ids = {id(o) for o in self.lines}
        self.records = [o for o in self.outputs if not o.critical_record and o.role != "line"]
        self.queue_size = queue_size
        self.late_after_s = late_after_s
        self.counters = BusCounters()
        self._lock = threading.Lock()      # counters are bumped from worker threads
        self._workers: dict[int, _Worker] = {}
        # Line outputs whose last verdict or state call failed: what they show the controller is unknown (a dead
        # GPIO chip can leave the last OK standing), so the line is in FAULT until a later call succeeds.
        self._line_failures: dict[int, str] = {}
        self._logged: dict[int, float] = {}   # _log_failure: when an output's failure was last logged at ERROR
        self._start_failed: set[int] = set()  # line outputs whose start() failed: retried before their state calls

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> str | None:
        """Start every output (in the caller's thread, so start-up errors are reported in order), then the workers.
        Returns why a critical record did not start (the station must not raise READY on a log it cannot write);
        a line output that did not start is a line-output fault (line_output_fault) until a state call succeeds."""
        record_failure = None
        for out in self._ordered():
            failure = self._call(out, "start")
            if failure is not None and out.critical_record and record_failure is None:
                record_failure = failure
            if failure is not None and id(out) in self._line_ids:
                self._start_failed.add(id(out))   # retried by retry_failed_lines (a port freed later)
        for out in self._ordered():
            if out.slow and id(out) not in self._workers:
                self._workers[id(out)] = _Worker(self, out, self.queue_size)
        return record_failure

    def close(self) -> None:
        """Every output back to its safe state: queued calls are delivered first (bounded wait), then close()."""
        workers, self._workers = self._workers, {}
        for out in self._ordered():
            worker = workers.get(id(out))
            if worker is None:
                self._call(out, "close")
            else:
                worker.submit("close", ())
        for worker in workers.values():
            if not worker.join(_CLOSE_TIMEOUT_S):
                log.error("output %s did not close within %.0f s (stalled device)", worker.output.name,
                          _CLOSE_TIMEOUT_S)

    # -- one part ----------------------------------------------------------------------------------------------
    def begin_part(self, frame_id: int) -> None:
        """A trigger fired / inspection of `frame_id` starts: line outputs withdraw the last verdict, show BUSY;
        records that show a current verdict (OPC UA's LastResult) withdraw it (`verdict_withdrawn`)."""
        for out in self.lines:
            self._dispatch(out, "begin_part", frame_id)
        self.notify("verdict_withdrawn")

    def trigger_accepted(self) -> None:
        """A software trigger was accepted (before POST /trigger answers, a TRG returns): nothing of the previous
        part stays readable as the answer, on the line outputs or on a record that shows a current verdict."""
        self.acknowledge()
        self.notify("verdict_withdrawn")

    def publish(self, result: InspectionResult, *, started: float | None = None,
                deadline_ms: float | None = None) -> RecordFailure | None:
        """Record the part, then tell the line, then the other records; see the module docstring.

        `started`: time.monotonic() of the trigger (or capture). The result is changed in place when it becomes
        FAULT (deadline, record failure); returns the record failure, if any."""
        if started is not None:
            result.timings_ms["since_trigger"] = (time.monotonic() - started) * 1000.0
        self._check_deadline(result, started, deadline_ms)
        failure = None
        recorded = []
        for out in self.critical:
            before = result.verdict
            try:
                out.publish(result)
            except Exception as exc:  # noqa: BLE001 - whatever broke the record, the part is not OK
                failure = self._record_failed(out, result, exc)
            else:
                recorded.append((out, before))
        if failure is not None:
            # The logs written before the failing one hold the verdict the line will not get: they get the
            # superseding FAULT record too, so every log agrees with the line.
            for out, verdict in recorded:
                if verdict is not Verdict.FAULT:
                    self._supersede(out, result)
        elif self._check_deadline(result, started, deadline_ms):
            for out in self.critical:  # the superseding record: the line gets FAULT, so must the log
                failure = self._supersede(out, result) or failure
        # A line output on a worker (serial) gets the deadline as an expiry: a verdict still queued when the
        # controller has stopped waiting for it is dropped, never sent late (the bus checked the deadline above,
        # but a stalled port can hold the line for longer).
        expires = started + deadline_ms / 1000.0 if started is not None and deadline_ms is not None else None
        for out in self.lines:
            self._dispatch(out, "publish", result, expires=expires)
        for out in self.records:
            # Parts an output ignores stay out of its worker's queue (probe 113: behind a slow NG image store, the
            # OK parts it never saves filled the queue of 64 and pushed out two NG parts of a bad batch).
            if out.wants(result):
                self._dispatch(out, "publish", result)
        return failure

    def probe_records(self) -> str | None:
        """Why a critical record could not be written now (its `probe()`), or None when all could."""
        for out in self.critical:
            probe = getattr(out, "probe", None)
            if callable(probe):
                try:
                    probe()
                except Exception as exc:  # noqa: BLE001 - any failure means: still not writable
                    return str(exc)[:300]
        return None

    def acknowledge(self) -> None:
        for out in self.lines:
            self._dispatch(out, "acknowledge")

    # -- station state ---------------------------------------------------------------------------------------
    def set_ready(self, ready: bool) -> None:
        self._each("set_ready", ready)

    def set_fault(self, reason: str | None) -> None:
        self._each("set_fault", reason)

    def heartbeat(self) -> None:
        self._each("heartbeat")

    def reopen(self) -> None:
        self._each("reopen")

    def notify(self, method: str, *args: Any) -> None:
        """Call `method` on every output that has it (an optional event such as recipe_changed), in bus order."""
        for out in self._ordered():
            if callable(getattr(out, method, None)):
                self._dispatch(out, method, *args)

    def output_counters(self) -> dict[str, float]:
        """The bus's counters plus those outputs export (`counters()`), summed by name, for /metrics."""
        with self._lock:
            c = self.counters
            totals: dict[str, float] = {"output_errors": c.errors, "output_dropped": c.dropped,
                                        "output_late": c.late, "output_expired": c.expired,
                                        "record_failures": c.record_failures}
        for out in self.outputs:
            extra = getattr(out, "counters", None)
            if callable(extra):
                for name, value in extra().items():
                    totals[name] = totals.get(name, 0) + value
        return totals

    def pending(self) -> int:
        """Calls queued on the workers (tests and diagnostics)."""
        return sum(w.pending() for w in list(self._workers.values()))

    # -- internals -------------------------------------------------------------------------------------------
    def _ordered(self) -> list[Output]:
        return [*self.critical, *self.lines, *self.records]

    def _each(self, method: str, *args: Any) -> None:
        for out in self._ordered():
            self._dispatch(out, method, *args)

    def _dispatch(self, out: Output, method: str, *args: Any, expires: float | None = None) -> None:
        worker = self._workers.get(id(out))
        if worker is not None:
            worker.submit(method, args, expires)
        else:
            self._call(out, method, *args)

    def _call(self, out: Output, method: str, *args: Any) -> str | None:
        """Call `method` on `out`; a failure is logged, counted and returned (None: it worked)."""
        try:
            getattr(out, method)(*args)
        except OutputError as exc:
            self._count("errors")
            failure = f"{out.name}: {method} failed: {str(exc)[:200]}"
            self._log_failure(out, failure)
        except Exception as exc:  # noqa: BLE001 - one broken adapter must not stop the others or the inspection
            self._count("errors")
            log.exception("output %s: %s raised", out.name, method)
            failure = f"{out.name}: {method} raised {type(exc).__name__}: {str(exc)[:200]}"
        else:
            failure = None
            # A state call that works shows the output back (a heartbeat may "work" by doing nothing while gone).
            if method in _STATE_METHODS and self._logged.pop(id(out), None) is not None:
                log.info("output %s: %s works again", out.name, method)
        self._line_call(out, method, failure)
        return failure

    def _log_failure(self, out: Output, failure: str) -> None:
        """An output that keeps failing (a port gone, a server that never started: retried every second and on
        every part) is logged at ERROR once a minute, the rest at DEBUG; every failure is still counted, and the
        line's FAULT reason names the first."""
        now = time.monotonic()
        with self._lock:
            last = self._logged.get(id(out))
            repeat = last is not None and now - last < 60.0
            if not repeat:
                self._logged[id(out)] = now
        (log.debug if repeat else log.error)("output %s", failure)

    def _line_call(self, out: Output, method: str, failure: str | None) -> None:
        if method not in _STATE_METHODS or id(out) not in self._line_ids:
            return
        with self._lock:
            if failure is None:
                self._line_failures.pop(id(out), None)
            else:   # the first failure names the fault until a call succeeds (a stable reason, no churn)
                self._line_failures.setdefault(id(out), failure)

    def retry_failed_lines(self, ready: bool, fault: str | None) -> None:
        """Tell the line outputs whose last state call failed the station's state again: one that works again
        (a serial port plugged back) clears its failure without waiting for a part, which a line that is not READY
        may never get (its HTTP trigger answers 503)."""
        with self._lock:
            failed = [o for o in self.lines if id(o) in self._line_failures]
        failed += [o for o in self.lines if o not in failed and _own_failure(o) is not None]
        for out in failed:
            if id(out) in self._start_failed:
                if self._call(out, "start") is not None:
                    continue
                self._start_failed.discard(id(out))
            self._dispatch(out, "set_fault", fault)
            self._dispatch(out, "set_ready", ready)

    def line_output_fault(self) -> str | None:
        """Why a line output may be showing the controller something else than the station means (its last
        verdict or state call failed, or it found a failure of its own: Output.failure()), or None."""
        with self._lock:
            failure = next(iter(self._line_failures.values()), None)
        if failure is None:
            failure = next((f"{o.name}: {f}" for o in self.lines if (f := _own_failure(o)) is not None), None)
        return failure

    def _check_deadline(self, result: InspectionResult, started: float | None, deadline_ms: float | None) -> bool:
        """Turn a late verdict into FAULT; True when it did."""
        if started is None or deadline_ms is None or result.verdict is Verdict.FAULT:
            return False
        elapsed = (time.monotonic() - started) * 1000.0
        if elapsed <= deadline_ms:
            return False
        # A verdict after the part has left the station is not a verdict for that part.
        result.verdict = Verdict.FAULT
        result.error = f"deadline exceeded: {elapsed:.1f} ms from trigger to output > {deadline_ms:g} ms"
        return True

    def _supersede(self, out: Output, result: InspectionResult) -> RecordFailure | None:
        """Write the superseding FAULT record of a part already recorded; one that fails is a record failure (the
        log has cut the superseded record with it: no log keeps a verdict the line never got)."""
        try:
            out.publish(result)
        except Exception as exc:  # noqa: BLE001 - the part is not on record: the station must know
            return self._record_failed(out, result, exc)
        return None

    def _record_failed(self, out: Output, result: InspectionResult, exc: Exception) -> RecordFailure:
        self._count("errors")
        self._count("record_failures")
        reason = str(exc)[:300] if isinstance(exc, OutputError) else f"{type(exc).__name__}: {str(exc)[:300]}"
        log.error("output %s: part %d not recorded, FAULT on the line: %s", out.name, result.frame_id, reason)
        if result.verdict is not Verdict.FAULT or not result.error:
            result.error = f"not recorded: {reason}"
        result.verdict = Verdict.FAULT
        halt = getattr(getattr(out, "cfg", None), "on_record_failure", "fault") == "halt"
        return RecordFailure(output=out.name, reason=reason, halt=halt)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + n)

    def _dropped(self, out: Output, method: str, args: tuple) -> None:
        self._count("dropped")
        if method == "publish":
            log.warning("output %s: stalled, part %d not delivered (queue of %d full)", out.name, args[0].frame_id,
                        self.queue_size)
        elif method != "heartbeat":
            log.warning("output %s: stalled, %s dropped (queue of %d full)", out.name, method, self.queue_size)

    def _expired(self, out: Output, result: InspectionResult, delay_s: float, late_when_queued: bool = False) -> None:
        """Not sent, whatever the verdict: a controller that has timed out on the part and counts answers would
        read a late one (even FAULT) as the next part's, and every later answer one part off, OK included."""
        self._count("expired")
        why = ("its deadline had passed before it was queued (the inspection loop was late)" if late_when_queued
               else f"its deadline passed {delay_s * 1000.0:.0f} ms after it was queued (the port was stalled)")
        log.error("output %s: part %d %s not sent: %s; the controller has timed out on it", out.name,
                  result.frame_id, result.verdict.value, why)

    def _late(self, out: Output, result: InspectionResult, delay_s: float) -> None:
        self._count("late")
        log.warning("output %s: part %d delivered %.0f ms after its verdict", out.name, result.frame_id,
                    delay_s * 1000.0)


def _own_failure(out: Output) -> str | None:
    """out.failure() where the output has one; one that raises counts as failed (a broken adapter must not read as
    a working one)."""
    failure = getattr(out, "failure", None)
    if not callable(failure):
        return None
    try:
        return failure()
    except Exception as exc:  # noqa: BLE001
        return f"failure() raised {type(exc).__name__}: {str(exc)[:200]}"
