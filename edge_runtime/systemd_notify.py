"""sd_notify(3) without libsystemd: tell systemd the daemon is ready, alive (watchdog) or stopping.

Every call is a no-op returning False when the daemon does not run under systemd (no $NOTIFY_SOCKET).
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def _socket_address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]  # Linux abstract namespace
    if addr.startswith("/"):
        return addr
    # systemd also knows vsock: addresses (for VMs); a station never needs them.
    log.debug("NOTIFY_SOCKET %r is not a unix socket path; not notifying", addr)
    return None


def notify(message: str) -> bool:
    """Send one datagram of newline-separated KEY=VALUE assignments. True when it was sent."""
    addr = _socket_address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(message.encode("utf-8"), addr)
        return True
    except OSError as exc:
        # A notify failure must not stop inspection; systemd's own timeouts will tell the operator.
        log.warning("sd_notify %r to %s failed: %s", message.split("\n", 1)[0], os.environ.get("NOTIFY_SOCKET"), exc)
        return False


def ready() -> bool:
    return notify("READY=1")


def reloading() -> bool:
    """A reload begins; READY=1 ends it (sd_notify(3): RELOADING=1 carries the monotonic time)."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    # One line only: a newline would start a new assignment.
    return notify("STATUS=" + " ".join(text.splitlines()))


def watchdog_interval() -> float | None:
    """The service's WatchdogSec in seconds, or None when no watchdog is set for this process.

    Ping at half this interval, as sd_watchdog_enabled(3) advises."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # meant for another process (e.g. our parent before a fork)
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled", usec)
        return None
    return value / 1_000_000 if value > 0 else None
