"""Recipes: a line holds one bundle per product; the controller selects one over HTTP, serial or a Modbus register;
the switch is verified, logged, acknowledged and timed; a part arriving mid-switch is FAULT, never OK, and no
part is inspected with the wrong recipe; a failed switch keeps the line in FAULT."""
from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from extras import require
import yaml

from edge_runtime import bundle_loader
from edge_runtime.bundle import MANIFEST, content_id
from edge_runtime.config import load_station
from doubles import RecordingOutput
from edge_runtime.outputs.serial_output import SerialConfig, SerialOutput
from edge_runtime.records import Verdict
from edge_runtime.schema import ConfigError
from doubles import ScriptedSource


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class RecipeRecorder(RecordingOutput):
    """A RecordingOutput that also records recipe acknowledgements (number, name, status, ms, error)."""

    def recipe_changed(self, number, name, status, ms, error) -> None:
        self._record("recipe_changed", (number, name, status, ms, error))


# bundle id of each product's copy (made by product_bundle; content-derived, so known only once made)
IDS: dict[str, str] = {}


def product_bundle(src: Path, dest: Path, product: str) -> Path:
    """A copy of `src` that is another product's bundle: its manifest names the product, so its id differs."""
    shutil.copytree(src, dest)
    manifest = yaml.safe_load((dest / MANIFEST).read_text())
    manifest["product"] = product
    manifest["bundle_id"] = IDS[product] = content_id(manifest)
    (dest / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dest


@pytest.fixture
def two_products(small_bundle, tmp_path) -> tuple[Path, Path]:
    return (product_bundle(small_bundle, tmp_path / "cap_a", "cap-a"),
            product_bundle(small_bundle, tmp_path / "cap_b", "cap-b"))


def recipe_station(write_station, bundles, free_port=None, **recipes):
    a, b = bundles
    http = {"port": free_port()} if free_port else {"enabled": False}
    return load_station(write_station(
        source={"type": "scripted"}, trigger={"type": "software"}, http=http,
        recovery={"read_timeout_s": 0.1},
        recipes={"recipes": [{"name": "cap-a", "number": 1, "bundle": str(a)},
                             {"name": "cap-b", "number": 2, "bundle": str(b)}], **recipes}))


def fire_and_wait(station, rec, n=1):
    before = len(rec.results)
    for _ in range(n):
        station.trigger.fire()
        wait_until(lambda: len(rec.results) > before, what="a result")
        before = len(rec.results)
    return rec.results[-1]


def test_switch_over_http_is_verified_acknowledged_and_timed(two_products, write_station, part_images_bytes,
                                                             free_port, start_station):
    cfg = recipe_station(write_station, two_products, free_port, allow_http=True)
    rec = RecipeRecorder()
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    wait_until(lambda: station.line.recipes is not None and station.line.recipes.status == "ok" and rec.ready,
               what="ready")
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-a"]
    base = f"http://127.0.0.1:{station.http_port}"
    req = urllib.request.Request(f"{base}/recipe/cap-b", method="POST")
    answer = json.loads(urllib.request.urlopen(req, timeout=5).read())
    assert answer["accepted"] is True
    wait_until(lambda: station.line.recipes.active.name == "cap-b", what="the switch")
    doc = json.loads(urllib.request.urlopen(f"{base}/recipe", timeout=5).read())["line"]
    assert doc["active"] == "cap-b" and doc["status"] == "ok" and doc["last_switch_ms"] > 0
    result = fire_and_wait(station, rec)
    assert result.bundle_id == IDS["cap-b"] and result.verdict is not Verdict.FAULT
    with pytest.raises(urllib.error.HTTPError) as err:    # an unknown recipe is refused, naming the known ones
        urllib.request.urlopen(urllib.request.Request(f"{base}/recipe/cap-z", method="POST"), timeout=5)
    assert err.value.code == 404 and "1=cap-a, 2=cap-b" in err.value.read().decode()
    wait_until(lambda: any(c[2] == "failed" for c in rec.calls_to("recipe_changed")), what="the refusal's ack")
    running.stop()
    acks = rec.calls_to("recipe_changed")
    assert acks[0][:3] == (1, "cap-a", "ok")                          # start-up: the initial recipe, verified
    assert [a[2] for a in acks[1:3]] == ["switching", "ok"] and acks[2][:2] == (2, "cap-b") and acks[2][3] > 0
    assert acks[-1][2] == "failed" and "unknown recipe" in acks[-1][4]
    assert station.status().counters["recipe_switches"] == 1


def test_part_arriving_mid_switch_is_fault_never_inspected(two_products, write_station, part_images_bytes,
                                                           start_station, monkeypatch):
    release = threading.Event()
    real = bundle_loader.golden_check

    def slow_check(bundle, pipeline):
        release.wait(30)                 # the switch's self-test holds until the test has fired its part
        return real(bundle, pipeline)

    cfg = recipe_station(write_station, two_products)
    rec = RecipeRecorder()
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    wait_until(lambda: rec.ready, what="ready")
    monkeypatch.setattr(bundle_loader, "golden_check", slow_check)
    reads = source.read_calls
    station.line._on_serial_line("RCP 2")           # the controller selects product 2 on the serial line
    wait_until(lambda: station.line.recipes.busy, what="the switch to start")
    before = len(rec.results)
    station.trigger.fire()                          # a part arrives while the switch runs
    wait_until(lambda: len(rec.results) > before, what="its answer")
    mid = rec.results[-1]
    assert mid.verdict is Verdict.FAULT and "recipe" in mid.error and source.read_calls == reads
    assert rec.ready is False and station.state.fault_kind == "recipe"
    release.set()
    wait_until(lambda: station.line.recipes.status == "ok" and station.line.recipes.active.name == "cap-b",
               what="the switch")
    after = fire_and_wait(station, rec)
    running.stop()
    assert after.bundle_id == IDS["cap-b"] and after.verdict is not Verdict.FAULT
    # Every inspected part carries the bundle of the recipe in service when it was triggered; none is OK mid-switch.
    assert [r.bundle_id for r in rec.results if r.verdict is not Verdict.FAULT] == [IDS["cap-b"]]


def test_failed_switch_keeps_the_line_in_fault_until_a_good_one(two_products, write_station, part_images_bytes,
                                                                start_station):
    a, b = two_products
    cfg = recipe_station(write_station, two_products, preload=False)
    model = next(p for p in b.iterdir() if p.suffix == ".onnx")
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF                    # product b's bundle is corrupt on disk
    model.write_bytes(bytes(data))
    rec = RecipeRecorder()
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    wait_until(lambda: rec.ready, what="ready")
    accepted, _ = station.line.recipes.request("cap-b", "test")
    assert accepted
    wait_until(lambda: station.line.recipes.status == "failed", what="the switch to fail")
    refused = fire_and_wait(station, rec)
    assert refused.verdict is Verdict.FAULT and "switch to cap-b failed" in refused.error
    assert rec.ready is False and station.fault_reason.startswith("recipe: switch to cap-b failed")
    assert station.state.fault_kind == "recipe"
    station.line.recipes.request(1, "test")         # back to product a: verified, the line inspects again
    wait_until(lambda: station.line.recipes.status == "ok", what="the switch back")
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-a"]
    running.stop()
    failed = [c for c in rec.calls_to("recipe_changed") if c[2] == "failed"]
    assert failed and failed[0][:2] == (2, "cap-b") and failed[0][4]


def test_a_preloaded_recipe_is_switched_to_as_its_folder_is_now(two_products, write_station, part_images_bytes,
                                                                  start_station):
    """A preloaded recipe's copy in memory had been switched to after its folder changed: a new version installed
    there kept the old one in service, a damaged folder was reported 'verified and active'."""
    a, b = two_products
    cfg = recipe_station(write_station, two_products)       # preload: true, the default
    rec = RecipeRecorder()
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    wait_until(lambda: rec.ready and station.line.recipes.status == "ok", what="ready")
    preloaded = station.line.recipes._pipelines["cap-b"].bundle.bundle_id
    manifest = yaml.safe_load((b / MANIFEST).read_text())  # the engineer installs cap-b v2 in its folder
    manifest["bundle_version"] = int(manifest.get("bundle_version") or 0) + 1
    manifest["bundle_id"] = new_id = content_id(manifest)
    (b / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    station.line.recipes.request("cap-b", "test")
    wait_until(lambda: station.line.recipes.active.name == "cap-b" and station.line.recipes.status == "ok",
               what="the switch")
    assert new_id != preloaded and fire_and_wait(station, rec).bundle_id == new_id
    station.line.recipes.request("cap-a", "test")
    wait_until(lambda: station.line.recipes.active.name == "cap-a" and station.line.recipes.status == "ok",
               what="the switch back")
    model = next(p for p in b.iterdir() if p.suffix == ".onnx")
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF                             # now cap-b's folder is damaged
    model.write_bytes(bytes(data))
    station.line.recipes.request("cap-b", "test")
    wait_until(lambda: station.line.recipes.status == "failed", what="the switch to fail")
    refused = fire_and_wait(station, rec)
    running.stop()
    assert refused.verdict is Verdict.FAULT and "does not match the manifest" in station.fault_reason


def test_a_recipe_whose_folder_holds_another_recipes_product_is_refused_not_switched_to(
        two_products, write_station, part_images_bytes, start_station, tmp_path, capsys):
    """Probe 64: no recipe named a `product:`, and cap-b's folder was given cap-a's bundle (a copy to the wrong
    folder). The switch to cap-b was 'verified and active' (Modbus register 7 read 2, status 2) and cap-b's parts
    were inspected, OK, with cap-a's bundle. Now the switch fails (FAULT), and validate refuses the station file."""
    from edge_runtime.cli import main as runtime_main

    a, b = two_products
    cfg = recipe_station(write_station, two_products)
    rec = RecipeRecorder()
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    wait_until(lambda: rec.ready and station.line.recipes.status == "ok", what="ready")
    shutil.rmtree(b)
    shutil.copytree(a, b)                                   # cap-a's bundle installed in cap-b's folder
    station.line.recipes.request("cap-b", "test")
    wait_until(lambda: station.line.recipes.status in ("ok", "failed") and station.line.recipes.switching_to is None
               and station.line.recipes._pending is None and station.line.recipes.switches +
               station.line.recipes.switch_failures > 0, what="the switch to end")
    result = fire_and_wait(station, rec)
    running.stop()
    assert station.line.recipes.status == "failed" and station.line.recipes.active.name == "cap-a"
    assert result.verdict is Verdict.FAULT and "recipe cap-a's" in station.fault_reason
    capsys.readouterr()
    assert runtime_main(["validate", str(tmp_path / "station.yaml")]) == 2
    assert "the same bundle" in capsys.readouterr().err


def test_modbus_register_selects_and_registers_acknowledge(two_products, write_station, part_images_bytes,
                                                           free_port, start_station):
    from pymodbus.client import ModbusTcpClient

    port = free_port()
    a, b = two_products
    cfg = load_station(write_station(
        source={"type": "scripted"}, recovery={"read_timeout_s": 0.1},
        outputs=[{"type": "modbus", "port": port, "allow_writes": True}],
        recipes={"modbus_register": 16, "recipes": [{"name": "cap-a", "number": 1, "bundle": str(a)},
                                                    {"name": "cap-b", "number": 2, "bundle": str(b)}]}))
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source)
    station = running.station
    wait_until(lambda: station.counters.frames >= 1, what="inspection")
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    assert client.connect()
    try:
        assert client.read_holding_registers(7, count=2, device_id=1).registers == [1, 2]   # cap-a, verified
        assert not client.write_register(16, 2, device_id=1).isError()                     # the PLC asks for 2
        wait_until(lambda: station.line.recipes.active.name == "cap-b" and station.line.recipes.status == "ok",
                   what="the switch")
        wait_until(lambda: client.read_holding_registers(7, count=2, device_id=1).registers == [2, 2],
                   what="the acknowledgement in registers 7-8")
        frames = station.counters.frames
        wait_until(lambda: station.counters.frames > frames + 1, what="inspection with cap-b")
        # A number the station has no recipe for: the PLC cannot read a refusal, so the line faults (READY
        # down) instead of cap-b going on passing what may be product 7; a known number brings it back.
        assert not client.write_register(16, 7, device_id=1).isError()
        wait_until(lambda: station.fault_reason and "unknown recipe '7'" in station.fault_reason, what="the fault")
        assert station.status().state == "fault"
        assert not client.write_register(16, 1, device_id=1).isError()
        wait_until(lambda: station.line.recipes.active.name == "cap-a" and station.fault_reason is None,
                   what="a known recipe again")
    finally:
        client.close()
    running.stop()
    assert station.pipeline.bundle.bundle_id == IDS["cap-a"]


def test_while_the_plc_selects_the_recipe_other_sources_may_only_name_that_one(two_products, write_station,
                                                                              part_images_bytes, free_port,
                                                                              start_station):
    """The PLC's Modbus register asked for 2; an HTTP request had put the line back on cap-a while the register
    still read 2 (and could clear the FAULT of an unknown number the PLC asked for)."""
    from pymodbus.client import ModbusTcpClient

    port, http_port = free_port(), free_port()
    a, b = two_products
    cfg = load_station(write_station(
        source={"type": "scripted"}, recovery={"read_timeout_s": 0.1}, http={"port": http_port},
        outputs=[{"type": "modbus", "port": port, "allow_writes": True}],
        recipes={"modbus_register": 16, "allow_http": True,
                 "recipes": [{"name": "cap-a", "number": 1, "bundle": str(a)},
                             {"name": "cap-b", "number": 2, "bundle": str(b)}]}))
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source)
    station = running.station
    switcher = station.line.recipes
    base = f"http://127.0.0.1:{http_port}"

    def post(name):
        try:
            return urllib.request.urlopen(urllib.request.Request(f"{base}/recipe/{name}", method="POST"), timeout=5).status, ""
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    wait_until(lambda: station.counters.frames >= 1, what="inspection")
    assert post("cap-b")[0] == 202                       # before the PLC has chosen, HTTP may switch
    wait_until(lambda: switcher.active.name == "cap-b" and switcher.status == "ok", what="the HTTP switch")
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    assert client.connect()
    try:
        assert not client.write_register(16, 1, device_id=1).isError()                     # the PLC asks for 1
        wait_until(lambda: switcher.active.name == "cap-a" and switcher.status == "ok", what="the PLC's switch")
        code, body = post("cap-b")
        assert code == 409 and "Modbus register 16 asks for 1=cap-a" in body
        switches = switcher.switches
        for _ in range(3):                               # naming the PLC's own choice is fine, and changes nothing
            assert post("cap-a")[0] == 202
        outcome, message = switcher.submit("cap-a", "opcua").result(5)
        assert (outcome, message) == ("ok", "cap-a is already active") and switcher.switches == switches
        outcome, message = switcher.submit("cap-b", "opcua").result(5)
        assert outcome == "refused" and "Modbus register 16 asks for 1=cap-a" in message
        time.sleep(0.3)                                  # the PLC's acknowledgement still shows its switch as done
        assert client.read_holding_registers(7, count=2, device_id=1).registers == [1, 2]
        assert not client.write_register(16, 7, device_id=1).isError()                     # no such recipe
        wait_until(lambda: station.fault_reason and "unknown recipe '7'" in station.fault_reason, what="the fault")
        code, body = post("cap-a")
        assert code == 409 and "asks for '7', no recipe" in body
        time.sleep(0.3)
        assert station.status().state == "fault", "only the PLC can clear its own unknown number"
        assert client.read_holding_registers(7, count=2, device_id=1).registers[1] == 3       # failed
    finally:
        client.close()
    running.stop()


