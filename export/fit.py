"""Fit PatchCore on good images and write the deployable bundle.

Steps: geometry from the training images (aspect kept, optional tiling) -> ONNX FP32 -> ONNX INT8 -> both
graphs' patch features of every good image (each decoded once) -> greedy coreset (indices, on the FP32 features)
-> per variant (fp32, int8): memory bank = that extractor's features of the coreset patches -> HNSW index ->
k-fold cross-fitted scores of every good image (export.crossfit) -> operating point (tail model, optional review
band, calibration defects scored by the runtime's own Pipeline) -> golden images with expected scores -> manifest
with checksums.
"""
from __future__ import annotations

import datetime as dt
import math
import platform
import resource
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

import edge_runtime
from edge_runtime import scoring
from edge_runtime.bundle import (MANIFEST, SCHEMA_VERSION, SCHEMA_VERSION_SHIFT_16BIT, Bundle, check_output_dir,
                                 install_bundle, sha256_file, stale_staging, staged_bundle, staging_dir,
                                 write_manifest)
from edge_runtime.features import FeatureExtractor
from edge_runtime.frame_quality import FrameQuality, QualityBand
from edge_runtime.frame_quality import measure as measure_quality
from edge_runtime.int8_kernels import check_quantization
from edge_runtime.decode import SHIFT_16BIT, ImageError, colour_channels, declared_size, load_image
from edge_runtime.geometry import (ASPECT_TOLERANCE, DEFAULT_PIXELS, DEFAULT_RESAMPLE, STRIDE, Geometry,
                                   cut_tiles, default_input_size, plan_tiles)
from edge_runtime.nn_search import ExactSearch, HnswParams, HnswSearch, build_hnsw, upper_bounds
from edge_runtime.pipeline import Pipeline
from edge_runtime.preprocess import NORMALIZATION, canvas_of, preprocess, to_tensor
from export import backbone as backbone_mod
from export import crossfit
from export.calibration import (DEFAULT_MAX_FALSE_REJECT, OUTLIER_RATIO, OUTLIER_Z, operating_point, score_outliers,
                                wilson_interval)
from export.coreset import CHUNK_PATCHES, greedy_coreset
from export.dataset import DatasetError, calibration_images, defects_among_good, train_images
from export.metrics import auroc
from export.onnx_export import INT8_TARGETS, export_fp32, quantize_int8
from export.patch_features import PatchFeatures, aggregation, input_norm


@dataclass
class FitSettings:
    coreset_ratio: float = 0.1
    # auto: with calibration defects, fit each of BACKBONE_CANDIDATES and keep the one that separates them best
    # (fit_auto_backbone); without defects, lite0.
    backbone: str = "auto"
    input_size: tuple[int, int] | None = None  # model input (W, H); None: from the images' aspect and `pixels`
    pixels: int = DEFAULT_PIXELS               # model input pixels per tile when input_size is not given
    scale: float | None = None                 # tiling: canvas pixels per frame pixel; None: one tile per frame
    tile_overlap: int | None = None            # pixels shared by neighbouring tiles; None: 1/8 of the tile
    roi: tuple[int, int, int, int] | None = None
    size_policy: str | None = None             # None: refuse other sizes when the images share one, else resize
    resample: str = DEFAULT_RESAMPLE           # region -> canvas (edge_runtime.geometry.RESAMPLE_METHODS)
    aggregation_size: int = 3                  # PatchCore's local neighbourhood p (3x3 average of each tap)
    input_norm: str = "native"                 # patch_features.INPUT_NORMS: the network's input statistics
    seed: int = 0
    projection_dim: int | None = None      # None keeps the full concatenated dimension
    coreset_projection_dim: int = 128      # JL projection used only to pick the coreset
    cross_fit_folds: int = 5               # k-fold scores of every good image for the threshold (0: skip, AUROC runs)
    cross_fit_method: str = "bank-minus-fold"  # export.crossfit.METHODS: how each fold's bank is made
    max_train: int | None = None           # few-shot: at most this many images in the bank
    target_false_reject: float = 0.005
    review_false_reject: float | None = None  # lower edge of a review band at this modelled good-part rate
    # Good images whose cross-fitted scores stand out (calibration.score_outliers: a defect slipped in?) are left
    # out of the threshold and named; True keeps them in.
    keep_score_outliers: bool = False
    defect_margin: float = 0.05            # the threshold sits at least this fraction below the lowest defect
    # ... unless that rejects more good parts than this (modelled): NG at this rate, REVIEW from the zero-escape point
    max_false_reject: float | None = DEFAULT_MAX_FALSE_REJECT
    int8_target: str = "x86-avx2"
    int8_calibration_images: int = 64
    hnsw: HnswParams = field(default_factory=HnswParams)
    # The seeded walk's width chosen on the user's own patches (choose_ef_seeded); False keeps hnsw.ef_seeded.
    choose_ef_seeded: bool = True
    n_golden: int = 4
    default_variant: str = "int8"
    batch_size: int = 8
    product: str | None = None             # manifest 'product'; None: the data folder's name
    bundle_version: int | None = None      # manifest 'bundle_version' (monotonic); None: UTC seconds at fit time


class StageClock:
    """Wall and CPU seconds (all threads) of each fit stage since the previous mark, for the manifest: on shared
    cores the CPU time is the figure that does not depend on what else runs."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def mark(self, name: str) -> float:
        wall, cpu = time.perf_counter(), time.process_time()
        self.stages[name] = {"wall_s": round(wall - self._wall, 2), "cpu_s": round(cpu - self._cpu, 2)}
        self._wall, self._cpu = wall, cpu
        return self.stages[name]["wall_s"]


def log(msg: str) -> None:
    print(f"[fit] {msg}", file=sys.stderr, flush=True)


def image_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """(W, H) of each image from its header alone (no decoding)."""
    sizes = []
    for p in paths:
        with open(p, "rb") as fh:
            head = fh.read(1 << 16)
        try:
            _, w, h = declared_size(head)
        except Exception:
            # A header beyond the first 64 kB (a TIFF's directory after its pixels, as OpenCV writes it): the whole
            # file's. Not decoded: that reads 16-bit pixels at the default shift, before fit has pinned the data's
            # own, and refused every 12-bit TIFF as too dark. An unreadable header: load_image names the file.
            try:
                _, w, h = declared_size(p.read_bytes())
            except Exception:
                h, w = load_image(p).shape[:2]
        sizes.append((int(w), int(h)))
    return sizes


LARGE_FRAME_SHRINK = 4.0   # beyond this linear shrink of a frame to one model input, fit warns and suggests tiles


def is_16_bit(path: Path) -> bool:
    """Whether the file holds 16-bit pixels: from a PNG's header; a TIFF is decoded; JPEG and BMP are 8-bit."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 24:
        return head[24] == 16              # IHDR bit depth
    if head[:2] in (b"II", b"MM"):
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        return img is not None and img.dtype == np.uint16
    return False


