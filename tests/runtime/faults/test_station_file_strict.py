"""`edge-runtime validate` passes only station files that `run` can build; the station file parser is strict."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_runtime.cli import main
from edge_runtime.config import load_station
from edge_runtime.schema import ConfigError

REPO = Path(__file__).resolve().parents[3]
BASE = {"bundle": "bundle", "source": {"type": "folder", "path": "images"}, "http": {"enabled": False}}


def write(tmp_path: Path, data: dict | str, name: str = "station.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def validate(path: Path, capsys) -> tuple[int, str]:
    rc = main(["validate", str(path)])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


@pytest.mark.parametrize("logging, message", [
    ({"stats_window": 0}, "logging.stats_window: must be >= 1, got 0"),
    # probe 102: validated; every stage's window then kept every frame's timing, copied under the loop's lock
    ({"stats_window": 2**63 - 1}, "logging.stats_window: must be at most 100000 frames, got 9223372036854775807"),
    ({"stats_interval_s": -1}, "logging.stats_interval_s: must be > 0, got -1.0"),
    ({"stats_interval_s": 0}, "logging.stats_interval_s: must be > 0, got 0.0"),
])
def test_logging_values_run_cannot_use_are_invalid(tmp_path, capsys, logging, message):
    rc, out = validate(write(tmp_path, {**BASE, "logging": logging}), capsys)
    assert rc == 2
    assert f"{tmp_path / 'station.yaml'}: {message}" in out


def test_validate_builds_what_run_builds(tmp_path, capsys):
    """A key file that is not a key passes the schema; run would fail on it, so validate must too."""
    (tmp_path / "key.pub").write_bytes(b"not a key")
    rc, out = validate(write(tmp_path, {**BASE, "security": {"bundle_public_key": "key.pub"}}), capsys)
    assert rc == 2
    assert "security.bundle_public_key" in out and str(tmp_path / "station.yaml") in out


def test_valid_file_still_validates(tmp_path, capsys, device_bundle):
    (tmp_path / "images").mkdir()
    rc, out = validate(write(tmp_path, {**BASE, "bundle": str(device_bundle),
                                        "logging": {"stats_window": 1, "stats_interval_s": 0.5}}), capsys)
    assert rc == 0 and out.strip().endswith(": valid")


def test_appended_duplicate_section_is_refused_with_line(tmp_path, capsys):
    text = yaml.safe_dump({**BASE, "http": {"enabled": False}}, sort_keys=False)
    text += "http: {host: 0.0.0.0, allow_trigger: true}\n"
    path = write(tmp_path, text)
    line = text.splitlines().index("http: {host: 0.0.0.0, allow_trigger: true}") + 1
    rc, out = validate(path, capsys)
    assert rc == 2
    assert f"{path}: line {line}: duplicate key 'http'" in out


def test_nested_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, "bundle: b\nsource: {type: folder, path: x}\ninference:\n  threads: 2\n  threads: 8\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 5: duplicate key 'threads' \(first at line 4\)"):
        load_station(path)


def test_yaml_aliases_are_refused_in_station_files(tmp_path):
    path = write(tmp_path, "bundle: &b bundle\nsource: {type: folder, path: *b}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 1: YAML anchor &b is not allowed"):
        load_station(path)


def test_non_utf8_station_file_is_exit_2_naming_the_file(tmp_path):
    path = tmp_path / "station.yaml"
    path.write_bytes(b"bundle: b\nname: caf\xe9\nsource: {type: folder, path: x}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for command in (["validate", str(path)], ["run", "--config", str(path)]):
        out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", *command], capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode == 2, out.stderr
        assert f"{path}: station file is not UTF-8 text" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("change, message", [
    ({"inference": {"threads": 0}}, "inference.threads: must be 1-256 (one per physical core), got 0"),
    # Probe 73: 2**31 validated, then onnxruntime refused it at every bundle load (station in FAULT).
    ({"inference": {"threads": 2**31}}, "inference.threads: must be 1-256 (one per physical core), got 2147483648"),
    ({"lines": [{"name": "a", "source": {"type": "folder", "path": "a"}, "threads": 2**31}]},
     "lines[0].threads: must be 1-256 (one per physical core), got 2147483648"),
    ({"inference": {"deadline_ms": -5}}, "inference.deadline_ms: must be a number of milliseconds > 0 (the controller's timeout), got -5.0"),
    ({"http": {"port": 70000}}, "http.port: must be 0..65535, got 70000"),
    ({"recovery": {"read_timeout_s": 0}}, "recovery.read_timeout_s: must be > 0, got 0.0"),
    # Probe 73: 12 s stopped an idle line's watchdog pings for 12 s (WatchdogSec=10); 1e300 raised OverflowError.
    ({"recovery": {"read_timeout_s": 12}}, "recovery.read_timeout_s: must be at most 8 s (an idle line pings the "
                                           "systemd watchdog once per wait; the unit's WatchdogSec is 10), got 12"),
    ({"recovery": {"read_timeout_s": 1e300}}, "recovery.read_timeout_s: must be at most 8 s (an idle line pings the "
                                              "systemd watchdog once per wait; the unit's WatchdogSec is 10), got 1e+300"),
    # Probe 102's notes: validated, then every part waited for (and FAULTed on) frames no driver queues; a port
    # that never opened; a page history that could take the board's memory.
    ({"source": {"type": "camera", "device": 0, "drain_frames": 10**9}}, "source.drain_frames: must be 0..32, got 1000000000"),
    ({"source": {"type": "camera", "device": 0, "buffer_size": 33}}, "source.buffer_size: must be 1..32, got 33"),
    ({"outputs": [{"type": "serial", "port": "/dev/ttyUSB0", "baudrate": 10**12}]},
     "outputs[0].baudrate: must be 1..12000000, got 1000000000000"),
    ({"page": {"history": 10**9}}, "page: history/keep_frames: at most 2000 and 256 (held in memory), got 1000000000 and 32"),
    ({"page": {"history": 2000, "keep_frames": 2000}},
     "page: history/keep_frames: at most 2000 and 256 (held in memory), got 2000 and 2000"),
])
def test_nested_errors_name_the_key_path_once(tmp_path, change, message):
    path = write(tmp_path, {**BASE, **change})
    with pytest.raises(ConfigError) as err:
        load_station(path)
    assert str(err.value) == f"{path}: {message}"


def test_hostile_value_cannot_make_a_huge_error_message(tmp_path):
    path = write(tmp_path, {**BASE, "inference": {"precision": "x" * 900_000}})
    with pytest.raises(ConfigError) as err:
        load_station(path)
    assert len(str(err.value)) < 2500 and "inference.precision: expected one of 'int8', 'fp32'" in str(err.value)


def test_oversized_station_file_is_refused_before_parsing(tmp_path):
    path = write(tmp_path, "# " + "x" * (2 * 1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: station file is over \d+ bytes"):
        load_station(path)


def test_outputs_without_a_result_log_get_one_so_no_verdict_goes_unrecorded(tmp_path):
    # In the state dir: the service may write there (the station file's folder is read-only under the unit).
    cfg = load_station(write(tmp_path, {**BASE, "outputs": [{"type": "gpio", "ok": {"offset": 1}, "ng": {"offset": 2}}]}))
    assert [o.type for o in cfg.outputs] == ["gpio", "result_log"]
    assert cfg.outputs[1].path == str(tmp_path / "state" / "results.jsonl")
    lines = load_station(write(tmp_path, {**BASE, "lines": [{"name": "a", "source": {"type": "folder", "path": "images"},
                                                               "outputs": [{"type": "serial", "port": "/dev/ttyUSB0"}]}]}))
    assert [(o.type, getattr(o, "path", None)) for o in lines.lines[0].outputs] == [
        ("serial", None), ("result_log", str(tmp_path / "state" / "lines" / "a" / "results.jsonl"))]


@pytest.mark.parametrize("section, message", [
    ({"recipes": {"recipes": [{"name": "a", "number": 1, "bundle": "a"}]}, "rollout": {"enabled": True}},
     "rollout.enabled: not with recipes"),
    ({"outputs": [{"type": "result_log", "path": "r.jsonl", "backups": 0}]}, "backups: must be at least 1"),
    # probe 102: validated, then the first rotation looked for each of 2**63 backups: the loop hung, READY down
    ({"outputs": [{"type": "result_log", "path": "r.jsonl", "backups": 2**63 - 1}]}, "backups: must be at most 1000"),
])
def test_a_station_that_could_pass_a_part_without_record_or_deadline_is_invalid(tmp_path, capsys, section, message):
    base = {k: v for k, v in BASE.items() if not ("recipes" in section and k == "bundle")}
    rc, out = validate(write(tmp_path, {**base, **section}), capsys)
    assert rc == 2 and message in out, out


def test_the_deadline_is_on_by_default_and_an_old_null_means_the_default(tmp_path, caplog):
    cfg = load_station(write(tmp_path, BASE))
    assert cfg.inference.deadline_ms == 2000
    # `edge-runtime init` wrote `deadline_ms: null` ("no deadline") before there was a default: such files load.
    old = load_station(write(tmp_path, {**BASE, "inference": {"deadline_ms": None}}))
    assert old.inference.deadline_ms == 2000 and "null no longer means no deadline" in caplog.text


def test_a_key_path_that_is_a_device_is_refused_at_once_not_read_forever(tmp_path, capsys):
    rc, out = validate(write(tmp_path, {**BASE, "security": {"bundle_public_key": "/dev/zero"}}), capsys)
    assert rc == 2 and "security.bundle_public_key" in out and "/dev/zero: public key is not a regular file" in out


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path, capsys):
    import threading

    fifo = tmp_path / "station.yaml"
    os.mkfifo(fifo)
    rc = []
    t = threading.Thread(target=lambda: rc.append(main(["validate", str(fifo)])), daemon=True)
    t.start()
    t.join(10)
    assert rc == [2], "validate returned (refused) instead of waiting on the pipe"
    assert "not a regular file" in capsys.readouterr().err


def test_one_gpio_line_in_two_roles_is_refused_naming_both(tmp_path):
    """Each output checks only its own lines: OK on line 5 in one output and NG on line 5 in another would drive a
    pass on the fail wire. Across outputs, the trigger, recipe select lines and lines, one line has one role."""
    crossed = {**BASE, "outputs": [{"type": "gpio", "ok": {"offset": 5}, "ng": {"offset": 6}},
                                   {"type": "gpio", "ok": {"offset": 6}, "ng": {"offset": 5}}]}
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.ok: GPIO line 6 on /dev/gpiochip0 is already used by "
                                          r"outputs\[0\]\.ng"):
        load_station(write(tmp_path, crossed))
    trigger = {**BASE, "trigger": {"type": "gpio", "line": 6},
               "outputs": [{"type": "gpio", "ok": {"offset": 5}, "ng": {"offset": 6}}]}
    with pytest.raises(ConfigError, match=r"trigger\.line: GPIO line 6 .* already used by outputs\[0\]\.ng"):
        load_station(write(tmp_path, trigger))
    other_chip = {**BASE, "outputs": [{"type": "gpio", "ok": {"offset": 5}, "ng": {"offset": 6}},
                                      {"type": "gpio", "chip": "/dev/gpiochip1", "ok": {"offset": 6}, "ng": {"offset": 5}}]}
    assert len(load_station(write(tmp_path, other_chip)).outputs) == 3     # another chip's line 5 is another wire
    lines = {"bundle": "bundle", "http": {"enabled": False},
             "lines": [{"name": n, "source": {"type": "folder", "path": n},
                        "outputs": [{"type": "gpio", "ok": {"offset": a}, "ng": {"offset": b}}]}
                       for n, a, b in (("left", 5, 6), ("right", 6, 7))]}
    with pytest.raises(ConfigError, match=r"lines\[1\]\.outputs\[0\]\.ok: GPIO line 6 .* used by lines\[0\]\.outputs\[0\]\.ng"):
        load_station(write(tmp_path, lines))


def test_gpio_lines_a_line_inherits_and_chip_names_count_too(tmp_path):
    """A line without its own trigger or recipes runs with the station's: their GPIO lines are claimed by it too;
    'gpiochip0' is /dev/gpiochip0. Top-level outputs beside `lines:` would drive nothing: refused, not ignored."""
    inherited = {"bundle": "bundle", "http": {"enabled": False}, "trigger": {"type": "gpio", "line": 5},
                 "lines": [{"name": "l1", "source": {"type": "folder", "path": "x"},
                            "outputs": [{"type": "gpio", "ok": {"offset": 7}, "ng": {"offset": 5}}]}]}
    with pytest.raises(ConfigError, match=r"lines\[0\] \(the station's\) trigger\.line: GPIO line 5 .* used by "
                                          r"lines\[0\]\.outputs\[0\]\.ng"):
        load_station(write(tmp_path, inherited))
    named = {**BASE, "outputs": [{"type": "gpio", "ok": {"offset": 5}, "ng": {"offset": 6}},
                                 {"type": "gpio", "chip": "gpiochip0", "ok": {"offset": 7}, "ng": {"offset": 5}}]}
    with pytest.raises(ConfigError, match=r"outputs\[1\]\.ng: GPIO line 5 on gpiochip0 is already used by outputs\[0\]\.ok"):
        load_station(write(tmp_path, named))
    top = {"bundle": "bundle", "http": {"enabled": False},
           "outputs": [{"type": "gpio", "ok": {"offset": 5}, "ng": {"offset": 6}}],
           "lines": [{"name": "l1", "source": {"type": "folder", "path": "x"}}]}
    with pytest.raises(ConfigError, match=r"outputs\[0\]: with `lines:` each line lists its own outputs; this gpio"):
        load_station(write(tmp_path, top))
    for path in ("audit.jsonl", "results.jsonl"):   # the default's name too, once the file names it (probe 36)
        named_log = {**top, "outputs": [{"type": "result_log", "path": path}]}
        with pytest.raises(ConfigError, match=r"outputs\[0\]: with `lines:` each line records its parts in its own "
                                              rf"result log; {path} would stay empty"):
            load_station(write(tmp_path, named_log))
    no_outputs = {key: value for key, value in top.items() if key != "outputs"}
    assert load_station(write(tmp_path, no_outputs)).lines[0].name == "l1"


@pytest.mark.parametrize("text, key", [
    ("  - {type: result_log, path: r.jsonl, fsync: no}\n", "outputs[0].fsync: expected one of 'always', 'never', got False"),
    ("  - {type: result_log, path: on}\n", "outputs[0].path: expected a string, got True"),
])
def test_a_yaml_boolean_where_a_word_was_meant_says_to_quote_it(tmp_path, capsys, text, key):
    path = write(tmp_path, "bundle: bundle\nsource: {type: folder, path: images}\noutputs:\n" + text)
    rc, out = validate(path, capsys)
    assert rc == 2 and key in out
    assert "YAML reads an unquoted yes, no, on, off, true or false as a boolean: quote the word you meant" in out


@pytest.mark.parametrize("threads", ["0", "-3", "2147483648", "two"])
def test_check_refuses_a_thread_count_the_station_file_refuses(threads, capsys):
    """Probe 73: `check --threads 2147483648` stopped its self-test on onnxruntime's TypeError; 0 and -3 ran."""
    with pytest.raises(SystemExit) as stop:
        main(["check", str(REPO / "tests" / "fixtures" / "device_bundle"), "--threads", threads])
    assert stop.value.code == 2 and "--threads" in capsys.readouterr().err


