"""GpioOutput fail-safe behaviour with FakeGpioLines, and the real libgpiod path on a gpio-sim chip when available."""
from __future__ import annotations

import os
import threading
import time
import uuid

import pytest

from edge_runtime.outputs.base import OutputError
from edge_runtime.outputs.gpio_output import GpioConfig, GpioLine, GpioOutput
from doubles import FakeGpioLines
from edge_runtime.records import InspectionResult, Verdict

OK, NG, READY, ERROR, HB = 1, 2, 3, 4, 5
REVIEW, BUSY, VALID, ACK = 6, 7, 8, 9


def make_result(frame_id: int, verdict: Verdict) -> InspectionResult:
    inspected = verdict is not Verdict.FAULT
    return InspectionResult(
        frame_id=frame_id, source="cam0", verdict=verdict, score=1.0 if inspected else None,
        normalized_score=0.4 if inspected else None, threshold=2.0, timings_ms={}, bundle_id="b",
        error=None if inspected else "camera timeout",
    )


def make_config(**overrides) -> GpioConfig:
    cfg = dict(ok=GpioLine(offset=OK), ng=GpioLine(offset=NG), ready=GpioLine(offset=READY),
               error=GpioLine(offset=ERROR, active_low=True), heartbeat=GpioLine(offset=HB), pulse_ms=0)
    cfg.update(overrides)
    return GpioConfig(**cfg)


@pytest.fixture
def gpio():
    lines = FakeGpioLines()
    out = GpioOutput(make_config(), lines)
    out.start()
    yield out, lines
    out.close()


def test_start_requests_every_line_inactive_with_its_polarity(gpio):
    out, lines = gpio
    assert lines.events[0] == ("request", {OK: False, NG: False, READY: False, ERROR: True, HB: False})
    assert all(value is False for value in lines.history[0].values()), "every line starts de-asserted"
    assert lines.state == {OK: False, NG: False, READY: False, ERROR: False, HB: False}
    assert lines.physical(ERROR) is True, "active-low ERROR idles high"


def test_ok_only_after_an_inspected_ok_part(gpio):
    out, lines = gpio
    out.set_ready(True)
    assert lines.state[OK] is False and lines.state[READY] is True
    out.publish(make_result(1, Verdict.OK))
    assert lines.state[OK] is True and lines.state[NG] is False
    out.publish(make_result(2, Verdict.NG))
    assert lines.state[OK] is False and lines.state[NG] is True, "an NG result clears OK"
    # OK and NG are never asserted together at any recorded instant.
    assert not any(snapshot.get(OK) and snapshot.get(NG) for snapshot in lines.history)


def test_fault_result_is_not_ok_and_raises_error_until_a_part_is_inspected(gpio):
    out, lines = gpio
    out.set_ready(True)
    out.publish(make_result(1, Verdict.OK))
    out.publish(make_result(2, Verdict.FAULT))
    assert lines.state[OK] is False and lines.state[NG] is False and lines.state[ERROR] is True
    assert lines.physical(ERROR) is False, "active-low ERROR is driven low when asserted"
    out.publish(make_result(3, Verdict.OK))
    assert lines.state[OK] is True and lines.state[ERROR] is False


def test_set_fault_drops_ok_and_asserts_error(gpio):
    out, lines = gpio
    out.set_ready(True)
    out.publish(make_result(1, Verdict.OK))
    out.set_fault("camera lost")
    assert lines.state[ERROR] is True and lines.state[OK] is False
    out.set_fault(None)
    assert lines.state[ERROR] is False
    assert lines.state[OK] is False, "clearing a fault does not resurrect the previous part's OK"


def test_not_ready_drops_ok(gpio):
    out, lines = gpio
    out.set_ready(True)
    out.publish(make_result(1, Verdict.OK))
    out.set_ready(False)
    assert lines.state[READY] is False and lines.state[OK] is False


def test_close_drives_everything_inactive_then_releases(gpio):
    out, lines = gpio
    out.set_ready(True)
    out.publish(make_result(1, Verdict.OK))
    out.set_fault("x")
    out.close()
    assert lines.events[-1] == ("release",)
    assert all(value is False for value in lines.history[-1].values())
    assert not lines.requested
    out.close()  # idempotent


