"""`edge-export`: fit a bundle on good images, evaluate any engine on a test set, verify a bundle, run the demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fit(a: argparse.Namespace) -> int:
    from edge_runtime.nn_search import HnswParams
    from export.fit import FitSettings, fit

    s = FitSettings(coreset_ratio=a.coreset_ratio, backbone=a.backbone, image_size=a.image_size, seed=a.seed,
                    projection_dim=a.projection_dim, holdout_fraction=a.holdout, max_train=a.max_train,
                    target_false_reject=a.target_frr, int8_target=a.int8_target, default_variant=a.default_variant,
                    hnsw=HnswParams(M=a.hnsw_m, ef_construction=a.hnsw_ef_construction, ef_search=a.ef),
                    product=a.product, bundle_version=a.bundle_version)
    bundle = fit(Path(a.data_dir), Path(a.out), s, Path(a.calibration_defects) if a.calibration_defects else None,
                 overwrite=a.overwrite)
    print(f"bundle {bundle.bundle_id}: {a.out}")
    for name in bundle.manifest["variants"]:
        v = bundle.variant(name)
        print(f"  {name}: threshold {v.threshold:.4f} ({v.info['threshold_info']['method']})")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from export.evaluate import evaluate

    result = evaluate(Path(a.bundle), Path(a.data_dir), a.engine, a.knn, a.threads,
                      Path(a.report) if a.report else None, a.ef)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2))
    pix = "n/a" if result["pixel_auroc"] is None else f"{result['pixel_auroc']:.4f}"
    print(f"{a.engine}/{a.knn}: image AUROC {result['image_auroc']:.4f}, pixel AUROC {pix}, "
          f"{result['n_good']} good / {result['n_defect']} defect, threshold {result['threshold']:.4f}: "
          f"{result['false_rejects']} false rejects, {result['escapes']} escapes, "
          f"{result['seconds_per_image'] * 1000:.1f} ms/image")
    for d, v in result["per_defect"].items():
        print(f"  {d}: {v:.4f}")
    return 0


def _verify(a: argparse.Namespace) -> int:
    # The device's own check, on both variants: one implementation of what "a good bundle" means.
    from edge_runtime.cli import main as runtime_main

    precisions = [a.precision] if a.precision else ["fp32", "int8"]
    return runtime_main(["check", a.bundle, "--knn", a.knn, *[x for p in precisions for x in ("--precision", p)]])


def _keygen(a: argparse.Namespace) -> int:
    from export.signing import generate_keypair

    private, public = generate_keypair(Path(a.dir))
    print(f"private key (keep on the workstation): {private}\npublic key (security.bundle_public_key): {public}")
    return 0


def _sign(a: argparse.Namespace) -> int:
    from export.signing import SigningError, sign_bundle

    try:
        sig = sign_bundle(Path(a.bundle), Path(a.key))
    except SigningError as exc:
        print(f"edge-export: sign: {exc}", file=sys.stderr)
        return 1
    print(f"signed: {sig}")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from export.demo import run_demo

    return run_demo(Path(a.workdir), fresh=a.fresh)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit PatchCore on DATA_DIR/train/good and write a bundle")
    f.add_argument("data_dir")
    f.add_argument("--out", required=True, help="bundle directory to write")
    f.add_argument("--coreset-ratio", type=float, default=0.1)
    f.add_argument("--backbone", choices=["lite0", "lite2"], default="lite0")
    f.add_argument("--image-size", type=int, default=224)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--projection-dim", type=int, default=None, help="optional random projection of patch features")
    f.add_argument("--holdout", type=float, default=0.1, help="fraction of good images kept out to calibrate")
    f.add_argument("--max-train", type=int, default=None, help="few-shot: at most this many bank images")
    f.add_argument("--target-frr", type=float, default=0.01, help="target false-reject rate (good-only calibration)")
    f.add_argument("--calibration-defects", default=None, help="folder of defective images for the threshold")
    f.add_argument("--int8-target", choices=["x86-avx2", "x86-vnni", "arm"], default="x86-avx2")
    f.add_argument("--default-variant", choices=["int8", "fp32"], default="int8",
                   help="variant the device runs unless its station file says otherwise")
    f.add_argument("--ef", type=int, default=32, help="HNSW ef at query time (stored in the manifest)")
    f.add_argument("--hnsw-m", type=int, default=16)
    f.add_argument("--hnsw-ef-construction", type=int, default=200)
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--product", default=None, help="product name stored in the manifest; stations with "
                   "security.product refuse other products (default: the name of DATA_DIR)")
    f.add_argument("--bundle-version", type=int, default=None, help="monotonic integer release number; stations "
                   "refuse a lower one than they have loaded (default: UTC seconds since the epoch at fit time)")
    f.set_defaults(func=_fit)

    e = sub.add_parser("evaluate", help="score DATA_DIR/test/* with one engine; AUROC, errors at the threshold")
    e.add_argument("bundle")
    e.add_argument("data_dir")
    e.add_argument("--json", required=True)
    e.add_argument("--report", default=None, help="folder for the ROC plot and heat-map overlays")
    e.add_argument("--engine", choices=["reference", "onnx-fp32", "onnx-int8"], default="onnx-int8")
    e.add_argument("--knn", choices=["exact", "hnsw"], default="hnsw")
    e.add_argument("--ef", type=int, default=None, help="override the manifest's HNSW ef")
    e.add_argument("--threads", type=int, default=2)
    e.set_defaults(func=_evaluate)

    v = sub.add_parser("verify", help="check integrity and reproduce the golden scores")
    v.add_argument("bundle")
    v.add_argument("--precision", choices=["fp32", "int8"], default=None)
    v.add_argument("--knn", choices=["exact", "hnsw"], default="hnsw")
    v.set_defaults(func=_verify)

    k = sub.add_parser("keygen", help="create an ed25519 key pair for signing bundles")
    k.add_argument("dir")
    k.set_defaults(func=_keygen)

    sg = sub.add_parser("sign", help="sign a verified bundle's manifest (writes manifest.sig)")
    sg.add_argument("bundle")
    sg.add_argument("--key", required=True, help="private key from edge-export keygen")
    sg.set_defaults(func=_sign)

    d = sub.add_parser("demo", help="generate the embedded data set, fit, export and run the daemon on sample frames")
    d.add_argument("--workdir", default="demo_out")
    d.add_argument("--fresh", action="store_true", help="refit even if a bundle exists")
    d.set_defaults(func=_demo)

    a = p.parse_args(argv)
    from edge_runtime.bundle import BundleError
    from export.dataset import DatasetError

    try:
        return a.func(a)
    except (DatasetError, BundleError, FileExistsError, ValueError) as exc:
        print(f"edge-export: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
