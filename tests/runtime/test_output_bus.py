"""OutputBus: record before line before images, one failure policy, slow outputs on bounded workers."""
from __future__ import annotations

import json
import os
import threading
import time
import tty

import pytest

from edge_runtime.output_bus import OutputBus
from edge_runtime.outputs import ResultLog, ResultLogConfig
from doubles import FullDiskLog, RecordingOutput, RecordingOutputConfig
from edge_runtime.outputs.base import OutputError
from edge_runtime.outputs.serial_output import SerialConfig, SerialOutput
from edge_runtime.records import InspectionResult, Verdict


def make_result(frame_id: int, verdict: Verdict = Verdict.OK) -> InspectionResult:
    return InspectionResult(frame_id=frame_id, source="cam0", verdict=verdict, score=1.0, normalized_score=0.25,
                            threshold=2.0, timings_ms={"total": 5.0}, bundle_id="b")


class Journal:
    """One ordered list of (output, method, frame id) across outputs, as the line would see it."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, object]] = []
        self.lock = threading.Lock()

    def add(self, name: str, method: str, arg: object) -> None:
        with self.lock:
            self.entries.append((name, method, getattr(arg, "frame_id", arg)))


def journaled(cls_name: str, journal: Journal, *, role: str = "line", critical: bool = False, slow: bool = False,
              fail_on: tuple[str, ...] = ()) -> RecordingOutput:
    kind = type(cls_name, (RecordingOutput,), {"role": role, "critical_record": critical, "slow": slow})
    out = kind(RecordingOutputConfig(name=cls_name, fail_on=list(fail_on)))
    original = out._record

    def record(method, arg=None):
        journal.add(cls_name, method, arg)
        original(method, arg)

    out._record = record
    return out


def test_record_first_then_line_outputs_then_other_records():
    journal = Journal()
    images = journaled("images", journal, role="record")
    gpio = journaled("gpio", journal)
    log = journaled("log", journal, role="record", critical=True)
    bus = OutputBus([images, gpio, log])          # configured in any order
    bus.start()
    bus.begin_part(7)
    bus.publish(make_result(7))
    bus.close()
    published = [name for name, method, _ in journal.entries if method == "publish"]
    assert published == ["log", "gpio", "images"]
    assert [name for name, method, _ in journal.entries if method == "begin_part"] == ["gpio"], \
        "begin_part is for line outputs"


def test_a_part_that_cannot_be_recorded_is_fault_on_the_line_never_ok(tmp_path):
    line = RecordingOutput()
    log = FullDiskLog(ResultLogConfig(path=str(tmp_path / "r.jsonl"), fsync="never", on_record_failure="halt"))
    bus = OutputBus([line, log])
    bus.start()
    result = make_result(3, Verdict.OK)
    failure = bus.publish(result)
    assert failure is not None and failure.halt and "disk full" in failure.reason
    (seen,) = line.results
    assert seen.verdict is Verdict.FAULT and seen.error.startswith("not recorded: ")
    assert bus.counters.record_failures == 1
    bus.close()


def test_a_log_written_before_one_that_failed_gets_the_superseding_fault(tmp_path):
    """Two result logs, the second on a full disk: the line gets FAULT, and so must the first log, which had
    already recorded the part as OK (the later record of a frame id wins)."""
    import json

    first = ResultLog(ResultLogConfig(path=str(tmp_path / "a.jsonl"), fsync="never"))
    full = FullDiskLog(ResultLogConfig(path=str(tmp_path / "full.jsonl"), fsync="never"))
    line = RecordingOutput()
    bus = OutputBus([first, full, line])
    bus.start()
    assert bus.publish(make_result(5, Verdict.OK)) is not None
    records = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [(r["frame_id"], r["verdict"]) for r in records] == [(5, "OK"), (5, "FAULT")]
    assert line.results[0].verdict is Verdict.FAULT
    bus.close()


def test_deadline_runs_from_the_trigger_not_from_inspection():
    line = RecordingOutput()
    bus = OutputBus([line])
    result = make_result(1, Verdict.OK)                 # inspection itself took 5 ms ...
    bus.publish(result, started=time.monotonic() - 0.434, deadline_ms=200)   # ... but the trigger was 434 ms ago
    assert line.results[0].verdict is Verdict.FAULT
    assert "from trigger to output" in result.error and result.timings_ms["since_trigger"] >= 434
    on_time = make_result(2, Verdict.OK)
    bus.publish(on_time, started=time.monotonic(), deadline_ms=60_000)
    assert line.results[1].verdict is Verdict.OK


def test_a_record_that_pushes_the_part_past_its_deadline_is_superseded(tmp_path):

    class SlowLog(ResultLog):
        def publish(self, result):
            super().publish(result)
            time.sleep(0.05)                            # the fsync of a tired SD card

    line = RecordingOutput()
    log = SlowLog(ResultLogConfig(path=str(tmp_path / "r.jsonl")))
    bus = OutputBus([line, log])
    bus.start()
    bus.publish(make_result(1), started=time.monotonic(), deadline_ms=20)
    bus.close()
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["frame_id"], r["verdict"]) for r in records] == [(1, "OK"), (1, "FAULT")], "the later record wins"
    assert line.results[0].verdict is Verdict.FAULT


def test_a_superseding_record_that_fails_takes_the_superseded_verdict_with_it(tmp_path):
    """A dying disk: the fsync of part 1's OK record takes it past its deadline, then the superseding FAULT record
    hits a full disk. The line gets FAULT: the log must not keep OK for the part (probe 75), and the station must
    learn that the part is not on record."""
    import errno

    class DyingLog(ResultLog):
        writes = 0

        def _append(self, line):
            DyingLog.writes += 1
            if DyingLog.writes == 2:                    # the superseding record
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super()._append(line)
            time.sleep(0.05)                            # a slow fsync

    line = RecordingOutput()
    log = DyingLog(ResultLogConfig(path=str(tmp_path / "r.jsonl")))
    bus = OutputBus([line, log])
    bus.start()
    failure = bus.publish(make_result(1), started=time.monotonic(), deadline_ms=20)
    assert line.results[0].verdict is Verdict.FAULT
    # Read before any other write or close: what a crash now leaves on disk.
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["frame_id"], r["verdict"]) for r in records if r["verdict"] != "FAULT"] == []
    assert failure is not None and "frame 1 not logged" in failure.reason
    bus.publish(make_result(2), started=time.monotonic(), deadline_ms=60_000)
    bus.close()
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["frame_id"], r["verdict"]) for r in records] == [(2, "OK")]


def test_a_superseding_record_that_fails_after_a_rotation_takes_the_superseded_verdict_with_it(tmp_path):
    """As above, with the OK record the last that fits under max_bytes: the longer superseding FAULT record rotated
    the log first, so its failure could not cut the OK, which stayed in r.jsonl.1 for a part the line got FAULT."""
    import errno

    from edge_runtime.outputs.result_log import encode_record

    class DyingLog(ResultLog):
        writes = 0

        def _append(self, line):
            DyingLog.writes += 1
            if DyingLog.writes == 2:                    # the superseding record
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super()._append(line)
            time.sleep(0.05)                            # a slow fsync

    path = tmp_path / "r.jsonl"
    room = 1024 - len(encode_record(make_result(1))) - 30   # part 1's OK record (with its since_trigger) just fits
    path.write_bytes(b'{"frame_id":0}' + b" " * (room - 15) + b"\n")
    line = RecordingOutput()
    log = DyingLog(ResultLogConfig(path=str(path), max_bytes=1024))
    bus = OutputBus([line, log])
    bus.start()
    failure = bus.publish(make_result(1), started=time.monotonic(), deadline_ms=20)
    assert line.results[0].verdict is Verdict.FAULT and failure is not None
    kept = [(p.name, json.loads(x)["verdict"]) for p in sorted(tmp_path.iterdir())
            for x in p.read_text().splitlines() if json.loads(x)["frame_id"] == 1]
    assert [k for k in kept if k[1] != "FAULT"] == [], "no log keeps OK for a part the line got FAULT"
    bus.close()


class Stalled(RecordingOutput):
    """A line output that blocks in publish until released, like a serial port the PLC stopped reading."""

    slow = True

    def __init__(self) -> None:
        super().__init__(RecordingOutputConfig(name="stalled"))
        self.release = threading.Event()
        self.threads: set[str] = set()

    def publish(self, result):
        self.threads.add(threading.current_thread().name)
        self.release.wait(30)
        super().publish(result)


def test_a_stalled_output_never_blocks_the_loop_and_drops_are_counted():
    stalled, fast = Stalled(), RecordingOutput()
    bus = OutputBus([stalled, fast], queue_size=4, late_after_s=0.0)
    bus.start()
    for i in range(10):
        bus.begin_part(i)
        bus.publish(make_result(i))                 # returns although the stalled output has not finished one
    assert [r.frame_id for r in fast.results] == list(range(10)), "the other outputs got every part"
    assert stalled.results == [] and threading.current_thread().name not in stalled.threads
    assert bus.counters.dropped >= 10 + 10 - 4 - 2, "the bounded queue dropped the oldest calls"
    stalled.release.set()
    bus.close()
    assert bus.counters.late >= 1 and stalled.closed
    assert stalled.results[-1].frame_id == 9, "the newest verdict survives the drops"
    assert bus.output_counters()["output_dropped"] == bus.counters.dropped



def test_parts_the_ng_image_store_ignores_never_crowd_its_queue(tmp_path):
    """Probe 113: behind a slow NG image store (a large frame's PNG on an SD card, ~1 s), the OK parts it never
    saves filled its queue and pushed out the NG parts of a bad batch: 5 NG parts at 100 parts/s, 3 images."""
    import numpy as np

    from edge_runtime.outputs.ng_image_store import NgImageStore, NgImageStoreConfig

    store = NgImageStore(NgImageStoreConfig(dir=str(tmp_path / "ng"), format="png", min_free_mb=0))
    disk_free, real_save = threading.Event(), store._save
    store._save = lambda *a: disk_free.wait(30) and real_save(*a)
    bus = OutputBus([ResultLog(ResultLogConfig(path=str(tmp_path / "r.jsonl"), fsync="never")), store], queue_size=4)
    bus.start()
    for i in range(20):                                  # NG at 0 (being written), 1 and 2 (queued), then 17 OK
        result = make_result(i, Verdict.NG if i < 3 else Verdict.OK)
        result.image = np.zeros((8, 8, 3), np.uint8)
        bus.publish(result)
    disk_free.set()
    bus.close()
    assert sorted(int(n.split("_f")[1].split("_")[0]) for n in os.listdir(tmp_path / "ng")) == [0, 1, 2]
    assert bus.counters.dropped == 0

def test_a_verdict_queued_past_its_deadline_is_never_sent_late(caplog):
    """A stalled serial port holds part 1's OK past the controller's timeout; by then the controller may have
    triggered part 2. The OK must not reach the port after the deadline; part 2's own verdict still does."""
    stalled, fast = Stalled(), RecordingOutput()
    bus = OutputBus([stalled, fast], late_after_s=10.0)
    bus.start()
    bus.begin_part(0)
    bus.publish(make_result(0), started=time.monotonic(), deadline_ms=5000)   # being written when the port stalls
    bus.begin_part(1)
    bus.publish(make_result(1, Verdict.OK), started=time.monotonic(), deadline_ms=100)
    time.sleep(0.3)                                   # part 1's deadline passes while the port is stalled
    bus.begin_part(2)
    bus.publish(make_result(2, Verdict.NG), started=time.monotonic(), deadline_ms=5000)
    stalled.release.set()
    bus.close()
    assert [r.frame_id for r in stalled.results] == [0, 2], "part 1's OK was sent after its deadline"
    assert [r.frame_id for r in fast.results] == [0, 1, 2]
    assert bus.counters.expired == 1 and bus.output_counters()["output_expired"] == 1
    assert "part 1 OK not sent: its deadline passed" in caplog.text and "(the port was stalled)" in caplog.text


def test_a_part_already_late_when_published_is_not_blamed_on_the_port(caplog):
    """An inspection loop that hung past the deadline: the part is FAULT on every output at once, and a slow
    output drops it without waiting (a late answer would put a counting controller one part off); the log says
    the loop was late, not the port (probe 35)."""
    slow = RecordingOutput()
    slow.slow = True
    bus = OutputBus([slow])
    bus.start()
    bus.begin_part(3)
    bus.publish(make_result(3, Verdict.OK), started=time.monotonic() - 5.0, deadline_ms=2000)
    bus.close()
    assert slow.results == [] and bus.counters.expired == 1
    assert "part 3 FAULT not sent: its deadline had passed before it was queued (the inspection loop was late)" \
        in caplog.text and "port was stalled" not in caplog.text


def test_errors_from_any_output_are_counted_and_do_not_stop_the_others():
    journal = Journal()
    broken = journaled("broken", journal, fail_on=("begin_part", "publish", "heartbeat"))
    other = journaled("other", journal)
    bus = OutputBus([broken, other])
    bus.begin_part(1)
    bus.publish(make_result(1))
    bus.heartbeat()
    assert [m for n, m, _ in journal.entries if n == "other"] == ["begin_part", "publish", "heartbeat"]
    assert bus.counters.errors == 3


def test_acknowledge_reaches_line_outputs_only():
    journal = Journal()
    gpio, images = journaled("gpio", journal), journaled("images", journal, role="record")
    bus = OutputBus([gpio, images])
    bus.acknowledge()
    assert journal.entries == [("gpio", "acknowledge", None)]


def test_serial_writes_happen_on_the_worker_never_in_the_loop_thread(tmp_path):
    """A real pty whose PLC end never reads: the port's buffer fills and writes time out, on the worker."""
    master, slave = os.openpty()
    tty.setraw(master)
    name = os.ttyname(slave)
    os.close(slave)
    serial_out = SerialOutput(SerialConfig(port=name, timeout=0.05, reconnect_interval_s=3600))
    writers: set[str] = set()
    original = serial_out.publish

    def publish(result):
        writers.add(threading.current_thread().name)
        return original(result)

    serial_out.publish = publish
    fast = RecordingOutput()
    bus = OutputBus([serial_out, fast], queue_size=8)
    try:
        bus.start()
        for i in range(3000):                       # ~100 kB of RES lines into a pty nobody reads
            bus.publish(make_result(i))
        assert len(fast.results) == 3000
        bus.close()
    finally:
        os.close(master)
    assert writers == {f"output:{serial_out.name}"}, "RES lines are written by the worker, never by the loop"
    assert bus.counters.dropped + bus.counters.errors > 0, "what could not be written was counted"


def test_output_error_from_a_worker_is_counted():
    class Failing(RecordingOutput):
        slow = True

        def publish(self, result):
            raise OutputError("port gone")

    bus = OutputBus([Failing()])
    bus.start()
    bus.publish(make_result(1))
    bus.close()
    assert bus.counters.errors == 1


@pytest.mark.parametrize("verdict", [Verdict.REVIEW, Verdict.NG, Verdict.FAULT])
def test_the_bus_never_turns_a_non_ok_verdict_into_ok(verdict, tmp_path):
    line = RecordingOutput()
    bus = OutputBus([line, ResultLog(ResultLogConfig(path=str(tmp_path / "r.jsonl")))])
    bus.start()
    bus.publish(make_result(1, verdict), started=time.monotonic(), deadline_ms=60_000)
    bus.close()
    assert line.results[0].verdict is verdict


def test_an_output_failing_the_same_way_is_logged_once_not_on_every_retry(caplog):
    """A port that is gone is retried every second and on every part: one ERROR line (then one a minute), every
    failure still counted, and a line when it works again."""
    import logging

    out = RecordingOutput()
    out.fail_on = {"set_ready", "set_fault"}
    bus = OutputBus([out])
    with caplog.at_level(logging.DEBUG, logger="edge_runtime.output_bus"):
        for _ in range(5):
            bus.set_ready(True)
            bus.set_fault("x")
        out.fail_on = set()
        bus.set_ready(True)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "set_ready failed" in errors[0].getMessage()
    assert bus.counters.errors == 10
    assert any("works again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_part_beginning_or_a_trigger_withdraws_a_current_verdict_on_records_that_show_one():
    """OPC UA's LastResult is a record, not a line output, yet a client reads IsPass as the answer: begin_part and
    a software trigger tell every output that shows a current verdict (`verdict_withdrawn`); a trigger also
    withdraws the line outputs' verdict (acknowledge)."""
    class ShowsVerdict(RecordingOutput):
        role = "record"

        def verdict_withdrawn(self) -> None:
            self._record("verdict_withdrawn", None)

    line, shows = RecordingOutput(), ShowsVerdict()
    bus = OutputBus([line, shows])
    bus.start()
    bus.begin_part(1)
    assert shows.calls_to("verdict_withdrawn") == [None] and line.calls_to("begin_part") == [1]
    bus.trigger_accepted()
    assert len(shows.calls_to("verdict_withdrawn")) == 2 and len(line.calls_to("acknowledge")) == 1
    bus.close()


def test_a_slow_line_output_never_loses_a_ready_change_to_the_loops_heartbeats():
    """The loop hands every output a heartbeat each round (every 2 ms with frames in flight). Queued behind a slow
    serial write they filled the queue and pushed out the oldest call, the `RDY 0` the station had just sent: the
    PLC kept reading READY while the station had stopped inspecting (probe 77). Heartbeats coalesce, and a full
    queue gives up a heartbeat or a verdict before a READY or fault change."""
    stalled = Stalled()
    bus = OutputBus([stalled], queue_size=8)
    bus.start()
    bus.publish(make_result(0))          # the worker is stuck writing this one
    time.sleep(0.2)
    bus.set_fault("record: disk full")
    bus.set_ready(False)
    for i in range(1, 4):
        bus.begin_part(i)
        bus.publish(make_result(i))
    for _ in range(200):                 # the loop goes round while the port is slow
        bus.heartbeat()
    stalled.release.set()
    bus.close()
    assert stalled.calls_to("set_ready") == [False], "READY down reached the PLC"
    assert stalled.calls_to("set_fault") == ["record: disk full"]
    assert stalled.heartbeats <= 2, "heartbeats waiting behind a stalled port coalesce"
