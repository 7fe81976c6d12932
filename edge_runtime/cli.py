"""`edge-runtime`: run the inspection daemon, check a bundle, validate or write a station file, list cameras."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path


def _run(a: argparse.Namespace) -> int:
    from edge_runtime.config import load_station
    from edge_runtime.daemon import Station
    from edge_runtime.schema import ConfigError

    try:
        cfg = load_station(a.config)
    except ConfigError as exc:
        print(f"edge-runtime: invalid station file: {exc}", file=sys.stderr)
        return 2
    # Under systemd stderr goes to the journal, which stamps every line itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, cfg.logging.level), stream=sys.stderr, format=fmt)
    # faiss's loader logs at INFO that it "could not load library with AVX2 support": its wheels dispatch SIMD
    # inside one library and there is no such module to load. Read as an error by every new user; its own
    # warnings still show.
    logging.getLogger("faiss.loader").setLevel(max(logging.WARNING, logging.getLogger().level))
    from edge_runtime.daemon import HttpPortBusy, StateDirBusy

    try:
        return Station(cfg).run()
    except StateDirBusy as exc:
        print(f"edge-runtime: {exc}", file=sys.stderr)
        return 2
    except HttpPortBusy as exc:   # exit 1: systemd restarts it (RestartSec), by when an old instance may be gone
        print(f"edge-runtime: {exc}", file=sys.stderr)
        return 1


def _check(a: argparse.Namespace) -> int:
    from edge_runtime.bundle import BundleError
    from edge_runtime.bundle_loader import load_public_key
    from edge_runtime.self_test import run_self_test

    try:
        key = load_public_key(a.public_key)
    except (OSError, ValueError, ImportError, BundleError) as exc:   # BundleError: not a regular file (/dev/zero)
        print(f"FAIL  --public-key {a.public_key}: cannot read the key ({exc})", file=sys.stderr)
        return 1
    ok = True
    for precision in a.precision or [None]:
        report = run_self_test(Path(a.bundle), precision=precision, knn=a.knn, threads=a.threads, public_key=key)
        tag = precision or "default"
        if key is not None and report.checks:
            print(f"ok    [{tag}] signature: manifest signed by the key in {a.public_key}")
        for c in report.checks:
            print(f"ok    [{tag}] {c}")
        for f in report.failures:
            print(f"FAIL  [{tag}] {f}", file=sys.stderr)
        ok &= report.ok
    return 0 if ok else 1


def build_station_objects(cfg) -> list[str]:
    """Construct what `run` constructs from `cfg`, without opening any device, socket, file or bundle.

    Returns what was built (for the report). Raises ConfigError with the key when a constructor refuses a
    value the schema let through, so that `validate` never passes a file on which `run` would then fail.
    """
    from edge_runtime.daemon import Station, load_public_key
    from edge_runtime.http_endpoint import HttpEndpoint
    from edge_runtime.lines_config import line_station_configs
    from edge_runtime.schema import ConfigError
    from edge_runtime.sources import build_source

    steps = [
        ("outputs, trigger, logging", lambda: Station(cfg)),          # Station() builds these first in run
        ("source", lambda: [build_source(c.source, 0) for _, c in line_station_configs(cfg)]),
        ("http", lambda: HttpEndpoint(cfg.http, lambda: None) if cfg.http.enabled else None),
        ("security.bundle_public_key", lambda: load_public_key(cfg.security.bundle_public_key)),
        ("page", lambda: _page_ready(cfg)),
    ]
    built = []
    for key, build in steps:
        try:
            build()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a constructor raises, run would fail the same way
            raise ConfigError(f"{key}: {type(exc).__name__}: {exc}") from None
        built.append(key)
    return built


def check_against_bundles(cfg) -> tuple[list[str], list[str]]:
    """Every bundle each line may run (its own, each recipe's), checked as the daemon's load checks it except for
    building the model: the active version's descent, every file's checksum, the signature
    (security.bundle_public_key), product and version floor (state_dir), and the station file's ROI, size policy
    and review threshold. Raises ConfigError naming the line, recipe and bundle for one the daemon would refuse;
    returns (missing, notes): bundles or keys that are not here (validate may run away from the station, but the
    daemon cannot start on it here), and what could not be checked for another reason."""
    from edge_runtime.bundle import Bundle, BundleError, StationMismatch
    from edge_runtime.bundle_loader import check_station_against, load_public_key
    from edge_runtime.bundle_policy import check_admission
    from edge_runtime.bundle_versions import load_station_bundle
    from edge_runtime.lines_config import line_station_configs
    from edge_runtime.recipes import check_distinct_product, recipe_station_config
    from edge_runtime.rollout import planned_start_bundle
    from edge_runtime.schema import ConfigError

    missing, notes = [], []
    for name, c in line_station_configs(cfg):
        line = f"lines[{name}]: " if name else ""
        recipes = getattr(getattr(c, "recipes", None), "recipes", None) or []
        # Every bundle the line may run: its own and each recipe's (a switch to one the daemon refuses, or that
        # does not suit the station file, would leave the line in FAULT).
        targets = [(f"{line}recipe {r.name}: ", recipe_station_config(c, r)) for r in recipes] if recipes else \
            ([(line, c)] if getattr(c, "bundle", None) else [])
        for where, target in targets:
            if getattr(target.rollout, "enabled", False):   # the daemon starts on the bundle its rollout put there
                planned = planned_start_bundle(target.state_dir, target.bundle)
                if planned != target.bundle:   # said, not silent: the station file names another bundle
                    notes.append(f"{where}the daemon starts on the rolled-out bundle {planned} (state_dir rollout.json), "
                                 f"not on the station file's bundle {target.bundle}: change `bundle:` to replace it")
                target = dataclasses.replace(target, bundle=planned)
            if target.state_dir and os.path.isdir(target.state_dir) and not os.access(target.state_dir, os.R_OK | os.X_OK):
                notes.append(f"{where}state_dir {target.state_dir} is not readable here: the version floor and "
                             "device-made versions not checked (the daemon's user reads them)")
                target = dataclasses.replace(target, state_dir=None)
            path = target.bundle
            try:
                Bundle.load(path, verify=False)
            except (BundleError, OSError) as exc:   # no bundle here (yet): validate may run away from the station
                missing.append(f"{where}bundle {path} not read here ({exc}): not checked against the station file; "
                             "the daemon refuses it unless a readable bundle is there when it starts")
                continue
            try:
                key = load_public_key(target.security.bundle_public_key)
            except (OSError, ValueError, ImportError) as exc:
                missing.append(f"{where}security.bundle_public_key {target.security.bundle_public_key} not read here "
                             f"({exc}): bundle {path} not checked")
                continue
            bundle = None
            try:
                bundle = load_station_bundle(target, key)
                check_admission(bundle, target.security.product, target.security.allow_downgrade, target.state_dir,
                                scope=target.floor_scope)
                check_station_against(target, bundle)
            except StationMismatch as exc:
                raise ConfigError(f"{where}{exc} (bundle {path})") from None
            except BundleError as exc:
                raise ConfigError(f"{where}the daemon would refuse bundle {path}: {exc}") from None
            finally:
                if bundle is not None:
                    bundle.release()   # the verified bytes: validate only checks them
        for r in recipes:   # each recipe its own product's bundle: the daemon refuses a pair it cannot tell apart
            try:
                mine = Bundle.load(r.bundle, verify=False)
            except (BundleError, OSError):
                continue   # reported above as missing
            try:
                check_distinct_product(c.recipes, r, mine)
            except BundleError as exc:
                raise ConfigError(f"{line}the daemon would refuse bundle {r.bundle}: {exc}") from None
    return missing, notes


def check_sources_here(cfg) -> tuple[list[str], list[str]]:
    """(missing, notes) for sources that are not on this machine: a folder or video file that does not exist (the
    daemon cannot inspect a part here without it), a camera device node that is absent (a note: the daemon waits
    for a camera, reporting FAULT, and cameras get plugged in later). Not errors of the file: validate may run away
    from the station."""
    from edge_runtime.lines_config import line_station_configs
    from edge_runtime.sources.camera_source import camera_node

    missing, notes = [], []
    for name, c in line_station_configs(cfg):
        where, source = (f"lines[{name}].source" if name else "source"), c.source
        kind = getattr(source, "type", None)
        if kind == "folder" and not os.path.isdir(source.path):
            missing.append(f"{where}.path {source.path}: no such folder here")
        elif kind == "video" and "://" not in str(source.path) and not os.path.isfile(source.path):
            missing.append(f"{where}.path {source.path}: no such video file here")
        elif kind == "camera":
            node = camera_node(source.device)
            if not os.path.exists(node):
                notes.append(f"{where}.device {source.device!r}: {node} does not exist here (`edge-runtime cameras` "
                             "lists the cameras this machine has)")
    return missing, notes


def check_providers_here(cfg) -> list[str]:
    """inference.providers this machine's onnxruntime lacks (a CPU-only build on a Jetson): the daemon would stay
    in FAULT at start naming them, so validate says so rather than 'valid'."""
    import onnxruntime as ort

    from edge_runtime.lines_config import line_station_configs

    wanted = {p: None for _, c in line_station_configs(cfg) for p in (c.inference.providers or [])}
    available = ort.get_available_providers()
    absent = [p for p in wanted if p not in available]
    if not absent:
        return []
    return [f"inference.providers: onnxruntime here has no {', '.join(absent)} (available: {', '.join(available)}); "
            "install the onnxruntime build that has it (systemd/INSTALL.md, step 3)"]


def _page_ready(cfg) -> None:
    """With page.enabled, the optional extra must be installed and the station key readable (as run needs)."""
    if not cfg.page.enabled:
        return
    import importlib

    for module in ("starlette", "uvicorn"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ImportError(f"page.enabled needs {module}: pip install 'patchcore-edge[page]'") from None
    if cfg.page.station_signing_key:
        from edge_runtime.bundle_versions import station_public_key

        station_public_key(cfg.page.station_signing_key)


def _validate(a: argparse.Namespace) -> int:
    from edge_runtime.config import load_station
    from edge_runtime.schema import ConfigError

    try:
        cfg = load_station(a.config)
        build_station_objects(cfg)
    except ConfigError as exc:
        msg = str(exc)
        print(f"invalid: {msg if msg.startswith(str(a.config)) else f'{a.config}: {msg}'}", file=sys.stderr)
        return 2
    try:
        missing, notes = check_against_bundles(cfg)
    except ConfigError as exc:
        print(f"invalid: {a.config}: {exc}", file=sys.stderr)
        return 2
    from edge_runtime.config import trigger_warnings

    for warning in cfg.http.warnings() + cfg.frame_check.warnings() + trigger_warnings(cfg):
        print(f"warning: {a.config}: {warning}", file=sys.stderr)
    # Outputs that listen or send credentials (opcua, mqtt), the lines' too, and the station's shared MQTT.
    located = [(f"outputs[{i}]", out) for i, out in enumerate(cfg.outputs)]
    located += [(f"lines[{i}].outputs[{j}]", out) for i, ln in enumerate(cfg.lines) for j, out in enumerate(ln.outputs or [])]
    located += [("mqtt", cfg.mqtt)] if cfg.mqtt is not None else []
    for where, out in located:
        for warning in getattr(out, "warnings", lambda: [])():
            print(f"warning: {a.config}: {where}.{warning}", file=sys.stderr)
    source_missing, source_notes = check_sources_here(cfg)
    missing, notes = missing + source_missing + check_providers_here(cfg), notes + source_notes
    for note in notes + missing:    # not faults of the file: validate may run away from the station's bundle
        print(f"note: {a.config}: {note}")
    if missing:   # a valid file the daemon could not start on here: say so in the verdict and the exit status
        print(f"{a.config}: valid, but not ready to run on this machine: {len(missing)} thing"
              f"{'s' if len(missing) > 1 else ''} it needs missing here (the last "
              f"{f'{len(missing)} notes' if len(missing) > 1 else 'note'} above)")
        return 1
    print(f"{a.config}: valid")
    return 0


def _cameras(a: argparse.Namespace) -> int:
    from edge_runtime.cameras import format_cameras, list_cameras

    print(format_cameras(list_cameras(Path(a.dev), Path(a.sysfs)), Path(a.dev)))
    return 0


def _init(a: argparse.Namespace) -> int:
    from edge_runtime.station_init import InitError, write_station

    try:
        warnings = write_station(Path(a.bundle), a.source, a.output or [], a.device, Path(a.out), a.name, a.force,
                                 a.http_port, a.service)
    except InitError as exc:
        print(f"edge-runtime: init: {exc}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {a.out} (valid; check again after editing with: edge-runtime validate {a.out})")
    return 0


def _hash_password(a: argparse.Namespace) -> int:
    import getpass

    from edge_runtime.operator_page.auth import hash_password

    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
    if not password:
        print("edge-runtime hash-password: empty password", file=sys.stderr)
        return 2
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:   # bytes that are not UTF-8 (read as surrogates): a traceback, and no browser sends them
        print("edge-runtime hash-password: the password is not UTF-8 text", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def _adapt(a: argparse.Namespace) -> int:
    from edge_runtime.adapt_cli import run_adapt

    return run_adapt(a)


def _threads(text: str) -> int:
    """--threads as the station file's inference.threads takes it (onnxruntime refuses a count over a C int)."""
    from edge_runtime.lines_config import MAX_THREADS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_THREADS}, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    from edge_runtime.lines_config import MAX_THREADS
    from edge_runtime.station_init import DEVICE_INT8_TARGET, OUTPUT_KINDS

    p = argparse.ArgumentParser(prog="edge-runtime", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the inspection daemon",
                       description="Run the inspection daemon on a station file until stopped (SIGTERM, Ctrl-C): "
                                   "frames from its source are scored with its bundle and each verdict goes to its "
                                   "outputs. Exit 2 for an invalid station file: check it with edge-runtime "
                                   "validate first.")
    r.add_argument("--config", required=True, help="station YAML file (required; write one with edge-runtime init)")
    r.set_defaults(func=_run)
    c = sub.add_parser("check", help="verify a bundle: integrity, golden scores, index recall; non-zero on failure",
                       description="Check a bundle on this machine: every file's checksum, the signature with "
                                   "--public-key, the golden images re-scored to their recorded scores and the HNSW "
                                   "recall against exact search. Exit 0 when every check passes, else 1.")
    c.add_argument("bundle", help="bundle directory to check")
    c.add_argument("--precision", action="append", choices=["int8", "fp32"],
                   help="variant to check, repeatable (default: the bundle's default variant)")
    c.add_argument("--knn", choices=["hnsw", "hnswlib", "exact", "onnx", "ivf"], default="hnsw",
                   help="search used for the golden scores (default: hnsw, the bundle's HNSW graph searched by "
                        "faiss, as the daemon runs); hnswlib: the same graph searched by hnswlib; onnx: exact "
                        "search as an onnxruntime graph; ivf: faiss IVF built from the bank + exact re-check")
    c.add_argument("--threads", type=_threads, default=2,
                   help=f"onnxruntime and search threads, 1-{MAX_THREADS} (default: 2)")
    c.add_argument("--public-key", default=None, metavar="PATH",
                   help="ed25519 public key (a station's security.bundle_public_key): the manifest's signature must "
                        "verify against it (default: none, the signature is not checked; `validate` checks a "
                        "station's bundles with its key, product and version floor)")
    c.set_defaults(func=_check)
    v = sub.add_parser("validate", help="validate a station file and the bundles it names; exit 0 valid and ready "
                                        "here, 1 valid but something it needs is missing here, 2 invalid",
                       description="Validate a station file: the schema, every object run builds (without opening "
                                   "devices), and each bundle the lines may run (recipes included) checked as the "
                                   "daemon's load checks it except for the model: checksums, signature, product, "
                                   "version floor, ROI and size policy. Exit 0 valid and ready here, 1 valid but a "
                                   "bundle, key, source folder or video file it needs is missing on this machine (an "
                                   "absent camera is only a note), 2 invalid.")
    v.add_argument("config", help="station YAML file to check; errors name the file and the key")
    v.set_defaults(func=_validate)
    cam = sub.add_parser("cameras", help="list V4L2 cameras with their formats and frame sizes",
                         description="List this machine's V4L2 cameras (/dev/video*) with their names, pixel formats "
                                     "and frame sizes, for edge-runtime init --source camera:INDEX and a station "
                                     "file's source.device. Opens nothing for streaming.")
    cam.add_argument("--dev", default="/dev", help="device folder holding video* nodes (default: /dev)")
    cam.add_argument("--sysfs", default="/sys/class/video4linux",
                     help="sysfs folder with the device names (default: /sys/class/video4linux)")
    cam.set_defaults(func=_cameras)
    i = sub.add_parser("init", help="write a commented station file for a bundle, a source and outputs",
                       description="Write a complete, commented station file that edge-runtime validate accepts "
                                   "as written; edit the values the comments point at.")
    i.add_argument("--bundle", required=True, help="bundle directory from edge-export fit (required)")
    i.add_argument("--source", required=True,
                   help="camera:INDEX|/dev/videoN (see edge-runtime cameras), folder:PATH (images) or "
                        "video:PATH|rtsp://URL (required). The station file has one more source type that init "
                        "does not write: paced (a folder of images replayed at a fixed fps like a free-running "
                        "camera, for trials); write it by hand, see README.md, \"Run a station\"")
    i.add_argument("--output", action="extend", nargs="+", choices=list(OUTPUT_KINDS), default=None,
                   help="outputs, one or more, repeatable; a result_log is always written, first (default: "
                        "result_log). Init does not write mqtt or opcua outputs, nor the operator's page (page:): "
                        "add them by hand, see README.md, \"Plant integration\" and \"The operator's page and learning "
                        "from the line\"")
    i.add_argument("--device", choices=list(DEVICE_INT8_TARGET), default=None,
                   help="what the station runs on: sets threads and GPIO lines and warns when the bundle was "
                        "quantised for another CPU (default: none, generic x86 values)")
    i.add_argument("--name", default="station", help="station name in logs and /healthz (default: station)")
    i.add_argument("--http-port", type=int, default=8088,
                   help="health/metrics port (default: 8088); 0 picks a free one, for a trial run beside a "
                        "running station")
    i.add_argument("--out", required=True, help="station file to write (required)")
    i.add_argument("--force", action="store_true", help="replace an existing --out (default: off, refuse)")
    i.add_argument("--service", action="store_true",
                   help="for systemd/edge-runtime.service: the result log goes to /var/log/edge-runtime/results.jsonl "
                        "and NG images to /var/lib/edge-runtime/ng-images, the only places the unit may write "
                        "(default: off, both beside the station file)")
    i.set_defaults(func=_init)
    from edge_runtime.adapt_cli import add_adapt_parser

    add_adapt_parser(sub, _adapt)
    hp = sub.add_parser("hash-password", help="print a scrypt hash for page.users[].password_hash (reads the "
                                              "password from stdin, or asks for it on a terminal)",
                        description="Read a password from stdin (or ask for it on a terminal) and print its scrypt "
                                    "hash for page.users[].password_hash in the station file; the password itself "
                                    "is not stored. Exit 2 for an empty password.")
    hp.set_defaults(func=_hash_password)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
