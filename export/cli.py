"""`edge-export`: fit a bundle on good images, evaluate any engine on a test set, verify a bundle, run the demo."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from edge_runtime.geometry import DEFAULT_PIXELS, DEFAULT_RESAMPLE, RESAMPLE_METHODS
from export.calibration import DEFAULT_MAX_FALSE_REJECT
from edge_runtime.nn_search import HnswParams

MAX_SEED = 2**32 - 1   # fit's --seed: a seed every generator it feeds takes (hnswlib refuses a negative one)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 320x256, got {text!r}") from None
    if w < 32 or h < 32 or w % 16 or h % 16:
        raise argparse.ArgumentTypeError(f"input size {w}x{h}: both sides must be multiples of 16 and >= 32")
    return w, h


def _roi(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,W,H such as 100,0,1600,1200, got {text!r}") from None
    if x < 0 or y < 0 or w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"ROI {text}: need x, y >= 0 and w, h >= 8")
    return x, y, w, h


def _number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, also: tuple = ()):
    """An argparse type: a `kind` number within [low, high] (open ends where said), or one of `also`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if value in also:
            return value
        ok = value == value and (low is None or (value > low if low_open else value >= low)) \
            and (high is None or (value < high if high_open else value <= high))
        if not ok:
            fmt = "d" if kind is int else "g"
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:{fmt}}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:{fmt}}"
            extra = "".join(f" or {a}" for a in also)
            raise argparse.ArgumentTypeError(f"must be {' and '.join(x for x in (lo, hi) if x)}{extra}, got {text}")
        return value
    return parse


def _print_bundle(bundle, where) -> None:
    g = bundle.geometry
    print(f"bundle {bundle.bundle_id}: {where}")
    print(f"  geometry: input {g.input_size[0]}x{g.input_size[1]}, {g.n_tiles} tile(s) on a "
          f"{g.canvas_size[0]}x{g.canvas_size[1]} canvas, size policy {g.size_policy}, resample {g.resample}, "
          f"colour {g.colour or 'not pinned'}")
    for note in bundle.manifest["geometry"].get("chosen", {}).get("notes", []):
        if note.startswith("WARNING"):
            print(f"    {note}")
    for name in bundle.manifest["variants"]:
        v = bundle.variant(name)
        info = v.info["threshold_info"]
        frr = info["expected_false_reject"]
        band = f", REVIEW from {v.review_threshold:.4f}" if v.review_threshold else ""
        print(f"  {name}: threshold {v.threshold:.4f}{band} ({info['method']})")
        print(f"    expected false rejects {frr['modelled']:.2%} (95% CI {frr['modelled_ci95'][0]:.2%}-"
              f"{frr['modelled_ci95'][1]:.2%}); cross-fitted good images at or above it: "
              f"{frr['empirical_count']}/{frr['n']}"
              + (f"; lowest calibration defect {info['defect_margin']:+.1%} from it" if "defect_margin" in info else ""))
        left = frr.get("if_left_out_are_good")
        if left and left["empirical_count"] > frr["empirical_count"]:
            print(f"    if the {left['left_out']} image(s) left out are good parts: {left['empirical_count']}/{left['n']} "
                  f"cross-fitted good images at or above it ({left['empirical']:.1%}, 95% CI "
                  f"{left['empirical_ci95'][0]:.1%}-{left['empirical_ci95'][1]:.1%})")
        for warning in info.get("warnings", []):
            print(f"    WARNING: {warning}")
    outliers = (bundle.manifest.get("fit", {}).get("score_outliers") or {}).get("images") or []
    if outliers:
        kept = bundle.manifest["fit"]["score_outliers"].get("in_threshold")
        print(f"  WARNING: {len(outliers)} good image(s) score far above the others ("
              + ", ".join(outliers[:5]) + (" ..." if len(outliers) > 5 else "")
              + f"): {'kept in' if kept else 'left out of'} the threshold, still in the bank; look at them, remove "
              "any that is not a good part and fit again")


