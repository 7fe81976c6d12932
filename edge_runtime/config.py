"""The station file: one validated schema for everything a station does. Defaults live here.

Loaded once at start-up; an unknown key, a wrong type or a bad value is a ConfigError naming the file and key.
"""
from __future__ import annotations

import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from edge_runtime.bundle_policy import FloorScope
from edge_runtime.decode import DecodeConfig
from edge_runtime.http_endpoint import HttpConfig
from edge_runtime.nn_search import EF_MAX
from edge_runtime.lines_config import (MAX_THREADS, LineConfig, check_gpio_claims, check_serial_ports, gpio_claims,
                                       resolve_line_paths, validate_lines)
from edge_runtime.operator_page.config import PageConfig
from edge_runtime.recipes import RecipesConfig, resolve_recipe_paths
from edge_runtime.drift_monitor import DriftConfig
from edge_runtime.frame_quality import FrameCheckConfig
from edge_runtime.outputs import NgImageStoreConfig, OutputConfig, ResultLogConfig
from edge_runtime.outputs.mqtt_station import StationMqttConfig, validate_station_mqtt
from edge_runtime.rollout import RolloutConfig
from edge_runtime.safe_yaml import YamlRefused, load_strict
from edge_runtime.schema import ConfigError, from_mapping
from edge_runtime.capture_queue import CaptureConfig
from edge_runtime.sources import FolderSourceConfig, PacedSourceConfig, SourceConfig, VideoSourceConfig
from edge_runtime.sources.video_source import is_stream_url
from edge_runtime.triggers import FreeRunTriggerConfig, TriggerConfig

log = logging.getLogger(__name__)


# 2 s: far longer than an inspection takes (tens of ms on the 2-core x86 measured here, 9 tiles included), short
# enough that a stalled inspection does not answer a part triggered seconds later. A line sets its controller's
# timeout (device_configs/: 300-1000 ms).
DEFAULT_DEADLINE_MS = 2000.0

# A station file whose outputs name no result_log gets one (<state_dir>/results.jsonl; a line's:
# <state_dir>/lines/<line>/results.jsonl): the bus writes a part's record before any line output is told the verdict
# (output_bus.py), so without one an OK would reach the controller with no record of it.
DEFAULT_RESULT_LOG = "results.jsonl"

# What the station runs on. `edge-export fit --station` reads it to pick the bundle's INT8 target
# (edge_runtime/station_init.py DEVICE_INT8_TARGET maps each name); the runtime itself does not depend on it.
Device = Literal["x86", "x86-vnni", "pi4", "pi5", "jetson-orin", "arm64"]


