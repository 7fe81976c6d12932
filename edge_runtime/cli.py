"""`edge-runtime run --config STATION.yaml` (the daemon) and `edge-runtime check BUNDLE` (device self-test)."""
from __future__ import annotations

import argparse
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
    return Station(cfg).run()


def _check(a: argparse.Namespace) -> int:
    from edge_runtime.self_test import run_self_test

    ok = True
    for precision in a.precision or [None]:
        report = run_self_test(Path(a.bundle), precision=precision, knn=a.knn, threads=a.threads)
        tag = precision or "default"
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
    from edge_runtime.schema import ConfigError
    from edge_runtime.sources import build_source

    steps = [
        ("outputs, trigger, logging", lambda: Station(cfg)),          # Station() builds these first in run
        ("source", lambda: build_source(cfg.source, 0)),
        ("http", lambda: HttpEndpoint(cfg.http, lambda: None) if cfg.http.enabled else None),
        ("security.bundle_public_key", lambda: load_public_key(cfg.security.bundle_public_key)),
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
    print(f"{a.config}: valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-runtime", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the inspection daemon")
    r.add_argument("--config", required=True, help="station YAML file")
    r.set_defaults(func=_run)
    c = sub.add_parser("check", help="verify a bundle: integrity, golden scores, index recall; non-zero on failure")
    c.add_argument("bundle", help="bundle directory")
    c.add_argument("--precision", action="append", choices=["int8", "fp32"],
                   help="variant to test, repeatable (default: the bundle's default variant)")
    c.add_argument("--knn", choices=["hnsw", "exact"], default="hnsw", help="search to test (default: hnsw)")
    c.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default: 2)")
    c.set_defaults(func=_check)
    v = sub.add_parser("validate", help="validate a station file (schema, and every object run builds, without "
                                        "opening devices or the bundle); exit 0 valid, 2 invalid")
    v.add_argument("config", help="station YAML file")
    v.set_defaults(func=_validate)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
