"""Every answer on the GPIO lines stands long enough for a PLC that reads its inputs once per scan.

Two GPIO edges read together (the loop was busy) are two parts: the folded one is answered FAULT and the newest is
inspected. Both answers were driven back to back: the FAULT's RESULT_VALID stood for under a millisecond before the
next part's begin_part withdrew it, so a PLC scanning every few ms saw one RESULT_VALID edge, with OK, and paired it
with the first part, which was never inspected (probe 77). GpioConfig.hold_ms keeps each answer up, and the gap
before the next, at least that long.
"""
from __future__ import annotations

import time

import pytest

from doubles import FakeGpioLines, RecordingOutput, ScriptedSource
from edge_runtime.config import load_station
from edge_runtime.outputs import GpioConfig, GpioLine, GpioOutput
from edge_runtime.records import Verdict
from edge_runtime.triggers import FakeEdgeLine, GpioTrigger

OK, NG, READY, VALID, ERROR = 1, 2, 3, 4, 5


class TimedLines(FakeGpioLines):
    """FakeGpioLines that also notes when each write happened (the PLC sees levels over time)."""

    def __init__(self) -> None:
        super().__init__()
        self.timed: list[tuple[float, dict[int, bool]]] = []

    def set_values(self, values) -> None:
        super().set_values(values)
        self.timed.append((time.monotonic(), dict(self.state)))


class TriggeredCamera(ScriptedSource):
    def notify_trigger(self, at_wall=None, at=None) -> None:
        pass


def valid_phases(timed) -> list[tuple[bool, float]]:
    """(RESULT_VALID level, how long it stayed so) for every phase that ended, in order."""
    phases, level, since = [], False, None
    for at, state in timed:
        value = state.get(VALID, False)
        if value != level:
            if since is not None:
                phases.append((level, at - since))
            level, since = value, at
    return phases


def test_a_folded_triggers_fault_and_the_next_verdict_are_two_answers_a_scanning_plc_sees(
        device_bundle, good_part, write_station, start_station, wait_until):
    edge = FakeEdgeLine()
    cfg = load_station(write_station(bundle=device_bundle, source={"type": "scripted"},
                                     trigger={"type": "gpio", "chip": "/dev/gpiochip0", "line": 17},
                                     recovery={"read_timeout_s": 0.2}))
    lines = TimedLines()
    gpio = GpioOutput(GpioConfig(ok=GpioLine(offset=OK), ng=GpioLine(offset=NG), ready=GpioLine(offset=READY),
                                 result_valid=GpioLine(offset=VALID), error=GpioLine(offset=ERROR),
                                 pulse_ms=200), lines)
    rec = RecordingOutput()
    running = start_station(cfg, source=TriggeredCamera(steps=[good_part] * 3), outputs=[gpio, rec],
                            trigger=GpioTrigger(cfg.trigger, lambda _cfg: edge))
    wait_until(lambda: rec.ready, what="READY")
    edge.push_edge(2)   # two parts passed while the loop was busy: one overrun FAULT, one inspection
    wait_until(lambda: len(rec.results) == 2, what="both answers")
    time.sleep(0.5)     # the second answer's pulse ends on its own
    assert running.stop() == 0
    assert [r.verdict for r in rec.results] == [Verdict.FAULT, Verdict.OK]
    phases = valid_phases(lines.timed)
    ups = [d for level, d in phases if level]
    assert len(ups) >= 2, f"two RESULT_VALID pulses: {phases}"
    hold = 0.020   # the default hold_ms
    # Generous margins: the hold is a floor, only sleep's granularity is allowed below it.
    assert ups[0] >= 0.75 * hold, f"the FAULT answer stood {ups[0] * 1000:.2f} ms: a PLC scan misses it"
    gap = next(d for level, d in phases[1:] if not level)
    assert gap >= 0.75 * hold, f"RESULT_VALID was down {gap * 1000:.2f} ms between two answers"