def _fit(a: argparse.Namespace) -> int:
    from export.dataset import describe_training_data
    from export.fit import FitSettings, fit

    defects = Path(a.calibration_defects) if a.calibration_defects else None
    print(describe_training_data(Path(a.data_dir), defects, a.max_train), flush=True)
    a.int8_target, why = _resolve_int8_target(a)
    print(f"INT8 target {a.int8_target} ({why})", flush=True)
    s = FitSettings(coreset_ratio=a.coreset_ratio, backbone=a.backbone, input_size=a.input_size, pixels=a.pixels,
                    scale=a.scale, tile_overlap=a.tile_overlap, roi=a.roi, size_policy=a.size_policy, resample=a.resample,
                    aggregation_size=a.aggregation, input_norm=a.input_norm, seed=a.seed, projection_dim=a.projection_dim,
                    cross_fit_folds=a.cross_fit_folds, cross_fit_method=a.cross_fit_method, max_train=a.max_train, target_false_reject=a.target_frr,
                    review_false_reject=a.review_frr, defect_margin=a.defect_margin, max_false_reject=a.max_frr,
                    int8_target=a.int8_target,
                    keep_score_outliers=a.keep_score_outliers,
                    default_variant=a.default_variant, product=a.product, bundle_version=a.bundle_version,
                    hnsw=HnswParams(M=a.hnsw_m, ef_construction=a.hnsw_ef_construction, ef_search=a.ef,
                                    seed_step=a.seed_step,
                                    ef_seeded=HnswParams.ef_seeded if a.ef_seeded == "auto" else a.ef_seeded),
                    choose_ef_seeded=a.ef_seeded == "auto")
    bundle = fit(Path(a.data_dir), Path(a.out), s, defects, overwrite=a.overwrite)
    _print_bundle(bundle, a.out)
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


def _recalibrate(a: argparse.Namespace) -> int:
    from export.recalibrate import recalibrate

    bundle = recalibrate(Path(a.bundle), Path(a.out), Path(a.calibration_defects) if a.calibration_defects else None,
                         a.target_frr, a.review_frr, a.defect_margin, a.overwrite, max_false_reject=a.max_frr)
    _print_bundle(bundle, a.out)
    return 0


def _ef(text: str) -> int:
    from edge_runtime.nn_search import EF_MAX

    value = _integer(text)
    if not 1 <= value <= EF_MAX:
        raise argparse.ArgumentTypeError(f"must be 1-{EF_MAX}, got {text}")
    return value


def _ef_or_auto(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}") from None
    return _ef(text)


