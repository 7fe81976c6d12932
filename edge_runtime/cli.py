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


def _validate(a: argparse.Namespace) -> int:
    from edge_runtime.config import load_station
    from edge_runtime.schema import ConfigError

    try:
        cfg = load_station(a.config)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    for warning in cfg.http.warnings():
        print(f"warning: {a.config}: {warning}", file=sys.stderr)
    print(f"{a.config}: valid")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-runtime", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the inspection daemon")
    r.add_argument("--config", required=True, help="station YAML file")
    r.set_defaults(func=_run)
    c = sub.add_parser("check", help="verify a bundle: integrity, golden scores, index recall; non-zero on failure")
    c.add_argument("bundle")
    c.add_argument("--precision", action="append", choices=["int8", "fp32"], help="variant(s); default: the bundle's")
    c.add_argument("--knn", choices=["hnsw", "exact"], default="hnsw")
    c.add_argument("--threads", type=int, default=2)
    c.set_defaults(func=_check)
    v = sub.add_parser("validate", help="validate a station file and exit")
    v.add_argument("config")
    v.set_defaults(func=_validate)
    a = p.parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
