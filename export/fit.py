"""Fit PatchCore on good images and write the deployable bundle.

Steps: torch patch features of the good images -> greedy coreset (indices) -> ONNX FP32 -> ONNX INT8 ->
per variant (fp32, int8): memory bank = that extractor's features of the coreset patches -> HNSW index ->
threshold calibrated on held-out good images (and optional defects) by the runtime's own Pipeline -> golden
images with expected scores -> manifest with checksums.
"""
from __future__ import annotations

import datetime as dt
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

import edge_runtime
from edge_runtime import scoring
from edge_runtime.bundle import SCHEMA_VERSION, Bundle, write_manifest
from edge_runtime.features import FeatureExtractor
from edge_runtime.nn_search import HnswParams, build_hnsw
from edge_runtime.pipeline import Pipeline
from edge_runtime.preprocess import Preprocessing, load_image, preprocess
from export import backbone as backbone_mod
from export.calibration import calibrate_threshold
from export.coreset import greedy_coreset
from export.dataset import list_images, train_images
from export.metrics import auroc
from export.onnx_export import export_fp32, quantize_int8
from export.patch_features import AGGREGATION, PatchFeatures


@dataclass
class FitSettings:
    coreset_ratio: float = 0.1
    backbone: str = "lite0"
    image_size: int = 224
    seed: int = 0
    projection_dim: int | None = None      # None keeps the full concatenated dimension
    coreset_projection_dim: int = 128      # JL projection used only to pick the coreset
    holdout_fraction: float = 0.1          # good images kept out of the bank to calibrate the threshold
    max_train: int | None = None           # few-shot: at most this many images in the bank
    target_false_reject: float = 0.01
    int8_target: str = "x86-avx2"
    int8_calibration_images: int = 64
    hnsw: HnswParams = field(default_factory=HnswParams)
    n_golden: int = 4
    default_variant: str = "int8"
    batch_size: int = 8
    product: str | None = None             # manifest 'product'; None: the data folder's name
    bundle_version: int | None = None      # manifest 'bundle_version' (monotonic); None: UTC seconds at fit time


def log(msg: str) -> None:
    print(f"[fit] {msg}", file=sys.stderr, flush=True)


def split_train(images: list[Path], s: FitSettings) -> tuple[list[Path], list[Path]]:
    """Deterministic shuffle, then held-out calibration images first and bank images after them."""
    order = np.random.default_rng(s.seed).permutation(len(images))
    shuffled = [images[i] for i in order]
    n_hold = max(1, int(round(s.holdout_fraction * len(images)))) if s.holdout_fraction > 0 else 0
    n_hold = min(n_hold, len(images) - 1)
    holdout, bank = shuffled[:n_hold], shuffled[n_hold:]
    if s.max_train is not None:
        bank = bank[:s.max_train]
    return sorted(bank), sorted(holdout)


