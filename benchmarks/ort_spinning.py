"""onnxruntime intra-op spinning on the device path: never (the release before), or while a run lasts and stopped
when it ends (edge_runtime.features.make_session now). Each setting runs `edge-bench`'s loop in a fresh process
(raw frames, back to back), alternating, and the CPU the process burns in the 300 ms after one extractor run is
probed (threads left spinning). Writes benchmarks/results/ort_spinning.json.
With --gap-ms the frames come with idle time between them, like parts on a triggered line: the settings then differ
in how the FIRST run after an idle spell goes (the p90 of the features stage shows it; --name keeps the results
of several gaps apart).

    python benchmarks/ort_spinning.py --bundle /work/bundles/bottle --images ../shared/data/mvtec_ad/bottle/test
    python benchmarks/ort_spinning.py --bundle B --images DIR --gap-ms 50 --name ort_spinning_gap50
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "no spinning (allow_spinning 0)": {"session.intra_op.allow_spinning": "0"},
    "spin during the run, stop after (the default)": {"session.intra_op.allow_spinning": "1",
                                                      "session.force_spinning_stop": "1"},
}


def child(bundle: str, images: str, frames: int, threads: int, setting: str, gap_ms: float = 0.0) -> dict:
    """One setting in this process: make_session with the setting's config entries, then the bench loop."""
    import resource
    import time

    import numpy as np
    import onnxruntime as ort

    import edge_runtime.features as features
    from edge_runtime.bench import run_bench

    entries = SETTINGS[setting]
    original = ort.SessionOptions.add_session_config_entry

    def add_entry(self, key, value):   # the setting's value wins for the spinning keys
        if key in ("session.intra_op.allow_spinning", "session.force_spinning_stop"):
            value = entries.get(key, "0")
        return original(self, key, value)

    ort.SessionOptions.add_session_config_entry = add_entry
    report = run_bench(Path(bundle), Path(images), frames=frames, warmup=10, threads=threads, raw=True, gap_ms=gap_ms)
    session = features.make_session(Path(bundle) / "features_int8.onnx", threads) if (Path(bundle) / "features_int8.onnx").exists() else None
    idle = None
    if session is not None:
        shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
        x = np.zeros(shape, np.uint8 if features.takes_pixels(session) else np.float32)
        session.run(None, {session.get_inputs()[0].name: x})
        before = resource.getrusage(resource.RUSAGE_SELF)
        session.run(None, {session.get_inputs()[0].name: x})
        mid = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(0.3)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = lambda r: r.ru_utime + r.ru_stime
        idle = {"run_cpu_ms": (cpu(mid) - cpu(before)) * 1000, "idle_300ms_cpu_ms": (cpu(after) - cpu(mid)) * 1000}
    st = report["stages_ms"]
    features = np.array(report["samples_ms"]["features"])
    return {"setting": setting, "config": entries, "gap_ms": gap_ms,
            "stages_p50_ms": {k: v["p50"] for k, v in st.items()},
            "features_p90_ms": float(np.percentile(features, 90)),
            "features_share_over_2x_p50": float(np.mean(features > 2 * np.median(features))),
            "total_ms": st["total"], "idle_after_run": idle, "load_average": report["machine"]["load_average"],
            "cpu": report["machine"]["cpu"]["model"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, help="bundle directory (required)")
    p.add_argument("--images", required=True, help="test images (required)")
    p.add_argument("--frames", type=int, default=166, help="timed frames per run (default: 166)")
    p.add_argument("--threads", type=int, default=2, help="inference threads (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: 3)")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="idle ms between frames, like part spacing on a triggered line (default: 0.0, back to back)")
    p.add_argument("--name", default="ort_spinning", help="results file name (default: ort_spinning)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    if a.child:
        print(json.dumps(child(a.bundle, a.images, a.frames, a.threads, a.child, a.gap_ms)))
        return 0
    runs = []
    for r in range(a.rounds):
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--bundle", a.bundle, "--images", a.images, "--frames",
                                  str(a.frames), "--threads", str(a.threads), "--gap-ms", str(a.gap_ms),
                                  "--child", setting],
                                 capture_output=True, text=True, check=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            run["round"] = r
            runs.append(run)
            t, s, idle = run["total_ms"], run["stages_p50_ms"], run["idle_after_run"] or {}
            print(f"round {r} {setting:46s} features {s['features']:.2f} (p90 {run['features_p90_ms']:.2f}) search "
                  f"{s['search']:.2f} total p50 {t['p50']:.2f} p99 {t['p99']:.2f} ms; CPU in the 300 ms after a run "
                  f"{idle.get('idle_300ms_cpu_ms', float('nan')):.1f} ms")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(runs, indent=1))
    print(f"written: {RESULTS / (a.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
