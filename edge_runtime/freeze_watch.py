"""When did an input read just now really arrive? Not later than the process last ran before it read it.

A serial `TRG` or a POST /trigger carries no time of its own: it is dated when a thread of ours reads it. If the
whole process did not run for a while (SIGSTOP, a cgroup freeze, a VM pause, swap, a debugger), the bytes waited
in the kernel and are read the moment it runs again: dated "now", a trigger five seconds old passed the
max_age and deadline checks and the part then in front of the camera was answered OK (probe 35).

A thread ticks every TICK_S. A gap between ticks longer than FREEZE_S means nothing of ours ran; an input read
before the ticker has run again, or within SETTLE_S after it noticed the gap, may have arrived any time during
it, so it is dated from the gap's start (the earliest it can have come). The trigger's age then covers the
freeze, and a freeze longer than max_age_ms answers the part FAULT instead of capturing whatever is there now.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

TICK_S = 0.01      # how often the ticker runs (a wake-up and a float store: negligible on a 2-core board)
FREEZE_S = 0.1     # a gap this long is a freeze (well above scheduling jitter on a loaded 2-core board)
# After a freeze, inputs read this soon after the ticker noticed it may have waited through it: every thread wakes
# at once, and a reader with bytes waiting returns within a few ms. Longer would date fresh inputs from the freeze
# (probe 36: triggers sent 20 and 40 ms after SIGCONT were dated 0.4 s old with a 50 ms window).
SETTLE_S = 0.015
LOG_FREEZE_S = 1.0 # freezes at least this long are logged (shorter ones happen under load and only date inputs)


class FreezeWatch:
    """`earliest(read_at)`: the earliest monotonic time an input read at `read_at` may have arrived."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last_tick = clock()
        self._freeze: tuple[float, float] | None = None   # (start, noticed) of the last freeze
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.freezes = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._last_tick = self._clock()
                self._thread = threading.Thread(target=self._run, name="freeze-watch", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(TICK_S)
            self.tick()

    def tick(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        gap = now - self._last_tick
        if gap > FREEZE_S:
            self._freeze = (self._last_tick, now)
            self.freezes += 1
            if gap >= LOG_FREEZE_S:
                log.warning("the station did not run for %.1f s (stopped, frozen or starved): triggers read right "
                            "after it are dated from its start", gap)
        self._last_tick = now

    def earliest(self, read_at: float) -> float:
        last = self._last_tick
        if read_at - last > FREEZE_S:
            return last   # frozen until just now: the ticker has not run yet
        freeze = self._freeze
        if freeze is not None and freeze[0] <= read_at <= freeze[1] + SETTLE_S:
            return freeze[0]   # read during the freeze (the ticker noticed it meanwhile) or just after
        return read_at


FREEZE_WATCH = FreezeWatch()   # one per process: a freeze stops every thread at once