def test_heartbeat_toggles_its_line_only(gpio):
    out, lines = gpio
    seen = []
    for _ in range(4):
        out.heartbeat()
        seen.append(lines.state[HB])
        assert lines.events[-1][0] == "set" and set(lines.events[-1][1]) == {HB}
    assert seen == [True, False, True, False]


def test_heartbeat_without_a_line_is_a_no_op():
    lines = FakeGpioLines()
    out = GpioOutput(make_config(heartbeat=None), lines)
    out.start()
    before = list(lines.events)
    out.heartbeat()
    assert lines.events == before


def test_pulse_mode_drops_ok_after_the_pulse():
    lines = FakeGpioLines()
    out = GpioOutput(make_config(pulse_ms=20), lines)
    out.start()
    out.set_ready(True)
    out.publish(make_result(1, Verdict.OK))
    assert lines.state[OK] is True
    deadline = time.monotonic() + 5.0
    while lines.state[OK] and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lines.state[OK] is False, "the OK pulse must end on its own"
    assert lines.state[READY] is True
    out.close()


def test_a_new_part_cancels_the_previous_pulse():
    lines = FakeGpioLines()
    out = GpioOutput(make_config(pulse_ms=60_000), lines)
    out.start()
    out.publish(make_result(1, Verdict.OK))
    first_timer, first_generation = out._pulse_timer, out._pulse_generation
    out.publish(make_result(2, Verdict.NG))
    assert first_timer.finished.is_set(), "the first pulse timer is cancelled"
    out._end_pulse(first_generation)  # a timer that fired just before it was cancelled must not touch part 2
    assert lines.state[OK] is False and lines.state[NG] is True
    out.close()
    assert out._pulse_timer is None


def test_hardware_errors_become_output_errors():
    lines = FakeGpioLines()
    lines.fail_with = OSError(16, "Device or resource busy")
    out = GpioOutput(make_config(), lines)
    with pytest.raises(OutputError, match="gpiochip0.*busy"):
        out.start()
    with pytest.raises(OutputError, match="not requested"):
        out.publish(make_result(1, Verdict.OK))
    out.start()
    lines.fail_with = OSError(5, "Input/output error")
    with pytest.raises(OutputError, match="Input/output error"):
        out.publish(make_result(2, Verdict.OK))
    out.close()


def test_real_backend_reports_a_missing_chip_as_output_error(tmp_path):
    chip = str(tmp_path / "gpiochip9")
    out = GpioOutput(make_config(chip=chip))  # LibgpiodLines: imports gpiod and asks the kernel for the chip
    with pytest.raises(OutputError, match="gpiochip9"):
        out.start()
    out.close()  # nothing was requested: closing must still be clean


def test_config_rejects_shared_offsets_and_empty_configs():
    with pytest.raises(ValueError, match="already used"):
        make_config(ng=GpioLine(offset=OK)).validate()
    with pytest.raises(ValueError, match="at least one"):
        GpioConfig().validate()