def test_a_restarted_line_resumes_its_recipe_and_the_plcs_choice(two_products, write_station, part_images_bytes,
                                                                   free_port, start_station):
    """After a restart the line came back on the initial recipe while the PLC had chosen cap-b (its register then
    reads 0, and a PLC that writes it only at changeover never does again); HTTP could choose freely again."""
    from pymodbus.client import ModbusTcpClient

    port, http_port = free_port(), free_port()
    a, b = two_products

    def start():
        cfg = load_station(write_station(
            source={"type": "scripted"}, recovery={"read_timeout_s": 0.1}, http={"port": http_port},
            state_dir="state", outputs=[{"type": "modbus", "port": port, "allow_writes": True}],
            recipes={"modbus_register": 16, "allow_http": True,
                     "recipes": [{"name": "cap-a", "number": 1, "bundle": str(a)},
                                 {"name": "cap-b", "number": 2, "bundle": str(b)}]}))
        source = ScriptedSource(steps=part_images_bytes)
        source.cfg.loop = True
        return start_station(cfg, source=source)

    running = start()
    switcher = running.station.line.recipes
    wait_until(lambda: running.station.counters.frames >= 1, what="inspection")
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
    assert client.connect()
    try:
        assert not client.write_register(16, 2, device_id=1).isError()
        wait_until(lambda: switcher.active.name == "cap-b" and switcher.status == "ok", what="the PLC's switch")
    finally:
        client.close()
    running.stop()

    again = start()
    switcher = again.station.line.recipes
    wait_until(lambda: again.station.counters.frames >= 1, what="inspection after the restart")
    assert switcher.active.name == "cap-b" and again.station.pipeline.bundle.bundle_id == IDS["cap-b"]
    try:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{http_port}/recipe/cap-a", method="POST"),
                               timeout=5)
        raise AssertionError("HTTP switched away from the PLC's choice after a restart")
    except urllib.error.HTTPError as err:
        assert err.code == 409
    again.stop()

    # The PLC asked for a number that is no recipe, then the station restarted: the saved choice decides, so the
    # line stays in FAULT rather than resuming cap-b (a switch that failed or never ran had been resumed as OK).
    (tmp_path_of(again) / "recipe_selected.json").write_text('{"active": "cap-b", "plc": "9"}')
    third = start()
    wait_until(lambda: third.station.fault_reason and "'9'" in third.station.fault_reason, what="the FAULT")
    assert third.station.status().state == "fault"
    third.stop()
    (tmp_path_of(again) / "recipe_selected.json").write_text('{"active": "cap-b", "plc": "1"}')
    fourth = start()
    wait_until(lambda: fourth.station.counters.frames >= 1, what="inspection")
    assert fourth.station.line.recipes.active.name == "cap-a" and fourth.station.pipeline.bundle.bundle_id == IDS["cap-a"]
    fourth.stop()


