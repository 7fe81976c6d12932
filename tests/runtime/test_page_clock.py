"""The operator page's timeouts run on the monotonic clock: NTP stepping the wall clock (an industrial PC that
booted with a wrong RTC) neither keeps a login alive nor keeps a feedback preview applicable for as long as the
step (a probe: a login made while the clock ran a day ahead stayed valid for that day after the step back)."""
from __future__ import annotations

import time

import pytest

from edge_runtime.bundle_versions import VersionStore
from edge_runtime.operator_page import feedback as feedback_mod
from edge_runtime.operator_page.auth import Sessions, hash_password
from edge_runtime.operator_page.config import PageUser
from edge_runtime.operator_page.feedback import Feedback, FeedbackError
from edge_runtime.operator_page.part_history import PartHistory


class Clocks:
    """time.time and time.monotonic moved by hand (the real ones plus an offset each)."""

    def __init__(self, monkeypatch):
        self.wall = self.mono = 0.0
        real_time, real_mono = time.time, time.monotonic
        monkeypatch.setattr(time, "time", lambda: real_time() + self.wall)
        monkeypatch.setattr(time, "monotonic", lambda: real_mono() + self.mono)


def test_a_login_expires_after_its_timeout_whatever_the_wall_clock_does(monkeypatch):
    sessions = Sessions([PageUser(name="eng", role="engineer", password_hash=hash_password("pw"))], timeout_s=600.0)
    clocks = Clocks(monkeypatch)
    sid, _ = sessions.login("eng", "pw")
    clocks.wall = -86400.0            # NTP steps the wall clock back a day
    assert sessions.get(sid) is not None
    clocks.mono = 601.0               # the timeout has passed
    assert sessions.get(sid) is None

    sid, _ = sessions.login("eng", "pw")
    clocks.wall += 86400.0 * 365      # a step forward does not log anyone out
    assert sessions.get(sid) is not None


def test_expired_logins_are_not_held_for_ever(monkeypatch):
    """Sessions whose cookie is never presented again (the browser dropped it at max_age) are forgotten by a
    later login: a page used for months holds only the logins of the last timeout_s."""
    sessions = Sessions([PageUser(name="eng", role="engineer", password_hash=hash_password("pw"))], timeout_s=600.0)
    clocks = Clocks(monkeypatch)
    for _ in range(10):
        sessions.login("eng", "pw")
        clocks.mono += 601.0
    sid, _ = sessions.login("eng", "pw")
    assert len(sessions._sessions) == 1
    assert sessions.get(sid) is not None


def test_a_preview_expires_after_its_ttl_whatever_the_wall_clock_does(monkeypatch, tmp_path):
    fb = Feedback(VersionStore(tmp_path / "base", tmp_path / "state"), PartHistory(), lambda: None, lambda who: None)
    clocks = Clocks(monkeypatch)
    pid = fb._keep("eng", object(), [1], "learn", "operator")
    clocks.wall = -86400.0
    clocks.mono = feedback_mod.PLAN_TTL_S + 1.0
    with pytest.raises(FeedbackError, match="expired"):
        fb._apply(pid, "eng", "learn", "engineer")
