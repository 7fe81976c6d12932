"""systemd/edge-runtime.service agrees with what the daemon does (notify, watchdog, reload, exit codes, paths)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edge_runtime.cli import main as cli_main
from edge_runtime.config import load_station
from edge_runtime.outputs import NgImageStoreConfig, ResultLogConfig

REPO = Path(__file__).resolve().parents[3]
UNIT = REPO / "systemd" / "edge-runtime.service"


def unit_settings() -> dict[str, list[str]]:
    """key -> every value assigned to it, in order (systemd allows repeated keys)."""
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_matches_the_daemon_protocol():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]   # the daemon sends READY=1 itself
    assert float(s["WatchdogSec"][0]) > 0                              # the loop pings WATCHDOG=1
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]               # SIGHUP reloads the bundle
    assert s["ExecStart"][0].split()[1:] == ["run", "--config", "/etc/edge-runtime/station.yaml"]
    assert s["Restart"] == ["on-failure"]
    assert s["User"] != ["root"] and s["CapabilityBoundingSet"] == [""]
    assert s["DevicePolicy"] == ["closed"]
    assert {"char-video4linux rw", "char-gpiochip rw", "char-ttyUSB rw"} <= set(s["DeviceAllow"])
    assert set(s["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_invalid_config_exit_status_is_not_restarted(tmp_path):
    station = tmp_path / "station.yaml"
    station.write_text("bundle: b\nsource: {type: folder, path: x}\nunknown: 1\n")
    code = cli_main(["run", "--config", str(station)])
    assert code == 2
    assert unit_settings()["RestartPreventExitStatus"] == [str(code)]


def test_device_configs_write_only_where_the_sandbox_allows():
    writable = tuple(p.rstrip("/") + "/" for p in unit_settings()["ReadWritePaths"][0].split())
    for path in sorted((REPO / "device_configs").glob("*.yaml")):
        cfg = load_station(path)
        targets = [cfg.state_dir] + [o.path if isinstance(o, ResultLogConfig) else o.dir for o in cfg.outputs
                                     if isinstance(o, (ResultLogConfig, NgImageStoreConfig))]
        for target in targets:
            assert (target.rstrip("/") + "/").startswith(writable), f"{path.name}: {target} is read-only under the unit"


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify insists that ExecStart exists: point it at this checkout's console script (or python).
    exe = shutil.which("edge-runtime") or shutil.which("python3")
    unit = tmp_path / "edge-runtime.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/edge-runtime", exe))
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "edge-runtime.service" not in done.stderr, done.stderr
