"""The station file: one validated schema for everything a station does. Defaults live here.

Loaded once at start-up; an unknown key, a wrong type or a bad value is a ConfigError naming the file and key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from edge_runtime.decode import DecodeConfig
from edge_runtime.http_endpoint import HttpConfig
from edge_runtime.outputs import NgImageStoreConfig, OutputConfig, ResultLogConfig
from edge_runtime.schema import ConfigError, from_mapping
from edge_runtime.sources import FolderSourceConfig, SourceConfig, VideoSourceConfig
from edge_runtime.sources.video_source import is_stream_url
from edge_runtime.triggers import FreeRunTriggerConfig, TriggerConfig


@dataclass(kw_only=True)
class InferenceConfig:
    precision: Literal["int8", "fp32"] | None = None  # None: the bundle's default variant
    knn: Literal["hnsw", "exact"] = "hnsw"
    threads: int = 2
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    ef_search: int | None = None                      # None: the bundle's value
    deadline_ms: float | None = None                  # a verdict later than this is FAULT (the part has moved on)

    def validate(self) -> None:
        if self.threads < 1:
            raise ValueError(f"inference.threads: must be >= 1, got {self.threads}")
        if self.ef_search is not None and self.ef_search < 1:
            raise ValueError(f"inference.ef_search: must be >= 1, got {self.ef_search}")
        if self.deadline_ms is not None and self.deadline_ms <= 0:
            raise ValueError(f"inference.deadline_ms: must be > 0, got {self.deadline_ms}")


@dataclass(kw_only=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stats_interval_s: float = 60.0     # how often per-stage latency percentiles are logged
    stats_window: int = 1000           # frames in the sliding window of the percentiles


@dataclass(kw_only=True)
class RecoveryConfig:
    backoff_initial_s: float = 0.5     # camera/trigger reopen: first wait, doubled up to the maximum
    backoff_max_s: float = 10.0
    read_timeout_s: float = 1.0        # one loop iteration waits at most this long for a trigger or frame
    exit_when_exhausted: bool = True   # a replayed folder or file that ends stops the daemon cleanly

    def validate(self) -> None:
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("recovery: need 0 < backoff_initial_s <= backoff_max_s")
        if self.read_timeout_s <= 0:
            raise ValueError("recovery.read_timeout_s: must be > 0")


@dataclass(kw_only=True)
class SecurityConfig:
    bundle_public_key: str | None = None   # path to a raw 32-byte or PEM ed25519 public key; manifest.sig must verify


@dataclass(kw_only=True)
class StationConfig:
    name: str = "station"
    bundle: str                                        # bundle directory (relative paths: to the station file)
    roi: tuple[int, int, int, int] | None = None       # x, y, w, h crop of the frame; overrides the bundle's
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    source: SourceConfig
    trigger: TriggerConfig = field(default_factory=FreeRunTriggerConfig)
    outputs: list[OutputConfig] = field(default_factory=lambda: [ResultLogConfig(path="results.jsonl")])
    http: HttpConfig = field(default_factory=HttpConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    state_dir: str | None = None                       # where the frame counter survives restarts

    def validate(self) -> None:
        if self.roi is not None and (self.roi[2] <= 0 or self.roi[3] <= 0 or min(self.roi[:2]) < 0):
            raise ValueError(f"roi: expected x, y >= 0 and w, h > 0, got {list(self.roi)}")
        if not self.bundle:
            raise ValueError("bundle: must name the bundle directory")
        kinds = [o.type for o in self.outputs]
        if kinds.count("modbus") > 1:
            raise ValueError("outputs: at most one modbus server per station")
        logs = [o.path for o in self.outputs if isinstance(o, ResultLogConfig)]
        if len(set(logs)) != len(logs):
            raise ValueError("outputs: two result logs write the same file")


# The root of error messages while validating; replaced by the file name (see load_station).
_ROOT = "<station>"


def _where(message: str, path: Path) -> str:
    """'<station>.inference.threads: ...' -> '/etc/x/station.yaml: inference.threads: ...'."""
    if message.startswith(_ROOT + "."):
        message = message[len(_ROOT) + 1:]
    elif message.startswith(_ROOT):
        message = message[len(_ROOT):].lstrip(": ")
    return f"{path}: {message}"


def resolve_paths(cfg: StationConfig, base: Path) -> StationConfig:
    """Make the file system paths in `cfg` absolute against `base` (the station file's folder), in place.

    Devices (/dev/...), camera indices and stream URLs are left alone. Raises ConfigError (rooted at the
    station, see load_station) for a path the OS cannot represent, such as one with a NUL byte."""

    def absolute(key: str, value: str) -> str:
        try:
            return str(resolve(base, value))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{_ROOT}.{key}: not a usable path {value!r} ({exc})") from None

    cfg.bundle = absolute("bundle", cfg.bundle)
    src = cfg.source
    if isinstance(src, FolderSourceConfig):
        src.path = absolute("source.path", src.path)
        if src.journal:
            src.journal = absolute("source.journal", src.journal)
    elif isinstance(src, VideoSourceConfig) and not is_stream_url(src.path):
        src.path = absolute("source.path", src.path)
    for i, out in enumerate(cfg.outputs):
        if isinstance(out, ResultLogConfig):
            out.path = absolute(f"outputs[{i}].path", out.path)
        elif isinstance(out, NgImageStoreConfig):
            out.dir = absolute(f"outputs[{i}].dir", out.dir)
    if cfg.state_dir:
        cfg.state_dir = absolute("state_dir", cfg.state_dir)
    if cfg.security.bundle_public_key:
        cfg.security.bundle_public_key = absolute("security.bundle_public_key", cfg.security.bundle_public_key)
    return cfg


def load_station(path: str | Path) -> StationConfig:
    """Read and validate a station file; relative paths in it are made relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read station file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # PyYAML's constructors raise these for well-formed but impossible values (a 13th month, deep nesting).
        raise ConfigError(f"{path}: not a usable YAML document ({type(exc).__name__}: {exc})") from None
    if data is None:
        raise ConfigError(f"{path}: the station file is empty")
    try:
        cfg = from_mapping(StationConfig, data, _ROOT)
    except ConfigError as exc:
        raise ConfigError(_where(str(exc), path)) from None
    try:
        return resolve_paths(cfg, path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(_where(str(exc), path)) from None


def resolve(base: Path, p: str) -> Path:
    """Relative paths in a station file are relative to the file, not to the daemon's working directory."""
    # No expanduser(): "~" has no useful meaning for a service user, and an unknown ~user would raise.
    q = Path(p)
    if "\0" in p:
        raise ValueError("embedded NUL byte")
    return q if q.is_absolute() else (base / q).resolve()
