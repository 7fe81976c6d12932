"""`edge-export`: fit a bundle on good images, evaluate any engine on a test set, verify a bundle, run the demo."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fit(a: argparse.Namespace) -> int:
    from edge_runtime.nn_search import HnswParams
    from export.dataset import describe_training_data
    from export.fit import FitSettings, fit

    defects = Path(a.calibration_defects) if a.calibration_defects else None
    print(describe_training_data(Path(a.data_dir), defects), flush=True)
    a.int8_target, why = _resolve_int8_target(a)
    print(f"INT8 target {a.int8_target} ({why})", flush=True)
    s = FitSettings(coreset_ratio=a.coreset_ratio, backbone=a.backbone, image_size=a.image_size, seed=a.seed,
                    projection_dim=a.projection_dim, holdout_fraction=a.holdout, max_train=a.max_train,
                    target_false_reject=a.target_frr, int8_target=a.int8_target, default_variant=a.default_variant,
                    hnsw=HnswParams(M=a.hnsw_m, ef_construction=a.hnsw_ef_construction, ef_search=a.ef))
    bundle = fit(Path(a.data_dir), Path(a.out), s, defects, overwrite=a.overwrite)
    print(f"bundle {bundle.bundle_id}: {a.out}")
    for name in bundle.manifest["variants"]:
        v = bundle.variant(name)
        print(f"  {name}: threshold {v.threshold:.4f} ({v.info['threshold_info']['method']})")
    return 0


def _resolve_int8_target(a: argparse.Namespace) -> tuple[str, str]:
    """(INT8 target, why): --int8-target if given, else the device named by --device or the --station file,
    else x86-avx2 (correct on every x86 CPU). Raises ValueError for a station file without a usable device."""
    from edge_runtime.station_init import int8_target_for

    if a.device and a.station:
        raise ValueError("--device and --station both name the device; give one")
    device, source = a.device, "--device"
    if a.station:
        from edge_runtime.config import load_station
        from edge_runtime.schema import ConfigError

        try:
            device = load_station(a.station).device
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if device is None:
            raise ValueError(f"{a.station}: no 'device:' key (pi5, jetson-orin, x86, ...); add one or pass --device")
        source = a.station
    if a.int8_target:
        if device and int8_target_for(device) != a.int8_target:
            return a.int8_target, (f"--int8-target overrides {int8_target_for(device)} for device {device} "
                                   f"from {source}")
        return a.int8_target, "--int8-target"
    if device:
        return int8_target_for(device), f"device {device} from {source}"
    return "x86-avx2", "default: no --device/--station; correct on every x86 CPU, pass --device for ARM or VNNI"


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

    f = sub.add_parser("fit", help="fit PatchCore on a folder of good images and write a bundle",
                       description="Fit PatchCore on good images and write a checksummed bundle. DATA_DIR is a flat "
                                   "folder of good images or the benchmark layout DATA_DIR/train/good/.")
    f.add_argument("data_dir", help="flat folder of good images, or a benchmark folder with train/good/ inside")
    f.add_argument("--out", required=True, help="bundle directory to write (required; must be empty or absent "
                                                "unless --overwrite)")
    f.add_argument("--coreset-ratio", type=float, default=0.1,
                   help="fraction of good patches kept in the memory bank (default: 0.1); 0.01 gives a 10x smaller "
                        "bank and a faster fit, at the same image AUROC on bottle (shared/SEARCH.md)")
    f.add_argument("--backbone", choices=["lite0", "lite2"], default="lite0",
                   help="feature extractor (default: lite0); lite2 for hard, subtle defects (+3 AUROC points on thin cracks "
                        "in shared/BACKBONES.md) at about 1.5x the inference time")
    f.add_argument("--image-size", type=int, default=224,
                   help="square model input in pixels (default: 224); raise it when defects are only a few pixels "
                        "wide, at quadratic cost")
    f.add_argument("--seed", type=int, default=0, help="seed of the hold-out split, projections and coreset "
                                                       "(default: 0); change only to test stability")
    f.add_argument("--projection-dim", type=int, default=None,
                   help="random projection of the 152-d patch features (default: none, full dimension); "
                        "e.g. 64 for a smaller bank and faster search")
    f.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of good images kept out of the bank to calibrate the threshold (default: 0.1)")
    f.add_argument("--max-train", type=int, default=None,
                   help="few-shot: at most this many bank images (default: no limit, all of them)")
    f.add_argument("--target-frr", type=float, default=0.01,
                   help="false-reject rate the threshold aims at when there are no calibration defects "
                        "(default: 0.01); lower means fewer good parts rejected and more escapes")
    f.add_argument("--calibration-defects", default=None,
                   help="defect images for the threshold: a flat folder or one subfolder per defect type "
                        "(default: none, threshold from good images only); a few per type are enough")
    f.add_argument("--int8-target", choices=["x86-avx2", "x86-vnni", "arm"], default=None,
                   help="INT8 quantisation settings, overriding --device/--station (default: from --device or "
                        "--station, else x86-avx2, which is correct on every x86 CPU)")
    f.add_argument("--default-variant", choices=["int8", "fp32"], default="int8",
                   help="variant the device runs unless its station file says otherwise (default: int8); fp32 "
                        "when a GPU runs the model or INT8 loses accuracy on your parts")
    f.add_argument("--ef", type=int, default=32,
                   help="HNSW ef at query time, stored in the manifest (default: 32); higher is slower and "
                        "closer to exact (the image score is re-checked exactly either way)")
    f.add_argument("--hnsw-m", type=int, default=16,
                   help="HNSW links per node (default: 16); raise (e.g. 32) if edge-runtime check reports low recall")
    f.add_argument("--hnsw-ef-construction", type=int, default=200,
                   help="HNSW build-time search width (default: 200); higher builds a better index, slower")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: off, refuse)")
    # The device the bundle is for picks the INT8 target (edge_runtime/station_init.py DEVICE_INT8_TARGET).
    from edge_runtime.station_init import DEVICE_INT8_TARGET

    mapping = ", ".join(f"{d}->{t}" for d, t in DEVICE_INT8_TARGET.items())
    f.add_argument("--device", choices=list(DEVICE_INT8_TARGET), default=None,
                   help=f"device the bundle will run on; picks the INT8 target ({mapping}) (default: none)")
    f.add_argument("--station", default=None,
                   help="station file whose 'device:' key picks the INT8 target like --device (default: none)")
    f.set_defaults(func=_fit)

    e = sub.add_parser("evaluate", help="score DATA_DIR/test/* with one engine; AUROC, errors at the threshold")
    e.add_argument("bundle", help="bundle directory from edge-export fit")
    e.add_argument("data_dir", help="folder with test/good/ and test/<defect type>/ (optional ground_truth/)")
    e.add_argument("--json", required=True, help="file to write the metrics and per-image scores to (required)")
    e.add_argument("--report", default=None,
                   help="write a self-contained HTML report to this folder (report.html) (default: none)")
    e.add_argument("--engine", choices=["reference", "onnx-fp32", "onnx-int8"], default="onnx-int8",
                   help="what scores the images (default: onnx-int8, what the device runs); reference is the torch "
                        "model, to check the export")
    e.add_argument("--knn", choices=["exact", "hnsw"], default="hnsw",
                   help="nearest-neighbour search (default: hnsw, as on the device); exact to rule out the index")
    e.add_argument("--ef", type=int, default=None, help="override the manifest's HNSW ef (default: the manifest's)")
    e.add_argument("--threads", type=int, default=2, help="onnxruntime and search threads (default: 2)")
    e.set_defaults(func=_evaluate)

    v = sub.add_parser("verify", help="check integrity and reproduce the golden scores")
    v.add_argument("bundle", help="bundle directory to check")
    v.add_argument("--precision", choices=["fp32", "int8"], default=None,
                   help="check one variant only (default: both fp32 and int8)")
    v.add_argument("--knn", choices=["exact", "hnsw"], default="hnsw",
                   help="search used for the golden scores (default: hnsw, as on the device)")
    v.set_defaults(func=_verify)

    k = sub.add_parser("keygen", help="create an ed25519 key pair for signing bundles")
    k.add_argument("dir", help="folder to write the private and public key to")
    k.set_defaults(func=_keygen)

    sg = sub.add_parser("sign", help="sign a verified bundle's manifest (writes manifest.sig)")
    sg.add_argument("bundle", help="bundle directory to sign")
    sg.add_argument("--key", required=True, help="private key from edge-export keygen (required)")
    sg.set_defaults(func=_sign)

    d = sub.add_parser("demo", help="generate the embedded data set, fit, export and run the daemon on sample frames")
    d.add_argument("--workdir", default="demo_out", help="folder for the data, bundle and results (default: demo_out)")
    d.add_argument("--fresh", action="store_true", help="refit even if a bundle exists (default: off, reuse it)")
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
