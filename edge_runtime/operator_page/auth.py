"""Roles, hashed passwords (scrypt), server-side sessions and the cross-site checks of every state-changing request."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from edge_runtime.operator_page.config import ROLES, PageUser

# scrypt cost: 2^14 x 8 x 1 takes ~50 ms and 16 MiB on a Pi-class CPU, per login only.
_N, _R, _P = 2 ** 14, 8, 1
_MAXMEM = 64 * 1024 * 1024   # what one login's scrypt may use
SESSION_COOKIE = "edge_page_session"


def hash_password(password: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """'scrypt$N$r$p$<salt hex>$<hash hex>' for the station file's page.users[].password_hash."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"


def parse_hash(text: str) -> tuple[int, int, int, bytes, bytes]:
    parts = text.split("$")
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
        if n < 2 or n & (n - 1) or n > 2 ** 20 or not 1 <= r <= 32 or not 1 <= p <= 16 or len(salt) < 8 or len(digest) < 16:
            raise ValueError
    except ValueError:
        raise ValueError("password_hash: expected scrypt$N$r$p$<salt hex>$<hash hex> from `edge-runtime "
                         f"hash-password`, got {text[:20]!r}...") from None
    need = 128 * r * p + 128 * r * (n + 2)   # OpenSSL's scrypt memory: B (p blocks) + V (N + 2 blocks)
    if need > _MAXMEM:
        # Such a hash validates as text but fails every login with "memory limit exceeded" (a 500).
        raise ValueError(f"password_hash: scrypt N={n}, r={r} needs {need >> 20} MiB per login, over the "
                         f"{_MAXMEM >> 20} MiB a login may use; make the hash with `edge-runtime hash-password`")
    return n, r, p, salt, digest


def check_password(password: str, stored: str) -> bool:
    n, r, p, salt, digest = parse_hash(stored)
    got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(digest))
    return hmac.compare_digest(got, digest)


def role_allows(role: str | None, needed: str) -> bool:
    return role is not None and ROLES.index(role) >= ROLES.index(needed)


@dataclass
class Session:
    user: str
    role: str
    csrf: str
    expires: float   # time.monotonic(): NTP stepping the wall clock back must not keep a login alive for that long


class Sessions:
    """Random session ids held in memory (a restart logs everyone out), each with its own CSRF token."""

    def __init__(self, users: list[PageUser], timeout_s: float):
        self.users = {u.name: u for u in users}
        self.timeout_s = timeout_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        # A hash to compare against for unknown names, so a wrong name costs as long as a wrong password.
        self._dummy = hash_password(secrets.token_hex(8))

    @property
    def writable(self) -> bool:
        return bool(self.users)

    def login(self, name: str, password: str) -> tuple[str, Session] | None:
        user = self.users.get(name)
        ok = check_password(password, user.password_hash if user else self._dummy)
        if not (ok and user):
            return None
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        s = Session(user.name, user.role, secrets.token_urlsafe(32), now + self.timeout_s)
        with self._lock:
            # Expired sessions go here too: one whose cookie the browser dropped is never presented again, and
            # each login left one behind for the life of the process (probe 78: 500 logins held 500 sessions).
            for key in [k for k, v in self._sessions.items() if v.expires < now]:
                del self._sessions[key]
            self._sessions[sid] = s
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None and s.expires < time.monotonic():
                del self._sessions[sid]
                return None
            return s

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)
