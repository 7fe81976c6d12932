"""The search stage with and without the seeded walk, on one bundle's real patch features, interleaved.

    python benchmarks/seeded_walk.py BUNDLE --images DIR [--configs 0:0,4:4,4:6,4:8,2:8] [--name NAME]

Each config is SEED_STEP:EF_SEEDED (0:0 = every patch walks the graph from the top at the manifest's ef, the
behaviour before the seeded walk). Every config searches the same frames' features, frame by frame in turn (same
load for all), with the exact re-check of the image score, under the device's BLAS setting (`device_blas`), as
the station runs it. Reported per config: search-stage wall p50/p99 and CPU p50 (ms), the mean amount by which
per-patch distances exceed the exact ones (what the heat map sees), recall@1, patches re-checked, and whether
every image score equals the exact one. Writes benchmarks/results/seeded_walk_NAME.json and .md.
Accuracy (image and pixel AUROC) per config: `edge-export evaluate BUNDLE DATA --seed-step N --ef-seeded E`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_runtime.bench import cpu_info, load_average, software_info  # noqa: E402
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_report import bundle_features  # noqa: E402
from edge_runtime.nn_search import device_blas, upper_bounds  # noqa: E402


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        step, ef = (int(x) for x in item.split(":"))
        if step < 0 or step == 1 or (step and ef < 1):
            raise argparse.ArgumentTypeError(f"config {item!r}: SEED_STEP 0 or >= 2, EF_SEEDED >= 1")
        out.append((step, ef))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path, help="bundle directory")
    ap.add_argument("--images", type=Path, required=True, help="folder of test images, searched recursively")
    ap.add_argument("--frames", type=int, default=40, help="frames (images, spread over the folder) (default: 40)")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the frames (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="search threads (default: 2)")
    ap.add_argument("--configs", type=parse_configs, default=parse_configs("0:0,4:4,4:6,4:8,2:8"),
                    help="SEED_STEP:EF_SEEDED list; 0:0 is every patch from the top (default: 0:0,4:4,4:6,4:8,2:8)")
    ap.add_argument("--name", default=None, help="result name suffix (default: the bundle folder's name)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="JSON folder (default: "
                    "benchmarks/results)")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    load_before = load_average()
    bundle, pipe, _, feats = bundle_features(a.bundle, a.images, a.frames, a.threads)
    search = pipe.search
    exact = search.exact
    truth = []
    for q in feats:   # each patch's exact distance, in the re-check's own kernel
        truth.append(exact.nearest_within(q, upper_bounds(exact.bank, q, exact.nearest(q)[1])))
    manifest_params = search.params
    names = [("every patch from the top" if s == 0 else f"seeded: step {s}, ef_seeded {e}") + f" (ef {manifest_params.ef_search})"
             for s, e in a.configs]
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    excess, recall, rech, equal = ({n: [] for n in names} for _ in range(4))
    with device_blas("hnsw"):
        for r in range(a.rounds):
            for f, q in enumerate(feats):
                for name, (step, ef) in zip(names, a.configs):
                    search.params = replace(manifest_params, seed_step=step, ef_seeded=ef)
                    c0, w0 = time.process_time(), time.perf_counter()
                    dist = search.distances(q)
                    wall[name].append((time.perf_counter() - w0) * 1000)
                    cpu[name].append((time.process_time() - c0) * 1000)
                    if r == 0:
                        approx = search.approximate(q)
                        d_true, lab_true = truth[f]
                        excess[name].append(float(np.mean(approx / np.maximum(d_true, 1e-12) - 1)))
                        recall[name].append(float(np.mean(search.labels(q) == lab_true)))
                        rech[name].append(search.rechecked_last)
                        equal[name].append(bool(np.float32(dist.max()) == np.float32(d_true.max())))
    search.params = manifest_params
    base = names[0]
    results = {}
    for n in names:
        results[n] = {"search_p50_ms": float(np.percentile(wall[n], 50)), "search_p99_ms": float(np.percentile(wall[n], 99)),
                      "cpu_p50_ms": float(np.percentile(cpu[n], 50)),
                      "speedup_p50_vs_first": float(np.percentile(wall[base], 50) / np.percentile(wall[n], 50)),
                      "mean_patch_excess": float(np.mean(excess[n])), "recall_at_1": float(np.mean(recall[n])),
                      "rechecked_patches_mean": float(np.mean(rech[n])),
                      "image_scores_equal_exact": f"{sum(equal[n])}/{len(equal[n])}"}
    report = {"bundle": {"path": str(a.bundle), "bundle_id": bundle.bundle_id, "queries_per_frame": int(feats[0].shape[0]),
                         "grid": list(bundle.grid), "bank": int(exact.bank.shape[0]), "dim": int(exact.bank.shape[1]),
                         "manifest_search": manifest_params.__dict__},
              "frames": len(feats), "rounds": a.rounds, "threads": a.threads, "configs": results,
              "machine": {"cpu": cpu_info(), "software": software_info(), "load_before": load_before,
                          "load_after": load_average(), "pid_cpu_count": os.cpu_count()}}
    name = a.name or a.bundle.name
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"seeded_walk_{name}.json"
    path.write_text(json.dumps(report, indent=1))
    b = report["bundle"]
    head = (f"bundle {bundle.bundle_id}: {b['queries_per_frame']} patches ({b['grid'][0]} x {b['grid'][1]} per tile) x "
            f"{b['dim']}-d vs a bank of {b['bank']}; {len(feats)} frames x {a.rounds} rounds, interleaved; "
            f"{a.threads} threads; load {load_before} -> {report['machine']['load_after']}")
    rows = [f"| {n} | {r['search_p50_ms']:.2f} | {r['search_p99_ms']:.2f} | {r['cpu_p50_ms']:.2f} | "
            f"{r['speedup_p50_vs_first']:.2f} | {100 * r['mean_patch_excess']:.3f} | {r['recall_at_1']:.3f} | "
            f"{r['rechecked_patches_mean']:.1f} | {r['image_scores_equal_exact']} |" for n, r in results.items()]
    md = "\n".join([head, "", "| search | p50 ms | p99 ms | cpu p50 ms | x first | mean patch excess % | recall@1 | "
                    "re-checked | image score == exact |", "|---|---|---|---|---|---|---|---|---|", *rows])
    path.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"JSON written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