def tmp_path_of(running) -> Path:
    return Path(running.station.cfg.state_dir)


def test_serial_acknowledgement_lines():
    out = SerialOutput(SerialConfig(port="/dev/null"))
    written: list[str] = []
    out._write_line = written.append
    out.recipe_changed(2, "cap-b", "switching", None, None)
    out.recipe_changed(2, "cap-b", "ok", 812.4, None)
    out.recipe_changed(0, "-", "failed", None, "unknown recipe '9'\r\n")
    assert written == ["RCP 2 cap-b BUSY", "RCP 2 cap-b OK 812", "RCP 0 - ERR unknown recipe '9'"]


def test_recipe_errors_name_the_key(write_station, small_bundle):
    src = {"type": "scripted"}
    with pytest.raises(ConfigError, match=r"station.yaml: recipes: two recipes have number 1"):
        load_station(write_station(source=src, recipes={"recipes": [{"name": "a", "number": 1, "bundle": "x"},
                                                                    {"name": "b", "number": 1, "bundle": "y"}]}))
    with pytest.raises(ConfigError, match=r"leave out 'bundle'"):
        load_station(write_station(bundle=small_bundle, source={"type": "scripted"},
                                   recipes={"recipes": [{"name": "a", "number": 1, "bundle": "x"}]}))
    with pytest.raises(ConfigError, match=r"modbus_register: must be in the PLC area 16\.\.31"):
        load_station(write_station(source={"type": "scripted"}, recipes={
            "modbus_register": 3, "recipes": [{"name": "a", "number": 1, "bundle": "x"}]}))
    # Probe 113: 'a\n' passed ($ matches before a final newline) and named a recipe folder and the journal's lines.
    with pytest.raises(ConfigError, match=r"name: expected 1-32 letters, digits, '_', '\.', '-', got 'a\\n'"):
        load_station(write_station(source=src, recipes={"recipes": [{"name": "a\n", "number": 1, "bundle": "x"}]}))


def test_a_recipe_named_like_another_recipes_number_is_refused(write_station):
    """Probe 64: recipes named by article number, {name: "2", number: 1} and {name: cap-b, number: 2}. The PLC wrote
    2 to the recipe register; find("2") took the recipe *named* 2, product cap-a, 'verified and active' (status 2),
    and cap-b's parts were inspected OK with cap-a's bundle (a GPIO controller's ACK rises the same way)."""
    with pytest.raises(ConfigError, match=r"recipe '2' \(number 1\) is named like recipe cap-b's number 2"):
        load_station(write_station(source={"type": "scripted"}, recipes={"recipes": [
            {"name": "2", "number": 1, "bundle": "x"}, {"name": "cap-b", "number": 2, "bundle": "y"}]}))
    cfg = load_station(write_station(source={"type": "scripted"}, recipes={"recipes": [   # its own number: fine
        {"name": "2", "number": 2, "bundle": "x"}, {"name": "cap-b", "number": 1, "bundle": "y"}]}))
    assert cfg.recipes.find(2).name == "2" and cfg.recipes.find(1).name == "cap-b"


def test_serial_rcp_switches_and_is_acknowledged_on_the_wire(two_products, write_station, part_images_bytes,
                                                              start_station):
    import os
    import select
    import tty

    master, slave = os.openpty()
    tty.setraw(master)
    a, b = two_products
    received = b""

    def read_until(text: str, timeout: float = 60.0) -> str:
        nonlocal received
        deadline = time.monotonic() + timeout
        while text.encode() not in received:
            assert time.monotonic() < deadline, f"no {text!r} on the serial line; got {received[-400:]!r}"
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                received += os.read(master, 65536)
        return received.decode(errors="replace")

    try:
        cfg = load_station(write_station(
            source={"type": "scripted"}, trigger={"type": "software"}, recovery={"read_timeout_s": 0.1},
            outputs=[{"type": "result_log", "path": "results.jsonl"},
                     {"type": "serial", "port": os.ttyname(slave), "accept_trigger": True, "heartbeat_interval_s": 60}],
            recipes={"recipes": [{"name": "cap-a", "number": 1, "bundle": str(a)},
                                 {"name": "cap-b", "number": 2, "bundle": str(b)}]}))
        source = ScriptedSource(steps=part_images_bytes)
        source.cfg.loop = True
        running = start_station(cfg, source=source)
        station = running.station
        read_until("RCP 1 cap-a OK")                  # start-up: the initial recipe, verified
        read_until("RDY 1")
        os.write(master, b"RCP 2\r\n")                # the PLC selects product 2
        text = read_until("RCP 2 cap-b OK")
        assert text.index("RCP 2 cap-b BUSY") < text.index("RCP 2 cap-b OK")
        # Probe 66: an RCP that changes nothing, or is malformed, had no answer (a PLC waiting for one timed out).
        received = b""
        os.write(master, b"RCP cap-b\r\n")           # already active
        read_until("RCP 2 cap-b OK 0")
        os.write(master, b"RCP cap-b extra\r\n")
        read_until("RCP 0 - ERR expected RCP <number|name>")
        os.write(master, b"TRG\r\n")
        read_until("RES ")
        running.stop()
    finally:
        os.close(master)
        os.close(slave)
    assert station.line.recipes.active.name == "cap-b"
    records = [json.loads(x) for x in Path(cfg.outputs[0].path).read_text().splitlines()]
    assert records and all(r["bundle_id"] == IDS["cap-b"] for r in records)


# ---- OPC UA: VisionSystem/PrepareRecipe (40100 RecipeManagement), answered once the switch is over -------------