_LINE = {"name": "a", "source": {"type": "folder", "path": "a"}}


@pytest.mark.parametrize("change, message", [
    ({"http": {"port": 15020}, "outputs": [{"type": "modbus", "port": 15020}]},
     "outputs[0].port: 15020 on 127.0.0.1 is also http.port on 127.0.0.1"),
    ({"outputs": [{"type": "opcua", "port": 4840}, {"type": "modbus", "host": "0.0.0.0", "port": 4840}]},
     "outputs[1].port: 4840 on 0.0.0.0 is also outputs[0].port on 127.0.0.1"),
    ({"http": {"port": 8090}, "page": {"enabled": True}}, "page.port: 8090 on 127.0.0.1 is also http.port on 127.0.0.1"),
    ({"http": {"host": "localhost", "port": 8088}, "lines": [{**_LINE, "outputs": [{"type": "opcua", "port": 8088}]}]},
     "lines[0].outputs[0].port: 8088 on 127.0.0.1 is also http.port on localhost"),
    ({"lines": [{**_LINE, "outputs": [{"type": "opcua", "port": 4841}]},
                {"name": "b", "source": {"type": "folder", "path": "b"}, "outputs": [{"type": "opcua", "port": 4841}]}]},
     "lines[1].outputs[0].port: 4841 on 127.0.0.1 is also lines[0].outputs[0].port on 127.0.0.1"),
])
def test_two_servers_of_the_station_on_one_port_are_refused(tmp_path, change, message):
    """Probe 73: http.port and a modbus output's port both 15020 validated; run stopped at once with 'another process
    holds the port' (the station's own Modbus server)."""
    data = {**BASE, "http": {"enabled": True, **change.pop("http", {})}, **change}
    if "lines" in data:
        data.pop("source")
    with pytest.raises(ConfigError) as err:
        load_station(write(tmp_path, data))
    assert message in str(err.value) and "cannot both listen" in str(err.value)