def test_publish_from_two_threads_keeps_ok_and_ng_exclusive():
    lines = FakeGpioLines()
    out = GpioOutput(make_config(), lines)
    out.start()

    def spam(verdict):
        for i in range(200):
            out.publish(make_result(i, verdict))

    threads = [threading.Thread(target=spam, args=(v,)) for v in (Verdict.OK, Verdict.NG)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(snapshot.get(OK) and snapshot.get(NG) for snapshot in lines.history)
    out.close()


# -- per-part handshake ---------------------------------------------------------------------------------------


def handshake_output(**overrides) -> tuple[GpioOutput, FakeGpioLines]:
    lines = FakeGpioLines()
    cfg = dict(review=GpioLine(offset=REVIEW), busy=GpioLine(offset=BUSY), result_valid=GpioLine(offset=VALID))
    cfg.update(overrides)
    out = GpioOutput(make_config(**cfg), lines)
    out.start()
    out.set_ready(True)
    return out, lines


def test_level_mode_gives_every_part_its_own_edge_and_withdraws_ok_while_the_next_is_captured():
    out, lines = handshake_output(pulse_ms=0)
    for frame_id in range(3):               # three OK parts in a row
        out.begin_part(frame_id)
        assert lines.state[OK] is False and lines.state[VALID] is False and lines.state[BUSY] is True, \
            "while the next part is captured no verdict stands"
        out.publish(make_result(frame_id, Verdict.OK))
        assert lines.state[OK] is True and lines.state[VALID] is True and lines.state[BUSY] is False
    ok_levels = [snapshot[OK] for snapshot in lines.history]
    rising_edges = sum(1 for a, b in zip(ok_levels, ok_levels[1:]) if not a and b)
    assert rising_edges == 3, "one OK edge per part"
    for snapshot in lines.history:
        if snapshot[VALID]:
            assert not snapshot[BUSY] and sum(snapshot[r] for r in (OK, NG, REVIEW)) == 1, \
                "RESULT_VALID only ever shows one settled verdict, never BUSY"
    out.close()


def test_result_valid_rises_after_the_verdict_lines_and_falls_before_them():
    out, lines = handshake_output(pulse_ms=0)
    out.begin_part(1)
    out.publish(make_result(1, Verdict.NG))
    out.begin_part(2)
    sets = [e[1] for e in lines.events if e[0] == "set" and (VALID in e[1] or NG in e[1])]
    rise = next(i for i, v in enumerate(sets) if v.get(VALID) is True)
    fall = next(i for i, v in enumerate(sets) if i > rise and v.get(VALID) is False)
    assert sets[rise - 1].get(NG) is True and NG not in sets[rise], "verdict first, then RESULT_VALID"
    assert NG not in sets[fall] and sets[fall + 1].get(NG) is False, "RESULT_VALID drops first, then the verdict"
    out.close()


def test_ack_input_from_the_plc_withdraws_the_verdict():
    out, lines = handshake_output(pulse_ms=0, ack=GpioLine(offset=ACK))
    assert ACK in lines.watched and ACK not in lines.state, "ACK is an input, not driven"
    out.begin_part(1)
    out.publish(make_result(1, Verdict.OK))
    assert lines.state[OK] and lines.state[VALID]
    lines.press(ACK)
    assert lines.state[OK] is False and lines.state[VALID] is False and out.acks == 1
    assert lines.state[READY] is True
    out.close()


def test_pulse_mode_is_the_default_and_the_strobe_ends_with_the_pulse():
    assert GpioConfig().pulse_ms > 0, "pulse mode by default: no verdict level outlives its part"
    out, lines = handshake_output(pulse_ms=20)
    out.begin_part(1)
    out.publish(make_result(1, Verdict.OK))
    deadline = time.monotonic() + 5.0
    while (lines.state[OK] or lines.state[VALID]) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lines.state[OK] is False and lines.state[VALID] is False
    out.close()


@pytest.mark.parametrize("config, review, ng", [
    ({}, True, False),                                   # a REVIEW line: REVIEW only
    ({"review_as_ng": True}, True, True),                # and NG too when asked
    ({"review": None}, None, True),                      # no REVIEW line: NG, so an OK/NG-only PLC rejects it
    ({"review": None, "review_as_ng": False}, None, False),
])
def test_review_never_drives_ok(config, review, ng):
    out, lines = handshake_output(pulse_ms=0, **config)
    out.begin_part(1)
    out.publish(make_result(1, Verdict.OK))
    out.begin_part(2)
    out.publish(make_result(2, Verdict.REVIEW))
    assert lines.state[OK] is False and lines.state[NG] is ng
    if review is not None:
        assert lines.state[REVIEW] is True
    assert lines.state[VALID] is True
    after = lines.history[[i for i, e in enumerate(lines.events) if e[0] == "set" and e[1].get(BUSY) is True][-1]:]
    assert not any(snapshot[OK] for snapshot in after), "OK is never asserted for the REVIEW part"
    out.close()


# -- the real libgpiod path on a simulated chip --------------------------------------------------------------

GPIO_SIM = "/sys/kernel/config/gpio-sim"


def _gpio_sim_unavailable() -> str | None:
    if not os.path.isdir(GPIO_SIM):
        return (f"{GPIO_SIM} does not exist: the gpio-sim kernel module is not loaded (modprobe gpio-sim) "
                "or configfs is not mounted; the real libgpiod path needs a GPIO chip")
    if not os.access(GPIO_SIM, os.W_OK):
        return f"{GPIO_SIM} is not writable (run as root to create a simulated chip)"
    return None


@pytest.fixture
def sim_chip():
    """A live gpio-sim chip with 8 lines: yields (/dev path, function reading a line's output level)."""
    reason = _gpio_sim_unavailable()
    if reason:
        pytest.skip(reason)
    dev = os.path.join(GPIO_SIM, f"edge-test-{uuid.uuid4().hex[:8]}")
    bank = os.path.join(dev, "bank0")
    os.mkdir(dev)
    os.mkdir(bank)
    try:
        with open(os.path.join(bank, "num_lines"), "w") as f:
            f.write("8")
        with open(os.path.join(dev, "live"), "w") as f:
            f.write("1")
        dev_name = open(os.path.join(dev, "dev_name")).read().strip()
        chip_name = open(os.path.join(bank, "chip_name")).read().strip()

        def level(offset: int) -> int:
            path = f"/sys/devices/platform/{dev_name}/{chip_name}/sim_gpio{offset}/value"
            return int(open(path).read().strip())

        yield f"/dev/{chip_name}", level
    finally:
        if os.path.exists(os.path.join(dev, "live")):
            with open(os.path.join(dev, "live"), "w") as f:
                f.write("0")
        os.rmdir(bank)
        os.rmdir(dev)


def test_real_libgpiod_lines_on_gpio_sim(sim_chip):
    chip, level = sim_chip
    out = GpioOutput(make_config(chip=chip))  # default: LibgpiodLines
    out.start()
    try:
        assert (level(OK), level(NG), level(READY), level(ERROR)) == (0, 0, 0, 1)  # ERROR is active-low
        out.set_ready(True)
        out.publish(make_result(1, Verdict.OK))
        assert (level(OK), level(NG), level(READY)) == (1, 0, 1)
        out.publish(make_result(2, Verdict.FAULT))
        assert (level(OK), level(ERROR)) == (0, 0)
        out.heartbeat()
        assert level(HB) == 1
    finally:
        out.close()


def failing_writes(lines: FakeGpioLines, n: int) -> None:
    """The next `n` set_values calls fail with EIO (a flaky GPIO expander, a brown-out on the bus)."""
    original, left = lines.set_values, [n]

    def set_values(values):
        if left[0] > 0:
            left[0] -= 1
            raise OSError(5, "Input/output error")
        original(values)
    lines.set_values = set_values


def test_a_failed_write_while_withdrawing_an_ok_never_leaves_it_standing_for_the_next_part():
    out, lines = handshake_output(pulse_ms=0)
    out.begin_part(0)
    out.publish(make_result(0, Verdict.OK))
    assert lines.state[OK] and lines.state[VALID]
    failing_writes(lines, 1)                       # the write that drops RESULT_VALID fails once: retried at once
    out.begin_part(1)
    assert not lines.state[OK] and not lines.state[VALID] and lines.state[BUSY], \
        "the last part's OK stands while the next part is inspected"
    out.publish(make_result(1, Verdict.NG))
    assert lines.state[NG] and lines.state[VALID] and not lines.state[OK]
    failing_writes(lines, 2)                       # fails twice: the bus gets the error...
    with pytest.raises(OutputError):
        out.begin_part(2)
    out.publish(make_result(2, Verdict.NG))        # ...and the next write sets every line, not only the changed ones
    assert lines.state[NG] and lines.state[VALID] and not lines.state[BUSY] and not lines.state[OK]
    for snapshot in lines.history:
        if snapshot[VALID]:
            assert sum(snapshot[r] for r in (OK, NG, REVIEW)) == 1
    out.close()


def test_a_pulse_end_that_cannot_drop_ok_holds_the_line_in_fault_until_every_line_is_written():
    """The timer that ends a verdict pulse has no caller to raise to: its failure must still reach the line (FAULT,
    READY down), and OK must not stand once any later write works (probe 60: OK stayed up until the next part)."""
    from edge_runtime.output_bus import OutputBus

    lines = FakeGpioLines()
    out = GpioOutput(make_config(pulse_ms=60_000), lines)
    bus = OutputBus([out])
    assert bus.start() is None
    bus.set_ready(True)
    bus.publish(make_result(1, Verdict.OK))
    assert lines.state[OK] is True and out.failure() is None and bus.line_output_fault() is None
    lines.fail_with = OSError(5, "Input/output error")
    out._end_pulse(out._pulse_generation)              # the timer fires; the chip refuses the write
    assert lines.state[OK] is True                     # the pin still shows OK ...
    assert "ending the verdict pulse failed, OK may still show" in out.failure()
    assert bus.line_output_fault().startswith(f"{out.name}: ending the verdict pulse failed")   # ... so: FAULT
    assert out.state["ok"] is False                    # what the station means: withdrawn
    bus.retry_failed_lines(False, "output gpio")       # the line's retry writes every line, and it works now
    assert lines.state[OK] is False and lines.state[READY] is False
    assert out.failure() is None and bus.line_output_fault() is None
    bus.close()


def test_a_heartbeat_after_a_failed_pulse_end_writes_the_withdrawn_verdict():
    lines = FakeGpioLines()
    out = GpioOutput(make_config(pulse_ms=60_000), lines)
    out.start()
    out.set_ready(True)
    out.publish(make_result(1, Verdict.OK))
    lines.fail_with = OSError(5, "Input/output error")
    out._end_pulse(out._pulse_generation)
    assert lines.state[OK] is True and out.failure() is not None
    out.heartbeat()                                    # the next loop's write goes to every line
    assert lines.state[OK] is False and out.failure() is None
    out.close()


def test_back_to_back_answers_each_stand_and_are_apart_for_hold_ms():
    """A PLC reads its inputs once per scan: an answer withdrawn at once by the next part's begin_part (a folded
    trigger's FAULT, frames in flight finished together) was never seen (probe 77)."""
    out, lines = handshake_output(pulse_ms=200, hold_ms=30)
    stamps = []
    original = lines.set_values
    lines.set_values = lambda values: (original(values), stamps.append((time.monotonic(), dict(lines.state))))
    out.begin_part(1)
    out.publish(make_result(1, Verdict.FAULT))
    out.begin_part(2)
    out.publish(make_result(2, Verdict.OK))
    rises = [t for (t, s), (_, p) in zip(stamps[1:], stamps) if s[VALID] and not p[VALID]]
    falls = [t for (t, s), (_, p) in zip(stamps[1:], stamps) if not s[VALID] and p[VALID]]
    assert len(rises) == 2 and len(falls) == 1
    assert falls[0] - rises[0] >= 0.025, "the FAULT answer stood its hold"
    assert rises[1] - falls[0] >= 0.025, "RESULT_VALID stayed down for the hold between the two answers"
    out.acknowledge()                      # the PLC's ACK withdraws at once, no hold
    assert lines.state[OK] is False and lines.state[VALID] is False
    out.close()


def test_hold_ms_is_validated_against_the_pulse():
    with pytest.raises(ValueError, match="hold_ms: must not exceed pulse_ms"):
        GpioConfig(ok=GpioLine(offset=OK), pulse_ms=10, hold_ms=20).validate()
    with pytest.raises(ValueError, match="hold_ms: must be 0 or more"):
        GpioConfig(ok=GpioLine(offset=OK), hold_ms=-1).validate()


def test_an_ok_or_ready_line_that_reads_asserted_when_released_is_refused():
    """A dead daemon releases its lines to the board's pull resistors: an active-low OK line on pull-downs (the
    default, `released: low`) then reads OK, an active-high one on pull-ups likewise (a probe: the libgpiod adapter
    sets no bias, so nothing else stops it)."""
    with pytest.raises(ValueError, match=r"ok.active_low: an active-low OK line reads asserted"):
        GpioConfig(ok=GpioLine(offset=OK, active_low=True)).validate()
    with pytest.raises(ValueError, match=r"ready.active_low: an active-high READY line .*released: high"):
        GpioConfig(ready=GpioLine(offset=READY), released="high").validate()
    GpioConfig(ok=GpioLine(offset=OK, active_low=True), ready=GpioLine(offset=READY, active_low=True),
               released="high").validate()                                    # sinking driver with pull-ups
    GpioConfig(ok=GpioLine(offset=OK), ng=GpioLine(offset=NG, active_low=True)).validate()   # NG may read asserted
    with pytest.raises(ValueError, match="released: must be low or high"):
        GpioConfig(ok=GpioLine(offset=OK), released="floating").validate()


def test_an_ack_that_cannot_withdraw_the_verdict_holds_the_line_in_fault_until_every_line_is_written():
    """ACK is not a state call, so the bus never faulted the line on it: a failed withdrawal left the acknowledged
    OK standing with READY up and nothing said (probe 99). failure() names it; the next full write withdraws it."""
    from edge_runtime.output_bus import OutputBus

    lines = FakeGpioLines()
    out = GpioOutput(make_config(result_valid=GpioLine(offset=VALID), ack=GpioLine(offset=ACK)), lines)
    bus = OutputBus([out])
    assert bus.start() is None
    bus.set_ready(True)
    bus.begin_part(1)
    bus.publish(make_result(1, Verdict.OK))
    lines.fail_with = OSError(5, "Input/output error")
    with pytest.raises(OutputError):
        lines.press(ACK)                                # the PLC acknowledges; the chip refuses the write
    assert lines.state[OK] is True                      # the pin still shows OK ...
    assert bus.line_output_fault().startswith(f"{out.name}: withdrawing the verdict on ACK failed")  # ... FAULT
    out.heartbeat()                                     # the next write goes to every line, and works
    assert lines.state[OK] is False and lines.state[VALID] is False
    assert out.failure() is None and bus.line_output_fault() is None
    bus.close()


class _FakeEdgeRequest:
    """A gpiod input request: `edges` pending rising edges; `lost` makes the next wait fail (the chip is gone)."""

    def __init__(self) -> None:
        self.edges = 0
        self.lost: Exception | None = None
        self.lock = threading.Lock()

    def wait_edge_events(self, timeout) -> bool:
        time.sleep(0.005)
        with self.lock:
            if self.lost is not None:
                raise self.lost
            return self.edges > 0

    def read_edge_events(self) -> None:
        with self.lock:
            self.edges -= 1

    def release(self) -> None:
        pass


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_the_ack_watcher_survives_a_failed_ack_and_reports_a_lost_input(monkeypatch):
    """One ACK whose withdrawal failed (EIO) ended the libgpiod watcher for good: every later ACK was ignored with
    the line READY (probe 99). And an input that is gone must fault the line, not only be logged."""
    import gpiod

    from edge_runtime.outputs.gpio_output import LibgpiodLines

    request = _FakeEdgeRequest()
    monkeypatch.setattr(gpiod, "request_lines", lambda *a, **k: request)
    lines = LibgpiodLines("/dev/gpiochip-fake", "test")
    handled = []

    def on_assert():
        handled.append(1)
        if len(handled) == 1:
            raise OutputError("GPIO: cannot set lines: EIO")

    lines.watch(ACK, False, on_assert)
    try:
        for n in (1, 2, 3):
            with request.lock:
                request.edges += 1
            assert _wait_for(lambda: len(handled) == n), f"ACK {n} was not handled"
        assert lines.watch_failure is None
        out = GpioOutput(make_config(), lines)          # failure() reads the backend's watcher
        request.lost = OSError(19, "No such device")
        assert _wait_for(lambda: lines.watch_failure is not None)
        assert "ACK input lost" in out.failure() and "No such device" in out.failure()
    finally:
        lines.release()