def _opcua_recipe_station(two_products, write_station, part_images_bytes, start_station, **recipes):
    require("asyncua", "opcua")
    from edge_runtime.outputs import OpcUaConfig, OpcUaServer

    cfg = recipe_station(write_station, two_products, **recipes)
    rec = RecipeRecorder()
    server = OpcUaServer(OpcUaConfig(port=0, allow_recipe=True, state_interval_s=0.2, recipe_timeout_s=120))
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec, server])
    wait_until(lambda: rec.ready and server.port is not None, what="ready")
    return running, rec, server


async def _call_prepare_recipe(port: int, external_id: str, state: str) -> tuple[list, dict]:
    """PrepareRecipe's outputs, then ActiveRecipe's variables read right after it, and StationState once it is
    `state` (the line's state reaches the server through the output bus, maybe a moment after the answer)."""
    import asyncio

    from asyncua import Client

    from edge_runtime.outputs.opcua_server import NAMESPACE_URI

    async with Client(f"opc.tcp://127.0.0.1:{port}/patchcore-edge/", timeout=120) as client:
        idx = await client.get_namespace_index(NAMESPACE_URI)
        vs = await client.nodes.objects.get_child([f"{idx}:VisionSystem"])
        outputs = await vs.call_method(f"{idx}:PrepareRecipe", external_id)
        seen = {}
        for path in ("ActiveRecipe/BundleId", "ActiveRecipe/ExternalId", "ActiveRecipe/Number",
                     "ActiveRecipe/SwitchStatus"):
            node = await vs.get_child([f"{idx}:{p}" for p in path.split("/")])
            seen[path] = await node.read_value()
        node = await vs.get_child([f"{idx}:StationState"])
        deadline = time.monotonic() + 10
        while await node.read_value() != state and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        seen["StationState"] = await node.read_value()
        return outputs, seen


def test_opcua_prepare_recipe_switches_and_answers_when_active(two_products, write_station, part_images_bytes,
                                                                start_station):
    import asyncio

    running, rec, server = _opcua_recipe_station(two_products, write_station, part_images_bytes, start_station)
    station = running.station
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-a"]
    outputs, seen = asyncio.run(_call_prepare_recipe(server.port, "cap-b", "ready"))
    # The call returned only once the switch was over: the line already runs b, and the variables show it.
    assert outputs[:2] == [True, 0] and outputs[2].startswith("cap-b active in")
    assert station.line.recipes.active.name == "cap-b" and station.line.recipes.status == "ok"
    assert seen == {"ActiveRecipe/BundleId": IDS["cap-b"], "ActiveRecipe/ExternalId": "cap-b",
                    "ActiveRecipe/Number": 2, "ActiveRecipe/SwitchStatus": "ok", "StationState": "ready"}
    result = fire_and_wait(station, rec)
    assert result.bundle_id == IDS["cap-b"] and result.verdict is not Verdict.FAULT
    # An unknown recipe: Error -1 naming the known ones; recipes.py refuses it and nothing changes (b stays).
    outputs, seen = asyncio.run(_call_prepare_recipe(server.port, "cap-z", "ready"))
    assert outputs[:2] == [False, -1] and "unknown recipe 'cap-z'" in outputs[2] and "1=cap-a, 2=cap-b" in outputs[2]
    assert seen["ActiveRecipe/BundleId"] == IDS["cap-b"] and seen["ActiveRecipe/ExternalId"] == "cap-b"
    assert station.line.recipes.active.name == "cap-b" and station.line.recipes.status == "ok"
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-b"]
    running.stop()
    assert server.counters()["opcua_recipe_calls"] == 2


def test_opcua_prepare_recipe_failed_switch_answers_error_and_line_stays_fault(two_products, write_station,
                                                                               part_images_bytes, start_station):
    import asyncio

    a, b = two_products
    model = next(p for p in b.iterdir() if p.suffix == ".onnx")
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF                    # product b's bundle is corrupt on disk
    model.write_bytes(bytes(data))
    running, rec, server = _opcua_recipe_station(two_products, write_station, part_images_bytes, start_station,
                                                 preload=False)
    station = running.station
    outputs, seen = asyncio.run(_call_prepare_recipe(server.port, "2", "fault"))   # by number, like the Modbus register
    assert outputs[:2] == [False, -2] and outputs[2].startswith("switch to cap-b failed")
    assert seen["StationState"] == "fault" and seen["ActiveRecipe/SwitchStatus"] == "failed"
    assert station.state.fault_kind == "recipe" and rec.ready is False
    refused = fire_and_wait(station, rec)
    assert refused.verdict is Verdict.FAULT and "switch to cap-b failed" in refused.error
    outputs, seen = asyncio.run(_call_prepare_recipe(server.port, "cap-a", "ready"))   # back to a: verified, inspecting
    assert outputs[:2] == [True, 0] and seen["StationState"] == "ready"
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-a"]
    running.stop()


# ---- GPIO: binary-coded select lines + STROBE, acknowledged on an ACK output line ------------------------------

class FakeRecipeLines:
    """RecipeLines test double (edge_runtime/recipe_gpio.py): the test plays the PLC with `select(number)`."""

    def __init__(self) -> None:
        self.cfg = None
        self.inputs: dict[int, bool] = {}
        self.ack_history: list[bool] = []
        self.on_strobe = None
        self.released = False
        self.reads = 0
        self.settle_after_first_read: int | None = None   # the lines read at the strobe change to this just after

    def request(self, cfg) -> None:
        self.cfg = cfg
        self.inputs = {o: False for o in cfg.select}
        self.ack_history.append(False)

    def watch_strobe(self, on_strobe) -> None:
        self.on_strobe = on_strobe

    def read(self, offsets):
        self.reads += 1
        if self.settle_after_first_read is not None and self.reads == 1:
            values = [self.inputs[o] for o in offsets]
            for i, offset in enumerate(self.cfg.select):     # the lines finish changing after the first read
                self.inputs[offset] = bool(self.settle_after_first_read >> i & 1)
            return values
        return [self.inputs[o] for o in offsets]

    def set_ack(self, asserted: bool) -> None:
        self.ack_history.append(asserted)

    @property
    def ack(self) -> bool:
        return self.ack_history[-1]

    def release(self) -> None:
        self.released = True
        self.ack_history.append(False)

    def select(self, number: int) -> None:
        """The PLC sets the select lines (bit 0 = select[0]), then pulses STROBE."""
        for i, offset in enumerate(self.cfg.select):
            self.inputs[offset] = bool(number >> i & 1)
        self.on_strobe()


GPIO_SELECT = {"chip": "/dev/gpiochip0", "select": [4, 5], "strobe": 6, "ack": 7, "debounce_ms": 5}


@pytest.fixture
def fake_recipe_lines(monkeypatch) -> FakeRecipeLines:
    from edge_runtime import recipe_gpio

    lines = FakeRecipeLines()
    monkeypatch.setattr(recipe_gpio, "LibgpiodRecipeLines", lambda: lines)
    return lines


def _gpio_station(two_products, write_station, part_images_bytes, start_station):
    cfg = recipe_station(write_station, two_products, gpio=dict(GPIO_SELECT))
    rec = RecipeRecorder()
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    wait_until(lambda: rec.ready, what="ready")
    return running, rec


def test_gpio_select_lines_choose_recipe_2_and_ack_rises(two_products, write_station, part_images_bytes,
                                                         start_station, fake_recipe_lines):
    running, rec = _gpio_station(two_products, write_station, part_images_bytes, start_station)
    station = running.station
    wait_until(lambda: fake_recipe_lines.on_strobe is not None, what="the strobe watched")
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-a"]
    fake_recipe_lines.select(2)                     # select lines 4=0, 5=1, then STROBE
    wait_until(lambda: fake_recipe_lines.ack, what="ACK")
    assert station.line.recipes.active.name == "cap-b" and station.line.recipes.status == "ok" and rec.ready
    result = fire_and_wait(station, rec)
    assert result.bundle_id == IDS["cap-b"] and result.verdict is not Verdict.FAULT
    running.stop()
    assert fake_recipe_lines.released and fake_recipe_lines.ack is False      # released with ACK low
    assert [a[:3] for a in rec.calls_to("recipe_changed")[1:3]] == [(2, "cap-b", "switching"), (2, "cap-b", "ok")]