def test_servers_on_other_addresses_or_free_ports_share_a_number(tmp_path):
    data = {**BASE, "http": {"enabled": True, "port": 0},
            "outputs": [{"type": "modbus", "port": 4840}, {"type": "opcua", "host": "127.0.0.2", "port": 4840},
                        {"type": "opcua", "port": 0}]}
    load_station(write(tmp_path, data))


def test_init_refuses_an_http_port_its_modbus_output_takes(tmp_path, capsys):
    bundle = REPO / "tests" / "fixtures" / "device_bundle"
    rc = main(["init", "--bundle", str(bundle), "--source", "camera:0", "--output", "modbus", "--http-port", "5020",
               "--out", str(tmp_path / "s.yaml")])
    assert rc == 2 and "--http-port 5020: the modbus output init writes serves Modbus on 5020" in capsys.readouterr().err
    assert not (tmp_path / "s.yaml").exists()


@pytest.mark.parametrize("change, warned", [
    ({}, "warning: {path}: trigger.type: software, but nothing in this station file fires it"),
    ({"http": {"port": 0, "allow_trigger": True}}, None),
    ({"http": {"enabled": False, "allow_trigger": True}}, "trigger.type: software, but nothing"),
    ({"outputs": [{"type": "serial", "port": "/dev/ttyUSB9", "accept_trigger": True}]}, None),
    ({"outputs": [{"type": "opcua", "port": 0, "allow_trigger": True}]}, None),
    ({"source": None, "lines": [{"name": "a", "source": {"type": "folder", "path": "a"}},
                                {"name": "b", "source": {"type": "folder", "path": "b"}, "trigger": {"type": "free_run"}}]},
     "warning: {path}: lines[0] (the station's) trigger.type: software, but nothing"),
])
def test_a_software_trigger_nothing_can_fire_is_warned_about(tmp_path, capsys, change, warned):
    """Probe 73: trigger software with http.allow_trigger off and no other trigger path validated with no word, and the
    station ran READY for ever without inspecting a part."""
    data = {**BASE, "trigger": {"type": "software"}, **change}
    if data["source"] is None:
        data.pop("source")
    path = write(tmp_path, data)
    rc, out = validate(path, capsys)
    assert rc in (0, 1), out
    if warned is None:
        assert "nothing in this station file fires it" not in out
    else:
        assert warned.format(path=path) in out