def sixteen_bit_shift(paths: list[Path], sample: int = 32) -> tuple[int, list[str]]:
    """preprocessing.shift_16bit for these training images, and the notes fit prints: when it is not the default
    8, and (a warning) when the set mixes 8- and 16-bit files.

    The station turns 16-bit pixels into min(v >> shift, 255) (decode.to_rgb). A camera's full-range 16-bit
    frames want the top byte (8); 12-bit sensor values in 16-bit files (0-4095) would reach the model as 0-15,
    nearly black, so the shift is pinned to the data's significant bits (4 for 12-bit): fit and station then
    see the same 8 bits. From the brightest of up to `sample` of the 16-bit images, spread over the set (a
    brighter frame later saturates at 255, which a defect check sees, rather than wrapping); 8-bit files are read
    as they are whatever the shift, so they do not decide it (one stray 8-bit file must not make a 12-bit set's
    frames nearly black)."""
    wide = [p for p in paths if is_16_bit(p)]
    if not wide:
        return SHIFT_16BIT, []
    picks = wide[:: max(1, len(wide) // sample)][:sample]
    # The colour channels only: an opaque alpha channel is 65535 whatever the data's depth (decode.colour_channels).
    tops = {p: int(colour_channels(img).max()) for p, img in ((p, cv2.imread(str(p), cv2.IMREAD_UNCHANGED)) for p in picks)
            if img is not None}
    # A file two or more bits above the typical one is other data (a full-range file among 12-bit ones), not a
    # bright part: it must not set the shift that makes every other frame nearly black. Within a bit, it is.
    typical = int(np.median([max(v, 1).bit_length() for v in tops.values()])) if tops else 16
    strays = [p for p, v in tops.items() if max(v, 1).bit_length() > typical + 1]
    # None decodable: the top byte, and the feature pass names the file that cannot be read.
    highest = max((v for p, v in tops.items() if p not in strays), default=(1 << 16) - 1)
    bits = max(highest, 1).bit_length()
    shift = max(0, bits - 8) if bits < 16 else SHIFT_16BIT
    notes = []
    if strays:
        notes.append(f"WARNING: {len(strays)} of {len(tops)} sampled 16-bit training images hold values far above the "
                     f"others' (first: {strays[0].name}, highest {tops[strays[0]]}, against about {typical} bits): "
                     f"read like the rest, as min(v >> {shift}, 255), they saturate; fit on one camera's images")
    if shift != SHIFT_16BIT:
        notes.append(f"16-bit training images with about {bits} significant bits (highest value {highest} of 65535): "
                     f"16-bit pixels are read as min(v >> {shift}, 255), here and on the station "
                     f"(preprocessing.shift_16bit); frames from the camera must carry the same {bits}-bit values")
    if len(wide) < len(paths):
        first = next(p.name for p in paths if p not in set(wide))
        notes.append(f"WARNING: {len(paths) - len(wide)} of {len(paths)} training images are 8-bit (first: {first}) "
                     f"and the rest 16-bit: 8-bit files are read as they are, 16-bit ones as min(v >> {shift}, 255), "
                     f"so the two show a part at the same brightness only if the 8-bit ones were made that way; fit "
                     f"on one camera's images")
    return shift, notes


def tile_plan(region: tuple[int, int], scale: float, s: FitSettings):
    """(canvas, tile input size, overlap, tile origins) for a region of this size at `scale` (--scale)."""
    rw, rh = region
    # A side under 32 px at this scale is raised to 32 with the other in proportion: the canvas keeps the region's
    # aspect (raising one side alone stretched a 9 x 300 strip 7x at --scale 0.5, a 48 x 40 part to a square).
    scale = max(scale, 32 / min(rw, rh))
    canvas = (max(32, round(rw * scale)), max(32, round(rh * scale)))
    tw, th = s.input_size or default_input_size(1.0, s.pixels)
    tw = min(tw, max(32, canvas[0] // STRIDE * STRIDE))
    th = min(th, max(32, canvas[1] // STRIDE * STRIDE))
    canvas = (max(canvas[0], tw), max(canvas[1], th))
    overlap = s.tile_overlap if s.tile_overlap is not None else max(16, min(tw, th) // 8 // 8 * 8)
    if not 0 <= overlap < min(tw, th):
        raise ValueError(f"tile overlap {overlap} must be in [0, {min(tw, th)})")
    return canvas, (tw, th), overlap, plan_tiles(canvas, (tw, th), overlap)


SIZE_STRAY_SHARE = 0.10   # at most this share of the training images in other sizes than the rest: strays


def drop_size_strays(paths: list[Path], s: FitSettings) -> tuple[list[Path], str | None]:
    """Training images in another size than nearly all the others (at most SIZE_STRAY_SHARE of them): left out,
    with a warning naming them, so the bundle keeps refusing frames of another size. Otherwise one stray file (a
    copy from another camera, a resized export) silently turned the size policy from refuse into resize for every
    frame, and a wrong camera's frames were scored instead of faulted. Kept when --size-policy asks for resizing
    or letterboxing, or an ROI is given (frames of any size are cut at it)."""
    if s.size_policy in ("resize", "letterbox") or s.roi is not None or len(paths) < 2:
        return paths, None
    sizes = image_sizes(paths)
    counts: dict[tuple[int, int], int] = {}
    for wh in sizes:
        counts[wh] = counts.get(wh, 0) + 1
    main, n = max(counts.items(), key=lambda kv: kv[1])
    odd = [p for p, wh in zip(paths, sizes) if wh != main]
    if not odd or len(odd) > SIZE_STRAY_SHARE * len(paths):
        return paths, None
    first = next((p, wh) for p, wh in zip(paths, sizes) if wh != main)
    return [p for p, wh in zip(paths, sizes) if wh == main], (
        f"WARNING: {len(odd)} of {len(paths)} training images {'is' if len(odd) == 1 else 'are'} not "
        f"{main[0]}x{main[1]} like the rest (first: {first[0].name}, {first[1][0]}x{first[1][1]}): left out of the "
        "bank, and a frame of another size is a FAULT; fit on one camera's images (--size-policy resize keeps them)")


def plan_geometry(paths: list[Path], s: FitSettings) -> tuple[Geometry, dict]:
    """The bundle's geometry for these training images, and the reasons for each choice (for the manifest)."""
    sizes = image_sizes(paths)
    frames = sorted(set(sizes))      # the frames' own sizes (sizes becomes the regions' with an ROI)
    if s.roi is not None:
        x, y, w, h = s.roi
        bad = [p.name for p, (W, H) in zip(paths, sizes) if x + w > W or y + h > H]
        if bad:
            raise ValueError(f"--roi {list(s.roi)} lies outside {len(bad)} training images (first: {bad[0]})")
        sizes = [(w, h)] * len(paths)
    same = len(set(sizes)) == 1
    aspect = float(np.median([w / h for w, h in sizes]))
    notes = []
    if s.scale is None:
        if s.input_size:
            input_size = tuple(s.input_size)
            notes.append(f"input {input_size[0]}x{input_size[1]} as requested")
        else:
            # The pixel budget whatever the images' size (geometry.DEFAULT_PIXELS says why that budget). Smaller
            # images are upsampled to it: a patch is 8 model pixels and the ImageNet features see structures of
            # tens of pixels, so a 100 x 100 bottle kept at 96 x 96 passed 5 of 63 defects (pixel AUROC 0.959),
            # upsampled to 256 x 256 none (0.983).
            budget = s.pixels
            median_px = int(np.median([w * h for w, h in sizes]))
            input_size = default_input_size(aspect, budget)
            notes.append(f"input {input_size[0]}x{input_size[1]} (W/H {input_size[0] / input_size[1]:.3f}, "
                         f"{input_size[0] / input_size[1] / aspect - 1:+.1%} from the training images' median "
                         f"{aspect:.3f}: sides are multiples of {STRIDE}) at about {budget} model pixels"
                         + (f" (the images' median size {median_px} px is upsampled {math.sqrt(budget / median_px):.1f}x)"
                            if median_px < budget else ""))
            if abs(math.log(input_size[0] / input_size[1] / aspect)) > ASPECT_TOLERANCE:
                notes.append(f"WARNING: the input bends the images' aspect by more than {ASPECT_TOLERANCE:.0%} (a "
                             f"side of at least 32 px within 1.5x the pixel budget cannot do better): give "
                             f"--input-size, crop with --roi, or tile with --scale")
        canvas, tiles = input_size, ((0, 0),)
        shrink = math.sqrt(float(np.median([w * h for w, h in sizes])) / (canvas[0] * canvas[1]))
        if shrink > LARGE_FRAME_SHRINK:
            # One model input for a camera-size frame: a patch (8 model px) covers 8 x shrink frame pixels, so a
            # defect narrower than that is averaged away (an 80 px spot on a 5000 x 4000 frame passed, measured).
            w, h = (int(np.median([v[i] for v in sizes])) for i in (0, 1))
            ways = ", ".join(f"--scale {sc} gives {len(tile_plan((w, h), sc, s)[3])} tiles"
                             for sc in (0.5, 0.25) if w * sc >= canvas[0] or h * sc >= canvas[1])
            notes.append(f"WARNING: the frames ({w}x{h}) are shrunk {shrink:.0f}x to one model input: one patch is "
                         f"about {8 * shrink:.0f} frame pixels wide and smaller defects are averaged away. If the part "
                         "fills only some of the frame, crop to it with --roi X,Y,W,H first (one input, no extra "
                         "cost: a bottle filling 5% of a 2048x1536 frame went from 5 of 54 defects passed to none); "
                         f"else tile the frame for thin or small defects ({ways or '--scale'}), at that many times "
                         "the inspection time and the fit's feature and coreset time")
    else:
        if not same:
            raise ValueError("tiling (--scale) needs training images (or ROIs) of one size; these vary "
                             f"({len(set(sizes))} sizes, e.g. {sorted(set(sizes))[:3]})")
        rw, rh = sizes[0]
        canvas, input_size, overlap, tiles = tile_plan((rw, rh), s.scale, s)
        tw, th = input_size
        notes.append(f"{len(tiles)} tiles of {tw}x{th} (overlap >= {overlap} px) on a {canvas[0]}x{canvas[1]} canvas "
                     f"(scale {s.scale} of the {rw}x{rh} region)")
        if min(rw, rh) * s.scale < 32:
            notes.append(f"--scale {s.scale} makes the {rw}x{rh} region's short side under 32 px: raised to scale "
                         f"{32 / min(rw, rh):.3g}, keeping its aspect")
    policy = s.size_policy or ("refuse" if same else "resize")
    done = {"resize": "resized", "letterbox": "letterboxed"}
    frame_size = frames[0] if s.roi is not None and len(frames) == 1 else None
    if same:
        what = (f"all training images are {frames[0][0]}x{frames[0][1]}" if len(frames) == 1 else
                f"the training images vary in size ({len(frames)} sizes)")
        if s.roi is not None:
            what += f", their ROI {sizes[0][0]}x{sizes[0][1]} at ({s.roi[0]}, {s.roi[1]})"
        if policy != "refuse":
            notes.append(f"{what}: other sizes are {done[policy]}")
        elif s.roi is not None and len(frames) > 1:
            # No one frame size to pin (geometry.frame_size): frames of any size are cut at the ROI.
            notes.append(f"{what}: frames of any size are cut at the ROI (it must lie inside them); the ROI has the "
                         "fitted size, so nothing else is checked: fit on one camera's frames to pin their size")
        else:
            notes.append(f"{what}: a frame{' or ROI' if s.roi is not None else ''} of another size is a FAULT")
    else:
        notes.append(f"training images vary in size ({len(set(sizes))} sizes): every frame is "
                     f"{done.get(policy, 'resized')} to the canvas, as the bank was fitted")
    geom = Geometry(input_size=tuple(input_size), canvas_size=tuple(canvas), tiles=tuple(tiles),
                    region_size=sizes[0] if same else None, roi=tuple(s.roi) if s.roi else None, size_policy=policy,
                    resample=s.resample, frame_size=frame_size)
    return geom, {"training_sizes": [f"{w}x{h}" for w, h in frames][:20],
                  **({"training_roi_size": f"{sizes[0][0]}x{sizes[0][1]}"} if s.roi is not None else {}),
                  "median_aspect": aspect,
                  "scale": s.scale, "notes": notes}


def pin_colour(geom: Geometry, paths: list[Path], grey: list[bool]) -> tuple[Geometry, list[int], str]:
    """geometry.colour from what the model saw of each training image (edge_runtime.geometry.match_colour says what
    the station does with it), the images that do not match it (by index), and the note fit prints.

    One camera gives one kind. A set that mixes them (stray files: a tinted JPEG on a mono line, a few images
    converted to grey) follows the majority: grey when at least half are grey, the colour ones then converted as
    the station converts frames; else colour, with the grey ones left out of the bank (a colour bundle faults a
    grey frame, its own training images included)."""
    n_grey, n = sum(grey), len(grey)
    colour = "grey" if 2 * n_grey >= n else "colour"
    odd = [i for i, g in enumerate(grey) if g != (colour == "grey")]
    if not odd:
        return replace(geom, colour=colour), odd, (
            "grey images: the station converts colour frames to grey, as the bank was fitted" if colour == "grey"
            else "colour images: a frame without colour (R = G = B) is a FAULT")
    kind = "in colour (" if colour == "grey" else "grey (R = G = B; "
    done = ("converted to grey as the station converts frames" if colour == "grey"
            else "left out of the bank; a grey frame is a FAULT")
    return replace(geom, colour=colour), odd, (
        f"WARNING: {len(odd)} of {n} training images {'is' if len(odd) == 1 else 'are'} {kind}first: "
        f"{paths[odd[0]].name}), the rest {colour}: fitted as {colour}, the most of them, with "
        f"{'that one' if len(odd) == 1 else 'those'} {done}; fit on one camera's images")


def tensors(path: Path, geom: Geometry, shift_16bit: int = SHIFT_16BIT,
            quality: list[FrameQuality] | None = None) -> np.ndarray:
    """The image's tile tensor, as the station makes it; `quality`, if given, receives the canvas's frame quality."""
    canvas, _, _ = canvas_of(load_image(path, shift_16bit), geom, str(path))
    if quality is not None:
        quality.append(measure_quality(canvas))
    return to_tensor(cut_tiles(canvas, geom))


def onnx_features(extractors: dict[str, FeatureExtractor], paths: list[Path], geom: Geometry,
                  label: str = "features", grey: list[bool] | None = None,
                  shift_16bit: int = SHIFT_16BIT, quality: list[FrameQuality] | None = None) -> dict[str, np.ndarray]:
    """Per extractor, (len(paths) * patches_per_image, dim) float32 features, image-major; each image decoded once.
    `grey`, if given, receives per image whether the model saw R = G = B everywhere (the colour pin's input);
    `quality` each image's frame quality (the manifest's training band)."""
    per_image = geom.n_tiles * geom.grid()[0] * geom.grid()[1]
    out = {name: np.empty((len(paths) * per_image, ex.dim), dtype=np.float32) for name, ex in extractors.items()}
    t0 = last = time.time()
    for i, p in enumerate(paths):
        x = tensors(p, geom, shift_16bit, quality)
        if grey is not None:   # the normalisation treats the channels alike, so equal pixels stay equal
            grey.append(bool(np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 0], x[:, 2])))
        for name, ex in extractors.items():
            out[name][i * per_image:(i + 1) * per_image] = ex(x)
        if time.time() - last > 10:
            last = time.time()
            log(f"{label}: {i + 1}/{len(paths)} images ({(i + 1) / (last - t0):.1f} images/s)")
    return out


def cross_fit_scores(feats: dict[str, np.ndarray], indexes: dict, selected: np.ndarray, n_images: int, per_image: int,
                     s: FitSettings) -> tuple[dict[str, np.ndarray], dict]:
    """Per variant, every good image's score against a bank without its fold (export.crossfit says how), and the
    record of how that was done for the manifest."""
    if s.cross_fit_method not in crossfit.METHODS:
        raise ValueError(f"cross-fit method {s.cross_fit_method!r}: expected one of {', '.join(crossfit.METHODS)}")
    folds = min(s.cross_fit_folds, n_images)
    fold_of = crossfit.fold_assignment(n_images, folds, s.seed)
    record = {"method": s.cross_fit_method, "folds": folds, "fold_seed": s.seed + 1}
    if s.cross_fit_method == "refit":
        scores = crossfit.refit_scores(feats, feats["fp32"], per_image, fold_of, s.coreset_ratio,
                                       s.coreset_projection_dim, s.seed, log)
        record["bank"] = "per fold: greedy coreset re-run on the other folds' images; exact image scores"
        return scores, record
    scores = {}
    for name, x in feats.items():
        scores[name], stats = crossfit.bank_minus_fold_scores(
            x, selected, indexes[name], per_image, fold_of, threads=2,
            log=lambda msg, name=name: log(f"[{name}] {msg}"))   # one set of folds per variant: say which
        record[f"{name}_rechecked_patches_per_image"] = round(stats["rechecked_patches_per_image"], 1)
    record["search"] = f"HNSW ef {crossfit.CROSS_FIT_EF} (fold vectors marked deleted) + exact re-check of the image score"
    record["bank"] = ("per fold: the shipped coreset less the vectors from the fold's own images (no coreset re-run; "
                      "conservative: no other image's patch fills their place); held-out images searched in the "
                      "shipped HNSW index with those vectors marked deleted, image scores exact by re-check")
    return scores, record


def set_operating_point(v: dict, name: str, good_scores: np.ndarray, defect_scores: np.ndarray,
                        bank_scores: np.ndarray | None, target_false_reject: float, review_false_reject: float | None,
                        defect_margin: float, seed: int = 0, cross_fitted: bool = True,
                        cross_fit_method: str | None = None, names: list[str] | None = None,
                        max_false_reject: float | None = DEFAULT_MAX_FALSE_REJECT) -> float | None:
    """Thresholds of one variant into its manifest entry `v`; returns the calibration AUROC when defects exist."""
    threshold, review, info = operating_point(good_scores, defect_scores, target_false_reject, review_false_reject,
                                              bank_scores, defect_margin, seed, names=names,
                                              max_false_reject=max_false_reject)
    if not cross_fitted:
        info["method"] += " (NO cross-fitting: in-bank scores, for accuracy runs only)"
    elif cross_fit_method:
        info["cross_fit_method"] = cross_fit_method  # export.crossfit: how each fold's bank was made
    v["threshold"], v["review_threshold"], v["threshold_info"] = threshold, review, info
    separation = None
    if len(defect_scores):
        separation = auroc(np.r_[np.zeros(len(good_scores)), np.ones(len(defect_scores))], np.r_[good_scores, defect_scores])
        v["calibration_auroc"] = separation
    frr = info["expected_false_reject"]
    log(f"{name}: threshold {threshold:.4f} ({info['method']}); expected false rejects {frr['modelled']:.2%} "
        f"(95% CI {frr['modelled_ci95'][0]:.2%}-{frr['modelled_ci95'][1]:.2%}; cross-fitted "
        f"{frr['empirical_count']}/{frr['n']})" + (f"; review band from {review:.4f}" if review else ""))
    for warning in info.get("warnings", []):
        log(f"{name}: WARNING: {warning}")
    return separation


def left_out_rate(v: dict, name: str, good_scores: np.ndarray, used: np.ndarray) -> None:
    """The false-reject figure if the good images left out of the threshold (score outliers) are good parts after
    all: the rule also names real good parts, e.g. a small part on a flat background (probe 45: two of 120 good
    bottles named, the threshold under both, 0.5% expected where their count gives 1.7%)."""
    threshold = v["threshold"]
    k = int(np.sum(good_scores >= threshold))
    lo, hi = wilson_interval(k, len(good_scores))
    v["threshold_info"]["expected_false_reject"]["if_left_out_are_good"] = {
        "empirical": k / len(good_scores), "empirical_count": k, "n": int(len(good_scores)),
        "empirical_ci95": [lo, hi], "left_out": int((~used).sum())}
    if np.any(good_scores[~used] >= threshold):
        log(f"{name}: WARNING: if the {int((~used).sum())} good image(s) left out of the threshold are good parts, "
            f"{k} of {len(good_scores)} cross-fitted good images score at or above it ({k / len(good_scores):.1%}, "
            f"95% CI {lo:.1%}-{hi:.1%}), not what the expected false-reject rate above says")


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


# Fastest first: on a tie the first is kept. lite2 costs ~1.5x the inference time of lite0 and gained 3 image-AUROC
# points on thin cracks in portrait parts (shared/BACKBONES.md); on bottle and magnetic tile the two are level.
BACKBONE_CANDIDATES = ("lite0", "lite2")
# A candidate replaces an earlier one only when its calibration AUROC is higher by more than this.
BACKBONE_TOLERANCE = 0.005


# Seeded-walk widths tried by fit, cheapest first; the last is HnswParams' default.
EF_SEEDED_CANDIDATES = (4, 6, 8)
# A width whose patch distances exceed the exact ones by at most this on average (relative) is taken even where
# the walk from the top is closer still: on a small bank the walk from the top is all but exact (1% bottle:
# 0.000%), and demanding that of the seeded walk kept ef_seeded 8 where 4 (0.08-0.15% on the training patches,
# 0.12% on the test set) moved pixel AUROC by 0.00001 and the search stage by -0.7 ms (benchmarks/seeded_walk.py).
EXCESS_TOLERANCE = 0.002


def choose_ef_seeded(excess: dict, default: int) -> tuple[int, str]:
    """(ef_seeded, reason): the cheapest candidate whose mean per-patch excess over the exact distance is no
    larger than the walk from the top's (`excess["top"]`) or than EXCESS_TOLERANCE, so the heat map is never
    visibly coarser than without the seeded walk; `default` when none is."""
    bar = max(excess["top"], EXCESS_TOLERANCE)
    for ef in EF_SEEDED_CANDIDATES:
        if excess[ef] <= bar:
            return ef, (f"the cheapest width within {100 * bar:.3f}% of exact on average: walking every patch from "
                        f"the top {100 * excess['top']:.3f}%, the tolerance {100 * EXCESS_TOLERANCE:.2f}%, this "
                        f"width {100 * excess[ef]:.3f}% mean excess")
    measured = f" ({100 * excess[default]:.3f}%)" if default in excess else ""
    return default, (f"no width within {100 * bar:.3f}% of exact on average (walking every patch from the top: "
                     f"{100 * excess['top']:.3f}%); the default {default}{measured}")


def calibration_score(pipe: Pipeline, path: Path) -> float:
    """A calibration defect's score, as the station would inspect it; ValueError naming the image (not the
    camera) when the station would fault it: it then says nothing about where defects score."""
    try:
        rgb = pipe.load_image(path)
        pipe.check_rgb(rgb, str(path))   # the station's frame check faults it before any score
        return pipe.score_rgb(rgb, str(path)).score
    except ImageError as exc:
        raise ValueError(f"calibration defect {path} cannot be inspected like the training images ({exc}); "
                         "give defects from the same camera and set-up, or leave this one out") from None


def seeded_walk_excess(pipe: Pipeline, paths: list[Path]) -> dict:
    """Mean relative excess over the exact nearest distance of the patches of `paths` (training images: patches in
    the bank itself, at distance 0, are left out) for the walk from the top ("top") and each candidate width."""
    search = pipe.search
    params = search.params
    feats = [pipe.extractor(preprocess(pipe.load_image(p), pipe.geometry, str(p))[0]) for p in paths]
    # Exact distances in the kernel `approximate` measures in (the expanded-form GEMM of `nearest` errs most
    # exactly where training patches sit: close to the bank).
    exact = [search.exact.nearest_within(q, upper_bounds(search.exact.bank, q, search.exact.nearest(q)[1]))[0]
             for q in feats]
    out = {}
    for key, changes in [("top", {"seed_step": 0}), *[(ef, {"ef_seeded": ef}) for ef in EF_SEEDED_CANDIDATES]]:
        search.params = replace(params, **changes)
        ratios = []
        for q, d in zip(feats, exact):
            keep = d > 0          # a patch that is itself in the bank has nothing to be close to
            ratios.append(search.approximate(q)[keep] / d[keep] - 1.0)
        ratios = np.concatenate(ratios) if ratios else np.zeros(0)
        out[key] = float(ratios.mean()) if ratios.size else 0.0
    search.params = params
    return out


def fit(data_dir: Path, out: Path, settings: FitSettings | None = None, calibration_defects: Path | None = None,
        overwrite: bool = False) -> Bundle:
    """Fit a bundle into `out`. `settings.backbone == "auto"` picks the backbone (fit_auto_backbone)."""
    s = settings or FitSettings()
    # The bank, threshold and golden scores come from the INT8 features computed HERE: a machine that cannot
    # compute the target's integers exactly would make a bundle that no device agrees with.
    check_quantization({**INT8_TARGETS.get(s.int8_target, {}), "target": s.int8_target}, None, f"INT8 target {s.int8_target}",
                       advice="Fit on a CPU with VNNI (or an ARM board), or use --int8-target x86-avx2 (exact on every "
                              "x86 CPU)")
    if s.backbone == "auto":
        return fit_auto_backbone(data_dir, out, s, calibration_defects, overwrite)
    return _fit(data_dir, out, s, calibration_defects, overwrite)


def choose_backbone(separation: dict[str, float | None]) -> tuple[str, str]:
    """(backbone, reason) from each candidate's calibration AUROC, candidates in BACKBONE_CANDIDATES order."""
    first = chosen = next(iter(separation))
    for name, auc in separation.items():
        if auc is not None and auc > (separation[chosen] or 0.0) + BACKBONE_TOLERANCE:
            chosen = name
    listed = ", ".join(f"{n} {a:.4f}" for n, a in separation.items() if a is not None)
    why = (f"the fastest; no other is better by more than {BACKBONE_TOLERANCE}" if chosen == first
           else f"better by more than {BACKBONE_TOLERANCE}")
    return chosen, f"calibration AUROC (cross-fitted good vs calibration defects) {listed}: {chosen} ({why})"


def fit_auto_backbone(data_dir: Path, out: Path, s: FitSettings, calibration_defects: Path | None = None,
                      overwrite: bool = False) -> Bundle:
    """The backbone chosen by the user's own defects: every candidate is fitted beside `out` and the one whose
    cross-fitted good scores separate the calibration defects best is kept (the faster one on a tie); the fit
    takes that many times as long. Without calibration defects there is nothing to compare on: lite0."""
    out = Path(out)
    if not calibration_defects or not calibration_images(calibration_defects):
        log("backbone auto: lite0 (no calibration defects to compare the backbones on)")
        return _fit(data_dir, out, replace(s, backbone=BACKBONE_CANDIDATES[0]), calibration_defects, overwrite)
    inputs = {"training folder": data_dir, "calibration folder": calibration_defects}
    check_output_dir(out, overwrite, inputs)   # the bundle there is replaced only once a candidate is chosen
    # Each candidate in its own new folder inside one staging folder (staging_dir: never another run's or the
    # user's); the chosen one is installed, the staging folder removed in any case.
    stage = staging_dir(out)
    t0 = time.time()
    kept = None
    try:
        separation, made = {}, {}
        for i, name in enumerate(BACKBONE_CANDIDATES):
            log(f"backbone auto: fitting {name} ({i + 1} of {len(BACKBONE_CANDIDATES)})")
            made[name] = stage / name
            b = _fit(data_dir, made[name], replace(s, backbone=name), calibration_defects, overwrite=False)
            separation[name] = b.manifest["variants"][b.manifest["default_variant"]].get("calibration_auroc")
        chosen, reason = choose_backbone(separation)
        log(f"backbone auto: {reason}")
        try:
            install_bundle(made[chosen], out, overwrite, inputs)
        except OSError:
            kept = made[chosen]   # complete, and named in the error for the user to move
            raise
    finally:
        for path in ([stage] if kept is None else [p for p in made.values() if p != kept]):
            shutil.rmtree(path, ignore_errors=True)
    manifest = yaml.safe_load((out / MANIFEST).read_text())
    manifest["fit"]["backbone_choice"] = {"candidates": separation, "chosen": chosen, "reason": reason,
                                          "seconds_all_candidates": round(time.time() - t0, 1)}
    manifest["bundle_id"] = None   # a new manifest: a new id
    write_manifest(out, manifest)
    bundle = Bundle.load(out)
    log(f"bundle {bundle.bundle_id} ({chosen}) written to {out}")
    return bundle


def _fit(data_dir: Path, out: Path, s: FitSettings, calibration_defects: Path | None = None,
         overwrite: bool = False) -> Bundle:
    t_fit = time.time()
    clock = StageClock()
    out = Path(out)
    images = train_images(data_dir)
    defects = calibration_images(calibration_defects) if calibration_defects else []
    copies = defects_among_good(defects, images)   # all the good images: one left out by --max-train is good too
    if copies:
        (d, g), more = copies[0], f" ({len(copies)} of {len(defects)} defects are)" if len(copies) > 1 else ""
        raise DatasetError(f"calibration defect {d} is a byte-identical copy of the good image {g}{more}: a good part "
                           "among the defects would put the threshold under the good parts; remove it from one of "
                           "the two folders")
    if s.max_train is not None:  # few-shot: a seeded subset
        order = np.random.default_rng(s.seed).permutation(len(images))[:s.max_train]
        images = sorted(images[i] for i in order)
    inputs = {"training folder": data_dir, "calibration folder": calibration_defects}
    check_output_dir(out, overwrite, inputs)
    images, stray_note = drop_size_strays(images, s)
    geom, geom_info = plan_geometry(images, s)
    if stray_note:
        geom_info["notes"].append(stray_note)
    fitted = geom.frame_size if s.roi else geom.region_size    # the frame size the station will accept
    if defects and fitted and geom.size_policy == "refuse":   # before the work
        odd = [(p, wh) for p, wh in zip(defects, image_sizes(defects)) if wh != fitted]
        if odd:
            (p, (w, h)), (rw, rh) = odd[0], fitted
            raise ValueError(f"calibration defect {p} is {w}x{h}, the training images {rw}x{rh}: the station would "
                             f"refuse such a frame; give defects from the same camera ({len(odd)} of {len(defects)} "
                             "differ)")
    shift_16bit, depth_notes = sixteen_bit_shift(images)
    geom_info["notes"] += depth_notes
    # Written beside `out` and moved there only when complete: a fit that fails (or is stopped) leaves the bundle
    # --overwrite would have replaced as it was, and no half-written folder that the next --overwrite refuses.
    with staged_bundle(out, overwrite, inputs) as stage:
        for other in stale_staging(out, stage):
            log(f"WARNING: {other} was left by a run that was stopped outright (or is another fit's, still "
                "running): delete it once no fit is writing it (a .old- folder holds the bundle that run was "
                "replacing)")
        _fit_into(stage, data_dir, s, images, defects, geom, geom_info, shift_16bit, clock, t_fit)
    bundle = Bundle.load(out)
    log(f"bundle {bundle.bundle_id} written to {out} in {time.time() - t_fit:.1f} s "
        f"(peak resident {bundle.manifest['fit']['peak_rss_mib']} MiB)")
    return bundle


def _fit_into(out: Path, data_dir: Path, s: FitSettings, images: list[Path], defects: list[Path], geom: Geometry,
              geom_info: dict, shift_16bit: int, clock: StageClock, t_fit: float) -> None:
    """The fit proper, into the new folder `out` (_fit's staging folder)."""
    torch.manual_seed(s.seed)
    model = PatchFeatures(s.backbone, s.projection_dim, s.seed, aggregation_size=s.aggregation_size,
                          input_norm=s.input_norm)
    grid = geom.grid()
    per_image = geom.n_tiles * grid[0] * grid[1]
    log(f"{len(images)} good images, {len(defects)} calibration defects; {s.backbone}; " + "; ".join(geom_info["notes"]))
    log(f"{per_image} patches x {model.dim}-d per image")

    # The exported graphs compute every feature: the FP32 ONNX graph is the one the fp32 variant runs (torch's
    # output differs by ~5e-5 of 18) and runs ~30x faster than torch eager here; each image is decoded once for both.
    clock.mark("setup")
    onnx_info = export_fp32(model, geom.input_size, out / "features_fp32.onnx")
    clock.mark("onnx_export")
    calib, n_calib_tiles = [], 0
    for p in images[:s.int8_calibration_images]:
        if n_calib_tiles >= 4 * s.int8_calibration_images:  # tiled bundles: enough tiles from fewer images
            break
        calib.append(tensors(p, geom, shift_16bit))
        n_calib_tiles += geom.n_tiles
    quant_info = quantize_int8(out / "features_fp32.onnx", out / "features_int8.onnx", calib, s.int8_target)
    del calib
    log(f"ONNX FP32 and INT8 ({s.int8_target}) written (quantisation {clock.mark('int8_quantisation'):.1f} s)")
    models = {"fp32": "features_fp32.onnx", "int8": "features_int8.onnx"}
    expected = (grid[0] * grid[1], model.dim, geom.input_size, geom.n_tiles)
    extractors = {name: FeatureExtractor(out / f, expected, threads=2) for name, f in models.items()}
    # The INT8 bank holds the INT8 extractor's features of the same coreset patches: a bank built from
    # FP32 features but queried with INT8 ones loses ~5 points of image AUROC (shared/BACKBONES.md).
    grey: list[bool] = []
    qualities: list[FrameQuality] = []
    all_feats = onnx_features(extractors, images, geom, "fp32 + int8 features", grey, shift_16bit, qualities)
    geom, odd, colour_note = pin_colour(geom, images, grey)
    geom_info["notes"].append(colour_note)
    log(colour_note)
    if odd and geom.colour == "grey":      # the colour strays as the station will see them
        again = onnx_features(extractors, [images[i] for i in odd], geom, "colour images as grey", None, shift_16bit)
        for name, x in all_feats.items():
            for k, i in enumerate(odd):
                x[i * per_image:(i + 1) * per_image] = again[name][k * per_image:(k + 1) * per_image]
    elif odd:                              # the grey strays: out of the bank
        keep = np.ones(len(images), dtype=bool)
        keep[odd] = False
        all_feats = {name: x[np.repeat(keep, per_image)] for name, x in all_feats.items()}
        images = [p for p, k in zip(images, keep) if k]
        qualities = [q for q, k in zip(qualities, keep) if k]
    # The band of frames the bank was fitted on: the station's frame check and drift monitor compare against it.
    quality_band = QualityBand.of(qualities)
    log(f"training frames: {quality_band.describe()}, 0.5th-99.5th percentile")
    del extractors
    t_feat = clock.mark("features")
    log(f"FP32 and INT8 features of {len(images)} images in {t_feat:.1f} s")
    n_select = max(1, int(round(s.coreset_ratio * len(all_feats["fp32"]))))
    selected = greedy_coreset(all_feats["fp32"], n_select, s.coreset_projection_dim, s.seed)
    t_coreset = clock.mark("coreset")
    log(f"coreset {n_select}/{len(all_feats['fp32'])} patches in {t_coreset:.1f} s")
    banks = {name: x[selected] for name, x in all_feats.items()}
    # One single-threaded build per variant, both at once (hnswlib releases the GIL): as fast as two-threaded
    # builds one after the other, and the same data gives the same graph. A two-threaded hnswlib build inserts in
    # a racy order: two fits of one bank gave graphs whose search differed by up to 15% (bottle, 2.8-3.3 ms).
    with ThreadPoolExecutor(max_workers=len(banks)) as pool:
        futures = {name: pool.submit(build_hnsw, bank, s.hnsw, s.seed, 1) for name, bank in banks.items()}
    indexes = {name: f.result() for name, f in futures.items()}
    for name, index in indexes.items():
        index.save_index(str(out / f"index_{name}.hnsw"))
    t_index = clock.mark("hnsw_build")
    log(f"HNSW indexes built in {t_index:.1f} s")
    crossfit_record = None
    crossfit_scores = {}
    if s.cross_fit_folds:
        crossfit_scores, crossfit_record = cross_fit_scores(all_feats, indexes, selected, len(images), per_image, s)
    t_cross = clock.mark("cross_fit")
    if crossfit_record:
        crossfit_record["seconds"] = round(t_cross, 2)
    outliers = np.zeros(len(images), dtype=bool)
    for scores in crossfit_scores.values():
        outliers |= score_outliers(scores, s.target_false_reject)
    if outliers.any():
        # 6 defects slipped among bottle's 209 good images had raised the threshold 24.2 -> 45.2 and let 34 of 57
        # defects through, silently: the threshold is set without them unless asked, and they are named.
        worst = max(crossfit_scores.values(), key=lambda x: float(np.max(x)))
        named = ", ".join(f"{images[i].name} ({float(worst[i]):.1f})" for i in np.flatnonzero(outliers)[:10])
        log(f"WARNING: {int(outliers.sum())} of {len(images)} good images score far above the others in "
            f"cross-fitting (robust z > {OUTLIER_Z:g} and > {OUTLIER_RATIO:g} x the threshold the core of the scores "
            f"gives; median "
            f"{float(np.median(worst)):.1f}): {named}{' ...' if outliers.sum() > 10 else ''}. They look like defects "
            "or another product among the good images: "
            + ("kept in the threshold (--keep-score-outliers). " if s.keep_score_outliers else
               "the threshold is set without them (--keep-score-outliers keeps them). ")
            + "They are still in the bank: look at them, remove any that is not a good part and fit again.")
    del all_feats, indexes

    manifest = {
        "schema_version": SCHEMA_VERSION if shift_16bit == SHIFT_16BIT else SCHEMA_VERSION_SHIFT_16BIT,
        "bundle_id": None,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "product": s.product or Path(data_dir).resolve().name,
        "bundle_version": s.bundle_version if s.bundle_version is not None else int(time.time()),
        "software": software_versions(),
        "backbone": {"name": s.backbone, "weights_sha256": backbone_mod.BACKBONES[s.backbone].sha256,
                     "weights_package": backbone_mod.BACKBONES[s.backbone].package.replace("_", "-") + "==0.1.0",
                     "padding": "TensorFlow SAME (asymmetric at stride 2), computed for the fixed input size", "taps": list(model.backbone.tap_blocks),
                     "tap_channels": list(model.backbone.channels), "tap_strides": [8, 16]},
        "geometry": {**geom.to_manifest(), "chosen": geom_info},
        "frame_quality": quality_band.to_manifest(),
        "preprocessing": {**NORMALIZATION, "shift_16bit": shift_16bit,
                          "from_16_bit": f"min(v >> {shift_16bit}, 255) for 16-bit pixels; 8-bit pixels as they are"},
        "features": {"input_norm": input_norm(s.input_norm),
                     "aggregation": aggregation(s.aggregation_size), "grid": list(grid), "dim": model.dim,
                     "full_dim": model.full_dim,
                     "projection": {"dim": s.projection_dim, "seed": s.seed, "kind": "random orthonormal (QR)"}
                     if s.projection_dim else None, "onnx": onnx_info},
        "score": {**scoring.SCORE_DEFINITION, "distance": "l2", "k": 1},
        "coreset": {"method": f"greedy k-center in random chunks of <= {CHUNK_PATCHES} patches",
                    "ratio": s.coreset_ratio, "projection_dim": s.coreset_projection_dim,
                    "seed": s.seed, "n_bank_images": len(images), "n_patches": len(images) * per_image,
                    "n_selected": int(n_select), "seconds": round(t_coreset, 2)},
        "index": {"library": "hnswlib", "dim": model.dim, **asdict(s.hnsw),
                  "note": "ef is not stored by hnswlib; the runtime sets ef_search on every load"},
        "variants": {name: {"model": models[name], "index": f"index_{name}.hnsw", "bank_size": int(len(banks[name])),
                            "threshold": 1.0} for name in banks},
        "default_variant": s.default_variant,
        "fit": {"data_dir": str(data_dir),
                "settings": {k: v for k, v in asdict(s).items() if k != "hnsw"},
                "bank_images": [p.name for p in images], "calibration_defects": [str(p) for p in defects],
                "calibration_defect_sha256": [sha256_file(p) for p in defects],
                "feature_seconds": round(t_feat, 2), "index_seconds": round(t_index, 2),
                "cross_fit_seconds": round(t_cross, 2), "cross_fit": crossfit_record,
                "score_outliers": {"images": [images[i].name for i in np.flatnonzero(outliers)],
                                   "rule": f"robust z > {OUTLIER_Z:g} and > {OUTLIER_RATIO:g} x the threshold the "
                                           "core of the scores gives, repeated on what is left "
                                           "(export.calibration.score_outliers)",
                                   "in_threshold": bool(s.keep_score_outliers)}},
        "files": {},
    }
    manifest["variants"]["int8"]["quantization"] = quant_info

    # Golden images: the frames as they arrive (full size, so the self-test runs decode and geometry too).
    (out / "golden").mkdir()
    n_good = max(1, s.n_golden - min(2, len(defects)))
    golden_src = [images[i] for i in np.linspace(0, len(images) - 1, n_good).round().astype(int)] + defects[:min(2, len(defects))]
    golden_files = []
    for i, src in enumerate(dict.fromkeys(golden_src)):
        name = f"golden/{i:02d}_{'defect' if src in defects else 'good'}.png"
        if is_16_bit(src):   # as it arrives: the self-test then reads it through preprocessing.shift_16bit too
            cv2.imwrite(str(out / name), cv2.imread(str(src), cv2.IMREAD_UNCHANGED))
        else:
            cv2.imwrite(str(out / name), cv2.cvtColor(load_image(src, shift_16bit), cv2.COLOR_RGB2BGR))
        golden_files.append(name)
    draft = Bundle(out, manifest)
    separation = {}
    bank_sample = images[:: max(1, len(images) // 32)]
    if s.choose_ef_seeded and s.hnsw.seed_step:
        # Only the heat map depends on it (the image score is exact either way), so the thresholds below do not.
        pipe = Pipeline(draft, precision=s.default_variant if s.default_variant in banks else None, knn="hnsw",
                        threads=2)
        excess = seeded_walk_excess(pipe, bank_sample[:8])
        ef, why = choose_ef_seeded(excess, s.hnsw.ef_seeded)
        manifest["index"]["ef_seeded"] = ef
        manifest["fit"]["ef_seeded_choice"] = {"chosen": ef, "reason": why, "images": min(8, len(bank_sample)),
                                               "mean_excess": {str(k): round(v, 6) for k, v in excess.items()}}
        log(f"seeded walk: ef_seeded {ef}: {why}")
    if not defects:
        # Probe 34: on varied grey parts the good-only threshold passed 58% (200 images) and 91% (30) of the
        # defects, and nothing in fit's output had said that it cannot know.
        log("no calibration defects: the threshold is set from good parts only; how many defects it passes is "
            "not known until `edge-export evaluate` scores defect images (a few per type with "
            "--calibration-defects set the threshold for them)")
    for name in banks:
        pipe = Pipeline(draft, precision=name, knn="hnsw", threads=2)
        defect_scores = np.array([calibration_score(pipe, p) for p in defects])
        bank_scores = np.array([pipe.score_rgb(pipe.load_image(p), str(p)).score for p in bank_sample])
        good_scores = crossfit_scores.get(name, bank_scores)
        v = manifest["variants"][name]
        used_mask = ~outliers if crossfit_scores and not s.keep_score_outliers else np.ones(len(good_scores), bool)
        sep = set_operating_point(v, name, good_scores[used_mask], defect_scores, bank_scores, s.target_false_reject,
                                  s.review_false_reject, s.defect_margin, s.seed, cross_fitted=bool(crossfit_scores),
                                  cross_fit_method=crossfit_record["method"] if crossfit_record else None,
                                  names=([p.name for p, u in zip(images, used_mask) if u]
                                         if len(good_scores) == len(images) else None),
                                  max_false_reject=s.max_false_reject)
        if sep is not None:
            separation[name] = sep
        if not used_mask.all():
            left_out_rate(v, name, good_scores, used_mask)
        v["cross_fit_scores"] = ({p.name: round(float(x), 5) for p, x in zip(images, good_scores)}
                                 if crossfit_scores else None)
        v["golden"] = [{"file": g, "score": pipe.score_rgb(pipe.load_image(out / g), g).score} for g in golden_files]
        v["golden_tolerance"] = {"relative": 1e-3 if name == "fp32" else 1e-2}
    manifest["default_variant"], manifest["default_variant_reason"] = choose_default_variant(s.default_variant, separation)
    log(f"default variant {manifest['default_variant']}: {manifest['default_variant_reason']}")
    clock.mark("operating_point_golden_manifest")
    manifest["fit"]["stages"] = clock.stages
    manifest["fit"]["cpu_seconds"] = round(sum(v["cpu_s"] for v in clock.stages.values()), 1)
    manifest["fit"]["seconds"] = round(time.time() - t_fit, 1)
    manifest["fit"]["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_manifest(out, manifest)
