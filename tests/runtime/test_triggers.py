import threading

import pytest

from edge_runtime.schema import ConfigError, convert
from edge_runtime.triggers import (
    FakeEdgeLine,
    FreeRunTrigger,
    GpioTrigger,
    GpioTriggerConfig,
    GpiodEdgeLine,
    SoftwareTrigger,
    SoftwareTriggerConfig,
    TriggerConfig,
    TriggerError,
    build_trigger,
)


def test_free_run_always_captures():
    trig = build_trigger(convert({"type": "free_run"}, TriggerConfig, "trigger"))
    assert isinstance(trig, FreeRunTrigger) and trig.is_free_run
    assert trig.wait(0.0) is not None and trig.wait(0.0) is not None


def test_software_trigger_waits_until_fired():
    trig = build_trigger(SoftwareTriggerConfig())
    assert isinstance(trig, SoftwareTrigger) and not trig.is_free_run
    assert trig.wait(0.0) is None
    trig.fire()
    assert trig.wait(0.0) is not None
    assert trig.wait(0.0) is None  # one fire, one capture


def test_software_trigger_fired_from_another_thread():
    trig = SoftwareTrigger()
    started = threading.Event()

    def fire_later():
        started.wait()
        trig.fire()

    t = threading.Thread(target=fire_later)
    t.start()
    started.set()
    assert trig.wait(10.0) is not None  # wakes on fire(), long before the timeout
    t.join()


def test_software_trigger_coalesces_and_counts_overruns():
    trig = SoftwareTrigger()
    trig.fire()
    trig.fire()
    trig.fire()
    assert trig.wait(0.0) is not None
    assert trig.wait(0.0) is None
    assert trig.fired == 3 and trig.overruns == 2


def test_serial_trg_line_fires():
    trig = SoftwareTrigger()
    assert trig.handle_line("  trg\r\n") is True
    assert trig.handle_line("STATUS") is False
    assert trig.wait(0.0) is not None and trig.wait(0.0) is None


def test_gpio_trigger_with_fake_line():
    lines = []

    def factory(cfg):
        lines.append(FakeEdgeLine())
        return lines[-1]

    cfg = convert({"type": "gpio", "chip": "/dev/gpiochip1", "line": 17, "edge": "falling", "bias": "pull_up"},
                  TriggerConfig, "trigger")
    trig = build_trigger(cfg, line_factory=factory)
    assert isinstance(trig, GpioTrigger)
    trig.open()
    assert trig.wait(0.0) is None
    lines[0].push_edge()
    assert trig.wait(0.0) is not None
    lines[0].push_edge(3)          # three parts while the loop was busy: one capture, two overruns
    assert trig.wait(0.0) is not None
    assert trig.edges == 4 and trig.overruns == 2
    trig.close()
    assert lines[0].closed


def test_gpio_edge_from_another_thread_wakes_wait():
    line = FakeEdgeLine()
    trig = GpioTrigger(GpioTriggerConfig(line=4), line_factory=lambda cfg: line)
    t = threading.Thread(target=line.push_edge)
    t.start()
    assert trig.wait(10.0) is not None
    t.join()


def test_gpio_os_error_while_waiting_becomes_trigger_error():
    class Broken(FakeEdgeLine):
        def wait_edges(self, timeout):
            raise OSError("chip removed")

    trig = GpioTrigger(GpioTriggerConfig(line=4), line_factory=lambda cfg: Broken())
    with pytest.raises(TriggerError, match="chip removed"):
        trig.wait(0.0)


def test_real_gpiod_line_on_missing_chip_is_a_clear_trigger_error(tmp_path):
    with pytest.raises(TriggerError, match="no-such-chip"):
        GpiodEdgeLine(GpioTriggerConfig(chip=str(tmp_path / "no-such-chip"), line=0))


def test_gpio_config_validation():
    with pytest.raises(ConfigError, match=r"trigger\.line: required"):
        convert({"type": "gpio"}, TriggerConfig, "trigger")
    with pytest.raises(ConfigError, match="debounce_ms"):
        convert({"type": "gpio", "line": 1, "debounce_ms": -1}, TriggerConfig, "trigger")
    with pytest.raises(ConfigError, match="edge"):
        convert({"type": "gpio", "line": 1, "edge": "up"}, TriggerConfig, "trigger")
    # probe 100: 1.0e+17 validated, then the trigger's open raised OverflowError (timedelta) and run died with a
    # traceback; refused as recipes.gpio.debounce_ms is.
    with pytest.raises(ConfigError, match=r"debounce_ms: must be 0\.\.1000, got 1e\+17"):
        convert({"type": "gpio", "line": 1, "debounce_ms": 1.0e17}, TriggerConfig, "trigger")