def _integer(text: str) -> int:
    """int(text) with argparse's own message: a bare ValueError read 'invalid _ef value' (probe 107)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seed_step(text: str) -> int:
    value = _integer(text)
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or >= 2, got {text}")
    return value


def _evaluate(a: argparse.Namespace) -> int:
    from export.evaluate import evaluate

    result = evaluate(Path(a.bundle), Path(a.data_dir), a.engine, a.knn, a.threads,
                      Path(a.report) if a.report else None, a.ef, a.size_policy, a.seed_step, a.ef_seeded)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2))
    pix = "n/a" if result["pixel_auroc"] is None else f"{result['pixel_auroc']:.4f}"
    if result.get("pixel_auroc_note"):
        pix += f" ({result['pixel_auroc_note']})"
    img = "n/a" if result["image_auroc"] is None else f"{result['image_auroc']:.4f}"
    print(f"{result['engine']}/{a.knn}: image AUROC {img}, pixel AUROC {pix}, "
          f"{result['n_good']} good / {result['n_defect']} defect, threshold {result['threshold']:.4f}: "
          f"{result['false_rejects']} false rejects, {result['escapes']} escapes, "
          + (f"{len(result['faults'])} FAULT (could not be inspected), " if result["faults"] else "") +
          f"{result['seconds_per_image'] * 1000:.1f} ms/image")
    op = result["operating_point"]

    def pct(r: dict) -> str:
        return f"{r['count']}/{r['n']} ({r['rate']:.1%}, 95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%})" if r["n"] else "-"

    print(f"  at the shipped threshold {op['threshold']:.4f}"
          + (f" (REVIEW from {op['review_threshold']:.4f})" if op["review_threshold"] else "")
          + f": good rejected {pct(op['good']['false_rejects'])}, good to review {pct(op['good']['review'])}"
          + (f", of them FAULT {pct(op['good']['fault'])}" if op["good"]["fault"]["count"] else ""))
    for d, row in op["defects"].items():
        auc = "" if d == "all" or result["per_defect"][d] is None else f"AUROC {result['per_defect'][d]:.4f}, "
        fault = f", FAULT {pct(row['fault'])}" if row["fault"]["count"] else ""
        print(f"  {d:>14}: {auc}escapes {pct(row['escapes'])}, review {pct(row['review'])}{fault}")
    if result["excluded_calibration_defects"]:
        print(f"  ({result['excluded_calibration_defects']} calibration defects used by fit left out)")
    if result.get("false_reject_warning"):
        print(f"  WARNING: {result['false_reject_warning']}")
    if result["faults"]:
        f = result["faults"]
        print(f"  WARNING: {len(f)} image(s) could not be inspected: FAULT on the station (counted as rejected "
              f"above, left out of the AUROCs); the first: {f[0]['error']}")
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


def _attach_dash_values(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`--roi -10,0,100,100` as `--roi=-10,0,100,100`: argparse takes a value that starts with '-' (and is not a
    plain negative number) for an option and answers 'expected one argument', not the option's own message."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edge-export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit PatchCore on a folder of good images and write a bundle",
                       description="Fit PatchCore on good images and write a checksummed bundle. DATA_DIR is a flat "
                                   "folder of good images or the benchmark layout DATA_DIR/train/good/.")
    f.add_argument("data_dir", help="flat folder of good images, or a benchmark folder with train/good/ inside")
    f.add_argument("--out", required=True, help="bundle directory to write (required; must be empty or absent "
                                                "unless --overwrite)")
    f.add_argument("--coreset-ratio", type=_number(float, 0, 1, low_open=True), default=0.1,
                   help="fraction of good patches kept in the memory bank (default: 0.1); 0.01 gives a 10x smaller "
                        "bank and a faster fit, at the same image AUROC on bottle "
                        "(benchmarks/results/accuracy_levers.md, row bottle/coreset-1pct)")
    f.add_argument("--backbone", choices=["auto", "lite0", "lite2"], default="auto",
                   help="feature extractor (default: auto: with --calibration-defects, lite0 and lite2 are both fitted "
                        "and the one whose cross-fitted good scores separate your defects better is kept, lite0 on a "
                        "tie, so the fit takes twice as long; without defects lite0). lite2: +3 image-AUROC points "
                        "on thin cracks in portrait parts, level with lite0 on bottle "
                        "(benchmarks/results/accuracy_levers.md), about 1.5x the inference time")
    f.add_argument("--input-size", type=_size, default=None, metavar="WxH",
                   help="model input (one tile) in pixels, multiples of 16 (default: chosen from the training "
                        "images: their median aspect ratio at about --pixels pixels)")
    f.add_argument("--pixels", type=_number(int, 32 * 32), default=DEFAULT_PIXELS,
                   help=f"model pixels per tile when --input-size is not given, whatever the images' size: larger "
                        f"images are shrunk to it, smaller ones upsampled (default: {DEFAULT_PIXELS}, 256x256); raise "
                        f"it for sharper heat maps, or tile with --scale for thin defects on large frames")
    f.add_argument("--scale", type=_number(float, 0, 4, low_open=True), default=None,
                   help="tile the frame: canvas pixels per frame pixel, e.g. 0.5 for a 2448x2048 camera and thin "
                        "defects (default: none, the whole frame is one model input)")
    f.add_argument("--tile-overlap", type=_number(int, 0), default=None,
                   help="pixels shared by neighbouring tiles (default: 1/8 of the tile, at least 16)")
    f.add_argument("--roi", type=_roi, default=None, metavar="X,Y,W,H",
                   help="inspect only this rectangle of every frame (default: the whole frame)")
    f.add_argument("--size-policy", choices=["refuse", "resize", "letterbox"], default=None,
                   help="a frame whose size differs from the training images: FAULT (refuse), resize or letterbox "
                        "(default: refuse when the training images share one size, else resize)")
    f.add_argument("--resample", choices=RESAMPLE_METHODS, default=DEFAULT_RESAMPLE,
                   help=f"frame region -> model canvas, pinned in the bundle (default: {DEFAULT_RESAMPLE}): area = one "
                        "OpenCV INTER_AREA resize; halve-area = 2 x 2 box halvings while the region is at least four "
                        "times the canvas, then INTER_AREA: the same anti-aliasing, 4-10x faster on camera frames of "
                        "1-12 MP, identical when the region is under four times the canvas")
    f.add_argument("--aggregation", type=_number(int, 1, 15), default=3,
                   help="local neighbourhood of each patch feature, odd (default: 3, the paper's)")
    f.add_argument("--input-norm", choices=["native", "imagenet"], default="native",
                   help="input statistics the network sees, mapped inside the ONNX graph: native = (rgb - 127) / "
                        "128 as EfficientNet-Lite was trained; imagenet = (rgb/255 - mean) / std, about 2.2x the "
                        "contrast, as torchvision and anomalib feed these weights. Measured: imagenet raises bottle "
                        "pixel AUROC 0.983 -> 0.987 but drops magnetic tile image AUROC 0.959 -> 0.906: compare "
                        "both with `evaluate` on your calibration defects (default: native)")
    # Probe 107: --seed -1 ran the whole fit, then hnswlib's index build raised a TypeError traceback.
    f.add_argument("--seed", type=_number(int, 0, MAX_SEED), default=0,
                   help=f"random seed of coreset, projection and folds, 0-{MAX_SEED} (default: 0)")
    f.add_argument("--projection-dim", type=_number(int, 1), default=None,
                   help="random projection of patch features to fewer dimensions (default: none)")
    f.add_argument("--cross-fit-folds", type=_number(int, 2, 50, also=(0,)), default=5,
                   help="k-fold cross-fitting that scores every good image against a bank built without it, "
                        "for the threshold (default: 5; 0 skips it: for accuracy experiments only)")
    f.add_argument("--cross-fit-method", choices=["bank-minus-fold", "refit"], default="bank-minus-fold",
                   help="how each fold's bank is made (default: bank-minus-fold: the shipped coreset less the fold's "
                        "own vectors, searched in the shipped HNSW index with an exact re-check, no coreset re-run; "
                        "refit: a new coreset per fold on the other folds' images, ~k times the coreset cost)")
    f.add_argument("--target-frr", type=_number(float, 0, 0.5, low_open=True), default=0.005,
                   help="target false-reject rate of good parts; the threshold is the modelled quantile of the "
                        "cross-fitted good scores (default: 0.005)")
    f.add_argument("--review-frr", type=_number(float, 0, 1, low_open=True, high_open=True), default=None,
                   help="add a REVIEW band whose lower edge sends about this fraction of good parts to a person "
                        "(default: no band)")
    f.add_argument("--keep-score-outliers", action="store_true",
                   help="keep good images whose cross-fitted scores stand far above the others (robust z > 12 and "
                        "> 1.25 x the threshold the rest give: a defect or another product slipped in?) in the "
                        "threshold (default: off: they are left out of it and named; they stay in the bank)")
    f.add_argument("--defect-margin", type=_number(float, 0, 1, high_open=True), default=0.05,
                   help="with --calibration-defects: the threshold sits at least this fraction below the lowest "
                        "defect when the good-only threshold would let one through (default: 0.05)")
    f.add_argument("--max-frr", type=_number(float, 0, 1, low_open=True, high_open=True),
                   default=DEFAULT_MAX_FALSE_REJECT,
                   help="with --calibration-defects: the most good parts (modelled rate) the zero-escape threshold "
                        "may reject; when it would reject more, NG stays at this rate and the zero-escape point "
                        "becomes the lower edge of a REVIEW band, with a warning (REVIEW is never OK; a line "
                        f"without a REVIEW output counts it NG) (default: {DEFAULT_MAX_FALSE_REJECT})")
    f.add_argument("--max-train", type=_number(int, 2), default=None,
                   help="few-shot: at most this many good images, for the bank and the threshold; with more in "
                        "DATA_DIR, a random choice seeded by --seed (the same images and --seed pick the same ones; "
                        "adding or removing an image can change the choice), the rest are not used (default: no "
                        "limit, all of them)")
    f.add_argument("--calibration-defects", default=None,
                   help="defect images for the threshold: a flat folder or one subfolder per defect type "
                        "(default: none, threshold from good images only); a few per type are enough")
    f.add_argument("--int8-target", choices=["x86-avx2", "x86-vnni", "arm"], default=None,
                   help="INT8 quantisation settings, overriding --device/--station (default: from --device or "
                        "--station, else x86-avx2, which is exact on every x86 CPU); x86-vnni (8-bit weights) is "
                        "computed differently by an x86 CPU without VNNI, and a station on one refuses it")
    f.add_argument("--default-variant", choices=["int8", "fp32"], default="int8",
                   help="variant the device runs unless its station file says otherwise (default: int8); fp32 "
                        "when a GPU runs the model or INT8 loses accuracy on your parts")
    f.add_argument("--ef", type=_ef, default=HnswParams.ef_search,
                   help=f"HNSW ef at query time, stored in the manifest (default: {HnswParams.ef_search}); higher is "
                        "slower and closer to exact for the heat map (the image score is re-checked exactly either "
                        "way); a station overrides it with inference.ef_search")
    f.add_argument("--seed-step", type=_seed_step, default=HnswParams.seed_step,
                   help=f"seeded walk, stored in the manifest (default: {HnswParams.seed_step}): every Nth patch row "
                        "and column (and the last) walks the HNSW graph from the top, every other patch searches its "
                        "bottom level from the neighbours of the walked patches around it; faster and closer to exact "
                        "on real parts; 0: every patch walks from the top")
    f.add_argument("--ef-seeded", type=_ef_or_auto, default="auto",
                   help="search width of a seeded patch, stored in the manifest (default: auto: the cheapest of "
                        "4, 6, 8 whose patches of up to 8 training images are as close to exact as walking every "
                        "patch from the top, or within 0.2%% of exact on average, else "
                        f"{HnswParams.ef_seeded}; the image score is exact either way)")
    f.add_argument("--hnsw-m", type=_number(int, 2, 256), default=16,
                   help="HNSW links per node (default: 16); raise (e.g. 32) if edge-runtime check reports low recall")
    f.add_argument("--hnsw-ef-construction", type=_number(int, 1, 4096), default=200,
                   help="HNSW build-time search width (default: 200); higher builds a better index, slower")
    f.add_argument("--overwrite", action="store_true",
                   help="replace the bundle in a non-empty --out once the new one is complete; a folder without a "
                        "bundle is never deleted (default: off, refuse)")
    # The device the bundle is for picks the INT8 target (edge_runtime/station_init.py DEVICE_INT8_TARGET).
    from edge_runtime.station_init import DEVICE_INT8_TARGET

    mapping = ", ".join(f"{d}->{t}" for d, t in DEVICE_INT8_TARGET.items())
    f.add_argument("--device", choices=list(DEVICE_INT8_TARGET), default=None,
                   help=f"device the bundle will run on; picks the INT8 target ({mapping}) (default: none)")
    f.add_argument("--station", default=None,
                   help="station file whose 'device:' key picks the INT8 target like --device (default: none)")
    f.add_argument("--product", default=None, help="product name stored in the manifest; stations with "
                   "security.product refuse other products (default: the name of DATA_DIR)")
    # Probe 107: --bundle-version -5 was refused only by the load after the whole fit, the bundle left in --out.
    f.add_argument("--bundle-version", type=_number(int, 0, 2**63 - 1), default=None,
                   help="monotonic integer release number, 0 or more; stations refuse a lower one than they have "
                        "loaded (default: UTC seconds since the epoch at fit time)")
    f.set_defaults(func=_fit)

    rc = sub.add_parser("recalibrate", help="new thresholds for a bundle without refitting (defects, target, review band)",
                        description="Recompute a bundle's operating point from its cross-fitted good scores and new "
                                    "calibration defects, target false-reject rate or review band; writes a new "
                                    "bundle and leaves the original as it is.")
    rc.add_argument("bundle", help="bundle directory from edge-export fit (fitted with cross-fitting)")
    rc.add_argument("--out", required=True, help="new bundle directory (required)")
    rc.add_argument("--calibration-defects", default=None,
                    help="defect images: a flat folder or one subfolder per type (default: the ones the bundle was "
                         "calibrated with, when every one is still there unchanged; else none, with a warning)")
    rc.add_argument("--target-frr", type=_number(float, 0, 0.5, low_open=True), default=None,
                    help="target false-reject rate (default: the bundle's fit setting)")
    rc.add_argument("--review-frr", type=_number(float, 0, 1, low_open=True, high_open=True), default=None,
                    help="lower edge of a REVIEW band at this good-part rate (default: the bundle's fit setting)")
    rc.add_argument("--defect-margin", type=_number(float, 0, 1, high_open=True), default=None,
                    help="threshold at least this fraction below the lowest defect (default: the bundle's setting)")
    rc.add_argument("--max-frr", type=_number(float, 0, 1, low_open=True, high_open=True), default=None,
                    help="the most good parts the zero-escape threshold may reject before it becomes a REVIEW band "
                         f"instead (default: the bundle's setting, else {DEFAULT_MAX_FALSE_REJECT})")
    rc.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (default: off, refuse)")
    rc.set_defaults(func=_recalibrate)

    e = sub.add_parser("evaluate", help="score DATA_DIR/test/* with one engine; AUROC, errors at the threshold",
                       description="Score every image in DATA_DIR/test/ (good/ and one folder per defect type) with "
                                   "one engine and write the metrics and per-image scores to --json: image and pixel "
                                   "AUROC, false rejects and escapes at the bundle's threshold, ms per image.")
    e.add_argument("bundle", help="bundle directory from edge-export fit")
    e.add_argument("data_dir", help="folder with test/good/ and test/<defect type>/ (optional ground_truth/)")
    e.add_argument("--json", required=True, help="file to write the metrics and per-image scores to (required)")
    e.add_argument("--report", default=None,
                   help="write a self-contained HTML report to this folder (report.html) (default: none)")
    e.add_argument("--engine", choices=["reference", "onnx-fp32", "onnx-int8"], default=None,
                   help="what scores the images (default: what the device runs, the bundle's default variant: "
                        "onnx-int8 unless fit chose fp32); reference is the torch model, to check the export")
    e.add_argument("--knn", choices=["exact", "hnsw", "hnswlib", "ivf"], default="hnsw",
                   help="nearest-neighbour search (default: hnsw, the bundle's graph searched by faiss as on the "
                        "device; hnswlib: the same graph in hnswlib); exact to rule out the index; "
                        "ivf = the faiss IVF search of a station with knn: ivf")
    e.add_argument("--ef", type=_ef, default=None, help="override the manifest's HNSW ef (default: the manifest's)")
    e.add_argument("--seed-step", type=_seed_step, default=None,
                   help="override the manifest's seeded-walk step; 0: every patch walks from the top (default: the "
                        "manifest's)")
    e.add_argument("--ef-seeded", type=_ef, default=None,
                   help="override the manifest's search width of a seeded patch (default: the manifest's)")
    from edge_runtime.cli import _threads   # 1-256, as check's (probe 107: 0, -3 and 999999 were taken)
    from edge_runtime.lines_config import MAX_THREADS

    e.add_argument("--threads", type=_threads, default=2,
                   help=f"onnxruntime and search threads, 1-{MAX_THREADS} (default: 2)")
    e.add_argument("--size-policy", choices=["refuse", "resize", "letterbox"], default=None,
                   help="override the bundle's size policy for test images of another size (default: the bundle's)")
    e.set_defaults(func=_evaluate)

    v = sub.add_parser("verify", help="check integrity and reproduce the golden scores",
                       description="Check a bundle before shipping it, as `edge-runtime check` does on the device: "
                                   "every file's checksum, the golden images re-scored to their recorded scores and "
                                   "the HNSW recall, for each variant. Exit 0 when every check passes, else 1.")
    v.add_argument("bundle", help="bundle directory to check")
    v.add_argument("--precision", choices=["fp32", "int8"], default=None,
                   help="check one variant only (default: both fp32 and int8)")
    v.add_argument("--knn", choices=["exact", "hnsw"], default="hnsw",
                   help="search used for the golden scores (default: hnsw, as on the device)")
    v.set_defaults(func=_verify)

    k = sub.add_parser("keygen", help="create an ed25519 key pair for signing bundles",
                       description="Write a new ed25519 key pair into DIR: bundle_signing_key.pem signs bundles "
                                   "(edge-export sign) and stays on the workstation; bundle_signing_key.pub goes to "
                                   "each station's security.bundle_public_key. Never replaces an existing key.")
    k.add_argument("dir", help="folder to write the private and public key to")
    k.set_defaults(func=_keygen)

    sg = sub.add_parser("sign", help="sign a verified bundle's manifest (writes manifest.sig)",
                        description="Verify BUNDLE (every checksum), then sign its manifest with a private key from "
                                    "edge-export keygen, writing manifest.sig beside it; a station with "
                                    "security.bundle_public_key loads only bundles signed by the matching key.")
    sg.add_argument("bundle", help="bundle directory to sign")
    sg.add_argument("--key", required=True, help="private key from edge-export keygen (required)")
    sg.set_defaults(func=_sign)

    d = sub.add_parser("demo", help="generate the embedded data set, fit, export and run the daemon on sample frames",
                       description="The whole product in one command: generate a synthetic data set, fit and export "
                                   "a bundle with a few calibration defects, write a station file, run the daemon "
                                   "(edge-runtime run) on mixed sample frames and print each verdict and the "
                                   "per-stage latency. A second run reuses the bundle in --workdir.")
    d.add_argument("--workdir", default="demo_out", help="folder for the data, bundle and results (default: demo_out)")
    d.add_argument("--fresh", action="store_true",
                   help="delete the demo folder and start over, refitting (default: off, reuse its bundle); "
                        "refused if the folder holds anything the demo did not write")
    d.set_defaults(func=_demo)

    a = p.parse_args(_attach_dash_values(sys.argv[1:] if argv is None else list(argv), ("--roi", "--input-size")))
    from edge_runtime.bundle import BundleError
    from edge_runtime.features import FeatureError
    from export.dataset import DatasetError

    # A stopped fit (kill, systemd, a container runtime) unwinds like Ctrl-C, so its staging folder is removed.
    main_thread = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM)) if main_thread else None
    try:
        return a.func(a)
    except (DatasetError, BundleError, FeatureError, OSError, ValueError) as exc:   # OSError: a read-only disk
        print(f"edge-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Probe 107: Ctrl-C printed a KeyboardInterrupt traceback. The staging folder is already removed (a
        # bundle reaches --out only whole), so one line says so.
        out = f"; nothing half-written is left in {a.out}" if getattr(a, "out", None) else ""
        print(f"edge-export: {a.command}: stopped (Ctrl-C){out}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    sys.exit(main())
