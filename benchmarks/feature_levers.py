"""Feature-level screen of input levers on magnetic tile and bottle: torch FP32 features, the project's coreset,
hnswlib (ef 64) for magnetic tile and exact search for bottle. A screen, not the deployed path: it changes
what the fit cannot express yet (rotation, native scale, input contrast, taps) and shows which lever is worth a
fit option; a lever that wins here is then measured through fit + the deployed INT8 path (accuracy_levers.py).

    python benchmarks/feature_levers.py                         # every row not yet in the JSON
    python benchmarks/feature_levers.py --only tile/            # rows whose name starts with this
    python benchmarks/feature_levers.py --table                 # print the table from the JSON

Results: benchmarks/results/feature_levers.{json,md}. Each magnetic-tile row takes 2-15 min on 2 cores.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data"
TILE = DATA / "magnetic_tile" / "magnetic_tile"
BOTTLE = DATA / "mvtec_ad" / "bottle"
OUT = ROOT / "benchmarks" / "results" / "feature_levers"
IMAGENET = (np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32))

# name -> (data, settings, what changes). Settings: canvas (W, H); prep: resize | rotate (landscape frames
# turned upright, then resized) | native (no resampling: the network runs on each image's own size) | letterbox
# (aspect kept, padded with 127 to the canvas); taps: zero-based stage indices (export.backbone.TAP_STAGES);
# norm: native ((rgb - 127) / 128) | imagenet | gain g ((rgb - 127) * g / 128); backbone; ratio; score: max (the
# pinned image score) | avg3 (max of the 3 x 3-averaged patch grid); wide: depthwise | expand (the tap blocks' inner,
# expanded activations instead of their outputs); project: random orthonormal projection to this many dims.
ROWS: dict[str, tuple[Path, dict, str]] = {
    "tile/base": (TILE, {}, "240 x 272 resize, native statistics, lite0, 10% (the fit default)"),
    "tile/208x232": (TILE, {"canvas": (208, 232)}, "fewer pixels, 208 x 232"),
    "tile/176x200": (TILE, {"canvas": (176, 200)}, "fewer pixels, 176 x 200"),
    "tile/rotate": (TILE, {"prep": "rotate"}, "landscape frames turned upright before the resize"),
    "tile/native-scale": (TILE, {"prep": "native"}, "no resampling: each image at its own size"),
    "tile/imagenet": (TILE, {"norm": "imagenet"}, "ImageNet input statistics (2.2x contrast)"),
    "tile/gain-1.5": (TILE, {"norm": 1.5}, "contrast x1.5"),
    "tile/gain-0.5": (TILE, {"norm": 0.5}, "contrast x0.5"),
    "tile/lite2": (TILE, {"backbone": "lite2"}, "lite2 backbone"),
    "tile/coreset-25": (TILE, {"canvas": (208, 232), "ratio": 0.25}, "25% coreset (vs tile/208x232)"),
    "tile/letterbox": (TILE, {"prep": "letterbox"}, "aspect kept, padded to 240 x 272 (grey 127)"),
    "tile/taps-2+5": (TILE, {"taps": (2, 5)}, "taps stage 2 + stage 5 (stride 8 + 32, 40 + 192 ch) instead of 2 + 4"),
    "tile/taps-2+3": (TILE, {"taps": (2, 3)}, "taps stage 2 + stage 3 (stride 8 + 16, 40 + 80 ch) instead of 2 + 4"),
    # The three best single levers together (fourth session): do they add up?
    "tile/208x232+gain-0.5": (TILE, {"canvas": (208, 232), "norm": 0.5}, "208 x 232 and contrast x0.5"),
    "tile/208x232+gain-0.5+taps-2+5": (TILE, {"canvas": (208, 232), "norm": 0.5, "taps": (2, 5)},
                                       "208 x 232, contrast x0.5, taps 2 + 5"),
    "tile/208x232+gain-0.5+lite2": (TILE, {"canvas": (208, 232), "norm": 0.5, "backbone": "lite2"},
                                    "208 x 232, contrast x0.5, lite2"),
    # Image score = max of the patch grid after a 3 x 3 mean (isolated one-patch spikes of good parts count less
    # than coherent defects). Not the pinned score: measured to see whether a new score definition would pay.
    "tile/score-avg3": (TILE, {"score": "avg3"}, "image score: max of the 3 x 3-averaged patch grid"),
    "tile/208x232+score-avg3": (TILE, {"canvas": (208, 232), "score": "avg3"}, "208 x 232 and the 3 x 3-averaged max"),
    # Seventh session: the wide activations inside the tap blocks (PatchCore's WideResNet features are 1,536-d; ours
    # are the 152-d linear bottlenecks), randomly projected to 256-d as the paper projects to 1,024.
    "tile/wide-depthwise": (TILE, {"wide": "depthwise", "project": 256},
                            "tap blocks' depthwise outputs (240 + 672 ch, after ReLU6) instead of their block outputs, "
                            "random projection to 256-d"),
    "tile/wide-expand": (TILE, {"wide": "expand", "project": 256},
                         "tap blocks' expansion outputs (240 + 672 ch, after ReLU6), random projection to 256-d"),
    # Eighth session: nuisance the bank need not learn. Magnetic-tile images differ in brightness (mean grey 55-98
    # over the training set) and contrast (std 14-28); whitening weighs feature directions by how little good
    # parts vary along them (a Mahalanobis nearest neighbour); flipped copies of the good images widen the bank.
    "tile/intensity-mean": (TILE, {"intensity": "mean"}, "each image's mean grey moved to 68 (the set's median)"),
    "tile/intensity-std": (TILE, {"intensity": "std"}, "each image's mean and contrast moved to 68 and 20 (the set's medians)"),
    "tile/whiten-0.1": (TILE, {"whiten": 0.1}, "features whitened by the good patches' covariance (shrinkage 0.1)"),
    "tile/whiten-0.01": (TILE, {"whiten": 0.01}, "features whitened by the good patches' covariance (shrinkage 0.01)"),
    "tile/augment-flip": (TILE, {"augment": "flip"}, "bank from the good images and their left-right and up-down flips"),
    "tile/denoise-1pct": (TILE, {"denoise": 0.01}, "bank without the 1% of good patches farthest from every other "
                          "good image's patches (SoftPatch-style bank cleaning), then the coreset"),
    "tile/denoise-5pct": (TILE, {"denoise": 0.05}, "the same, without the farthest 5%"),
    "tile/ensemble-lite0+lite2": (TILE, {"ensemble": ("lite0", "lite2")},
                                  "lite0 and lite2 patch features side by side (152 + 168 = 320-d; the paper's ensemble)"),
    # Eleventh session: published PatchCore resizes to 256 and keeps the central 224 x 224 (its code's default for
    # every data set), so the outer 6% of each side is never scored. Does the gap to 0.979 sit in the borders?
    "tile/center-crop": (TILE, {"prep": "crop"}, "resized to 274 x 311 (x 8/7), the central 240 x 272 kept "
                         "(published PatchCore's resize 256 / crop 224)"),
    "tile/coreset-5": (TILE, {"ratio": 0.05}, "5% coreset"),
    "tile/coreset-2": (TILE, {"ratio": 0.02}, "2% coreset"),
    "tile/knn-3": (TILE, {"knn": 3}, "patch score: mean distance to its 3 nearest bank vectors"),
    # Nineteenth session: the aggregation neighbourhood on magnetic tile (5 x 5 was worse than 3 x 3; is 1 better, as
    # on bottle's pixel AUROC?), and stride-4 features (stage 1, 24 ch, 2 x 2-averaged onto the stride-8 grid) for
    # the thin cracks, the weakest defect type.
    # Twentieth session: the nearest neighbour by angle (cosine) instead of L2, the whole 152-d vector or each tap's
    # part on its own (40 + 112 channels): a patch's feature magnitude follows its contrast, which differs between
    # magnetic-tile images.
    "tile/l2norm": (TILE, {"l2norm": "all"}, "patch features scaled to unit length (cosine nearest neighbour)"),
    "tile/l2norm-taps": (TILE, {"l2norm": "taps"}, "each tap's part of the feature (40 + 112) scaled to unit length"),
    "tile/agg-1": (TILE, {"agg": 1}, "no local aggregation (each tap's own activations)"),
    "tile/stride4": (TILE, {"stride4": True}, "stage-1 (stride 4, 24 ch) features averaged 2 x 2 onto the stride-8 "
                     "grid, added to the two taps (176-d)"),
    "bottle/base": (BOTTLE, {"canvas": (256, 256), "exact": True, "pixel": True}, "256 x 256, native statistics (the fit default)"),
    "bottle/imagenet": (BOTTLE, {"canvas": (256, 256), "exact": True, "pixel": True, "norm": "imagenet"}, "ImageNet input statistics"),
    "bottle/320": (BOTTLE, {"canvas": (320, 320), "exact": True, "pixel": True}, "320 x 320"),
}


def to_input(img: np.ndarray, s: dict) -> np.ndarray:
    if s.get("prep") == "rotate" and img.shape[1] > img.shape[0]:
        img = np.ascontiguousarray(np.rot90(img))
    if s.get("prep") == "letterbox":
        (w, h), (ih, iw) = s.get("canvas", (240, 272)), img.shape[:2]
        scale = min(w / iw, h / ih)
        nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
        canvas = np.full((h, w, 3), 127, np.uint8)
        y0, x0 = (h - nh) // 2, (w - nw) // 2
        canvas[y0:y0 + nh, x0:x0 + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        img = canvas
    elif s.get("prep") == "crop":
        w, h = s.get("canvas", (240, 272))
        big = cv2.resize(img, (round(w * 8 / 7), round(h * 8 / 7)), interpolation=cv2.INTER_AREA)
        y0, x0 = (big.shape[0] - h) // 2, (big.shape[1] - w) // 2
        img = np.ascontiguousarray(big[y0:y0 + h, x0:x0 + w])
    elif s.get("prep") != "native":
        img = cv2.resize(img, s.get("canvas", (240, 272)), interpolation=cv2.INTER_AREA)
    norm = s.get("norm", "native")
    x = img.astype(np.float32)
    if s.get("intensity"):   # per-image brightness (and contrast) to the training set's medians
        x = x - x.mean() + 68 if s["intensity"] == "mean" else (x - x.mean()) * (20 / max(float(x.std()), 1.0)) + 68
    if norm == "imagenet":
        x = (x / 255 - IMAGENET[0]) / IMAGENET[1]
    else:
        x = (x - 127) * float(1.0 if norm == "native" else norm) / 128
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def images(data: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    train = sorted(p for p in (data / "train" / "good").iterdir() if p.is_file())
    tests = [(p, d.name) for d in sorted((data / "test").iterdir()) for p in sorted(d.iterdir()) if p.is_file()]
    return train, tests


def stride4_features(model, x):
    """The model's patch features with stage 1's output (stride 4; lite0's last 24-channel block) averaged 2 x 2
    onto the stride-8 grid and 3 x 3 aggregated like the taps, in front of them."""
    import torch
    import torch.nn.functional as F

    bb, stage1 = model.backbone, None
    with torch.no_grad():
        h = bb.stem(x)
        for blk in bb.blocks:
            h = blk(h)
            if h.shape[1] == 24 and h.shape[-1] * 4 >= x.shape[-1]:
                stage1 = h
        base = model(x)                                              # (1, h*w, D)
        rows, cols = model.grid((x.shape[-1], x.shape[-2]))
        f4 = F.avg_pool2d(stage1, 2, stride=2, ceil_mode=True)[..., :rows, :cols]
        f4 = F.avg_pool2d(f4, 3, stride=1, padding=1, count_include_pad=True)
        return torch.cat([f4.reshape(1, f4.shape[1], -1).transpose(1, 2), base], 2)


def wide_features(model, x, s: dict):
    """PatchCore's aggregation (3 x 3 mean, stride-16 map upsampled, concatenated) over the tap blocks' inner
    activations (`s["wide"]`: the depthwise or the expansion stage's ReLU6 output), projected to s["project"] dims."""
    import torch
    import torch.nn.functional as F

    bb = model.backbone
    caught = []
    hooks = [getattr(bb.blocks[i], s["wide"]).register_forward_hook(lambda _m, _i, out: caught.append(out))
             for i in bb.tap_blocks]
    try:
        bb(x)
    finally:
        for h in hooks:
            h.remove()
    f8, f16 = (F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=True) for f in caught)
    f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
    f = torch.cat([f8, f16], 1).flatten(2).transpose(1, 2)
    return f @ _projection(f.shape[-1], s["project"]) if s.get("project") else f


@functools.lru_cache(maxsize=None)
def _projection(dim: int, out: int):
    """A fixed random orthonormal (dim, out) matrix, made once per shape (seed 0, as export.patch_features)."""
    import torch

    q, _ = torch.linalg.qr(torch.randn(dim, out, generator=torch.Generator().manual_seed(0)))
    return q


def run_row(name: str) -> dict:
    import hnswlib
    import torch

    from export.coreset import greedy_coreset
    from export.metrics import auroc
    from export.patch_features import PatchFeatures

    import export.backbone as backbone

    data, s, _ = ROWS[name]
    torch.set_num_threads(2)
    taps = backbone.TAP_STAGES
    backbone.TAP_STAGES = tuple(s.get("taps", taps))   # read when the network is built
    try:
        model = PatchFeatures(s.get("ensemble", (s.get("backbone", "lite0"),))[0], aggregation_size=s.get("agg", 3))
    finally:
        backbone.TAP_STAGES = taps
    load = lambda p: cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)   # gray -> 3 equal channels

    others = [PatchFeatures(b) for b in s.get("ensemble", ())[1:]]

    def feats(p: Path) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(to_input(load(p), s))
            if others:
                return torch.cat([model(x)[0]] + [o(x)[0] for o in others], 1).numpy()
            if s.get("stride4"):
                return stride4_features(model, x)[0].numpy()
            return (wide_features(model, x, s) if s.get("wide") else model(x))[0].numpy()

    def train_feats(p: Path) -> list[np.ndarray]:
        if s.get("augment") != "flip":
            return [feats(p)]
        img = load(p)
        out = []
        for f in (None, 1, 0):   # as is, left-right, up-down
            with torch.no_grad():
                x = torch.from_numpy(to_input(img if f is None else np.ascontiguousarray(cv2.flip(img, f)), s))
                out.append(model(x)[0].numpy())
        return out

    if s.get("l2norm"):   # the nearest neighbour by angle: unit vectors (each tap's part on its own for "taps")
        feats_unnormed = feats

        def feats(p: Path) -> np.ndarray:
            f = feats_unnormed(p)
            parts = np.split(f, [40], axis=1) if s["l2norm"] == "taps" else [f]
            return np.concatenate([x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6) for x in parts], 1)

    train, tests = images(data)
    t0 = time.perf_counter()
    per_image = [np.concatenate(train_feats(p)) for p in train]
    bank_all = np.concatenate(per_image)
    owner = np.repeat(np.arange(len(per_image)), [len(f) for f in per_image])
    if s.get("whiten"):   # Mahalanobis: x -> (x - mean) C^-1/2 with C shrunk towards its mean eigenvalue
        mean = bank_all.mean(0)
        cov = np.cov((bank_all[::7] - mean).T).astype(np.float64)
        cov = (1 - s["whiten"]) * cov + s["whiten"] * np.trace(cov) / len(cov) * np.eye(len(cov))
        vals, vecs = np.linalg.eigh(cov)
        white = (vecs / np.sqrt(vals)).astype(np.float32)
        feats_raw = feats
        feats = lambda p: (feats_raw(p) - mean) @ white
        bank_all = (bank_all - mean) @ white
    n_bank = int(len(bank_all) * s.get("ratio", 0.1))
    if s.get("denoise"):
        # Each good patch's distance to the nearest bank patch of ANOTHER image (a first coreset bank, hnswlib k=32):
        # a patch no other good image resembles is a blemish or an artifact, which the farthest-point coreset would
        # otherwise keep first. The farthest `denoise` fraction is dropped before the coreset is drawn.
        first = greedy_coreset(bank_all, n_bank, progress=False)
        idx = hnswlib.Index("l2", bank_all.shape[1])
        idx.init_index(len(first), M=16, ef_construction=100)
        idx.add_items(bank_all[first], np.arange(len(first)))
        idx.set_ef(64)
        labels, d2 = idx.knn_query(bank_all, k=32)
        other = owner[first][labels] != owner[:, None]
        cross = np.where(other.any(1), d2[np.arange(len(d2)), other.argmax(1)], np.inf)
        keep = cross <= np.quantile(cross[np.isfinite(cross)], 1 - s["denoise"])
        bank_all = bank_all[keep]
    bank = np.ascontiguousarray(bank_all[greedy_coreset(bank_all, n_bank, progress=False)])
    t1 = time.perf_counter()
    if s.get("exact"):
        tb = torch.from_numpy(bank)
        nearest = lambda q: torch.cdist(torch.from_numpy(q), tb).min(1).values.numpy()
    else:
        index = hnswlib.Index("l2", bank.shape[1])
        index.init_index(len(bank), M=16, ef_construction=100)
        index.add_items(bank)
        index.set_ef(64)
        k = s.get("knn", 1)
        nearest = lambda q: np.sqrt(index.knn_query(q, k=k)[1]).mean(1)
    scores, pix_s, pix_l = [], [], []
    for p, kind in tests:
        d = nearest(feats(p))
        if s.get("score") == "avg3":
            w, h = s.get("canvas", (240, 272))
            grid = d.reshape(-(-h // 8), -(-w // 8)).astype(np.float32)
            scores.append(float(cv2.blur(grid, (3, 3), borderType=cv2.BORDER_REFLECT).max()))
        else:
            scores.append(d.max())
        if s.get("pixel"):   # the runtime's heat map: grid -> canvas (linear), Gaussian sigma 4, -> image size
            w, h = s["canvas"]
            grid = d.reshape(-(-h // 8), -(-w // 8)).astype(np.float32)
            heat = cv2.GaussianBlur(cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR), (33, 33), 4.0,
                                    borderType=cv2.BORDER_REFLECT)
            mask_path = data / "ground_truth" / kind / f"{p.stem}_mask.png"
            mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 127 if kind != "good" else None
            size = mask.shape[::-1] if mask is not None else cv2.imread(str(p)).shape[1::-1]
            pix_s.append(cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR).ravel()[::4])
            pix_l.append((mask if mask is not None else np.zeros(size[::-1], bool)).ravel()[::4])
    scores = np.array(scores)
    kinds = np.array([k for _, k in tests])
    good = kinds == "good"
    per_type = {k: round(auroc(np.r_[np.zeros(good.sum()), np.ones((kinds == k).sum())],
                               np.r_[scores[good], scores[kinds == k]]), 4) for k in sorted(set(kinds) - {"good"})}
    pixel = round(auroc(np.concatenate(pix_l), np.concatenate(pix_s)), 4) if pix_s else None
    return {"image_auroc": round(auroc(~good, scores), 4), "pixel_auroc": pixel, "per_type": per_type, "bank": len(bank),
            "train_patches": len(bank_all), "seconds": round(time.perf_counter() - t0, 1),
            "fit_seconds": round(t1 - t0, 1)}


def table(results: dict) -> str:
    lines = ["| row | change | image AUROC | pixel AUROC | per defect type | bank |", "|---|---|---|---|---|---|"]
    for name, (_, _, what) in ROWS.items():
        if name in results:
            r = results[name]
            per = ", ".join(f"{k} {v:.3f}" for k, v in r["per_type"].items())
            pix = f"{r['pixel_auroc']:.4f}" if r.get("pixel_auroc") is not None else ""
            lines.append(f"| {name} | {what} | {r['image_auroc']:.4f} | {pix} | {per} | {r['bank']} |")
    return "\n".join(lines) + ("\n\nFP32 torch features, 10% coreset unless said; magnetic tile searched with hnswlib ef 64, "
                               "bottle exactly. Same-setting repeats differ by up to ~0.006 (coreset chunks, HNSW).\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only rows whose name starts with this (default: all)")
    ap.add_argument("--table", action="store_true", help="print the table from the JSON and exit (default: off)")
    from bench_report import state_defaults   # every option's help states its default
    a = state_defaults(ap).parse_args()
    path = OUT.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    if not a.table:
        for name in ROWS:
            if name.startswith(a.only) and name not in results:
                print(f"row {name}", flush=True)
                results[name] = run_row(name)
                path.write_text(json.dumps(results, indent=1))
    text = table(results)
    OUT.with_suffix(".md").write_text("# Feature-level levers (benchmarks/feature_levers.py)\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
