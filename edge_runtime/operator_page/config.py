"""The station file's `page:` section: where the operator's page listens, who may change what, what it keeps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edge_runtime.client_filter import check_host_encodable, is_loopback

ROLES = ("viewer", "operator", "engineer")
# How far above the threshold (times it) a part may score and still be taught as good without an engineer's explicit
# word: the page's default (page.operator_learn_max) and the limit of `edge-runtime adapt --good`.
OPERATOR_LEARN_MAX = 1.25


PAGE_HISTORY_MAX = 2000      # parts (overlay + thumbnail JPEGs): ~200 MB at most
PAGE_KEEP_FRAMES_MAX = 256   # full inspected regions


@dataclass(kw_only=True)
class PageUser:
    name: str
    role: Literal["viewer", "operator", "engineer"]
    password_hash: str        # from `edge-runtime hash-password` (scrypt); never the password itself

    def validate(self) -> None:
        from edge_runtime.operator_page.auth import parse_hash

        if not self.name.strip():
            raise ValueError("name: must not be empty")
        parse_hash(self.password_hash)  # ValueError naming the expected form


@dataclass(kw_only=True)
class PageConfig:
    enabled: bool = False             # off unless the station file asks for it
    host: str = "127.0.0.1"           # loopback: reachable from the station's own screen only
    port: int = 8090                  # 0 picks a free port (tests)
    lan: bool = False                 # must be true for a host other than loopback (the page is then on the LAN)
    allowed_hosts: list[str] = field(default_factory=list)  # Host names accepted besides IPs and localhost
    history: int = 200                # parts kept for the history view (thumbnails + overlay)
    keep_frames: int = 32             # of those, the newest whose full frame is kept for "this part is good"
    view_px: int = 640                # longest side of the overlay image served
    thumbnail_px: int = 160
    users: list[PageUser] = field(default_factory=list)  # none: the page is read-only
    session_timeout_s: float = 8 * 3600.0
    station_signing_key: str | None = None  # ed25519 private key (PEM) signing device-made versions; see bank_adapt
    # An operator may teach as good a part scoring up to this many times the threshold (a false reject lies near
    # it; a part far above it is more likely a defect): an engineer confirms the rest. 0: engineers only.
    operator_learn_max: float = OPERATOR_LEARN_MAX

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0..65535, got {self.port}")
        check_host_encodable(self.host)   # as http.host: uvicorn could not bind it either
        if not self.lan and not is_loopback(self.host):
            raise ValueError(f"host: {self.host} is not loopback; set page.lan: true to serve the page on the LAN")
        if self.history < 1 or self.keep_frames < 0 or self.keep_frames > self.history:
            raise ValueError(f"history/keep_frames: need history >= 1 and 0 <= keep_frames <= history, "
                             f"got {self.history} and {self.keep_frames}")
        # Held in memory: a part is its overlay and thumbnail JPEGs (~50-100 kB), a kept frame the whole inspected
        # region (15 MB at 5 MP). Unbounded, the page could take a small board's memory away from the line.
        if self.history > PAGE_HISTORY_MAX or self.keep_frames > PAGE_KEEP_FRAMES_MAX:
            raise ValueError(f"history/keep_frames: at most {PAGE_HISTORY_MAX} and {PAGE_KEEP_FRAMES_MAX} (held in "
                             f"memory), got {self.history} and {self.keep_frames}")
        if self.view_px < 64 or self.thumbnail_px < 16:
            raise ValueError(f"view_px/thumbnail_px: need >= 64 and >= 16, got {self.view_px} and {self.thumbnail_px}")
        names = [u.name for u in self.users]
        if len(set(names)) != len(names):
            raise ValueError("users: a name appears twice")
        if not 0 <= self.operator_learn_max <= 100:
            raise ValueError(f"operator_learn_max: must be 0..100 (times the threshold), got {self.operator_learn_max}")
        if self.session_timeout_s <= 0:
            raise ValueError(f"session_timeout_s: must be > 0, got {self.session_timeout_s}")
