"""The station's frame-to-verdict latency with the position prior on and off, in one interleaved run.

    python benchmarks/position_prior.py BUNDLE --images DIR [--rounds 3] [--name NAME]

With the prior (edge_runtime.position_prior) the search stage finds the exact image score from the bank rows the
golden parts' patches took, and its heat map takes the per-patch bounds that search left; without it every patch
walks the graph before the verdict. Two more settings keep the prior but leave out one of its steps: the
defect-first step (a part over the decision threshold after a few walks measures its worst patch first:
FaissHnswSearch.PRIOR_FIRST), and the exact measure of the highest bound once the patches over the floor have
walked (FaissHnswSearch.FLOOR_AFTER_WALK). Four pipelines of the same bundle inspect the same raw frames (decoded
once, as a camera delivers them), frame by frame in turn, the order alternating, under the device's BLAS setting;
the heat map is read after each verdict and timed on its own. Reported per setting and per kind of part (good /
defect, by folder name): total and search-stage p50 / p90 / p99 (ms), the heat map, in how many frames the scores
of all four were identical, and how closely each heat map follows the full walk's (the lowest correlation;
benchmarks/heat_map_source.py for pixel AUROC). Writes benchmarks/results/position_prior[_NAME].{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from bench_report import LoadMonitor, add_results_option, md_table, write_results  # noqa: E402

from edge_runtime.bundle import Bundle  # noqa: E402
from edge_runtime.nn_search import device_blas  # noqa: E402
from edge_runtime.pipeline import Pipeline  # noqa: E402
from edge_runtime.records import Frame, Verdict  # noqa: E402

SETTINGS = ("prior on (the default)", "prior on, no defect-first step", "prior on, no floor after the walks",
            "prior off")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory")
    ap.add_argument("--images", type=Path, required=True, help="folder of test images, one subfolder per kind")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the images (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="inference threads of each pipeline (default: 2)")
    ap.add_argument("--name", default=None, help="result name suffix (default: none)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    bundle = Bundle.load(a.bundle)
    pipes = {SETTINGS[0]: Pipeline(bundle, threads=a.threads),
             SETTINGS[1]: Pipeline(bundle, threads=a.threads),
             SETTINGS[2]: Pipeline(bundle, threads=a.threads),
             SETTINGS[3]: Pipeline(bundle, threads=a.threads, position_prior=False)}
    pipes[SETTINGS[2]].search.FLOOR_AFTER_WALK = False   # FaissHnswSearch.FLOOR_AFTER_WALK
    no_first = pipes[SETTINGS[1]].search
    if getattr(no_first, "prior", None) is not None:   # every part walks its top share before its floor
        no_first.set_prior(no_first.prior, defect_above=None)
    note = pipes[SETTINGS[0]].prior_note
    paths = sorted(p for p in a.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    frames = [(p, cv2.imread(str(p), cv2.IMREAD_UNCHANGED)) for p in paths]
    kinds = ["good" if p.parent.name == "good" else "defect" for p in paths]
    stats = {s: {k: {"total": [], "search": [], "heat": []} for k in ("good", "defect")} for s in SETTINGS}
    same_score = 0
    corr = {s: [] for s in SETTINGS[:-1]}
    load = LoadMonitor()
    with device_blas("hnsw"):
        for i in range(min(5, len(frames))):   # warm-up
            for pipe in pipes.values():
                pipe.inspect(Frame(frame_id=i, source=str(frames[i][0]), image=frames[i][1])).anomaly_map
        for r in range(a.rounds):
            for i, ((path, image), kind) in enumerate(zip(frames, kinds)):
                results = {}
                for s in (SETTINGS if (i + r) % 2 else SETTINGS[::-1]):   # the order alternating
                    res = pipes[s].inspect(Frame(frame_id=i, source=str(path), image=image))
                    if res.verdict is Verdict.FAULT:
                        raise SystemExit(f"{path}: {res.error}")
                    t0 = time.perf_counter()
                    heat = res.anomaly_map
                    st = stats[s][kind]
                    st["heat"].append((time.perf_counter() - t0) * 1000)
                    st["total"].append(res.timings_ms["total"])
                    st["search"].append(res.timings_ms["search"])
                    results[s] = (res.score, heat)
                if r == 0:   # every setting against the full walk (prior off)
                    s0, h0 = results[SETTINGS[-1]]
                    same_score += int(all(results[s][0] == s0 for s in SETTINGS))
                    for s in SETTINGS[:-1]:
                        corr[s].append(float(np.corrcoef(results[s][1].ravel(), h0.ravel())[0, 1]))
    summary = load.stop()
    rows = []
    for s in SETTINGS:
        every = {key: stats[s]["good"][key] + stats[s]["defect"][key] for key in ("total", "search", "heat")}
        for kind, st in (("good", stats[s]["good"]), ("defect", stats[s]["defect"]), ("all", every)):
            if not st["total"]:
                continue
            rows.append([s, kind, len(st["total"]) // a.rounds,
                         *np.percentile(st["total"], [50, 90, 99]).tolist(),
                         *np.percentile(st["search"], [50, 90, 99]).tolist(), float(np.median(st["heat"])),
                         float(np.median(np.add(st["total"], st["heat"])))])
    body = (f"{len(frames)} raw frames x {a.rounds} rounds, the settings in turn per frame (order alternating), {a.threads} "
            f"threads; position prior: {note}. Scores identical in {same_score}/{len(frames)} frames; heat maps "
            f"against the full walk's, lowest correlation: "
            + ", ".join(f"{s} {min(c):.4f}" for s, c in corr.items() if c) + ".\n\n"
            + md_table(["search", "parts", "frames", "total p50 ms", "total p90 ms", "total p99 ms", "search p50 ms",
                        "search p90 ms", "search p99 ms", "heat map p50 ms", "total + heat map p50 ms"], rows))
    write_results("position_prior" + (f"_{a.name}" if a.name else ""),
                  "Frame to verdict with and without the position prior (and two of its steps)", body,
                  {"bundle": str(a.bundle), "prior": note, "stats_ms": stats, "same_score": same_score,
                   "heat_map_correlation_min": {s: min(c) for s, c in corr.items() if c}, "frames": len(frames)}, summary, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
