"""`edge-runtime init`: write a commented station file for a bundle, a source and the chosen outputs.

The file is complete and valid as written (`edge-runtime validate` accepts it); every key carries a comment
saying what it does and its default, so the user edits values rather than looking up the schema
(edge_runtime/config.py and the source/output modules hold the definitions).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

OUTPUT_KINDS = ("result_log", "gpio", "serial", "modbus", "ng_images")

# The device a station runs on -> the INT8 quantisation target its bundle needs (the keys of
# export/onnx_export.py INT8_TARGETS). `edge-export fit --device/--station` reads it; the names are the station
# file's `device:` values (edge_runtime.config.Device; a test keeps them equal). Generic x86 takes the
# AVX2-safe settings (reduce_range: no u8 x s8 saturation on any x86 CPU); x86-vnni is for CPUs with VNNI
# (Ice Lake+, Zen 4+, AVX-VNNI); every ARM board here (Cortex-A72/A76/A78AE) takes S8S8.
DEVICE_INT8_TARGET: dict[str, str] = {
    "x86": "x86-avx2",
    "x86-vnni": "x86-vnni",
    "pi4": "arm",
    "pi5": "arm",
    "jetson-orin": "arm",
    "arm64": "arm",
}


def int8_target_for(device: str) -> str:
    """The INT8 target for a device name. Raises ValueError naming the known devices."""
    try:
        return DEVICE_INT8_TARGET[device]
    except KeyError:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICE_INT8_TARGET)}") from None
SOURCE_KINDS = ("camera", "folder", "video")

# Where systemd/edge-runtime.service lets the daemon write (ProtectSystem=strict, ReadWritePaths=): a station file
# installed under /etc with the default relative paths would log beside itself, read-only, and FAULT every part.
SERVICE_RESULT_LOG = "/var/log/edge-runtime/results.jsonl"
SERVICE_NG_IMAGES = "/var/lib/edge-runtime/ng-images"
MODBUS_PORT = 5020   # the modbus output's port in the file init writes


class InitError(ValueError):
    """The init request cannot produce a station file; the message says which argument and why."""


@dataclass(frozen=True)
class DeviceProfile:
    threads: int
    gpio_chip: str
    gpio: dict[str, tuple[int, str]]    # role -> (line offset, where it is on the board)
    serial_port: str
    note: str


_PI_GPIO = {"ok": (17, "header pin 11"), "ng": (27, "pin 13"), "ready": (22, "pin 15"), "error": (23, "pin 16")}
PROFILES: dict[str, DeviceProfile] = {
    "pi5": DeviceProfile(4, "/dev/gpiochip0", _PI_GPIO, "/dev/ttyUSB0",
                         "Raspberry Pi 5: 4 cores; header GPIO on /dev/gpiochip0 (pinctrl-rp1; /dev/gpiochip4 on "
                         "kernels before 6.6.45, check with `gpiodetect`)"),
    "pi4": DeviceProfile(4, "/dev/gpiochip0", _PI_GPIO, "/dev/ttyUSB0",
                         "Raspberry Pi 4: 4 cores; header GPIO on /dev/gpiochip0 (BCM numbers)"),
    "jetson-orin": DeviceProfile(4, "/dev/gpiochip0",
                                 {"ok": (105, "header pin 29"), "ng": (106, "pin 31"), "ready": (43, "pin 33"),
                                  "error": (41, "pin 32")}, "/dev/ttyUSB0",
                                 "Jetson Orin: header GPIO on /dev/gpiochip0 (tegra234-gpio); for the GPU install "
                                 "onnxruntime-gpu and list CUDAExecutionProvider first"),
    "x86": DeviceProfile(2, "/dev/gpiochip0", {"ok": (0, "set to your board"), "ng": (1, "set to your board"),
                                               "ready": (2, "set to your board"), "error": (3, "set to your board")},
                         "/dev/ttyUSB0", "x86 PC: one thread per physical core (`lscpu`); GPIO offsets depend on "
                                         "the I/O card (`gpioinfo`)"),
}
PROFILES["x86-vnni"] = PROFILES["x86"]
PROFILES["arm64"] = PROFILES["x86"]


def parse_source(spec: str) -> tuple[str, str | int]:
    """'camera:0' -> ('camera', 0); 'camera:/dev/video2', 'folder:PATH', 'video:PATH|rtsp://...'. Raises InitError."""
    kind, sep, value = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or not value:
        raise InitError(f"--source {spec!r}: expected camera:INDEX|DEVICE, folder:PATH or video:PATH|URL")
    if kind == "camera" and value.lstrip("-").isdigit():
        index = int(value)
        if not 0 <= index <= 255:   # V4L2 numbers /dev/videoN 0-255
            raise InitError(f"--source {spec!r}: a camera index is 0-255 (see `edge-runtime cameras`)")
        return kind, index
    return kind, value


def _q(value: str) -> str:
    """A YAML scalar for any string (JSON strings are valid YAML double-quoted scalars)."""
    return json.dumps(value)


def _station_relative(path: str, station_dir: Path) -> str:
    """Paths in a station file are relative to the file; keep URLs, devices and absolute paths as they are."""
    if "://" in path or Path(path).is_absolute():
        return path
    return os.path.relpath(Path(path).resolve(), station_dir.resolve())


def _bundle_summary(bundle: Path) -> tuple[str, str | None]:
    """(one-line description for the header comment, the INT8 target the bundle was fitted for). Raises InitError."""
    manifest = bundle / "manifest.yaml"
    try:
        m = yaml.safe_load(manifest.read_text())
    except OSError as exc:
        raise InitError(f"--bundle {bundle}: cannot read {manifest} ({exc.strerror or exc}); "
                        "give the folder `edge-export fit --out` wrote") from None
    except yaml.YAMLError as exc:
        raise InitError(f"{manifest}: not valid YAML ({str(exc)[:200]})") from None
    if not isinstance(m, dict):
        raise InitError(f"{manifest}: expected a mapping")
    settings = (m.get("fit") or {}).get("settings") or {}
    target = settings.get("int8_target")
    backbone = (m.get("backbone") or {}).get("name", "?")
    geom = m.get("geometry") or {}
    size = "x".join(str(v) for v in geom.get("input_size") or ["?"])
    return (f"bundle {m.get('bundle_id', '?')}: {backbone}, input {size} px, default variant "
            f"{m.get('default_variant', '?')}, INT8 target {target or '?'}"), target


def render_station(bundle: Path, source: str, outputs: list[str], device: str | None, station_path: Path,
                   name: str = "station", http_port: int = 8088, service: bool = False) -> tuple[str, list[str]]:
    """The station file text and warnings for the user. Raises InitError for a bad source, output or bundle.

    service: write the paths the systemd unit may write to (SERVICE_RESULT_LOG, SERVICE_NG_IMAGES) instead of
    paths beside the station file."""
    bundle, station_dir = Path(bundle), Path(station_path).resolve().parent
    kind, value = parse_source(source)
    outputs = list(outputs) or ["result_log"]
    unknown = [o for o in outputs if o not in OUTPUT_KINDS]
    if unknown:
        raise InitError(f"--output {unknown[0]!r}: expected one of {', '.join(OUTPUT_KINDS)}")
    if len(set(outputs)) != len(outputs):
        raise InitError(f"--output: each kind at most once, got {outputs}")
    if "result_log" not in outputs:   # every part is recorded before a line output hears its verdict
        outputs.insert(0, "result_log")
    if device is not None and device not in DEVICE_INT8_TARGET:
        raise InitError(f"--device {device!r}: expected one of {', '.join(DEVICE_INT8_TARGET)}")
    summary, fitted_target = _bundle_summary(bundle)
    warnings = []
    if device and fitted_target and fitted_target != DEVICE_INT8_TARGET[device]:
        warnings.append(f"the bundle's INT8 model was quantised for {fitted_target}, but a {device} wants "
                        f"{DEVICE_INT8_TARGET[device]}: refit with `edge-export fit ... --device {device}` "
                        "(or run precision fp32)")
    profile = PROFILES[device or "x86"]
    live = kind == "camera" or (kind == "video" and "://" in str(value))
    L: list[str] = [
        f"# Station file written by `edge-runtime init`. Check it with: edge-runtime validate {station_path.name}",
        "# Run it with: edge-runtime run --config " + station_path.name,
        "# Relative paths are relative to this file. Every key below shows its value and, in the comment, its default.",
        f"# {summary}",
        *([f"# {profile.note}"] if device else []),
        "",
        f"name: {_q(name)}                 # shown in logs and /healthz (default: station)",
        f"device: {device if device else 'null'}"
        f"                    # what this runs on: {'|'.join(DEVICE_INT8_TARGET)}; `edge-export fit --station "
        f"{station_path.name}` picks the INT8 target from it (default: null)",
        f"bundle: {_q(_station_relative(str(bundle), station_dir))}   # the bundle folder from `edge-export fit` "
        "(required)",
        "roi: null                  # [x, y, w, h] in frame pixels: moves the bundle's region of interest (same w x h "
        "as fitted); null: the bundle's (default: null)",
        "size_policy: null          # a frame or ROI of another size than fitted: refuse (FAULT) | resize | letterbox; "
        "null: the bundle's (default: null)",
        "",
        "inference:",
        "  precision: null          # int8 | fp32; null: the bundle's default variant (default: null)",
        "  knn: hnsw                # hnsw (fast; the image score is re-checked exactly) | exact | onnx (exact, on "
        "the providers: CUDA on a Jetson) | ivf (faiss, built on the device; image score re-checked exactly) "
        "(default: hnsw)",
        f"  threads: {profile.threads}               # onnxruntime + search threads; one per physical core "
        "(default: 2)",
        "  providers: [CPUExecutionProvider]   # onnxruntime providers in priority order (default: CPU only)",
        "  ef_search: null          # HNSW search width; null: the bundle's value (default: null)",
        "  ivf_nprobe: 2            # knn: ivf cells scanned per patch: 1 faster, 2 closer heat map (default: 2)",
        "  position_prior: true     # knn: hnsw: start each part's search where the golden parts' patches landed "
        "(faster verdict, same score, heat map from that search's bounds); false: every patch searched before the "
        "verdict (default: true)",
        "  review_threshold: null   # score from which a part is REVIEW (below the threshold, never OK); null: the "
        "bundle's band, if any (default: null)",
        "  deadline_ms: 2000        # a verdict later than this after the trigger is FAULT and never sent late; "
        "set your controller's timeout (default: 2000)",
        "",
    ]
    if kind == "camera":
        dev = value if isinstance(value, int) else _q(str(value))
        L += [
            "source:",
            "  type: camera",
            f"  device: {dev}                # index or /dev/videoN; prefer the /dev/v4l/by-id/... path from "
            "`edge-runtime cameras` (default: 0)",
            "  backend: any             # any | v4l2 | gstreamer (default: any; v4l2 on Linux USB cameras)",
            "  width: null              # requested size, a mode `edge-runtime cameras` lists; null: the driver's "
            "choice (default: null)",
            "  height: null             # (default: null)",
            "  fps: null                # requested frame rate (default: null)",
            "  fourcc: null             # MJPG for USB 2 bandwidth, YUYV for raw (default: null)",
            "  buffer_size: 1           # driver queue; 1 keeps frames fresh (default: 1)",
            "  drain_frames: 1          # stale frames dropped after a trigger (default: 1; UVC often needs 2)",
        ]
    elif kind == "folder":
        L += [
            "source:",
            "  type: folder",
            f"  path: {_q(_station_relative(str(value), station_dir))}   # folder of images to inspect (required)",
            "  mode: replay             # replay: inspect the files there, in name order; watch: new files as "
            "they arrive (default: replay)",
            "  loop: false              # replay: start over after the last file (default: false)",
            "  poll_interval_s: 0.2     # watch: time between folder scans (default: 0.2)",
            "  process_existing: false  # watch: also inspect files already there at start (default: false)",
            "  image_arrives: after_trigger   # watch + trigger: after_trigger (files there at the trigger are left out) "
            "| before_trigger (the camera PC writes, then triggers: the newest one is the part's) (default: "
            "after_trigger)",
            "  image_max_age_s: 2.0     # before_trigger: the part's image is at most this old at the trigger (default: 2.0)",
        ]
    else:
        L += [
            "source:",
            "  type: video",
            f"  path: {_q(_station_relative(str(value), station_dir))}   # video file or rtsp:// URL (required)",
            "  loop: false              # files: start over at the end (default: false)",
            "  backend: any             # any | ffmpeg | gstreamer (default: any)",
            "  open_timeout_s: 5.0      # streams: give up connecting after this long; above 8 (the 10 s watchdog) "
            "is capped (default: 5)",
            "  read_timeout_s: 5.0      # streams: a stalled stream fails after this long (default: 5)",
            "  repeated_frames: auto    # auto | fault | allow: a stream frame repeating an earlier one is a frozen "
            "stream, FAULT (auto: streams only; allow: free run on an H.264 stream of a still scene) (default: auto)",
        ]
        if "://" in str(value):
            L.append("  latency_ms: 0            # triggered line: the stream's delay behind its sensor (film a "
                     "stopwatch); the part's frame is one received this long after the trigger (default: 0)")
    L += [
        "",
        "# When to inspect. free_run: every frame the source gives (default). A part-present sensor instead:",
        f"#   trigger: {{type: gpio, chip: {profile.gpio_chip}, line: 25, edge: falling, bias: pull_up, "
        "debounce_ms: 5}",
        "trigger:",
        "  type: free_run",
        "",
        "outputs:                   # several at once (default: one result_log, results.jsonl)",
    ]
    for out in outputs:
        if out == "result_log":
            L += [
                "  - type: result_log       # one JSON line per part: verdict, scores, latency, bundle id",
                (f"    path: {SERVICE_RESULT_LOG}   # (required) where the systemd unit may write"
                 if service else
                 f"    path: results.jsonl    # (required) under systemd: {SERVICE_RESULT_LOG} (init --service)"),
                "    max_bytes: 52428800    # rotate at this size (default: 52428800, 50 MiB)",
                "    backups: 5             # rotated files kept (default: 5)",
                "    fsync: always          # always: survives power cuts; never: less SD-card wear "
                "(default: always)",
            ]
        elif out == "gpio":
            L += [
                "  - type: gpio             # libgpiod v2 lines; OK is asserted only for an inspected good part",
                f"    chip: {profile.gpio_chip}   # (default: /dev/gpiochip0; list with `gpiodetect`)",
            ]
            for role, (offset, where) in profile.gpio.items():
                L.append(f"    {role + ':':<7} {{offset: {offset}}}   # {where}; line offset on the chip "
                         "(default: unset, the role is not driven)")
            L += ["    pulse_ms: 0            # 0: OK/NG hold until the PLC's ACK or the next part; >0: pulse this "
                  "long (default: 200)",
                  "    released: low          # what a line reads when the daemon is dead: low = the board's "
                  "pull-downs (default: low)"]
        elif out == "serial":
            L += [
                "  - type: serial           # ASCII lines to a PLC: RES <frame> <OK|NG|FAULT> <score> <norm>",
                f"    port: {profile.serial_port}     # (required) stable: /dev/serial/by-id/...",
                "    baudrate: 115200       # (default: 115200)",
                "    accept_trigger: false  # true: a TRG line from the PLC fires a software trigger "
                "(default: false)",
            ]
        elif out == "modbus":
            L += [
                "  - type: modbus           # Modbus TCP server the PLC polls (coils OK/NG/READY/ERROR, registers)",
                "    host: 127.0.0.1        # 0.0.0.0 to serve the plant network (default: 127.0.0.1)",
                f"    port: {MODBUS_PORT}             # 502 needs CAP_NET_BIND_SERVICE (default: 5020)",
                "    unit_id: 1             # (default: 1)",
                "    allow_writes: false    # PLC may write holding registers 16-31 (default: false)",
            ]
        elif out == "ng_images":
            L += [
                "  - type: ng_images        # NG/FAULT frames and heat-map overlays, bounded",
                (f"    dir: {SERVICE_NG_IMAGES}   # (required) where the systemd unit may write"
                 if service else
                 f"    dir: ng_images         # (required) under systemd: {SERVICE_NG_IMAGES} (init --service)"),
                "    max_files: 2000        # (default: 2000)",
                "    max_bytes: 1073741824  # (default: 1073741824, 1 GiB; smaller on SD cards)",
            ]
    L += [
        "",
        "http:                      # GET /healthz (200 only while inspecting) and /metrics (Prometheus)",
        "  enabled: true            # (default: true)",
        "  host: 127.0.0.1          # loopback: only local tools reach it (default: 127.0.0.1)",
        f"  port: {http_port:<18} # 0 picks a free port (default: 8088)",
        "",
        "# Frames far from the training frames' brightness/sharpness/noise (manifest frame_quality): FAULT, never OK.",
        "frame_check:",
        "  enabled: true            # (default: true)",
        "  dark: 0.5                # FAULT below this x the darkest training frames' brightness (default: 0.5)",
        "  bright: 0.5              # FAULT above this far from the brightest training frames to white (default: 0.5)",
        "  blur: 0.25               # FAULT below this x the least sharp training frames' sharpness (default: 0.25)",
        "  noise: 3.0               # FAULT above this x the noisiest training frames' noise, or x the sharpest's "
        "sharpness (default: 3.0)",
        "",
        "# Rolling warnings (log, /healthz, /metrics) when conditions drift from those of the fit; verdicts unchanged.",
        "drift:",
        "  enabled: true            # (default: true)",
        "  window: 50               # parts in each rolling median (default: 50)",
        "  score_ratio: 1.15        # warn above this x the fit's median good score (default: 1.15)",
        "  brightness_margin: 0.05  # warn outside the training brightness band +- this (default: 0.05)",
        "  sharpness_margin: 0.25   # warn outside the training sharpness band +- this (default: 0.25)",
        "  noise_margin: 0.25       # warn outside the training noise band +- this (default: 0.25)",
        "",
        "logging:",
        "  level: INFO              # DEBUG | INFO | WARNING | ERROR (default: INFO)",
        "  stats_interval_s: 60     # how often latency percentiles are logged (default: 60)",
        "",
        "recovery:",
        "  backoff_initial_s: 0.5   # camera reopen: first wait, doubled up to backoff_max_s (default: 0.5)",
        "  backoff_max_s: 10        # (default: 10)",
        "  read_timeout_s: 1.0      # one loop waits at most this for a frame (default: 1.0)",
        f"  exit_when_exhausted: {'false' if live else 'true'}   # a replayed folder or file that ends stops the "
        "daemon (default: true; false for live sources)",
        "",
        "state_dir: null            # frame counter, bundle version, journals, lock (one daemon per state_dir); "
        "null: $STATE_DIRECTORY under systemd (/var/lib/edge-runtime), else ./state beside this file (default: null)",
        "",
        "security:",
        "  bundle_public_key: null  # ed25519 public key; only bundles signed with `edge-export sign` load "
        "(default: null)",
        "",
    ]
    return "\n".join(L), warnings


def write_station(bundle: Path, source: str, outputs: list[str], device: str | None, out: Path,
                  name: str = "station", force: bool = False, http_port: int = 8088, service: bool = False) -> list[str]:
    """Write the station file and check it with the daemon's own loader; returns warnings for the user.

    Raises InitError for bad arguments, an existing file without `force`, or (a bug) a file that does not load."""
    from edge_runtime.config import load_station
    from edge_runtime.schema import ConfigError

    out = Path(out)
    if out.exists() and not force:
        raise InitError(f"{out}: exists (use --force to replace it)")
    if not 0 <= http_port <= 65535:
        raise InitError(f"--http-port {http_port}: expected 0..65535")
    if http_port == MODBUS_PORT and "modbus" in outputs:   # the station file would refuse two servers on one port
        raise InitError(f"--http-port {http_port}: the modbus output init writes serves Modbus on {MODBUS_PORT}; "
                        "pick another port")
    text, warnings = render_station(bundle, source, outputs, device, out, name, http_port, service)
    # Only a regular file is replaced: writing to a FIFO --out blocked for ever waiting for a reader, and a folder,
    # a device or a read-only place raised a traceback (probe 100).
    if out.exists() and not out.is_file():
        raise InitError(f"--out {out}: exists and is not a regular file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except OSError as exc:
        raise InitError(f"--out {out}: cannot write the station file ({exc.strerror or exc})") from None
    try:
        load_station(out)
    except ConfigError as exc:   # the generator's bug, not the user's: say so plainly
        raise InitError(f"the generated station file does not validate ({exc}); please report it") from None
    return warnings