@pytest.mark.parametrize("text, message", [
    ("deadline_ms: 1e3", "inference.deadline_ms: expected a number, got '1e3' (YAML reads this exponent as a string: "
                         "write 1.0e+3 or the plain number)"),
    ("deadline_ms: 2.5e3", "got '2.5e3' (YAML reads this exponent as a string: write 2.5e+3 or the plain number)"),
    ("threads: 2e0", "inference.threads: expected an integer, got '2e0' (YAML reads this exponent as a string: "
                     "write the plain integer)"),
])
def test_an_exponent_yaml_reads_as_a_string_says_so(tmp_path, text, message):
    """Probe 73: `deadline_ms: 1e3` was refused as "expected a number, got '1e3'": PyYAML (YAML 1.1) reads an exponent
    without a '.' and a sign as a string, which the message did not say."""
    path = write(tmp_path, yaml.safe_dump(BASE, sort_keys=False) + f"inference:\n  {text}\n")
    with pytest.raises(ConfigError) as err:
        load_station(path)
    assert message in str(err.value)
    assert yaml.safe_load("[1.0e+3, 2.5e+3]") == [1000.0, 2500.0]   # the spellings the message gives are numbers


def test_a_string_that_is_no_number_gets_no_exponent_hint(tmp_path):
    path = write(tmp_path, yaml.safe_dump(BASE, sort_keys=False) + "inference:\n  deadline_ms: e3\n")
    with pytest.raises(ConfigError) as err:
        load_station(path)
    assert str(err.value).endswith("inference.deadline_ms: expected a number, got 'e3'")


@pytest.mark.parametrize("value", ["0250", "20:00", "-0750", "1:30.5"])
def test_yaml_11_base_60_and_octal_numbers_are_refused_not_reread(tmp_path, value):
    """PyYAML reads `0250` as octal 168 and `20:00` as base-60 1200: a deadline of 250 ms ran as 168 ms."""
    path = write(tmp_path, f"bundle: b\nsource: {{type: folder, path: x}}\ninference:\n  deadline_ms: {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 4: '{value}' is a base-60 or octal number in YAML 1.1"):
        load_station(path)
    quoted = write(tmp_path, "bundle: b\nsource: {type: folder, path: x}\nhttp: {enabled: false}\n"
                   f"logging: {{level: '{value}'}}\n", "quoted.yaml")
    with pytest.raises(ConfigError, match="logging.level"):   # text where text belongs: the schema judges it
        load_station(quoted)