def test_gpio_strobe_while_a_switch_runs_newest_wins(two_products, write_station, part_images_bytes,
                                                     start_station, fake_recipe_lines, monkeypatch):
    release = threading.Event()
    real = bundle_loader.golden_check

    def slow_check(bundle, pipeline):
        release.wait(30)                 # the first switch's self-test holds until the second strobe came
        return real(bundle, pipeline)

    running, rec = _gpio_station(two_products, write_station, part_images_bytes, start_station)
    station = running.station
    wait_until(lambda: fake_recipe_lines.on_strobe is not None, what="the strobe watched")
    monkeypatch.setattr(bundle_loader, "golden_check", slow_check)
    fake_recipe_lines.select(2)
    wait_until(lambda: station.line.recipes.busy, what="the switch to cap-b to start")
    fake_recipe_lines.select(1)                     # the PLC changes its mind while cap-b is being verified
    release.set()
    wait_until(lambda: fake_recipe_lines.ack, what="ACK")
    assert station.line.recipes.active.name == "cap-a" and station.line.recipes.status == "ok"
    # ACK rose once, for the switch the last strobe asked for, never for the superseded cap-b.
    assert fake_recipe_lines.ack_history.count(True) == 1
    assert [a[:3] for a in rec.calls_to("recipe_changed")[1:]] == [
        (2, "cap-b", "switching"), (2, "cap-b", "ok"), (1, "cap-a", "switching"), (1, "cap-a", "ok")]
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-a"]
    running.stop()


def test_gpio_number_that_is_no_recipe_faults_the_line_naming_it(two_products, write_station, part_images_bytes,
                                                                 start_station, fake_recipe_lines):
    running, rec = _gpio_station(two_products, write_station, part_images_bytes, start_station)
    station = running.station
    wait_until(lambda: fake_recipe_lines.on_strobe is not None, what="the strobe watched")
    fake_recipe_lines.select(3)                     # both select lines: number 3, no such recipe
    wait_until(lambda: station.line.recipes.status == "failed", what="the FAULT")
    assert rec.ready is False and station.state.fault_kind == "recipe"
    assert "select lines read 3" in station.fault_reason and "unknown recipe '3'" in station.fault_reason
    refused = fire_and_wait(station, rec)
    assert refused.verdict is Verdict.FAULT and "unknown recipe '3'" in refused.error
    assert fake_recipe_lines.ack is False
    fake_recipe_lines.select(1)                     # a valid number clears it: verified, ACK, inspecting again
    wait_until(lambda: fake_recipe_lines.ack, what="ACK")
    assert station.line.recipes.status == "ok" and rec.ready
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-a"]
    running.stop()


def test_gpio_select_lines_still_changing_at_the_strobe_fault_the_line_never_switch(
        two_products, write_station, part_images_bytes, start_station, fake_recipe_lines):
    """The PLC goes from recipe 1 (01) to 2 (10) and strobes while the lines change: read once, 11 = 3 (or 00 = 0)
    could be another product's recipe, and ACK would rise for it. Two reads one debounce apart that differ are a
    FAULT naming both numbers; a steady strobe then switches."""
    running, rec = _gpio_station(two_products, write_station, part_images_bytes, start_station)
    station = running.station
    wait_until(lambda: fake_recipe_lines.on_strobe is not None, what="the strobe watched")
    fake_recipe_lines.reads = 0
    fake_recipe_lines.settle_after_first_read = 2
    fake_recipe_lines.select(1)                     # read as 1 at the strobe, 2 a debounce period later
    wait_until(lambda: station.line.recipes.status == "failed", what="the FAULT")
    assert "select lines changing (1, then 2)" in station.fault_reason and fake_recipe_lines.ack is False
    assert fire_and_wait(station, rec).verdict is Verdict.FAULT
    fake_recipe_lines.settle_after_first_read = None
    fake_recipe_lines.select(2)                     # steady: switched, ACK
    wait_until(lambda: fake_recipe_lines.ack, what="ACK")
    assert station.line.recipes.active.name == "cap-b"
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-b"]
    running.stop()


@pytest.mark.parametrize("gpio, expected", [
    ({"select": [], "strobe": 6}, "recipes.gpio.select: expected 1..16 line offsets (bit 0 first), got 0"),
    ({"select": [4, 5], "strobe": 5}, "recipes.gpio.strobe: line 5 is already used by select[1]"),
    ({"select": [4, -1], "strobe": 6}, "recipes.gpio.select[1]: line offset must be 0 or more, got -1"),
    ({"select": [4, 5], "strobe": 6, "ack": 4}, "recipes.gpio.ack: line 4 is already used by select[0]"),
    ({"select": [4, 5], "strobe": 6, "debounce_ms": -1}, "recipes.gpio.debounce_ms: must be 0..1000, got -1"),
    ({"select": [4], "strobe": 6}, "recipes.gpio.select: 1 select lines encode numbers up to 1, but recipe cap-b "
                                   "has number 2"),
    ({"select": [4, 5], "strobe": 6, "active_low": "yes"}, "recipes.gpio.active_low"),
    ({"select": [4, 5]}, "recipes.gpio.strobe"),
])
def test_gpio_recipe_config_errors_name_the_key(write_station, two_products, gpio, expected):
    with pytest.raises(ConfigError) as err:
        recipe_station(write_station, two_products, gpio=gpio)
    assert expected in str(err.value), str(err.value)


def test_gpio_select_lines_that_cannot_be_claimed_fault_the_line(two_products, write_station, part_images_bytes,
                                                                 start_station, tmp_path):
    """The real libgpiod adapter on a chip that is not there: the line stays alive, in FAULT, saying why."""
    gpio = {**GPIO_SELECT, "chip": str(tmp_path / "no-gpiochip")}
    cfg = recipe_station(write_station, two_products, gpio=gpio)
    rec = RecipeRecorder()
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    running = start_station(cfg, source=source, outputs=[rec])
    station = running.station
    wait_until(lambda: station.fault_reason is not None and "gpio select lines" in station.fault_reason,
               what="the FAULT")
    assert f"strobe 6 on {tmp_path / 'no-gpiochip'}" in station.fault_reason and rec.ready is False
    assert fire_and_wait(station, rec).verdict is Verdict.FAULT
    running.stop()


def start_recipe_line(two_products, write_station, part_images_bytes, start_station, state_dir=None):
    """A triggered recipe station on looping parts, started (not yet waited for): (running, recorder)."""
    cfg = recipe_station(write_station, two_products)
    if state_dir is not None:
        cfg.state_dir = str(state_dir)
    rec = RecipeRecorder()
    source = ScriptedSource(steps=part_images_bytes)
    source.cfg.loop = True
    return start_station(cfg, source=source, outputs=[rec]), rec


def started_on_cap_a(two_products, write_station, part_images_bytes, start_station):
    """A triggered recipe station on looping parts, READY on cap-a: (running, recorder, switcher)."""
    running, rec = start_recipe_line(two_products, write_station, part_images_bytes, start_station)
    switcher = running.station.line.recipes
    wait_until(lambda: switcher is not None and switcher.status == "ok" and rec.ready, what="ready")
    return running, rec, switcher


@pytest.mark.parametrize("when", ["pending", "running"])
def test_a_reload_signal_during_a_requested_switch_keeps_the_requested_recipe(two_products, write_station,
                                                                              part_images_bytes, start_station, when):
    """SIGHUP re-reads the recipe the controller asked for last; re-reading the active one would undo an
    acknowledged switch and leave the line READY on the other product."""
    running, rec, switcher = started_on_cap_a(two_products, write_station, part_images_bytes, start_station)
    station = running.station
    switcher.request("cap-b", "plc")
    if when == "running":
        wait_until(lambda: switcher.switching_to is not None, what="the switch running")
    station.request_reload()
    # Settled: the reload signal taken, no switch queued or running (a fixed pause flaked on a loaded machine,
    # where the SIGHUP's own verified load took over a second).
    wait_until(lambda: not station.line._reload.is_set() and switcher._pending is None and not switcher.busy
               and switcher.status == "ok", what="the reload taken and every switch over")
    assert switcher.active.name == "cap-b" and switcher.status == "ok"
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-b"]
    assert running.stop() == 0


