"""Two fitted bundles side by side: fit time, CPU and memory, cross-fit method, operating point, and (given their
`edge-export evaluate` JSON) image and pixel AUROC of the evaluated path.

    python benchmarks/fit_compare.py BEFORE_BUNDLE AFTER_BUNDLE --eval BEFORE.json AFTER.json --name fit_compare_bottle

For a before/after of the fitting code: fit the same data with each version (`edge-export fit DATA --out DIR`),
evaluate both (`edge-export evaluate DIR DATA --json FILE`, the deployed INT8 + HNSW path by default), then run this.
Bundles written before the manifest recorded fit.cross_fit re-ran the coreset per fold ("refit").
Writes benchmarks/results/<--name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import LoadMonitor, add_results_option, md_table, write_results  # noqa: E402


def summary(bundle: Path, evaluation: Path | None) -> dict:
    m = yaml.safe_load((bundle / "manifest.yaml").read_text())
    fit = m.get("fit", {})
    out = {"bundle": str(bundle), "bundle_id": m.get("bundle_id"), "bank_images": m["coreset"]["n_bank_images"],
           "bank_size": m["coreset"]["n_selected"], "fit_seconds": fit.get("seconds"),
           "fit_cpu_seconds": fit.get("cpu_seconds"), "peak_rss_mib": fit.get("peak_rss_mib"),
           "cross_fit_seconds": fit.get("cross_fit_seconds"),
           "cross_fit_method": (fit.get("cross_fit") or {}).get("method", "refit"), "stages": fit.get("stages"),
           "variants": {}}
    for name, v in m["variants"].items():
        info = v["threshold_info"]
        out["variants"][name] = {"threshold": v["threshold"], "expected_false_reject": info["expected_false_reject"],
                                 "good_scores": info["good_scores"]}
    if evaluation:
        e = json.loads(evaluation.read_text())
        out["evaluation"] = {k: e.get(k) for k in ("engine", "knn", "image_auroc", "pixel_auroc", "false_rejects",
                                                   "escapes", "n_good", "n_defect", "threshold")}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", type=Path, help="bundle directory fitted by the earlier code")
    p.add_argument("after", type=Path, help="bundle directory fitted by the later code")
    p.add_argument("--eval", nargs=2, type=Path, default=None, metavar=("BEFORE_JSON", "AFTER_JSON"),
                   help="edge-export evaluate JSON of each bundle (default: none, no AUROC columns)")
    p.add_argument("--cpu", nargs=2, type=float, default=None, metavar=("BEFORE_S", "AFTER_S"),
                   help="fit CPU seconds measured outside the fit (user + sys of /usr/bin/time), used for both bundles "
                        "instead of the manifests' fit.cpu_seconds, which older bundles lack (default: none)")
    p.add_argument("--name", default="fit_compare", help="results file stem (default fit_compare)")
    add_results_option(p)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(p).parse_args()
    monitor = LoadMonitor()
    runs = {"before": summary(a.before, a.eval[0] if a.eval else None),
            "after": summary(a.after, a.eval[1] if a.eval else None)}
    for (label, r), cpu in zip(runs.items(), a.cpu or (None, None)):
        if cpu is not None:
            r["fit_cpu_seconds_measured"] = cpu
            r["fit_cpu_seconds"] = cpu   # one measure for both columns (the manifest figure excludes start-up)
    rows = []
    for label, r in runs.items():
        for name, v in r["variants"].items():
            frr = v["expected_false_reject"]
            ev = r.get("evaluation") or {}
            evaluated = ev and name == ev.get("engine", "").replace("onnx-", "")
            four = lambda x: None if x is None else f"{x:.4f}"  # noqa: E731  (AUROC and thresholds to 4 places)
            rows.append([label, r["cross_fit_method"], r["bank_images"], r["fit_seconds"], r["fit_cpu_seconds"],
                         r["peak_rss_mib"], name, four(v["threshold"]), four(v["good_scores"]["mean"]),
                         f"{frr['modelled']:.2%}", "{:.2%}-{:.2%}".format(*frr["modelled_ci95"]),
                         f"{frr['empirical_count']}/{frr['n']}",
                         four(ev.get("image_auroc")) if evaluated else None,
                         four(ev.get("pixel_auroc")) if evaluated else None])
    body = ("Fit wall seconds depend on the other load at the time (recorded in each bundle's log, not here); CPU "
            "seconds (process time, all threads) much less. 'good mean' is the mean cross-fitted good score. AUROC: "
            "the evaluated path (engine/knn of the evaluate JSON; the deployed INT8 + HNSW by default).\n\n" +
            md_table(["fit", "cross-fit", "images", "fit s", "fit CPU s", "peak MiB", "variant", "threshold",
                      "good mean", "expected FRR", "95% CI", "cross-fitted >= t", "image AUROC", "pixel AUROC"], rows))
    write_results(a.name, "Fit before / after: time, operating point, accuracy", body, runs, monitor.stop(),
                  out_dir=a.results_dir)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
