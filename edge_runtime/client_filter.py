"""Which network clients a station server (Modbus TCP, the HTTP endpoint) admits: `allowed_clients`, addresses
or networks. One parser and one test for both, so a station file means the same thing in each section."""
from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)

MAX_REPORTED = 64   # refused addresses logged once each, up to this many: a misconfigured list shows, a flood does not


def parse_networks(entries: list[str]) -> list:
    """`entries` as ip_network objects; a ValueError names the entry (`allowed_clients[i]`) that is neither an
    address nor a network."""
    networks = []
    for i, entry in enumerate(entries):
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"allowed_clients[{i}]: {entry!r} is not an IP address or network "
                             "(e.g. 10.0.0.5 or 10.0.0.0/24)") from None
    return networks


class ClientFilter:
    """admits(address): True when no networks are listed or the address lies in one of them."""

    def __init__(self, networks: list, server: str) -> None:
        self.networks = networks
        self.server = server
        self.refused = 0
        self._reported: set[str] = set()

    def admits(self, host: str | None) -> bool:
        if not self.networks:
            return True
        host = host or ""
        try:
            ip = ipaddress.ip_address(host.split("%")[0])   # an IPv6 scope id is no part of the address
        except ValueError:
            ip = None
        if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped          # an IPv4 client on a dual-stack socket
        if ip is not None and any(ip in net for net in self.networks):
            return True
        self.refused += 1
        if host not in self._reported and len(self._reported) < MAX_REPORTED:
            self._reported.add(host)
            log.warning("%s: refused a connection from %s: not in allowed_clients", self.server, host or "unknown")
        return False