def test_a_part_triggered_right_after_a_recipe_request_is_fault_not_the_old_recipes_ok(two_products, write_station,
                                                                                       part_images_bytes,
                                                                                       start_station):
    """The controller asks for product b and triggers at once: the part may be b; the old recipe must not pass it,
    whether or not the loop has started the switch yet."""
    running, rec, switcher = started_on_cap_a(two_products, write_station, part_images_bytes, start_station)
    station = running.station
    assert switcher.stale(triggered_mono=time.monotonic()) is None
    switcher.request("cap-b", "plc")
    assert switcher.stale(triggered_mono=time.monotonic()) == "part triggered after a recipe switch was requested"
    result = fire_and_wait(station, rec)
    assert result.verdict is Verdict.FAULT, result      # never the old recipe's verdict
    wait_until(lambda: switcher.active.name == "cap-b" and switcher.status == "ok", what="cap-b active")
    assert switcher.stale(triggered_mono=time.monotonic()) is None
    assert fire_and_wait(station, rec).bundle_id == IDS["cap-b"]
    assert running.stop() == 0


def watch_recipe_station(write_station, bundles, tmp_path, trigger, **source):
    a, b = bundles
    folder = tmp_path / "in"
    folder.mkdir()
    cfg = load_station(write_station(
        source={"type": "folder", "mode": "watch", "path": str(folder), "poll_interval_s": 0.05, **source},
        trigger=trigger, recovery={"read_timeout_s": 0.1},
        recipes={"recipes": [{"name": "cap-a", "number": 1, "bundle": str(a)},
                             {"name": "cap-b", "number": 2, "bundle": str(b)}]}))
    return cfg, folder


