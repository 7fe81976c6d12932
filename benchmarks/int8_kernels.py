"""INT8 bundles on a CPU without VNNI: the features, image scores and AUROC its kernels give, against this CPU's.

    python benchmarks/int8_kernels.py --bundle x86-avx2=DIR --bundle x86-vnni=DIR [--via qemu|mask] [--images DIR]

The development machines here all have VNNI, and onnxruntime picks its u8 x s8 kernel by CPU: without VNNI it
sums product pairs in saturating 16-bit registers (vpmaddubsw). The other kind of CPU, two ways:
  --via qemu (default): qemu's user-mode emulator with a CPU model that lacks AVX-512 and VNNI (`qemu-x86_64 -cpu
      Haswell`: AVX2 + FMA, as an older industrial PC); onnxruntime there detects that CPU and runs its AVX2
      kernels on an emulated chip with no AVX-512 at all. Slow: minutes per bundle, more for a float-input model.
  --via mask: this CPU with CPUID answered without AVX-512 / VNNI / AMX (`cpuid_mask/mask_cpuid.c`, preloaded;
      needs gcc and CPUID faulting, see non_vnni_latency.py): the same kernel choice at native speed.
Each bundle's INT8 model is run on the same preprocessed tiles both ways (one thread each), and the other CPU's
features are scored exactly against the bundle's own INT8 bank here.
Also reported: `edge_runtime.int8_kernels.exact_products` in both places (the check a station runs at load).
Writes benchmarks/results/int8_kernels.{json,md}. Needs qemu-user (apt-get install -y qemu-user).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_report import BOTTLE, LoadMonitor, add_results_option, md_table, write_results  # noqa: E402

# Runs in the emulated process: onnxruntime only (numpy's AVX2 sort crashed under qemu 7.2's emulation).
CHILD = r"""
import json, sys
import numpy as np
import onnxruntime as ort
from edge_runtime.int8_kernels import exact_products
model, tiles_path, out_path = sys.argv[1:4]
so = ort.SessionOptions(); so.intra_op_num_threads = 1
s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
name = s.get_inputs()[0].name
tiles = np.load(tiles_path)
np.save(out_path, np.stack([s.run(None, {name: t})[0] for t in tiles]))
print(json.dumps({f"{a} x {w}": exact_products(a, w) for a in ("QUInt8", "QInt8") for w in (127, 63)}))
"""


def model_tiles(pipe, path: Path) -> np.ndarray:
    """The tiles the INT8 model takes for one image, as the pipeline makes them: (n_tiles, H, W, 3 or 4) uint8
    pixels, or the (n_tiles, 3, H, W) float tensor for a model without the pixel input (the arm target's s8 input)."""
    from edge_runtime.decode import decode_image
    from edge_runtime.features import model_input
    from edge_runtime.preprocess import preprocess

    tensor, _, _ = preprocess(decode_image(path.read_bytes(), str(path)), pipe.geometry, str(path))
    return model_input(tensor, pipe.extractor.takes_pixels, pipe.extractor.channels)


def run_bundle(label: str, bundle_dir: Path, images: list[Path], prefix: list[str], env: dict, work: Path) -> dict:
    from edge_runtime.bundle import Bundle
    from edge_runtime.int8_kernels import exact_products
    from edge_runtime.nn_search import ExactSearch
    from edge_runtime.pipeline import Pipeline
    from export.metrics import auroc

    bundle = Bundle.load(bundle_dir)
    pipe = Pipeline(bundle, precision="int8", knn="exact", threads=2)
    quant = pipe.variant.info.get("quantization", {})
    tiles = np.stack([model_tiles(pipe, p) for p in images])
    tiles_path, out_path = work / f"{label}_tiles.npy", work / f"{label}_emulated.npy"
    np.save(tiles_path, tiles)
    model = bundle.path(pipe.variant.model_file)
    here = [pipe.extractor(t) for t in tiles]
    proc = subprocess.run([*prefix, sys.executable, "-c", CHILD, str(model), str(tiles_path), str(out_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"emulated run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    probe_emulated = json.loads(proc.stdout.strip().splitlines()[-1])
    emulated = [f.reshape(-1, pipe.extractor.dim) for f in np.load(out_path)]
    search = pipe.search if isinstance(pipe.search, ExactSearch) else ExactSearch(pipe.search.bank)
    kinds = np.array([p.parent.name for p in images])
    good = kinds == "good"
    out = {"bundle": str(bundle_dir), "bundle_id": bundle.bundle_id, "int8_target": quant.get("target"),
           "reduce_range": quant.get("reduce_range"), "activation": quant.get("activation"),
           "threshold": pipe.threshold, "images": len(images),
           "probe_here": {f"{a} x {w}": exact_products(a, w) for a in ("QUInt8", "QInt8") for w in (127, 63)},
           "probe_emulated": probe_emulated}
    diff = np.concatenate([a - b for a, b in zip(here, emulated)])
    ref = np.concatenate(here)
    out["max_abs_feature_diff"] = float(np.abs(diff).max())
    out["relative_l2_feature_diff"] = float(np.linalg.norm(diff) / np.linalg.norm(ref))
    for name, feats in (("here", here), ("emulated", emulated)):
        scores = np.array([float(search.distances(f).max()) for f in feats])
        out[name] = {"image_auroc": round(float(auroc(~good, scores)), 4),
                     "good_rejected": int((scores[good] >= pipe.threshold).sum()), "good": int(good.sum()),
                     "defects_passed": int((scores[~good] < pipe.threshold).sum()), "defects": int((~good).sum()),
                     "score_median_good": round(float(np.median(scores[good])), 3),
                     "score_median_defect": round(float(np.median(scores[~good])), 3)}
    print(f"{label}: features off by {out['relative_l2_feature_diff']:.2e} (relative L2) with the other kernels; "
          f"AUROC here {out['here']['image_auroc']}, there {out['emulated']['image_auroc']}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, metavar="LABEL=DIR",
                    help="a bundle to run, labelled (e.g. x86-avx2=/tmp/b); repeat for each (required)")
    ap.add_argument("--images", type=Path, default=BOTTLE / "test",
                    help="test folder with good/ and one folder per defect type (default: ../shared/data/mvtec_ad/bottle/test)")
    ap.add_argument("--cpu", default="Haswell",
                    help="qemu CPU model for the other kind of CPU (default: Haswell: AVX2 and FMA, no AVX-512, no VNNI)")
    ap.add_argument("--via", choices=["qemu", "mask"], default="qemu",
                    help="how the other CPU is had: qemu emulation or the CPUID mask on this CPU (default: qemu)")
    ap.add_argument("--name", default=None, help="results file name (default: int8_kernels, int8_kernels_mask)")
    add_results_option(ap)
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args()
    if a.via == "qemu" and shutil.which("qemu-x86_64") is None:
        raise SystemExit("qemu-x86_64 not found: apt-get install -y qemu-user")
    name = a.name or ("int8_kernels" if a.via == "qemu" else "int8_kernels_mask")
    other = f"qemu -cpu {a.cpu}" if a.via == "qemu" else "CPUID masked"
    images = sorted(p for p in a.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    load = LoadMonitor()
    results = {}
    with tempfile.TemporaryDirectory(prefix="int8-kernels-") as tmp:
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        prefix = ["qemu-x86_64", "-cpu", a.cpu]
        if a.via == "mask":
            from non_vnni_latency import build_shim

            env["LD_PRELOAD"], prefix = str(build_shim(Path(tmp))), []
        for item in a.bundle:
            label, _, path = item.partition("=")
            results[label] = run_bundle(label, Path(path), images, prefix, env, Path(tmp))
    rows = []
    for label, r in results.items():
        for where in ("here", "emulated"):
            s = r[where]
            rows.append([label, "this CPU" if where == "here" else other,
                         r["probe_here" if where == "here" else "probe_emulated"][
                             f"{r['activation']} x {63 if r['reduce_range'] else 127}"],
                         f"{r['relative_l2_feature_diff']:.1e}" if where == "emulated" else "-",
                         f"{s['image_auroc']:.4f}", f"{s['good_rejected']}/{s['good']}",
                         f"{s['defects_passed']}/{s['defects']}", f"{s['score_median_good']:.2f}",
                         f"{s['score_median_defect']:.2f}"])
    body = md_table(["bundle (INT8 target)", "kernels of", "exact_products", "features off (rel. L2)",
                     "image AUROC", "good rejected", "defects passed", "median good", "median defect"], rows)
    body += (f"\nSame tiles, same bank, exact search, the bundle's own threshold; {len(images)} images of "
             f"{a.images}. The numbers of the other CPU's kernels, not its speed.\n")
    write_results(name, f"INT8 bundles on a CPU without VNNI ({other})", body,
                  {"via": a.via, "cpu_model": a.cpu if a.via == "qemu" else None, "bundles": results},
                  load.stop(), out_dir=a.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
