"""A GPIO edge while the line cannot inspect is answered FAULT at once, as a software trigger is.

The line drained the edges waiting, slept recovery.read_timeout_s, then answered what it had drained: an edge that
came during the sleep waited for the next drain and the sleep after it, up to two read_timeouts (probe 77: 1.6-1.7 s
with read_timeout_s 1.0, a bundle missing). A controller that has timed out on that part reads the late FAULT as
the next part's answer, and every later answer one part off.
"""
from __future__ import annotations

import time

from doubles import RecordingOutput, ScriptedSource
from edge_runtime.config import load_station
from edge_runtime.records import Verdict
from edge_runtime.triggers import FakeEdgeLine, GpioTrigger


def test_an_edge_while_the_line_has_no_bundle_is_answered_well_within_read_timeout(tmp_path, write_station,
                                                                                   start_station, wait_until):
    edge = FakeEdgeLine()
    cfg = load_station(write_station(bundle=tmp_path / "missing", source={"type": "scripted"},
                                     trigger={"type": "gpio", "chip": "/dev/gpiochip0", "line": 17},
                                     recovery={"read_timeout_s": 2.0}))
    rec = RecordingOutput()
    running = start_station(cfg, source=ScriptedSource(steps=[]), outputs=[rec],
                            trigger=GpioTrigger(cfg.trigger, lambda _cfg: edge))
    wait_until(lambda: running.station.fault_reason and "missing" in running.station.fault_reason, what="FAULT")
    delays = []
    for _ in range(3):
        time.sleep(0.3)
        sent, answered = time.monotonic(), len(rec.results)
        edge.push_edge()
        wait_until(lambda: len(rec.results) > answered, timeout=10, what="the FAULT answer")
        delays.append(time.monotonic() - sent)
    assert running.stop() == 0
    assert [r.verdict for r in rec.results] == [Verdict.FAULT] * 3
    assert all("station not ready" in r.error for r in rec.results)
    assert max(delays) < 0.5, f"answered {[round(d * 1000) for d in delays]} ms after the edge (read_timeout_s 2)"
