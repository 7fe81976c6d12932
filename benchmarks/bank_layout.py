"""Frame to verdict with the bank laid out around the position prior's rows, against the index file's order.

    python benchmarks/bank_layout.py BUNDLE --images DIR [--rounds 4] [--name NAME]

FaissHnswSearch.renumber (what the station does once it has a position prior) moves the prior's rows to the front
of the bank, in the order the patch positions first take them, and the rest after them in breadth-first order of
the graph: the prior's candidate distances and the walks that start from its rows read one compact block instead
of rows scattered over the whole bank, which the features stage has pushed out of the cache by then. Two pipelines
of the same bundle, one laid out (the default) and one in the file's order, inspect the same raw frames (decoded
once, as a camera delivers them), frame by frame in turn, the order alternating, under the device's BLAS setting.
Reported per layout and per kind of part (good / defect, by folder name): total and search-stage p50 / p90 / p99
(ms), the search's paired per-frame difference, how long each pipeline took to load, and in how many frames the
scores and heat maps were bit for bit the same. Writes benchmarks/results/bank_layout[_NAME].{json,md}.
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
from edge_runtime.hnsw_graph import FaissHnswSearch  # noqa: E402
from edge_runtime.nn_search import device_blas  # noqa: E402
from edge_runtime.pipeline import Pipeline  # noqa: E402
from edge_runtime.records import Frame, Verdict  # noqa: E402

LAYOUTS = ("laid out around the prior (the default)", "the index file's order")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory")
    ap.add_argument("--images", type=Path, required=True,
                    help="folder of test images, one subfolder per kind (required)")
    ap.add_argument("--rounds", type=int, default=4, help="timed passes over the images (default: 4)")
    ap.add_argument("--threads", type=int, default=2, help="inference threads of each pipeline (default: 2)")
    ap.add_argument("--name", default=None, help="result name suffix (default: none)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    bundle = Bundle.load(a.bundle)
    pipes, load_ms = {}, {}
    for layout in (LAYOUTS[1], LAYOUTS[0], LAYOUTS[1], LAYOUTS[0]):   # each built twice, the second kept
        FaissHnswSearch.RENUMBER_FOR_PRIOR = layout == LAYOUTS[0]
        t0 = time.perf_counter()
        pipes[layout] = Pipeline(bundle, threads=a.threads)
        load_ms[layout] = (time.perf_counter() - t0) * 1000
    FaissHnswSearch.RENUMBER_FOR_PRIOR = True
    note = pipes[LAYOUTS[0]].prior_note
    if not note.startswith("on"):
        print(f"note: no position prior for this bundle ({note}): both layouts are the file's")
    paths = sorted(p for p in a.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    frames = [(p, cv2.imread(str(p), cv2.IMREAD_UNCHANGED)) for p in paths]
    kinds = ["good" if p.parent.name == "good" else "defect" for p in paths]
    stats = {s: {k: {"total": [], "search": []} for k in ("good", "defect")} for s in LAYOUTS}
    paired = []   # file order minus laid out, search stage, per frame
    same_score = same_heat = 0
    load = LoadMonitor()
    with device_blas("hnsw"):
        for i in range(min(5, len(frames))):   # warm-up
            for pipe in pipes.values():
                pipe.inspect(Frame(frame_id=i, source=str(frames[i][0]), image=frames[i][1]))
        for r in range(a.rounds):
            for i, ((path, image), kind) in enumerate(zip(frames, kinds)):
                results = {}
                for s in (LAYOUTS if (i + r) % 2 else LAYOUTS[::-1]):   # the order alternating
                    res = pipes[s].inspect(Frame(frame_id=i, source=str(path), image=image))
                    if res.verdict is Verdict.FAULT:
                        raise SystemExit(f"{path}: {res.error}")
                    stats[s][kind]["total"].append(res.timings_ms["total"])
                    stats[s][kind]["search"].append(res.timings_ms["search"])
                    results[s] = res
                paired.append(results[LAYOUTS[1]].timings_ms["search"] - results[LAYOUTS[0]].timings_ms["search"])
                if r == 0:
                    a0, a1 = (results[s] for s in LAYOUTS)
                    same_score += int(a0.score == a1.score)
                    same_heat += int(np.array_equal(a0.anomaly_map, a1.anomaly_map))
    summary = load.stop()
    rows = []
    for s in LAYOUTS:
        every = {key: stats[s]["good"][key] + stats[s]["defect"][key] for key in ("total", "search")}
        for kind, st in (("good", stats[s]["good"]), ("defect", stats[s]["defect"]), ("all", every)):
            if not st["total"]:
                continue
            rows.append([s, kind, len(st["total"]) // a.rounds, *np.percentile(st["total"], [50, 90, 99]).tolist(),
                         *np.percentile(st["search"], [50, 90, 99]).tolist(), float(np.mean(st["search"]))])
    gain = {"mean": float(np.mean(paired)), "median": float(np.median(paired)),
            "share_faster": float(np.mean(np.asarray(paired) > 0))}
    body = (f"{len(frames)} raw frames x {a.rounds} rounds, the two layouts in turn per frame (order alternating), "
            f"{a.threads} threads; position prior: {note}. Search stage, file order minus laid out, paired per frame: "
            f"mean {gain['mean']:.3f} ms, median {gain['median']:.3f} ms, laid out faster in "
            f"{100 * gain['share_faster']:.0f}% of frames. Scores identical in {same_score}/{len(frames)} frames, heat "
            f"maps in {same_heat}/{len(frames)}. Pipeline load: "
            + ", ".join(f"{s} {load_ms[s]:.0f} ms" for s in LAYOUTS) + ".\n\n"
            + md_table(["bank layout", "parts", "frames", "total p50 ms", "total p90 ms", "total p99 ms",
                        "search p50 ms", "search p90 ms", "search p99 ms", "search mean ms"], rows))
    write_results("bank_layout" + (f"_{a.name}" if a.name else ""),
                  "Frame to verdict with the bank laid out around the position prior, and in the file's order", body,
                  {"bundle": str(a.bundle), "prior": note, "stats_ms": stats, "search_gain_ms": gain,
                   "same_score": same_score, "same_heat_map": same_heat, "frames": len(frames), "load_ms": load_ms},
                  summary, out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