def drop(folder: Path, name: str, data: bytes) -> Path:
    """A camera PC's write: a temporary name, renamed into place."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    tmp.rename(folder / name)
    return folder / name


def test_watch_folder_backlog_from_before_a_switch_is_fault_not_the_new_recipes_verdict(
        two_products, write_station, part_images_bytes, start_station, monkeypatch, tmp_path):
    """Images that were in the folder before the switch ended are the previous product's, even when the line reads
    them after it (a backlog; images written while the switch ran): FAULT, each record naming its file. An image
    written after the switch is inspected with the new recipe."""
    release = threading.Event()
    real = bundle_loader.golden_check
    cfg, folder = watch_recipe_station(write_station, two_products, tmp_path, {"type": "free_run"})
    rec = RecipeRecorder()
    running = start_station(cfg, outputs=[rec])
    switcher = running.station.line.recipes
    wait_until(lambda: switcher is not None and switcher.status == "ok" and rec.ready, what="ready")
    drop(folder, "first.png", part_images_bytes[0])
    wait_until(lambda: len(rec.results) == 1, what="the first part")
    assert rec.results[0].bundle_id == IDS["cap-a"] and rec.results[0].verdict is not Verdict.FAULT

    monkeypatch.setattr(bundle_loader, "golden_check", lambda bundle, pipeline: (release.wait(30), real(bundle, pipeline))[1])
    switcher.request("cap-b", "plc")
    wait_until(lambda: switcher.switching_to is not None, what="the switch to start")
    backlog = [drop(folder, f"old_{i}.png", part_images_bytes[i % 2]) for i in range(3)]
    time.sleep(0.3)                       # the line would have read them by now if it were inspecting
    release.set()
    wait_until(lambda: switcher.status == "ok" and switcher.active.name == "cap-b", what="cap-b active")
    wait_until(lambda: len(rec.results) >= 4, what="the backlog's answers")
    time.sleep(0.05)
    drop(folder, "new.png", part_images_bytes[0])
    wait_until(lambda: any(r.source.endswith("new.png") for r in rec.results), what="the new part")
    running.stop()
    by_file = {Path(r.source).name: r for r in rec.results}
    for path in backlog:
        r = by_file[path.name]                       # the record names the file: the audit trail
        assert r.verdict is Verdict.FAULT and "recipe switch" in r.error, r
        assert r.captured_at > 0
    assert by_file["new.png"].bundle_id == IDS["cap-b"] and by_file["new.png"].verdict is not Verdict.FAULT
    inspected = [r for r in rec.results if r.verdict is not Verdict.FAULT]
    assert [Path(r.source).name for r in inspected] == ["first.png", "new.png"]


def test_before_trigger_image_written_before_a_switch_is_fault_at_the_next_trigger(
        two_products, write_station, part_images_bytes, start_station, tmp_path):
    """image_arrives: before_trigger takes a file written before the trigger; one written before a recipe switch
    the trigger came after is the previous product's part: FAULT, never the new recipe's verdict."""
    cfg, folder = watch_recipe_station(write_station, two_products, tmp_path, {"type": "software"},
                                       image_arrives="before_trigger", image_max_age_s=30.0)
    rec = RecipeRecorder()
    running = start_station(cfg, outputs=[rec])
    station = running.station
    switcher = station.line.recipes
    wait_until(lambda: switcher is not None and switcher.status == "ok" and rec.ready, what="ready")
    drop(folder, "before.png", part_images_bytes[0])
    time.sleep(0.05)
    switcher.request("cap-b", "plc")
    wait_until(lambda: switcher.status == "ok" and switcher.active.name == "cap-b" and rec.ready, what="cap-b active")
    result = fire_and_wait(station, rec)
    assert result.verdict is Verdict.FAULT and "recipe switch" in result.error, result
    assert Path(result.source).name == "before.png"
    drop(folder, "after.png", part_images_bytes[0])
    result = fire_and_wait(station, rec)
    running.stop()
    assert Path(result.source).name == "after.png" and result.bundle_id == IDS["cap-b"]
    assert result.verdict is not Verdict.FAULT


class ModbusRecipeLine:
    """A triggered recipe line selected by Modbus register 16 (allow_writes), with a result log to read the verdicts
    from and a PLC client on its port: what the register-race tests drive."""

    def __init__(self, two_products, write_station, part_images_bytes, free_port, start_station, tmp_path):
        from pymodbus.client import ModbusTcpClient

        port = free_port()
        a, b = two_products
        self.log_path = tmp_path / "results.jsonl"
        cfg = load_station(write_station(
            source={"type": "scripted"}, trigger={"type": "software"}, recovery={"read_timeout_s": 5.0},
            outputs=[{"type": "modbus", "port": port, "allow_writes": True},
                     {"type": "result_log", "path": str(self.log_path)}],
            recipes={"modbus_register": 16, "recipes": [{"name": "cap-a", "number": 1, "bundle": str(a)},
                                                        {"name": "cap-b", "number": 2, "bundle": str(b)}]}))
        source = ScriptedSource(steps=part_images_bytes)
        source.cfg.loop = True
        self.running = start_station(cfg, source=source)
        self.station = self.running.station
        self.switcher = self.station.line.recipes
        wait_until(lambda: self.switcher is not None and self.switcher.status == "ok" and self.ready(), what="ready")
        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
        assert self.client.connect()

    def ready(self) -> bool:
        return self.station.status().state == "ready"

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()] if self.log_path.exists() else []

    def fire(self) -> dict:
        before = len(self.records())
        self.station.trigger.fire()
        wait_until(lambda: len(self.records()) > before, what="a result")
        return self.records()[-1]

    def write(self, register: int, value: int) -> None:
        assert not self.client.write_register(register, value, device_id=1).isError()

    def stop(self) -> None:
        self.client.close()
        self.running.stop()


def test_a_plc_writing_the_recipe_register_and_triggering_at_once_gets_fault_not_the_old_recipes_verdict(
        two_products, write_station, part_images_bytes, free_port, start_station, tmp_path):
    """The loop wakes on the trigger before its housekeeping has read the register: the register is read again
    when the part is admitted, and the request dates from the last read that still showed the old number."""
    line = ModbusRecipeLine(two_products, write_station, part_images_bytes, free_port, start_station, tmp_path)
    try:
        for number, name in ((2, "cap-b"), (1, "cap-a"), (2, "cap-b")):
            assert line.fire()["bundle_id"] == IDS[line.switcher.active.name]
            time.sleep(0.2)                                   # the loop is back waiting for a trigger
            line.write(16, number)
            result = line.fire()                              # at once, as a PLC that does not wait for the ack
            assert result["verdict"] == "FAULT" or result["bundle_id"] == IDS[name], result
            wait_until(lambda: line.switcher.active.name == name and line.switcher.status == "ok" and line.ready(),
                       what=f"{name} active")
    finally:
        line.stop()


def test_a_restart_keeps_the_switch_guard_and_a_pending_request(two_products, write_station, part_images_bytes,
                                                                 start_station, monkeypatch, tmp_path):
    """The guard (when the last switch ended) and the newest request survive a restart: a backlog that arrived
    before a switch, still queued at the stop, is FAULT after the restart, not the resumed recipe's verdict (a probe:
    580 queued files passed OK by the recipe asked for after they arrived, once the daemon had restarted)."""
    release = threading.Event()
    real = bundle_loader.golden_check
    cfg, folder = watch_recipe_station(write_station, two_products, tmp_path, {"type": "free_run"})
    cfg.state_dir = str(tmp_path / "state")
    rec = RecipeRecorder()
    running = start_station(cfg, outputs=[rec])
    switcher = running.station.line.recipes
    wait_until(lambda: switcher is not None and switcher.status == "ok" and rec.ready, what="ready")
    monkeypatch.setattr(bundle_loader, "golden_check", lambda bundle, pipeline: (release.wait(30), real(bundle, pipeline))[1])
    switcher.request("cap-b", "http")
    wait_until(lambda: switcher.switching_to is not None, what="the switch to start")
    backlog = [drop(folder, f"old_{i}.png", part_images_bytes[i % 2]) for i in range(3)]
    running.station.request_stop()          # stopped while the switch runs: cap-b requested, cap-a still active
    release.set()
    running.join()
    monkeypatch.setattr(bundle_loader, "golden_check", real)

    cfg2, _ = load_station(write_station(
        source={"type": "folder", "mode": "watch", "path": str(folder), "poll_interval_s": 0.05},
        trigger={"type": "free_run"}, recovery={"read_timeout_s": 0.1}, state_dir=str(tmp_path / "state"),
        recipes={"recipes": [{"name": "cap-a", "number": 1, "bundle": str(two_products[0])},
                             {"name": "cap-b", "number": 2, "bundle": str(two_products[1])}]})), None
    rec2 = RecipeRecorder()
    again = start_station(cfg2, outputs=[rec2])
    switcher2 = again.station.line.recipes
    wait_until(lambda: len(rec2.results) >= 3, what="the backlog's answers")
    assert switcher2.active.name == "cap-b"            # the request stands across the restart
    by_file = {Path(r.source).name: r for r in rec2.results}
    assert all(by_file[p.name].verdict is Verdict.FAULT for p in backlog), rec2.results
    time.sleep(0.05)
    drop(folder, "new.png", part_images_bytes[0])
    wait_until(lambda: any(r.source.endswith("new.png") for r in rec2.results), what="the new part")
    again.stop()
    new = next(r for r in rec2.results if r.source.endswith("new.png"))
    assert new.verdict is not Verdict.FAULT and new.bundle_id == IDS["cap-b"]
    # A switch that ended before the stop: its end is saved and restored, so what arrived before it stays FAULT.
    saved = json.loads((tmp_path / "state" / "recipe_selected.json").read_text())
    assert saved["active"] == "cap-b" and saved["guard_wall"] is not None
    third = start_station(cfg2, outputs=[RecipeRecorder()])
    wait_until(lambda: third.station.line.recipes is not None and third.station.line.recipes.status == "ok",
               what="third start")
    guard = third.station.line.recipes.guard_wall
    assert guard == saved["guard_wall"]
    assert third.station.line.recipes.stale(arrived_wall=guard - 1.0) is not None
    assert third.station.line.recipes.stale(arrived_wall=guard + 1.0) is None
    third.stop()


@pytest.mark.parametrize("log_size, others, reset", [(256, 0, 1), (2, 3, 1), (2, 3, 0)])
def test_a_recipe_number_written_and_reset_between_two_reads_still_faults_the_part(
        two_products, write_station, part_images_bytes, free_port, start_station, tmp_path, monkeypatch,
        log_size, others, reset):
    """On a mixed line the PLC writes each part's product: 2 for one part, 1 again at once. The loop reads the
    register between parts and would see 1 both times; the server's timed write log shows the 2, so the part that
    came after it is FAULT, never recipe 1's verdict (a probe: OK from recipe 1 with 50 ms between the writes).
    More changes than the log keeps: the present choice is verified again, parts from the last read FAULT."""
    from edge_runtime.outputs import modbus_output

    monkeypatch.setattr(modbus_output, "PLC_WRITE_LOG", log_size)
    line = ModbusRecipeLine(two_products, write_station, part_images_bytes, free_port, start_station, tmp_path)
    switcher = line.switcher
    try:
        line.write(16, 1)                          # the PLC's level: recipe 1
        line.fire()                                # FAULT: a request from the PLC re-verifies recipe 1 first
        wait_until(lambda: switcher.switches >= 1 and switcher.status == "ok" and line.ready(),
                   what="recipe 1 verified")
        first = line.fire()
        assert first["verdict"] != "FAULT" and first["bundle_id"] == IDS["cap-a"], first
        time.sleep(0.2)                            # the loop waits for the next trigger
        switches_before = switcher.switches
        line.write(16, 2)                          # product 2 for one part ...
        line.write(16, reset)                      # ... back (or cleared to 0), before the loop looked
        for k in range(others):                    # then other PLC-area changes push those two out of a short log
            line.write(17, k + 1)
        result = line.fire()
        assert result["verdict"] == "FAULT" and "recipe" in result["error"], result
        if reset == 0:   # the lost changes held a changeover the PLC cleared: FAULT until it writes its number
            wait_until(lambda: "changes were lost" in (line.station.fault_reason or ""), what="FAULT")
            assert line.fire()["verdict"] == "FAULT"
            line.write(16, 1)
        # Recipe 1 was active throughout, so wait for the switch the writes caused (it re-verifies recipe 1), not
        # only for recipe 1 and READY: under load the check could pass before that switch began.
        wait_until(lambda: switcher.switches > switches_before and switcher.active.name == "cap-a"
                   and switcher.status == "ok" and switcher.switching_to is None and line.ready(),
                   what="recipe 1 again")
        again = line.fire()
        assert again["verdict"] != "FAULT" and again["bundle_id"] == IDS["cap-a"], again
    finally:
        line.stop()


def test_a_camera_that_rewrites_one_file_in_place_is_inspected_after_a_switch(two_products, write_station,
                                                                              part_images_bytes, start_station,
                                                                              tmp_path):
    """The same file written again keeps its first birth time; its new version is from after its last hand-over,
    so a switch before that does not fault it (a probe: every part FAULT for good after the first switch)."""
    import os

    cfg, folder = watch_recipe_station(write_station, two_products, tmp_path, {"type": "free_run"})
    rec = RecipeRecorder()
    running = start_station(cfg, outputs=[rec])
    switcher = running.station.line.recipes
    wait_until(lambda: switcher is not None and switcher.status == "ok" and rec.ready, what="ready")
    path = drop(folder, "cam.png", part_images_bytes[0])
    wait_until(lambda: len(rec.results) == 1, what="the first part")
    switcher.request("cap-b", "plc")
    wait_until(lambda: switcher.status == "ok" and switcher.active.name == "cap-b" and rec.ready, what="cap-b")
    time.sleep(0.1)
    with open(path, "r+b") as fh:               # the same inode, the next part's image
        fh.write(part_images_bytes[1])
        fh.truncate()
    os.utime(path)
    wait_until(lambda: len(rec.results) == 2, what="the rewritten part")
    running.stop()
    second = rec.results[1]
    assert second.verdict is not Verdict.FAULT and second.bundle_id == IDS["cap-b"], second.error


def test_a_wall_clock_stepped_back_does_not_date_a_frame_before_the_request(two_products, write_station,
                                                                            part_images_bytes, start_station):
    """NTP stepping the wall clock back while a switch waits: the frame's capture is also compared on the monotonic
    clock, so it is still after the request (a probe: a 10 s step back let the old recipe inspect)."""
    running, rec, switcher = started_on_cap_a(two_products, write_station, part_images_bytes, start_station)
    switcher.request("cap-b", "plc")
    now_mono, now_wall = time.monotonic(), time.time()
    assert switcher.stale(captured_wall=now_wall - 10.0, captured_mono=now_mono) is not None
    assert switcher.stale(captured_wall=now_wall - 10.0) is None     # the wall clock alone is fooled
    running.stop()


def test_a_selection_that_cannot_be_recorded_faults_parts_until_it_can(two_products, write_station,
                                                                       part_images_bytes, start_station, tmp_path):
    """Unrecorded, a restart would resume the product before the switch and pass the new product's parts (a probe:
    OK from recipe a after a restart whose last save had failed). FAULT and READY down until a save works."""
    state = tmp_path / "state"
    running, rec = start_recipe_line(two_products, write_station, part_images_bytes, start_station, state)
    station, switcher = running.station, running.station.line.recipes
    wait_until(lambda: switcher.status == "ok" and rec.ready, what="ready")
    (state / "recipe_selected.json.tmp").mkdir()         # the save fails (as a full or read-only disk would)
    switcher.request("cap-b", "plc")
    wait_until(lambda: switcher.active.name == "cap-b" and not switcher.busy, what="the switch")
    wait_until(lambda: not rec.ready and "selection not recorded" in (station.fault_reason or ""), what="FAULT")
    part = fire_and_wait(station, rec)
    assert part.verdict is Verdict.FAULT and "selection not recorded" in part.error
    station.line._resume()               # another condition clearing (a camera reopened) keeps READY down
    assert not station.line._ready and "selection not recorded" in station.fault_reason
    # A restart now would not know the selection: the old file is set aside, not left to be resumed.
    assert not (state / "recipe_selected.json").exists() and (state / "recipe_selected.json.unsaved").exists()
    (state / "recipe_selected.json.tmp").rmdir()
    wait_until(lambda: rec.ready, what="READY once it is recorded")
    assert json.loads((state / "recipe_selected.json").read_text())["active"] == "cap-b"
    assert not (state / "recipe_selected.json.unsaved").exists()
    after = fire_and_wait(station, rec)
    running.stop()
    assert after.verdict is not Verdict.FAULT and after.bundle_id == IDS["cap-b"]


@pytest.mark.parametrize("name, content, words", [
    ("recipe_selected.json", '{"active": "cap-b", "plc": "2", "requ', "unreadable"),
    ("recipe_selected.json", '{"active": "bottle-b", "plc": null, "requested": null}', "names no recipe"),
    ("recipe_selected.json.unsaved", '{"active": "cap-a", "plc": null}', "not recorded before the restart"),
])
def test_an_unknown_selection_faults_the_line_until_a_recipe_is_named(two_products, write_station,
                                                                      part_images_bytes, start_station, tmp_path,
                                                                      name, content, words):
    """Which product the line was on is unknown (a torn file, a recipe renamed since, a selection that could not
    be recorded before the restart): starting on `initial` had passed the other product's parts."""
    state = tmp_path / "state"
    state.mkdir()
    (state / name).write_text(content)
    running, rec = start_recipe_line(two_products, write_station, part_images_bytes, start_station, state)
    station, switcher = running.station, running.station.line.recipes
    wait_until(lambda: words in (station.fault_reason or ""), what="FAULT naming the file")
    assert (state / name).read_text() == content     # left as it is until a recipe is named
    assert not rec.ready and fire_and_wait(station, rec).verdict is Verdict.FAULT
    switcher.request("cap-b", "http")
    wait_until(lambda: switcher.active.name == "cap-b" and switcher.status == "ok" and rec.ready, what="cap-b")
    after = fire_and_wait(station, rec)
    running.stop()
    assert after.verdict is not Verdict.FAULT and after.bundle_id == IDS["cap-b"]