@torch.no_grad()
def torch_features(model: PatchFeatures, paths: list[Path], prep: Preprocessing, batch: int = 8,
                   label: str = "features") -> np.ndarray:
    """(len(paths) * n_patches, dim) float32, image-major."""
    n_patches = model.grid(prep.image_size)[0] * model.grid(prep.image_size)[1]
    out = np.empty((len(paths) * n_patches, model.dim), dtype=np.float32)
    t0 = time.time()
    for s in range(0, len(paths), batch):
        x = np.concatenate([preprocess(load_image(p), prep) for p in paths[s:s + batch]])
        f = model(torch.from_numpy(x)).numpy()
        out[s * n_patches:(s + len(f)) * n_patches] = f.reshape(-1, model.dim)
        if time.time() - t0 > 5 and (s // batch) % 10 == 0:
            log(f"{label}: {min(s + batch, len(paths))}/{len(paths)} images")
    return out


def onnx_features(extractor: FeatureExtractor, paths: list[Path], prep: Preprocessing) -> np.ndarray:
    return np.concatenate([extractor(preprocess(load_image(p), prep)) for p in paths])


def choose_default_variant(requested: str, separation: dict[str, float], tolerance: float = 0.005) -> tuple[str, str]:
    """INT8 unless the user's calibration defects show it separating them worse than FP32 by more than `tolerance`."""
    if requested == "int8" and separation and separation["int8"] < separation["fp32"] - tolerance:
        return "fp32", (f"calibration AUROC int8 {separation['int8']:.4f} < fp32 {separation['fp32']:.4f} - {tolerance}: "
                        "deploying FP32 rather than letting defects through")
    if separation:
        return requested, f"requested; calibration AUROC int8 {separation['int8']:.4f}, fp32 {separation['fp32']:.4f}"
    return requested, "requested (no calibration defects to compare the variants on)"


def software_versions() -> dict:
    import onnx
    import onnxruntime
    from importlib.metadata import version

    return {"edge_runtime": edge_runtime.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "opencv": cv2.__version__, "hnswlib": version("hnswlib")}


def fit(data_dir: Path, out: Path, settings: FitSettings | None = None, calibration_defects: Path | None = None,
        overwrite: bool = False) -> Bundle:
    s = settings or FitSettings()
    t_fit = time.time()
    out = Path(out)
    images = train_images(data_dir)
    bank_images, holdout = split_train(images, s)
    defects = list_images(calibration_defects) if calibration_defects else []
    if calibration_defects and not defects:
        raise ValueError(f"{calibration_defects}: no images found for threshold calibration")
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise FileExistsError(f"{out}: exists and is not empty (use --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    prep = Preprocessing(s.image_size)
    torch.manual_seed(s.seed)
    model = PatchFeatures(s.backbone, s.projection_dim, s.seed)
    grid = model.grid(s.image_size)
    n_patches = grid[0] * grid[1]
    log(f"{len(bank_images)} bank images, {len(holdout)} held-out good, {len(defects)} calibration defects; "
        f"{s.backbone} {s.image_size}px -> {grid[0]}x{grid[1]} patches x {model.dim}-d")

    t0 = time.time()
    feats = torch_features(model, bank_images, prep, s.batch_size, "bank features")
    t_feat = time.time() - t0
    n_select = max(1, int(round(s.coreset_ratio * len(feats))))
    t0 = time.time()
    selected = greedy_coreset(feats, n_select, s.coreset_projection_dim, s.seed)
    t_coreset = time.time() - t0
    log(f"coreset {n_select}/{len(feats)} patches in {t_coreset:.1f} s")

    onnx_info = export_fp32(model, s.image_size, out / "features_fp32.onnx")
    calib = [preprocess(load_image(p), prep) for p in bank_images[:s.int8_calibration_images]]
    quant_info = quantize_int8(out / "features_fp32.onnx", out / "features_int8.onnx", calib, s.int8_target)
    log(f"ONNX FP32 and INT8 ({s.int8_target}) written")

    banks = {"fp32": feats[selected]}
    del feats
    int8 = FeatureExtractor(out / "features_int8.onnx", (n_patches, model.dim, s.image_size), threads=2)
    # The INT8 bank holds the INT8 extractor's features of the same coreset patches: a bank built from
    # FP32 features but queried with INT8 ones loses ~5 points of image AUROC (shared/BACKBONES.md).
    img_idx, patch_idx = np.divmod(selected, n_patches)
    int8_rows = np.empty((len(selected), model.dim), dtype=np.float32)
    for i in np.unique(img_idx):
        rows = np.nonzero(img_idx == i)[0]
        int8_rows[rows] = int8(preprocess(load_image(bank_images[i]), prep))[patch_idx[rows]]
    banks["int8"] = int8_rows
    models = {"fp32": "features_fp32.onnx", "int8": "features_int8.onnx"}
    for name, bank in banks.items():
        build_hnsw(bank, s.hnsw, s.seed).save_index(str(out / f"index_{name}.hnsw"))

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "bundle_id": None,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "product": s.product or Path(data_dir).resolve().name,
        "bundle_version": s.bundle_version if s.bundle_version is not None else int(time.time()),
        "software": software_versions(),
        "backbone": {"name": s.backbone, "weights_sha256": backbone_mod.BACKBONES[s.backbone].sha256,
                     "weights_package": backbone_mod.BACKBONES[s.backbone].package.replace("_", "-") + "==0.1.0",
                     "padding": "TensorFlow SAME (asymmetric at stride 2), computed for the fixed input size", "taps": list(model.backbone.tap_blocks),
                     "tap_channels": list(model.backbone.channels), "tap_strides": [8, 16]},
        "preprocessing": prep.to_manifest(),
        "features": {"aggregation": AGGREGATION, "grid": list(grid), "dim": model.dim, "full_dim": model.full_dim,
                     "projection": {"dim": s.projection_dim, "seed": s.seed, "kind": "random orthonormal (QR)"}
                     if s.projection_dim else None, "onnx": onnx_info},
        "score": {**scoring.SCORE_DEFINITION, "distance": "l2", "k": 1},
        "coreset": {"method": "greedy k-center", "ratio": s.coreset_ratio, "projection_dim": s.coreset_projection_dim,
                    "seed": s.seed, "n_bank_images": len(bank_images), "n_patches": len(bank_images) * n_patches,
                    "n_selected": int(n_select), "seconds": round(t_coreset, 2)},
        "index": {"library": "hnswlib", "dim": model.dim, **asdict(s.hnsw),
                  "note": "ef is not stored by hnswlib; the runtime sets ef_search on every load"},
        "variants": {name: {"model": models[name], "index": f"index_{name}.hnsw", "bank_size": int(len(banks[name])),
                            "threshold": 1.0} for name in banks},
        "default_variant": s.default_variant,
        "fit": {"data_dir": str(data_dir), "settings": {k: v for k, v in asdict(s).items() if k != "hnsw"},
                "bank_images": [p.name for p in bank_images], "holdout_images": [p.name for p in holdout],
                "calibration_defects": [str(p) for p in defects], "feature_seconds": round(t_feat, 2)},
        "files": {},
    }
    manifest["variants"]["int8"]["quantization"] = quant_info

    # Calibrate each variant with the runtime's own pipeline (the deployed scoring code).
    (out / "golden").mkdir()
    golden_src = holdout[: max(1, s.n_golden - min(2, len(defects)))] + defects[: min(2, len(defects))]
    golden_files = []
    for i, src in enumerate(golden_src):
        rgb = load_image(src)
        scale = 512 / max(rgb.shape[:2])
        if scale < 1:  # keep golden images small; the stored file is what the self-test decodes
            rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        name = f"golden/{i:02d}_{'defect' if src in defects else 'good'}.png"
        cv2.imwrite(str(out / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        golden_files.append(name)
    draft = Bundle(out, manifest)
    separation = {}
    for name in banks:
        pipe = Pipeline(draft, precision=name, knn="exact", threads=2)
        good_scores = np.array([pipe.score_rgb(load_image(p)).score for p in holdout])
        defect_scores = np.array([pipe.score_rgb(load_image(p)).score for p in defects])
        threshold, info = calibrate_threshold(good_scores, defect_scores, s.target_false_reject)
        v = manifest["variants"][name]
        v["threshold"] = threshold
        v["threshold_info"] = info
        v["golden"] = [{"file": g, "score": pipe.score_rgb(load_image(out / g)).score} for g in golden_files]
        v["golden_tolerance"] = {"relative": 1e-3 if name == "fp32" else 1e-2}
        if len(defects):
            separation[name] = auroc(np.r_[np.zeros(len(good_scores)), np.ones(len(defect_scores))],
                                     np.r_[good_scores, defect_scores])
            v["calibration_auroc"] = separation[name]
        log(f"{name}: threshold {threshold:.4f} ({info['method']})")
    manifest["default_variant"], manifest["default_variant_reason"] = choose_default_variant(s.default_variant, separation)
    log(f"default variant {manifest['default_variant']}: {manifest['default_variant_reason']}")
    manifest["fit"]["seconds"] = round(time.time() - t_fit, 1)
    write_manifest(out, manifest)
    bundle = Bundle.load(out)
    log(f"bundle {bundle.bundle_id} written to {out} in {time.time() - t_fit:.1f} s")
    return bundle
