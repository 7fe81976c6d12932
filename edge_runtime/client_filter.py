"""Which network clients a station server (Modbus TCP, the HTTP endpoint) admits: `allowed_clients`, addresses
or networks. One parser and one test for both, so a station file means the same thing in each section; and
whether a server's own `host` keeps it on this machine (`is_loopback`, for the servers' warnings)."""
from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "localhost.")
MAX_REPORTED = 64   # refused addresses logged once each, up to this many (then one line says so): a misconfigured
                    # list shows, a scan does not fill the log


def is_loopback(host: str) -> bool:
    """True for localhost or a loopback address (127.0.0.0/8, ::1): a server listening there is off the network."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_networks(entries: list[str]) -> list:
    """`entries` as ip_network objects; a ValueError names the entry (`allowed_clients[i]`) that is neither an
    address nor a network, or an address with a prefix (10.0.0.5/24: the address or the network was meant, and
    taking the network silently would admit 255 more hosts). IPv4-mapped IPv6 entries (::ffff:10.0.0.5) are
    taken as the IPv4 ones, as clients are compared."""
    networks = []
    for i, entry in enumerate(entries):
        text = str(entry).strip()
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"allowed_clients[{i}]: {entry!r} is not an IP address or network "
                                 "(e.g. 10.0.0.5 or 10.0.0.0/24)") from None
            raise ValueError(f"allowed_clients[{i}]: {entry!r} names an address with a prefix: write "
                             f"{text.split('/')[0]} for that host or {loose} for the network") from None
        mapped = net.network_address.ipv4_mapped if net.version == 6 else None
        if mapped is not None and net.prefixlen >= 96:
            net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
        networks.append(net)
    return networks


class ClientFilter:
    """admits(address): True when no networks are listed or the address lies in one of them."""

    def __init__(self, networks: list, server: str, *, key: str = "allowed_clients",
                 refused: str = "a connection") -> None:
        self.networks = networks
        self.server = server
        self.key = key            # the station file's list, and what is refused, for the log line
        self.what = refused
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
        if host not in self._reported:
            if len(self._reported) < MAX_REPORTED:
                self._reported.add(host)
                log.warning("%s: refused %s from %s: not in %s", self.server, self.what, host or "unknown",
                            self.key)
            elif len(self._reported) == MAX_REPORTED:
                self._reported.add("")   # said once: the set stops growing here
                log.warning("%s: more than %d addresses refused (a scan?): further ones are counted, not logged; "
                            "a PLC missing from allowed_clients may be among them", self.server, MAX_REPORTED)
        return False


def check_host_encodable(host: str) -> None:
    """Raise ValueError (key `host`) for a host the socket layer cannot even encode: a lone surrogate ("x\\ud800"
    from a YAML escape), an empty or over-long label (probe 100: validate said valid, then bind raised TypeError
    'encoding of hostname failed' and run died with a traceback)."""
    try:
        host.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"host: {host!r} is not a host name or address ({exc})") from None
