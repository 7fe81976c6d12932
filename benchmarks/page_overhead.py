"""Does the operator's page slow inspection? Inspection latency with the page off, on and idle, and on with a
viewer: a headless Chromium on the live view (SSE updates, overlay per part, charts redrawn), or a client process
that reads the event stream and fetches every part's overlay and thumbnail (page_poll).

Runs the real daemon (Station) in this process on a looping folder replay of the bottle test images, N frames per
run, modes interleaved over several rounds (A B C A B C ...) so load drifts on a shared machine hit every mode
alike. The figure is the result log's per-part `total` latency (decode -> decision), p50 and p95 per mode.

Usage: python benchmarks/page_overhead.py BUNDLE [--images ../shared/data/mvtec_ad/bottle/test/good]
       [--frames 150] [--rounds 3] [--threads 2] [--json benchmarks/results/page_overhead.json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = ("page_off", "page_on_idle", "page_chromium", "page_poll")


def poll_client(port: int, stop: threading.Event) -> None:
    """A browser-like viewer without a browser: SSE stream read, overlay + thumbnail fetched for every new part."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/events")
    r = conn.getresponse()
    seen = None
    side = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        line = r.fp.readline()
        if not line.startswith(b"data: "):
            continue
        latest = json.loads(line[6:]).get("latest")
        if latest and latest["frame_id"] != seen:
            seen = latest["frame_id"]
            for kind in ("overlay", "thumb"):
                side.request("GET", f"/img/{seen}/{kind}.jpg")
                side.getresponse().read()
    conn.close()
    side.close()


def page_thread_cpu_ms() -> float:
    """CPU time (user + system) used so far by the page's threads: uvicorn's and its output-bus worker's."""
    import os

    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for t in threading.enumerate():
        if t.name in ("operator-page", "output:operator_page") and t.native_id:
            try:
                fields = open(f"/proc/self/task/{t.native_id}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) * 1000.0 / tick
    return total


def run_once(bundle: Path, images: Path, mode: str, frames: int, threads: int, work: Path) -> list[float]:
    from edge_runtime.config import load_station
    from edge_runtime.daemon import Station

    folder = work / f"run_{mode}_{time.monotonic_ns()}"
    folder.mkdir()
    (folder / "in").mkdir()
    for p in sorted(images.glob("*.png")):
        shutil.copyfile(p, folder / "in" / p.name)
    station_file = folder / "station.yaml"
    page = {"enabled": mode != "page_off", "port": 0}
    station_file.write_text(yaml.safe_dump({
        "bundle": str(bundle), "source": {"type": "folder", "path": "in", "loop": True},
        "http": {"enabled": False}, "state_dir": "state", "inference": {"threads": threads},
        "outputs": [{"type": "result_log", "path": "results.jsonl"}], "page": page}))
    station = Station(load_station(station_file))
    runner = threading.Thread(target=station.run, daemon=True)
    runner.start()
    viewer_stop, driver, viewer = threading.Event(), None, None
    while station.pipeline is None or (station.page is not None and station.page.port is None):
        time.sleep(0.05)
    if mode == "page_chromium":
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
        driver.get(f"http://127.0.0.1:{station.page.port}/")
    elif mode == "page_poll":
        # Its own process, like a browser: a client thread here would compete with the daemon for the GIL.
        import subprocess
        import sys

        viewer = subprocess.Popen([sys.executable, __file__, "--viewer", str(station.page.port)])
    start_frames = station.counters.frames
    warmup = 10
    while station.counters.frames < start_frames + warmup:
        time.sleep(0.05)
    cpu0, n0 = page_thread_cpu_ms(), station.counters.frames
    while station.counters.frames < start_frames + warmup + frames:
        time.sleep(0.05)
    cpu_per_part = (page_thread_cpu_ms() - cpu0) / max(1, station.counters.frames - n0)
    station.request_stop()
    runner.join(60)
    viewer_stop.set()
    if viewer is not None:
        viewer.terminate()
        viewer.wait(10)
    if driver is not None:
        drawn = driver.execute_script("return +document.getElementById('trend').dataset.points")
        assert drawn > 0, "the page did not update during the run"
        driver.quit()
    records = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    totals = [r["latency_ms"]["total"] for r in records if r["verdict"] != "FAULT"][warmup:warmup + frames]
    shutil.rmtree(folder, ignore_errors=True)
    return totals, cpu_per_part


def main(argv=None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--viewer"]:
        poll_client(int(argv[1]), threading.Event())
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared/data/mvtec_ad/bottle/test/good")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks/results/page_overhead.json")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)
    results: dict[str, list[float]] = {m: [] for m in a.modes}
    per_round: dict[str, list[float]] = {m: [] for m in a.modes}
    page_cpu: dict[str, list[float]] = {m: [] for m in a.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for mode in a.modes:
                totals, cpu = run_once(a.bundle, a.images, mode, a.frames, a.threads, Path(tmp))
                results[mode] += totals
                per_round[mode].append(statistics.median(totals))
                page_cpu[mode].append(cpu)
                print(f"round {rnd + 1} {mode:<14} p50 {statistics.median(totals):7.2f} ms over {len(totals)} frames; "
                      f"page threads {cpu:.2f} ms CPU per part", flush=True)
    base = statistics.median(results[a.modes[0]])
    table = {}
    print(f"\n{'mode':<16}{'p50 ms':>9}{'p95 ms':>9}{'vs off':>9}{'page CPU':>10}  per-round p50")
    for m, v in results.items():
        p50, p95 = statistics.median(v), statistics.quantiles(v, n=20)[18]
        table[m] = {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "frames": len(v),
                    "p50_vs_page_off": round(p50 / base - 1, 4), "per_round_p50_ms": [round(x, 2) for x in per_round[m]],
                    "page_threads_cpu_ms_per_part": round(statistics.median(page_cpu[m]), 2)}
        print(f"{m:<16}{p50:9.2f}{p95:9.2f}{100 * (p50 / base - 1):8.1f}%{statistics.median(page_cpu[m]):8.2f}ms  "
              f"{', '.join(f'{x:.1f}' for x in per_round[m])}")
    doc = {"bundle": str(a.bundle), "images": str(a.images), "frames_per_run": a.frames, "rounds": a.rounds,
           "threads": a.threads, "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
           "note": "per-part total latency (decode -> decision) from the result log; modes interleaved per round; "
                   "page CPU: user+system time of the page's threads (uvicorn, output-bus worker) per part",
           "loadavg_at_end": open("/proc/loadavg").read().split()[:3],
           "modes": table}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