def test_software_trigger_events_carry_their_time_and_the_triggers_folded_into_them():
    import time

    trig = SoftwareTrigger()
    before = time.monotonic()
    trig.fire()
    trig.fire()
    trig.fire(at=before + 100.0)
    event = trig.wait(0.0)
    assert event.at == before + 100.0, "the newest trigger is the part in front of the camera"
    assert event.missed == 2, "the two earlier parts are reported, to be answered FAULT"
    assert trig.wait(0.0) is None and trig.drain() == []
    trig.fire(at=before)
    assert event.age_ms(before + 100.25) == pytest.approx(250.0)
    assert [e.at for e in trig.drain()] == [before]


def test_a_software_trigger_refuses_a_fire_beyond_the_folds_every_accepted_one_is_answered():
    """Probe 47: more than MAX_FOLDED triggers folded into one capture were accepted (StartSingleJob True, POST 202)
    yet answered by neither a FAULT nor a record; now such a fire is refused and the caller says so."""
    from edge_runtime.line import MAX_MISSED_ANSWERS
    from edge_runtime.triggers import MAX_FOLDED

    trig = SoftwareTrigger()
    withdrawn = []
    trig.on_fire = lambda: withdrawn.append(1)
    assert all(trig.fire() for _ in range(MAX_FOLDED + 1)), "one waiting and MAX_FOLDED folded into it"
    assert trig.fire() is False and trig.fire() is False
    assert trig.refused == 2 and trig.fired == MAX_FOLDED + 1
    event = trig.wait(0.0)
    assert event.missed == MAX_FOLDED <= MAX_MISSED_ANSWERS, "each accepted one gets its FAULT answer"
    assert trig.fire() is True, "served: accepted again"


def test_triggers_expire_by_default_and_max_age_is_validated():
    assert build_trigger(SoftwareTriggerConfig()).max_age_ms == 250.0
    assert build_trigger(convert({"type": "software", "max_age_ms": 80}, TriggerConfig, "trigger")).max_age_ms == 80
    assert FreeRunTrigger().max_age_ms is None
    with pytest.raises(ConfigError, match=r"max_age_ms: must be > 0"):
        convert({"type": "software", "max_age_ms": 0}, TriggerConfig, "trigger")
    with pytest.raises(ConfigError, match=r"max_age_ms"):
        convert({"type": "gpio", "line": 1, "max_age_ms": -5}, TriggerConfig, "trigger")


def test_gpio_trigger_uses_the_edge_timestamp_and_drains_only_an_open_line():
    line = FakeEdgeLine()
    trig = GpioTrigger(GpioTriggerConfig(line=4, max_age_ms=100), line_factory=lambda cfg: line)
    assert trig.drain() == [], "a closed line keeps no edges"
    trig.open()
    line.push_edge(at=10.0)
    line.push_edge(at=10.5)
    event = trig.wait(0.0)
    assert (event.at, event.missed) == (10.5, 1) and trig.max_age_ms == 100
    line.push_edge(at=11.0)
    assert [e.at for e in trig.drain()] == [11.0]


