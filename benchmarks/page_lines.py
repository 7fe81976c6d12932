"""What one open live view of the operator's page is sent as the station grows from 1 to N lines: events and bytes
per second on the viewed line's stream, how many carried a part, the status, the all-lines summary, and any part
of another line (must be 0). Each line replays the bundle's golden images at --fps. Writes
benchmarks/results/page_lines.json (load average recorded).

    PYTHONPATH=. nice -n 10 python benchmarks/page_lines.py --seconds 12 --lines 1,2,4
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import yaml

from edge_runtime.bench import load_average
from edge_runtime.config import load_station
from edge_runtime.daemon import Station

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE_BUNDLE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "device_bundle"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(bundle: Path, n_lines: int, seconds: float, fps: float, work: Path) -> dict:
    folders = []
    for i in range(n_lines):
        f = work / f"{n_lines}_in{i}"
        f.mkdir(parents=True)
        for p in sorted((bundle / "golden").glob("*.png")):
            shutil.copyfile(p, f / p.name)
        folders.append(f)
    port = _free_port()
    doc = {"bundle": str(bundle), "http": {"enabled": False}, "state_dir": f"state{n_lines}",
           "inference": {"threads": 2}, "page": {"enabled": True, "port": port}}
    if n_lines == 1:
        doc["source"], path = {"type": "paced", "path": str(folders[0]), "fps": fps}, "/events"
    else:
        doc["lines"] = [{"name": f"l{i}", "source": {"type": "paced", "path": str(f), "fps": fps}}
                        for i, f in enumerate(folders)]
        path = "/line/l0/events"
    station_file = work / f"station{n_lines}.yaml"
    station_file.write_text(yaml.safe_dump(doc))
    station = Station(load_station(station_file))
    runner = threading.Thread(target=station.run, daemon=True)
    runner.start()
    while station.page.port is None or any(ln.pipeline is None for ln in station.lines):
        time.sleep(0.05)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    events = size = latest = status = summary = foreign = 0
    frames0 = [ln.counters.frames for ln in station.lines]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        raw = resp.readline()
        if not raw.startswith(b"data: "):
            continue
        events, size = events + 1, size + len(raw)
        d = json.loads(raw[6:])
        latest, status, summary = latest + ("latest" in d), status + ("status" in d), summary + ("lines" in d)
        if d.get("latest") and not d["latest"]["source"].startswith(str(folders[0]) + "/"):
            foreign += 1
    conn.close()
    frames = [ln.counters.frames - f0 for ln, f0 in zip(station.lines, frames0)]
    station.request_stop()
    runner.join(30)
    return {"lines": n_lines, "seconds": seconds, "events": events, "events_per_s": round(events / seconds, 2),
            "bytes_per_s": round(size / seconds), "with_part": latest, "with_status": status,
            "with_all_lines_summary": summary, "parts_of_other_lines": foreign,
            "parts_per_s_per_line": [round(f / seconds, 1) for f in frames]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(DEVICE_BUNDLE), help="bundle every line runs, the device test bundle "
                                                                  "(default: tests/fixtures/device_bundle)")
    ap.add_argument("--lines", default="1,2,4", help="station sizes to measure, comma-separated (default: 1,2,4)")
    ap.add_argument("--seconds", type=float, default=12.0, help="how long the stream is read (default: 12)")
    ap.add_argument("--fps", type=float, default=10.0, help="parts per second each line replays (default: 10)")
    ap.add_argument("--out", default=str(RESULTS / "page_lines.json"), help="JSON written (default: benchmarks/results/page_lines.json)")
    from bench_report import state_defaults   # every option's help states its default
    args = state_defaults(ap).parse_args()
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(Path(args.bundle).resolve(), int(n), args.seconds, args.fps, Path(tmp))
                for n in args.lines.split(",")]
    print("| lines | events/s | bytes/s | with a part | with status | with all-lines summary | other lines' parts | parts/s per line |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lines']} | {r['events_per_s']} | {r['bytes_per_s']} | {r['with_part']} | {r['with_status']} | "
              f"{r['with_all_lines_summary']} | {r['parts_of_other_lines']} | {r['parts_per_s_per_line']} |")
    Path(args.out).write_text(json.dumps({"rows": rows, "fps_per_line": args.fps, "load_before": load_before,
                                          "load_after": load_average()}, indent=1))


if __name__ == "__main__":
    main()
