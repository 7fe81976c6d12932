"""allowed_clients as both servers read it (edge_runtime/client_filter.py)."""
import logging

import pytest

from edge_runtime.client_filter import MAX_REPORTED, ClientFilter, parse_networks


def test_entries_mean_what_a_line_engineer_wrote():
    nets = parse_networks(["10.0.0.5", " 10.0.1.0/24 ", "fd00::/8", "::ffff:10.0.2.7"])
    f = ClientFilter(nets, "modbus")
    assert f.admits("10.0.0.5") and f.admits("10.0.1.200") and f.admits("fd00::1")
    assert f.admits("::ffff:10.0.0.5")          # an IPv4 client seen on a dual-stack socket
    assert f.admits("10.0.2.7")                 # an IPv4-mapped entry is the IPv4 address (it never matched before)
    assert not f.admits("10.0.0.6") and not f.admits("") and not f.admits(None) and not f.admits("fe80::1%eth0")
    assert ClientFilter([], "http").admits("203.0.113.9")   # no list: anyone


def test_an_address_with_a_prefix_is_refused_rather_than_widened():
    with pytest.raises(ValueError, match=r"allowed_clients\[1\]: '10.0.0.5/24' names an address with a prefix: "
                                         r"write 10.0.0.5 for that host or 10.0.0.0/24 for the network"):
        parse_networks(["10.0.0.1", "10.0.0.5/24"])
    with pytest.raises(ValueError, match=r"allowed_clients\[0\]: 'plc-1' is not an IP address or network"):
        parse_networks(["plc-1"])


def test_refusals_are_logged_once_per_address_then_one_line_for_a_scan(caplog):
    f = ClientFilter(parse_networks(["10.0.0.5"]), "modbus")
    with caplog.at_level(logging.WARNING, logger="edge_runtime.client_filter"):
        for _ in range(3):
            f.admits("10.0.0.9")
        for i in range(MAX_REPORTED + 20):
            f.admits(f"10.9.{i // 250}.{i % 250}")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("10.0.0.9" in m for m in lines) == 1
    assert len(lines) == MAX_REPORTED + 1
    assert "further ones are counted, not logged" in lines[-1]
    assert f.refused == 3 + MAX_REPORTED + 20
