"""Optional parts of an install that some tests need.

A device install (no exporter: no torch) skips the tests whose extra or service it lacks, with the reason. Where the
exporter is installed (a workstation, CI: the README's test command installs every extra) a missing part fails the
test instead, so nothing the suite should run is skipped silently. EDGE_TESTS_REQUIRE_ALL=1 or 0 overrides.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest


def _exporter_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ImportError:  # hidden by tests/fixtures/no_torch
        return False


STRICT = {"1": True, "0": False}.get(os.environ.get("EDGE_TESTS_REQUIRE_ALL", ""), None)
if STRICT is None:
    STRICT = _exporter_installed()


def _missing(what: str) -> None:
    if STRICT:
        raise RuntimeError(f"{what}; the exporter is installed, so this is a full test run that must not skip it "
                           "(set EDGE_TESTS_REQUIRE_ALL=0 to skip instead)")
    pytest.skip(what, allow_module_level=True)


def require(module: str, extra: str) -> ModuleType:
    """Import `module` or skip the calling test module: it comes with `pip install 'patchcore-edge[<extra>]'`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(f"needs the optional extra: pip install 'patchcore-edge[{extra}]' ({module} is not importable)")
        raise  # unreachable: _missing raises


def mqtt_broker() -> ModuleType:
    """tests/fixtures/mosquitto_broker.py, for tests that start a real broker: they need Debian's mosquitto binary
    (.ci/run installs it) and the MQTT client (the io extra). Call it at module level, or inside the one test that
    needs a broker in a module that mostly does not."""
    require("paho.mqtt.client", "io")
    spec = importlib.util.spec_from_file_location(
        "mosquitto_broker", Path(__file__).resolve().parent / "fixtures" / "mosquitto_broker.py")
    broker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(broker)
    if broker.mosquitto_binary() is None:
        _missing("needs a Mosquitto broker binary: apt-get install -y mosquitto")
    return broker


def require_program(name: str, package: str) -> str:
    """A system program some tests run (e.g. qemu-x86_64 from Debian's qemu-user; .ci/run installs it)."""
    import shutil
    path = shutil.which(name)
    if path is None:
        _missing(f"needs {name}: apt-get install -y {package}")
    return path
