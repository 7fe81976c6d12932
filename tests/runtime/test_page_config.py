"""The station file's `page:` section and the password hashes it stores (no starlette needed)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from edge_runtime.config import load_station
from edge_runtime.operator_page.auth import check_password, hash_password
from edge_runtime.schema import ConfigError


def station(tmp_path, page: dict):
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump({"bundle": "b", "source": {"type": "folder", "path": "in"}, "page": page}))
    return path


def test_page_is_off_and_on_loopback_by_default(tmp_path):
    cfg = load_station(station(tmp_path, {}))
    assert cfg.page.enabled is False and cfg.page.host == "127.0.0.1" and cfg.page.users == []


def test_lan_needs_an_explicit_yes(tmp_path):
    with pytest.raises(ConfigError, match=r"station.yaml: page.host: 0.0.0.0 is not loopback; set page.lan: true"):
        load_station(station(tmp_path, {"enabled": True, "host": "0.0.0.0"}))
    assert load_station(station(tmp_path, {"enabled": True, "host": "0.0.0.0", "lan": True})).page.lan


def test_a_plain_password_in_the_station_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"page.users\[0\].*password_hash: expected scrypt"):
        load_station(station(tmp_path, {"users": [{"name": "a", "role": "operator", "password_hash": "hunter2"}]}))
    with pytest.raises(ConfigError, match=r"page.users\[0\].role"):
        load_station(station(tmp_path, {"users": [{"name": "a", "role": "admin", "password_hash": hash_password("x")}]}))
    # Well-formed but too costly: every login would fail with "memory limit exceeded" (a 500), so it is refused here.
    costly = "scrypt$65536$8$1$" + "00" * 16 + "$" + "00" * 32
    with pytest.raises(ConfigError, match=r"page.users\[0\].*N=65536, r=8 needs 64 MiB per login"):
        load_station(station(tmp_path, {"users": [{"name": "a", "role": "operator", "password_hash": costly}]}))


def test_hash_password_command_round_trip():
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "hash-password"], input="s3cret\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    stored = out.stdout.strip()
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert check_password("s3cret", stored) and not check_password("s3cret!", stored)
