"""Learning false rejects on the device (`edge-runtime adapt`'s code) on the real bottle set, without torch.

Scores every bottle test image with the deployed bundle, learns the good parts the shipped threshold rejects
(or, when it rejects none, the N highest-scored good parts, so the path is still exercised and measured),
writes the new version and re-scores everything with a Pipeline loaded from it. Prints a table and writes JSON.
Run with tests/fixtures/no_torch first on PYTHONPATH: the script fails if torch was ever imported.

Usage: PYTHONPATH=tests/fixtures/no_torch:. python benchmarks/adapt_bottle.py BUNDLE [--data ../shared/data/mvtec_ad/bottle]
       [--learn-top 2] [--json benchmarks/results/adapt_bottle.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_images(data: Path) -> list[tuple[Path, str]]:
    out = []
    for folder in sorted((data / "test").iterdir()):
        out += [(p, folder.name) for p in sorted(folder.glob("*.png"))]
    return out


def score_all(bundle_dir: Path, images, threads: int) -> dict[str, float]:
    from edge_runtime.bundle import Bundle
    from edge_runtime.decode import load_image
    from edge_runtime.pipeline import Pipeline

    pipe = Pipeline(Bundle.load(bundle_dir), knn="hnsw", threads=threads)
    return {f"{label}/{p.name}": pipe.score_rgb(load_image(p), str(p)).score for p, label in images}, pipe.threshold


def with_threshold(bundle: Path, threshold: float, out: Path) -> Path:
    """A copy of `bundle` whose variants all use `threshold` (a stricter station), checksums rewritten."""
    import copy
    import shutil

    from edge_runtime.bundle import MANIFEST, SIGNATURE, Bundle, write_manifest

    src = Bundle.load(bundle)
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns(MANIFEST, SIGNATURE))
    m = copy.deepcopy(src.manifest)
    for v in m["variants"].values():
        v["threshold"], v["review_threshold"] = threshold, None
    m["bundle_id"] = None
    m.pop("files")
    write_manifest(out, m)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle")
    ap.add_argument("--learn-top", type=int, default=2,
                    help="when the shipped threshold rejects no good part, learn this many top-scored ones (default: 2)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="run on a copy of the bundle with this threshold in every variant, e.g. 18.9, the "
                         "99th-percentile threshold bottle shipped with before the tail model (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "adapt_bottle.json")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args(argv)

    from edge_runtime.bank_adapt import InputImage, prepare

    work = tempfile.TemporaryDirectory()
    if a.threshold is not None:
        a.bundle = with_threshold(a.bundle, a.threshold, Path(work.name) / "strict")
    images = test_images(a.data)
    before, threshold = score_all(a.bundle, images, a.threads)
    goods = sorted(((s, k) for k, s in before.items() if k.startswith("good/")), reverse=True)
    rejected = [k for s, k in goods if s >= threshold]
    chosen = rejected or [k for _, k in goods[:a.learn_top]]
    why = "rejected by the shipped threshold" if rejected else f"none rejected: the {a.learn_top} highest-scored good parts"
    by_key = {f"{label}/{p.name}": p for p, label in images}
    t0 = time.perf_counter()
    plan = prepare(a.bundle, [InputImage.from_file(by_key[k]) for k in chosen], [], threads=a.threads)
    t_prepare = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "adapted"
        t1 = time.perf_counter()
        new = plan.write(out, who="benchmark", audit_log=Path(tmp) / "audit.jsonl")
        t_write = time.perf_counter() - t1
        after, new_threshold = score_all(out, images, a.threads)
        new_id, new_version = new.bundle_id, new.bundle_version
    assert "torch" not in sys.modules, "torch was imported"
    defects = [k for k in before if not k.startswith("good/")]
    result = {
        "bundle": str(a.bundle), "threshold_override": a.threshold, "data": str(a.data), "machine": platform.machine(), "python": platform.python_version(),
        "torch_imported": "torch" in sys.modules, "learned_because": why, "learned": chosen,
        "threshold_before": threshold, "threshold_after": new_threshold,
        "bank": {k: [c.bank_before, c.bank_after] for k, c in plan.changes.items()},
        "seconds": {"prepare": round(t_prepare, 2), "write_and_self_test": round(t_write, 2),
                    "total": round(t_prepare + t_write, 2)},
        "learned_scores": {k: [before[k], after[k]] for k in chosen},
        "good_rejected": {"before": sum(before[k] >= threshold for k in before if k.startswith("good/")),
                          "after": sum(after[k] >= new_threshold for k in after if k.startswith("good/")),
                          "of": sum(k.startswith("good/") for k in before)},
        "defects_ng": {"before": sum(before[k] >= threshold for k in defects),
                       "after": sum(after[k] >= new_threshold for k in defects), "of": len(defects)},
        "min_defect_score": {"before": min(before[k] for k in defects), "after": min(after[k] for k in defects)},
        "new_bundle": {"bundle_id": new_id, "bundle_version": new_version},
    }
    print(f"learned ({why}):")
    for k in chosen:
        print(f"  {k:<28} {before[k]:8.3f} -> {after[k]:8.3f}  (threshold {threshold:.3f} -> {new_threshold:.3f})")
    for name, (b, n) in result["bank"].items():
        print(f"bank {name}: {b} -> {n} vectors (+{n - b}, {100 * (n - b) / b:.2f}%)")
    print(f"good parts rejected: {result['good_rejected']['before']} -> {result['good_rejected']['after']} of {result['good_rejected']['of']}")
    print(f"defects NG:          {result['defects_ng']['before']} -> {result['defects_ng']['after']} of {result['defects_ng']['of']}"
          f" (lowest defect score {result['min_defect_score']['before']:.3f} -> {result['min_defect_score']['after']:.3f})")
    print(f"time: prepare {t_prepare:.2f} s, write + self-test {t_write:.2f} s; torch imported: {result['torch_imported']}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