def test_a_trigger_that_says_when_it_was_sent_is_as_old_as_that_and_is_served_once():
    """An MQTT broker that stalls holds a trigger as long as it likes (probe 37: captured 8 s late as a fresh
    part). `sent_at` (Unix seconds or milliseconds, or ISO 8601 with a zone) dates it from then; a second
    delivery of the same `id` within 60 s (QoS 1 is at-least-once) is refused and withdraws the previous verdict;
    whole-second sent_at values and ids reused later are new triggers (probe 38)."""
    import time
    from types import SimpleNamespace

    from edge_runtime.outputs import mqtt_station
    from edge_runtime.outputs.mqtt_station import LineMqtt, parse_trigger

    assert parse_trigger(b"") == (None, None, None) and parse_trigger(b"1") == (None, None, None)
    assert parse_trigger(b"[1]") == (None, None, None)
    assert "is not a time" in parse_trigger(b'{"sent_at": "yesterday"}')[2]
    assert "not" in parse_trigger(b"{broken")[2] and parse_trigger(b'{"sent_at": NaN}')[0] is None
    now = time.time()
    for payload in (f'{{"sent_at": {now - 8.0}}}', f'{{"sent_at": {int((now - 8.0) * 1000)}}}',
                    '{"sent_at": "%s"}' % time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 8.0))):
        assert parse_trigger(payload.encode())[0] == pytest.approx(8.0, abs=1.5), payload
    assert "no time zone" in parse_trigger(b'{"sent_at": "2026-12-02T10:00:00"}')[2]
    # Probe 40: micro- and nanoseconds, a byte-order mark, the object encoded twice, float and object ids, a
    # sent_at too large for a float, one ahead of the clock (dated on arrival, said).
    for scale in (1e6, 1e9):
        assert parse_trigger(f'{{"sent_at": {int((now - 8.0) * scale)}}}'.encode())[0] == pytest.approx(8.0, abs=1.5)
    assert parse_trigger(b'\xef\xbb\xbf{"id": 3}')[1] == 3
    assert parse_trigger(b'"{\\"id\\": 4}"')[1] == 4
    assert parse_trigger(b'{"id": 1.5}')[1] == "1.5" and parse_trigger(b'{"id": {"a": 1}}')[1] == '{"a": 1}'
    assert "is not a time" in parse_trigger(b'{"sent_at": ' + b"9" * 401 + b"}")[2]
    assert "ahead of this station's clock" in parse_trigger(f'{{"sent_at": {now + 100}}}'.encode())[2]
    assert parse_trigger(b'{"id": 7, "pad": "' + b"x" * 20000 + b'"}')[2].startswith("payload of")
    trig = SoftwareTrigger(SoftwareTriggerConfig(max_age_ms=250))
    trig.fire(sent_age_s=8.0)
    assert trig.wait(0.0).age_ms() >= 8000 > trig.max_age_ms     # answered FAULT (expired), not captured
    trig.fire(sent_age_s=-3.0)                                     # a sender clock ahead: dated when read
    assert trig.wait(0.0).age_ms() < 1000

    station = SimpleNamespace(cfg=SimpleNamespace(allow_trigger=True, allow_recipe=False, host="broker", port=1883,
                                                  topic_prefix="plant/station"))
    line = LineMqtt(station, "left")
    fired, withdrawn = [], []
    line.bind_trigger(lambda **kw: fired.append(kw), withdraw=lambda: withdrawn.append(1))
    whole_second = f'{{"sent_at": {int(time.time())}}}'.encode()
    for _ in range(3):
        line.command("trigger", whole_second)                     # three parts within one second: three triggers
    sent = f'{{"sent_at": {time.time()}, "id": 17}}'.encode()
    line.command("trigger", sent)
    line.command("trigger", sent)                                  # the broker's redelivery
    assert len(fired) == 4 and withdrawn == [1] and line.commands_refused == 1
    line._recent_triggers[17] = time.monotonic() - mqtt_station.DUPLICATE_WINDOW_S - 1
    line.command("trigger", b'{"id": 17}')                         # a PLC counter come round again, later
    assert len(fired) == 5


def test_a_redelivered_trigger_is_refused_within_the_window_however_many_triggers_came_between():
    """Probe 70: ids were kept in a deque of 256, so a line at 6 triggers/s forgot an id within 44 s and the broker's
    redelivery of it, well inside the 60 s window, was captured and answered OK: a part nobody triggered."""
    import time
    from types import SimpleNamespace

    from edge_runtime.outputs.mqtt_station import LineMqtt

    station = SimpleNamespace(cfg=SimpleNamespace(allow_trigger=True, allow_recipe=False, host="broker", port=1883,
                                                  topic_prefix="plant/station"))
    line = LineMqtt(station, "left")
    fired, withdrawn = [], []
    line.bind_trigger(lambda **kw: fired.append(kw), withdraw=lambda: withdrawn.append(1))
    for i in range(270):   # 45 s of a line at 6 parts/s
        line.command("trigger", f'{{"id": "part-{i}", "sent_at": {time.time()}}}'.encode())
    line.command("trigger", f'{{"id": "part-0", "sent_at": {time.time()}}}'.encode())   # QoS 1 redelivery
    assert len(fired) == 270 and withdrawn == [1] and line.commands_refused == 1