def test_a_wall_clock_stepped_back_after_a_switch_does_not_fault_every_frame(two_products, write_station,
                                                                             part_images_bytes, start_station,
                                                                             monkeypatch, tmp_path):
    """NTP stepping the wall clock back after a switch: a frame captured after the switch is after it on the
    monotonic clock (a probe: a free-running line answered every part FAULT "frame captured during a recipe
    switch" for an hour after a 1 h step back, READY up, and again after a restart, from the saved guard)."""
    running, rec, switcher = started_on_cap_a(two_products, write_station, part_images_bytes, start_station)
    switcher.request("cap-b", "plc")
    wait_until(lambda: switcher.active.name == "cap-b" and switcher.status == "ok", what="cap-b active")
    before_end = switcher.guard_mono - 0.01
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600.0)
    assert switcher.stale(captured_wall=time.time(), captured_mono=time.monotonic()) is None
    assert switcher.stale(captured_wall=time.time(), captured_mono=before_end) is not None   # still guarded
    running.stop()
    monkeypatch.setattr(time, "time", real)

    # A guard saved while the clock ran years ahead (an RTC before NTP), restored at the next start.
    state = tmp_path / "state2"
    state.mkdir()
    (state / "recipe_selected.json").write_text(json.dumps(
        {"active": "cap-b", "plc": None, "requested": None, "guard_wall": time.time() + 10 * 365 * 86400.0}))
    again, rec2 = start_recipe_line(two_products, write_station, part_images_bytes, start_station, state_dir=state)
    switcher2 = again.station.line.recipes
    wait_until(lambda: switcher2 is not None and switcher2.status == "ok" and rec2.ready, what="ready")
    assert switcher2.active.name == "cap-b"
    assert switcher2.stale(captured_wall=time.time(), captured_mono=time.monotonic()) is None
    assert switcher2.stale(arrived_wall=time.time()) is not None   # a file's birth date cannot tell: FAULT, as before
    again.stop()


def test_a_lost_state_dir_faults_the_line_instead_of_starting_on_initial(two_products, write_station,
                                                                          part_images_bytes, start_station, tmp_path):
    """Probe 67: the PLC chose cap-b (serial RCP 2), the state_dir was lost (deleted, or another one: a station run
    by hand beside its service's StateDirectory) and the restarted line came up READY on `initial`, answering OK
    from cap-a's bundle for cap-b parts. The line's result log holding parts tells a lost selection from a first
    start: FAULT until a recipe is named."""
    state = tmp_path / "state"
    running, rec = start_recipe_line(two_products, write_station, part_images_bytes, start_station, state)
    results = Path(running.station.cfg.outputs[0].path)
    running.stop()
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"frame_id": 41, "verdict": "OK", "bundle_id": IDS["cap-b"]}) + "\n")
    shutil.rmtree(state)
    running, rec = start_recipe_line(two_products, write_station, part_images_bytes, start_station, state)
    station, switcher = running.station, running.station.line.recipes
    wait_until(lambda: "holds parts this line inspected" in (station.fault_reason or ""), what="FAULT")
    assert not rec.ready and fire_and_wait(station, rec).verdict is Verdict.FAULT
    switcher.request("cap-b", "http")
    wait_until(lambda: switcher.active.name == "cap-b" and switcher.status == "ok" and rec.ready, what="cap-b")
    after = fire_and_wait(station, rec)
    running.stop()
    assert after.verdict is not Verdict.FAULT and after.bundle_id == IDS["cap-b"] and after.frame_id > 41


def test_a_first_start_with_recipes_starts_on_initial(two_products, write_station, part_images_bytes,
                                                      start_station, tmp_path):
    running, rec = start_recipe_line(two_products, write_station, part_images_bytes, start_station,
                                     tmp_path / "state")
    switcher = running.station.line.recipes
    wait_until(lambda: switcher.status == "ok" and rec.ready, what="ready on initial")
    assert switcher.active.name == "cap-a"
    running.stop()