@dataclass(kw_only=True)
class InferenceConfig:
    precision: Literal["int8", "fp32"] | None = None  # None: the bundle's default variant
    # hnsw: the bundle's graph searched by faiss; hnswlib: the same graph in hnswlib (slower, two bank copies);
    # onnx: exact search on the providers (CUDA on a Jetson); ivf: faiss inverted file built on the device
    knn: Literal["hnsw", "hnswlib", "exact", "onnx", "ivf"] = "hnsw"
    threads: int = 2   # the line's cores for inference, shared by its workers
    # Frames a free-running line inspects at once, each on threads // workers cores (edge_runtime/inflight.py):
    # 2 with threads 2 inspects 1.25x the frames per second of 1 (bottle, 2-core x86: 113-123 vs 92-97) at a
    # longer time per frame (15-17 vs 10 ms). A triggered line inspects one part at a time.
    workers: int = 1
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    ef_search: int | None = None                      # None: the bundle's value
    ivf_nprobe: int = 2                               # knn: ivf cells scanned per patch: 1 faster, 2 closer heat map
    # knn: hnsw: the search's position prior (edge_runtime/position_prior.py), where the bundle's golden images
    # fit: faster verdicts, the same scores; the heat map takes the bounds that search left (pixel AUROC within
    # 0.0001 on bottle, benchmarks/results/heat_map_source.md). false: every patch walks the graph before the verdict.
    position_prior: bool = True
    # A verdict later than this after the trigger (free run: after capture) is FAULT, and one a stalled serial port
    # still holds then is never sent: set it to the controller's own timeout. Always on: a station with no
    # deadline would hand a stalled inspection's OK to whichever part the controller is waiting for by then.
    deadline_ms: float | None = DEFAULT_DEADLINE_MS   # null (station files from before 0.9): the default
    review_threshold: float | None = None             # None: the bundle's review band (if any); raw image score

    def validate(self) -> None:
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads: must be 1-{MAX_THREADS} (one per physical core), got {self.threads}")
        if not 1 <= self.workers <= 8:
            raise ValueError(f"workers: must be 1-8, got {self.workers}")
        if self.ef_search is not None and not 1 <= self.ef_search <= EF_MAX:
            raise ValueError(f"ef_search: must be 1-{EF_MAX}, got {self.ef_search}")
        if self.ivf_nprobe < 1:
            raise ValueError(f"ivf_nprobe: must be >= 1, got {self.ivf_nprobe}")
        if self.review_threshold is not None and not self.review_threshold > 0:
            raise ValueError(f"review_threshold: must be > 0, got {self.review_threshold}")
        if self.deadline_ms is None:
            # `edge-runtime init` used to write `deadline_ms: null` for "no deadline"; there is none such now.
            log.warning("inference.deadline_ms: null no longer means no deadline: using %g ms (set your "
                        "controller's timeout)", DEFAULT_DEADLINE_MS)
            self.deadline_ms = DEFAULT_DEADLINE_MS
        if not (isinstance(self.deadline_ms, (int, float)) and 0 < self.deadline_ms < math.inf):
            raise ValueError(f"deadline_ms: must be a number of milliseconds > 0 (the controller's timeout), "
                             f"got {self.deadline_ms!r}")
        if not self.providers:
            raise ValueError("providers: must list at least one onnxruntime execution provider")

    @property
    def frame_threads(self) -> int:
        """onnxruntime intra-op and search threads of one frame: the line's threads shared by its workers."""
        return max(1, self.threads // self.workers)


# Frames in the latency percentiles' window at most (as drift.window's bound).
STATS_WINDOW_MAX = 100_000


@dataclass(kw_only=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stats_interval_s: float = 60.0     # how often per-stage latency percentiles are logged
    stats_window: int = 1000           # frames in the sliding window of the percentiles

    def validate(self) -> None:
        if self.stats_interval_s <= 0:
            raise ValueError(f"stats_interval_s: must be > 0, got {self.stats_interval_s}")
        if self.stats_window < 1:
            raise ValueError(f"stats_window: must be >= 1, got {self.stats_window}")
        if self.stats_window > STATS_WINDOW_MAX:
            # Every stage keeps this many timings, copied under the lock the loop adds under (probe 102: 2**63 - 1
            # validated; the windows grew ~50 MiB an hour at 60 fps and each percentile log took longer).
            raise ValueError(f"stats_window: must be at most {STATS_WINDOW_MAX} frames, got {self.stats_window}")


# The longest one wait of the loop may be: an idle triggered line goes round (and pings the systemd watchdog) once per
# wait, and systemd/edge-runtime.service kills it after WatchdogSec=10 without a ping (probe 73: read_timeout_s 12
# validated, and the pings of an idle line came 12 s apart; 1e300 validated and raised OverflowError at the first wait).
READ_TIMEOUT_MAX_S = 8.0


@dataclass(kw_only=True)
class RecoveryConfig:
    backoff_initial_s: float = 0.5     # camera/trigger reopen: first wait, doubled up to the maximum
    backoff_max_s: float = 10.0
    read_timeout_s: float = 1.0        # one loop iteration waits at most this long for a trigger or frame
    exit_when_exhausted: bool = True   # a replayed folder or file that ends stops the daemon cleanly

    def validate(self) -> None:
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(f"need 0 < backoff_initial_s <= backoff_max_s, got "
                             f"{self.backoff_initial_s} and {self.backoff_max_s}")
        if self.read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s: must be > 0, got {self.read_timeout_s}")
        if self.read_timeout_s > READ_TIMEOUT_MAX_S:
            raise ValueError(f"read_timeout_s: must be at most {READ_TIMEOUT_MAX_S:g} s (an idle line pings the systemd "
                             f"watchdog once per wait; the unit's WatchdogSec is 10), got {self.read_timeout_s:g}")


@dataclass(kw_only=True)
class SecurityConfig:
    bundle_public_key: str | None = None   # path to a raw 32-byte or PEM ed25519 public key; manifest.sig must verify
    product: str | None = None             # when set, the bundle's manifest 'product' must be exactly this
    allow_downgrade: bool = False          # false: refuse a bundle_version lower than the highest one loaded

    def validate(self) -> None:
        if self.product is not None and not self.product.strip():
            raise ValueError("product: must not be empty (leave it out to accept any product)")


DEFAULT_TOP_LEVEL_LOG = "results.jsonl"   # a station file without `outputs:` (with `lines:`: unused)


class _DefaultOutputs(list):
    """The outputs a station file without `outputs:` gets: with `lines:` unused, so not refused like a named one."""


@dataclass(kw_only=True)
class StationConfig:
    name: str = "station"
    device: Device | None = None                       # informs `edge-export fit --station` (INT8 target)
    # Bundle directory (relative paths: to the station file); required unless every line of `lines:` names its
    # own. Typed `str` with a None default on purpose: an explicit `bundle: null` is still "expected a string".
    bundle: str = None  # type: ignore[assignment]
    roi: tuple[int, int, int, int] | None = None       # x, y, w, h crop of the frame; overrides the bundle's
    # A frame (or ROI) whose size differs from the bundle's: refuse (FAULT), resize or letterbox. None: the bundle's.
    size_policy: Literal["refuse", "resize", "letterbox"] | None = None
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    # Per frame: a frame far outside the training frames' brightness/sharpness/noise is a FAULT (frame_quality.py).
    frame_check: FrameCheckConfig = field(default_factory=FrameCheckConfig)
    # Over the last parts: rolling score, brightness, sharpness and noise warnings (drift_monitor.py).
    drift: DriftConfig = field(default_factory=DriftConfig)
    source: SourceConfig = None  # type: ignore[assignment]  # required unless the station has `lines:`
    trigger: TriggerConfig = field(default_factory=FreeRunTriggerConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)  # capture thread (edge_runtime/capture_queue.py)
    outputs: list[OutputConfig] = field(
        default_factory=lambda: _DefaultOutputs([ResultLogConfig(path=DEFAULT_TOP_LEVEL_LOG)]))
    http: HttpConfig = field(default_factory=HttpConfig)
    page: PageConfig = field(default_factory=PageConfig)   # the operator's page (edge_runtime/operator_page)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)   # signed rollout: edge_runtime/rollout.py
    # Where the frame counter survives restarts (ids are never reused). Unset: $STATE_DIRECTORY (systemd's
    # StateDirectory=, /var/lib/edge-runtime with the shipped unit), else "state" next to the station file.
    state_dir: str | None = None
    lines: list[LineConfig] = field(default_factory=list)  # several cameras in one daemon (edge_runtime/lines_config.py)
    recipes: RecipesConfig | None = None  # one bundle per product, chosen by the controller (edge_runtime/recipes.py)
    mqtt: StationMqttConfig | None = None  # with `lines:`: one MQTT connection for every line (outputs/mqtt_station.py)
    # Set by line_station_configs, not by the file: the station's state root, this line's camera and the other
    # lines' cameras, so the version floors of its camera and product count wherever they were recorded
    # (bundle_policy.applicable_floor).
    floor_scope: FloorScope | None = field(default=None, metadata={"internal": True})

    def validate(self) -> None:
        validate_station_mqtt(self.mqtt, self.outputs, self.lines)
        if self.lines:
            validate_lines(self.lines, self.trigger, self.recipes)
            for j, out in enumerate(self.outputs):
                # Each line drives its own outputs (line_station_configs): one listed here would drive nothing.
                if out.type not in ("result_log", "mqtt"):
                    raise ValueError(f"outputs[{j}]: with `lines:` each line lists its own outputs; this {out.type} "
                                     "output would drive nothing: move it into the line's `outputs:`")
                # The default top-level log (no `outputs:` key) is harmless; one the file names would stay empty
                # while each line records elsewhere (probe 33), and the operator audits the one they named.
                if isinstance(out, ResultLogConfig) and not isinstance(self.outputs, _DefaultOutputs):
                    raise ValueError(f"outputs[{j}]: with `lines:` each line records its parts in its own result "
                                     f"log; {out.path} would stay empty: name it in a line's `outputs:` (a line "
                                     "without outputs writes results-<name>.jsonl)")
            if self.bundle is None and self.recipes is None and any(ln.bundle is None and ln.recipes is None
                                                                    for ln in self.lines):
                missing = next(i for i, ln in enumerate(self.lines) if ln.bundle is None and ln.recipes is None)
                raise ValueError(f"lines[{missing}].bundle: required when the station names no bundle")
        else:
            if self.bundle is None and self.recipes is None:
                raise ValueError("bundle: required key is missing")
            if self.source is None:
                raise ValueError("source: required key is missing")
        sources = [(f"lines[{i}].source", ln.source) for i, ln in enumerate(self.lines)] if self.lines else \
            [("source", self.source)]
        for where, src in sources:
            latency_s = float(getattr(src, "latency_ms", 0.0) or 0.0) / 1000.0
            # After a trigger the line waits read_timeout_s for the part's frame, which comes latency_ms later.
            if latency_s and latency_s + 0.25 > self.recovery.read_timeout_s:
                raise ValueError(f"{where}.latency_ms: {latency_s * 1000:g} ms leaves no time to receive the part's "
                                 f"frame within recovery.read_timeout_s {self.recovery.read_timeout_s:g} s: raise "
                                 f"that to at least {latency_s + 0.25:g}")
        if self.roi is not None and (self.roi[2] <= 0 or self.roi[3] <= 0 or min(self.roi[:2]) < 0):
            raise ValueError(f"roi: expected x, y >= 0 and w, h > 0, got {list(self.roi)}")
        if self.bundle is not None and not self.bundle:
            raise ValueError("bundle: must name the bundle directory")
        if self.bundle is not None and self.recipes is not None:
            raise ValueError("recipes: a station with recipes names its bundles there; leave out 'bundle'")
        if self.rollout.enabled and (self.recipes is not None or any(ln.recipes for ln in self.lines)):
            # A rollout replaces the line's one bundle; with recipes it would put one product's bundle in service
            # while another recipe is active (and skip that recipe's product and version checks).
            raise ValueError("rollout.enabled: not with recipes: update a recipe's bundle folder and send SIGHUP "
                             "(the recipe in service is re-read and verified), or run one line per product")
        if self.rollout.enabled and not self.security.bundle_public_key and not self.rollout.allow_unsigned:
            # Probe 60: an unsigned offer with its threshold x1000 (id recomputed, no key needed) was switched to,
            # and a part with a large hole in it passed OK.
            raise ValueError("rollout.enabled: needs security.bundle_public_key: without it an offered bundle is "
                             "checked only against checksums its sender writes, so anyone who can offer one puts any "
                             "bundle in service (rollout.allow_unsigned: true accepts that deliberately)")
        kinds = [o.type for o in self.outputs]
        if kinds.count("modbus") > 1:
            raise ValueError("outputs: at most one modbus server per station")
        logs = [o.path for o in self.outputs if isinstance(o, ResultLogConfig)]
        if len(set(logs)) != len(logs):
            raise ValueError("outputs: two result logs write the same file")
        if not self.lines:
            check_gpio_claims(gpio_claims("", self.outputs, self.trigger, self.recipes))
            check_serial_ports([(f"outputs[{j}]", o) for j, o in enumerate(self.outputs)])
        check_listen_ports(self)


def trigger_warnings(cfg: StationConfig) -> list[str]:
    """What validate and the start log say about a `software` trigger that nothing in the station file can fire:
    the line then waits with READY up and inspects no part (probe 73: validate said valid, no warning, and such a
    station ran READY for ever without one record). Code may still fire it (tests, an embedding program)."""
    shared = (cfg.http.enabled and cfg.http.allow_trigger) or bool(cfg.mqtt is not None and cfg.mqtt.allow_trigger)
    located = ([(f"lines[{i}]" if ln.trigger else f"lines[{i}] (the station's)", ln.trigger or cfg.trigger,
                 ln.outputs or []) for i, ln in enumerate(cfg.lines)] or [("", cfg.trigger, cfg.outputs)])
    found = []
    for where, trigger, outputs in located:
        if getattr(trigger, "type", None) != "software" or shared:
            continue
        if any(getattr(o, "accept_trigger", False) or getattr(o, "allow_trigger", False) for o in outputs):
            continue   # a serial TRG, OPC UA StartSingleJob
        found.append(f"{where + ' ' if where else ''}trigger.type: software, but nothing in this station file fires "
                     "it (http.allow_trigger, a serial output's accept_trigger, an opcua output's allow_trigger or "
                     "mqtt.allow_trigger): the line waits with READY up and inspects no part")
    return found


# A server on one of these listens on every address of its family: it shares a port with any other host.
_ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]", "*")


def check_listen_ports(cfg: StationConfig) -> None:
    """One TCP port, one server: the station's own HTTP endpoint, operator page, Modbus and OPC UA servers (the
    lines' included) on one port and overlapping addresses cannot all listen (probe 73: http.port and a modbus
    output's port both 15020 validated; run then stopped with 'another process holds the port', the Modbus server
    being that process). Port 0 (a free port) never collides. Raises ValueError naming both keys."""
    located = [("http.port", cfg.http)] if cfg.http.enabled else []
    located += [("page.port", cfg.page)] if cfg.page.enabled else []
    located += [(f"outputs[{j}].port", o) for j, o in enumerate(cfg.outputs)]
    located += [(f"lines[{i}].outputs[{j}].port", o) for i, ln in enumerate(cfg.lines) for j, o in enumerate(ln.outputs or [])]
    seen: list[tuple[str, str, str, int]] = []   # (key, address compared, host as written, port)
    for where, server in located:
        if getattr(server, "type", "server") not in ("server", "modbus", "opcua") or not server.port:
            continue   # mqtt and serial outputs connect out; they listen on nothing
        host = "127.0.0.1" if server.host.lower() in ("localhost", "localhost.") else server.host.lower()
        for other_where, other, written, port in seen:
            if port == server.port and (host == other or host in _ANY_ADDRESS or other in _ANY_ADDRESS):
                raise ValueError(f"{where}: {port} on {server.host} is also {other_where} on {written}: the two "
                                 "servers cannot both listen; give each its own port")
        seen.append((where, host, server.host, server.port))


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

    if cfg.bundle is not None:
        cfg.bundle = absolute("bundle", cfg.bundle)
    resolve_recipe_paths(cfg.recipes, "recipes", absolute)
    if cfg.recipes is not None:
        cfg.bundle = cfg.recipes.initial_recipe().bundle   # what the line loads first
    resolve_line_paths(cfg.lines, absolute)
    src = cfg.source
    if isinstance(src, FolderSourceConfig):
        src.path = absolute("source.path", src.path)
        if src.journal:
            src.journal = absolute("source.journal", src.journal)
    elif isinstance(src, VideoSourceConfig) and not is_stream_url(src.path):
        src.path = absolute("source.path", src.path)
    elif isinstance(src, PacedSourceConfig):
        src.path = absolute("source.path", src.path)
    for i, out in enumerate(cfg.outputs):
        if isinstance(out, ResultLogConfig):
            out.path = absolute(f"outputs[{i}].path", out.path)
        elif isinstance(out, NgImageStoreConfig):
            out.dir = absolute(f"outputs[{i}].dir", out.dir)
    if not cfg.state_dir:
        cfg.state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "state"
    cfg.state_dir = absolute("state_dir", cfg.state_dir)
    # Outputs that name no result log get one in the state dir, which the service may write (the station file's
    # folder is read-only under the shipped unit); a line's in its own state folder.
    if not cfg.lines and not any(isinstance(o, ResultLogConfig) for o in cfg.outputs):
        cfg.outputs.append(ResultLogConfig(path=os.path.join(cfg.state_dir, DEFAULT_RESULT_LOG)))
        log.info("outputs name no result_log: every part is recorded in %s", cfg.outputs[-1].path)
    for ln in cfg.lines:
        if ln.outputs is not None and not any(isinstance(o, ResultLogConfig) for o in ln.outputs):
            ln.outputs.append(ResultLogConfig(path=os.path.join(cfg.state_dir, "lines", ln.name, DEFAULT_RESULT_LOG)))
    check_result_log_paths(cfg)
    check_ng_image_dirs(cfg)
    if cfg.security.bundle_public_key:
        cfg.security.bundle_public_key = absolute("security.bundle_public_key", cfg.security.bundle_public_key)
    # Outputs with files of their own (MQTT: TLS files, password, outbox; OPC UA: certificate, key) resolve them
    # once the state dir is known; a ValueError from the hook names the key under the output's.
    located = [(f"outputs[{i}]", out) for i, out in enumerate(cfg.outputs)]
    located += [(f"lines[{i}].outputs[{j}]", out) for i, ln in enumerate(cfg.lines) for j, out in enumerate(ln.outputs or [])]
    for where, out in located:
        hook = getattr(out, "resolve_paths", None)
        if hook is not None:
            try:
                hook(absolute, where, cfg.state_dir)
            except ValueError as exc:
                raise ConfigError(f"{_ROOT}.{where}.{exc}") from None
    cfg.rollout.resolve_paths(absolute, "rollout", cfg.state_dir)
    if cfg.mqtt is not None:
        cfg.mqtt.resolve_paths(absolute, "mqtt", cfg.state_dir)
    if cfg.page.station_signing_key:
        cfg.page.station_signing_key = absolute("page.station_signing_key", cfg.page.station_signing_key)
    return cfg


def _located_outputs(cfg: StationConfig) -> list[tuple[str, object]]:
    """(key path, output config) of every output the station file declares: each line's, or the station's."""
    if cfg.lines:
        return [(f"lines[{i}].outputs[{j}]", o) for i, ln in enumerate(cfg.lines) for j, o in enumerate(ln.outputs or [])]
    return [(f"outputs[{j}]", o) for j, o in enumerate(cfg.outputs)]


def check_result_log_paths(cfg: StationConfig) -> None:
    """No two result logs the station writes are one file, however the file spells them (`x.jsonl` and
    `./x.jsonl`, a line's default results-<name>.jsonl named by another line, a symlink): validate compares the
    paths as written, before they are resolved (probe 60: two lines shared one log, with colliding frame ids, and
    one line's recovery from a failed write cut the other line's acknowledged records off). Raises ConfigError."""
    seen: dict[str, str] = {}
    for where, out in _located_outputs(cfg):
        if not isinstance(out, ResultLogConfig):
            continue
        key = os.path.realpath(out.path)
        if key in seen:
            raise ConfigError(f"{_ROOT}.{where}.path: result log {out.path} is the file {seen[key]} already writes "
                              f"({key}): give each line its own result log")
        seen[key] = where


def check_ng_image_dirs(cfg: StationConfig) -> None:
    """No NG image folder is a folder a line's source reads: the station would inspect its own NG frames and
    overlays as new parts (probe 113: ng_images dir = the watch folder; one bad bottle became 1,347 NG and FAULT
    records in 20 s, each saved image read back as a part); nor one another NG image store writes. Raises
    ConfigError."""
    lines = cfg.lines or []
    sources = ([(f"lines[{i}].source.path", ln.source) for i, ln in enumerate(lines)] if lines
               else [("source.path", cfg.source)])
    folders = {os.path.realpath(src.path): where for where, src in sources if isinstance(src, FolderSourceConfig)}
    stores: dict[str, str] = {}
    for where, out in _located_outputs(cfg):
        if not isinstance(out, NgImageStoreConfig):
            continue
        key = os.path.realpath(out.dir)
        if key in folders:
            raise ConfigError(f"{_ROOT}.{where}.dir: NG image folder {out.dir} is the folder {folders[key]} reads "
                              f"({key}): its saved frames would be inspected as new parts; give it another folder")
        if key in stores:
            # Two stores name a part alike (time to the ms, frame id, verdict, file-name stem; two lines' ids run
            # in step), so one overwrote the other's image, and each bounded only its own files (probe 113).
            raise ConfigError(f"{_ROOT}.{where}.dir: NG image folder {out.dir} is the folder {stores[key]} already "
                              f"writes ({key}): give each NG image store its own folder")
        stores[key] = where


# A station file is a few kB; anything this large is not one (and must not reach the parser).
MAX_STATION_BYTES = 1024 * 1024


def load_station(path: str | Path) -> StationConfig:
    """Read and validate a station file; relative paths in it are made relative to the file's folder.

    Refused with a ConfigError naming the file: unreadable, over MAX_STATION_BYTES, not UTF-8, invalid YAML,
    YAML anchors/aliases/merge keys, a key repeated in any mapping (with its line), and any schema error.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a named pipe must not wait for a writer (validate hung on one); a FIFO or device is
        # then refused by its type, and regular files read as usual.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise ConfigError(f"{path}: station file is not a regular file")
            raw = fh.read(MAX_STATION_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read station file ({exc.strerror or exc})") from None
    if len(raw) > MAX_STATION_BYTES:
        raise ConfigError(f"{path}: station file is over {MAX_STATION_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: station file is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
    try:
        data = load_strict(text, str(path))
    except YamlRefused as exc:
        raise ConfigError(str(exc)) from None
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
