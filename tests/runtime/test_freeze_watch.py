"""FreezeWatch dates an input read right after the process did not run from the start of that freeze, so a
trigger that waited in the kernel through a SIGSTOP is as old as it really is (probe 35)."""
from __future__ import annotations

from edge_runtime.freeze_watch import FREEZE_S, SETTLE_S, FreezeWatch
from edge_runtime.triggers import SoftwareTrigger, SoftwareTriggerConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ticking(clock: Clock, seconds: float, watch: FreezeWatch) -> None:
    """The ticker running normally for `seconds`."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += 0.01
        watch.tick()


def test_inputs_read_while_running_normally_keep_their_read_time():
    clock = Clock()
    watch = FreezeWatch(clock)
    ticking(clock, 1.0, watch)
    assert watch.earliest(clock.now) == clock.now
    assert watch.freezes == 0


def test_an_input_read_before_the_ticker_ran_again_is_dated_from_the_freeze_start():
    clock = Clock()
    watch = FreezeWatch(clock)
    ticking(clock, 0.5, watch)
    frozen_at = clock.now
    clock.now += 5.0                                  # SIGSTOP for 5 s, then SIGCONT: the reader runs first
    assert watch.earliest(clock.now) == frozen_at


def test_an_input_read_just_after_the_ticker_noticed_is_dated_from_the_freeze_start_later_ones_are_not():
    clock = Clock()
    watch = FreezeWatch(clock)
    ticking(clock, 0.5, watch)
    frozen_at = clock.now
    clock.now += 2.0
    watch.tick()                                      # the ticker ran first this time
    assert watch.freezes == 1
    assert watch.earliest(clock.now + SETTLE_S / 2) == frozen_at
    # A trigger sent 20 ms after the process ran again is fresh (probe 36: a 50 ms window dated it 0.4 s old).
    assert watch.earliest(clock.now + 0.02) == clock.now + 0.02
    ticking(clock, 2 * SETTLE_S, watch)
    assert watch.earliest(clock.now) == clock.now     # a trigger that came after the freeze


def test_scheduling_jitter_below_the_freeze_limit_is_not_a_freeze():
    clock = Clock()
    watch = FreezeWatch(clock)
    clock.now += FREEZE_S * 0.9
    watch.tick()
    assert watch.freezes == 0 and watch.earliest(clock.now) == clock.now


def test_a_software_trigger_read_after_a_freeze_is_as_old_as_the_freeze():
    clock = Clock()
    watch = FreezeWatch(clock)
    trigger = SoftwareTrigger(SoftwareTriggerConfig(max_age_ms=250), freeze_watch=watch)
    ticking(clock, 0.2, watch)
    frozen_at = clock.now
    clock.now += 5.0
    trigger.handle_line("TRG")                        # the PLC's TRG waited in the tty buffer through the freeze
    event = trigger.wait(0.0)
    assert event is not None and event.at <= frozen_at
    assert event.age_ms(now=clock.now) >= 5000 > trigger.max_age_ms   # answered FAULT (expired), not captured late
