"""The device data path, in order: decode -> preprocess -> features -> search -> scores + heat map -> decision.

`Pipeline.inspect(frame)` is the whole inspection of one part. It never raises for a bad frame: anything that
stops a frame from being inspected becomes a FAULT result with the reason, never an OK.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edge_runtime import scoring
from edge_runtime.bundle import Bundle, BundleError, check_index_file
from edge_runtime.features import FeatureExtractor
from edge_runtime.nn_search import HnswSearch
from edge_runtime.decode import DecodeConfig, ImageError, decode_image, to_rgb
from edge_runtime.preprocess import crop_roi, preprocess, resize_square, to_tensor
from edge_runtime.records import Frame, InspectionResult, Verdict


@dataclass(frozen=True)
class Scored:
    score: float
    patch_scores: np.ndarray   # (grid_h * grid_w,)
    anomaly_map: np.ndarray    # image_size x image_size


def decide(score: float, threshold: float) -> Verdict:
    # NaN compares false with everything: it must land on NG, never OK.
    return Verdict.OK if score < threshold else Verdict.NG


class Pipeline:
    def __init__(self, bundle: Bundle, precision: str | None = None, knn: str = "hnsw", threads: int = 2,
                 providers: list[str] | None = None, ef_search: int | None = None):
        self.bundle = bundle
        self.decode_limits = DecodeConfig()  # the station file's `decode:` section replaces it (daemon)
        self.variant = bundle.variant(precision)
        self.prep = bundle.preprocessing
        self.grid = bundle.grid
        self.threshold = self.variant.threshold
        n_patches = self.grid[0] * self.grid[1]
        self.extractor = FeatureExtractor(bundle.path(self.variant.model_file),
                                          (n_patches, bundle.dim, self.prep.image_size), threads, providers)
        params = bundle.hnsw_params
        if ef_search is not None:
            params = type(params)(**{**params.__dict__, "ef_search": ef_search})
        index_path = bundle.path(self.variant.index_file)
        # Before hnswlib: it would load an index of another dimension without complaint and read garbage.
        check_index_file(index_path, bundle.dim, self.variant.info.get("bank_size"))
        try:
            hnsw = HnswSearch.load(index_path, bundle.dim, params, threads)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise BundleError(f"{index_path}: hnswlib cannot load the index ({exc})") from None
        if len(hnsw) != self.variant.info.get("bank_size", len(hnsw)):
            raise BundleError(f"{index_path}: index holds {len(hnsw)} vectors, manifest says {self.variant.info['bank_size']}")
        if knn == "hnsw":
            self.search = hnsw
        elif knn == "exact":
            self.search = hnsw.exact
        else:
            raise ValueError(f"knn must be 'hnsw' or 'exact', got {knn!r}")
        self.knn = knn

    # ---- the stages, callable one by one (evaluation and benchmarks use them directly) ----------------------
    def score_tensor(self, tensor: np.ndarray) -> Scored:
        patch_scores = self.search.distances(self.extractor(tensor))
        return Scored(scoring.image_score(patch_scores), patch_scores,
                      scoring.anomaly_map(patch_scores, self.grid, self.prep.image_size))

    def score_rgb(self, rgb: np.ndarray) -> Scored:
        return self.score_tensor(preprocess(rgb, self.prep))

    # ---- one part, timed ------------------------------------------------------------------------------------
    def inspect(self, frame: Frame) -> InspectionResult:
        timings: dict[str, float] = {}
        t_start = t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[stage] = (now - t) * 1000.0
            t = now

        rgb = None
        try:
            if frame.encoded is not None:
                rgb = decode_image(frame.encoded, frame.source, self.decode_limits)
            elif frame.image is not None:
                rgb = to_rgb(frame.image, frame.source)
            else:
                raise ImageError(f"{frame.source}: frame carries no image")
            lap("decode")
            rgb = crop_roi(rgb, self.prep.roi, frame.source)
            tensor = to_tensor(resize_square(rgb, self.prep.image_size))
            lap("preprocess")
            feats = self.extractor(tensor)
            lap("features")
            patch_scores = self.search.distances(feats)
            lap("search")
            score = scoring.image_score(patch_scores)
            heat = scoring.anomaly_map(patch_scores, self.grid, self.prep.image_size)
            lap("scoring")
            verdict = decide(score, self.threshold)
            norm = scoring.normalized_score(score, self.threshold)
            lap("decision")
            error = None
        except ImageError as exc:
            verdict, score, norm, heat, error = Verdict.FAULT, None, None, None, str(exc)
        except Exception as exc:  # an internal error must fault the part, not crash the station or pass it
            verdict, score, norm, heat, error = Verdict.FAULT, None, None, None, f"internal error: {type(exc).__name__}: {exc}"
        timings["total"] = (time.perf_counter() - t_start) * 1000.0
        return InspectionResult(frame_id=frame.frame_id, source=frame.source, verdict=verdict, score=score,
                                normalized_score=norm, threshold=self.threshold, timings_ms=timings,
                                bundle_id=self.bundle.bundle_id, error=error, anomaly_map=heat, image=rgb,
                                captured_at=frame.captured_at)
