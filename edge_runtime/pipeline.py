"""The device data path, in order: decode -> geometry -> frame quality -> preprocess -> features -> search -> scores
-> decision.

`Pipeline.inspect(frame)` is the whole inspection of one part. It never raises for a bad frame: anything that
stops a frame from being inspected becomes a FAULT result with the reason, never an OK.
Evaluation, calibration, the self-test and the torch reference call the same stage functions (`score_frame`,
`Pipeline.score_rgb`), so there is one implementation of what a score is.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from edge_runtime import decode, position_prior, scoring
from edge_runtime.bundle import Bundle, BundleError, check_index_file
from edge_runtime.decode import DecodeConfig, ImageError, decode_image, load_image, to_rgb
from edge_runtime.features import FeatureError, FeatureExtractor, make_session, model_input
from edge_runtime.frame_quality import FrameCheckConfig, QualityBand
from edge_runtime.frame_quality import check as check_frame
from edge_runtime.frame_quality import measure as measure_quality
from edge_runtime.geometry import cut_tiles, match_colour, region_of, to_canvas
from edge_runtime.int8_kernels import check_quantization
from edge_runtime.hnsw_graph import FaissHnswSearch, GraphError, read_hnsw_graph
from edge_runtime.nn_search import ExactSearch, HnswSearch, IvfSearch, OnnxExactSearch, patch_scores
from edge_runtime.preprocess import canvas_of, preprocess, to_tensor
from edge_runtime.records import Frame, InspectionResult, Verdict
from edge_runtime.scoring import decide  # noqa: F401  (the decision stage, re-exported with the pipeline)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    score: float
    patch_scores: np.ndarray   # (n_tiles * grid_h * grid_w,)
    anomaly_map: np.ndarray    # float32, the inspected region's own h x w


def score_frame(score_tiles, geometry, rgb: np.ndarray, name: str = "<frame>") -> Scored:
    """The one scoring path for a decoded frame: geometry -> tensor -> `score_tiles` -> image score + heat map.

    `score_tiles` maps (n_tiles, 3, H, W) float32 to per-patch scores; the deployed pipeline and the torch
    reference plug in their own, everything else is shared.
    """
    tensor, place, region_hw = preprocess(rgb, geometry, name)
    patch_scores = score_tiles(tensor)
    return Scored(scoring.image_score(patch_scores), patch_scores,
                  scoring.anomaly_map(patch_scores, geometry, place, region_hw))


def open_search(knn: str, index_bytes: bytes, dim: int, params, threads: int, providers: list[str] | None,
                ivf_nprobe: int | None, index_path) -> tuple[object, str]:
    """The search stage over the bundle's verified index bytes: (search, the engine actually used).

    hnsw: the bundle's graph in faiss (edge_runtime.hnsw_graph), falling back to hnswlib where faiss is missing;
    hnswlib: the same graph in hnswlib; exact / onnx / ivf: built on the device from the graph's vectors.
    Raises BundleError naming the index file."""
    def in_hnswlib(missing: str) -> HnswSearch:
        try:
            return HnswSearch.load(index_bytes, dim, params, threads)   # checked by read_hnsw_graph first
        except ImportError:
            raise BundleError(f"{index_path}: {missing}") from None
        except GraphError as exc:
            raise BundleError(f"{index_path}: not a usable HNSW index ({exc})") from None
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise BundleError(f"{index_path}: hnswlib cannot load the index ({exc})") from None

    if knn == "hnswlib":
        return in_hnswlib("knn: hnswlib needs hnswlib: pip install 'patchcore-edge[hnswlib]' (or use knn: hnsw, "
                          "the same graph in faiss)"), knn
    if knn not in ("hnsw", "exact", "onnx", "ivf"):
        raise ValueError(f"knn must be 'hnsw', 'hnswlib', 'exact', 'onnx' or 'ivf', got {knn!r}")
    try:
        graph = read_hnsw_graph(index_bytes, dim)
        if knn == "hnsw":
            return FaissHnswSearch(graph, params, threads), knn
    except GraphError as exc:
        raise BundleError(f"{index_path}: not a usable HNSW index ({exc})") from None
    except ImportError as exc:   # faiss is a core dependency; without it, the same graph in hnswlib
        search = in_hnswlib(f"{exc}; hnswlib (the fallback) is not installed either")
        log.warning("%s: %s; searching the graph with hnswlib instead", index_path, exc)
        return search, "hnswlib"
    if knn == "exact":
        return ExactSearch(graph.vectors), knn
    if knn == "onnx":
        try:
            return OnnxExactSearch(graph.vectors, threads, providers), knn
        except FeatureError as exc:
            raise BundleError(f"{index_path}: exact search graph cannot run here ({exc})") from None
    try:  # ivf: built here from the verified bank (never shipped); one faiss thread, see IvfSearch
        return IvfSearch(graph.vectors, nprobe=ivf_nprobe), knn
    except ImportError as exc:
        raise BundleError(f"{index_path}: ivf search cannot run here ({exc})") from None


class Pipeline:
    """One bundle variant, ready to inspect: ONNX session + search + thresholds.

    Raises BundleError (or FeatureError) when the bundle's model or index cannot be used on this device.
    `geometry_overrides` carries the station file's ROI / size policy (the tiling itself is the bundle's).
    """

    def __init__(self, bundle: Bundle, precision: str | None = None, knn: str = "hnsw", threads: int = 2,
                 providers: list[str] | None = None, ef_search: int | None = None,
                 review_threshold: float | None = None, ivf_nprobe: int | None = None,
                 seed_step: int | None = None, ef_seeded: int | None = None, position_prior: bool = True):
        self.bundle = bundle
        self.threads = threads          # this inspection's cores: onnxruntime, the search, the geometry's resample
        self.decode_limits = DecodeConfig()  # the station file's `decode:` section replaces it (daemon)
        self.frame_check = FrameCheckConfig()  # and its `frame_check:` section this
        # The training frames' brightness, sharpness and noise; None for a bundle fitted before they were recorded.
        self.quality_band = QualityBand.from_manifest(bundle.manifest.get("frame_quality"))
        if self.quality_band is None and "frame_quality" in bundle.manifest:
            log.warning("%s: the manifest's frame_quality is malformed: the frame check and the brightness, "
                        "sharpness and noise drift warnings are off for this bundle", bundle.root)
        self.variant = bundle.variant(precision)
        self.geometry = bundle.geometry
        self.grid = bundle.grid
        self.threshold = self.variant.threshold
        self.review_threshold = review_threshold if review_threshold is not None else self.variant.review_threshold
        if self.review_threshold is not None and not 0 < self.review_threshold < self.threshold:
            raise BundleError(f"review_threshold {self.review_threshold} must lie in (0, threshold {self.threshold})")
        g = self.geometry
        # Before the model: an INT8 model this machine would compute differently (an x86 CPU without VNNI and a
        # model with full 8-bit weights) scores every part against a bank of other features. FeatureError.
        check_quantization(self.variant.info.get("quantization"), providers, str(bundle.path(self.variant.model_file)))
        # The verified bytes, not the paths: a file replaced on disk after the check is never loaded.
        self.extractor = FeatureExtractor(bundle.read_verified(self.variant.model_file),
                                          (self.grid[0] * self.grid[1], bundle.dim, g.input_size, g.n_tiles),
                                          threads, providers, name=bundle.path(self.variant.model_file))
        self._check_input_channels()
        params = bundle.hnsw_params
        overrides = {k: v for k, v in (("ef_search", ef_search), ("seed_step", seed_step), ("ef_seeded", ef_seeded))
                     if v is not None}
        if overrides:   # benchmarks and evaluation only; a station takes the bundle's (but for ef_search)
            params = replace(params, **overrides)
        index_path = bundle.path(self.variant.index_file)
        index_bytes = bundle.read_verified(self.variant.index_file)
        # Before any reader: hnswlib would load an index of another dimension without complaint and read garbage.
        check_index_file(index_bytes, bundle.dim, self.variant.info.get("bank_size"), name=index_path)
        self.search, knn = open_search(knn, index_bytes, bundle.dim, params, threads, providers, ivf_nprobe, index_path)
        if len(self.search) != self.variant.info.get("bank_size", len(self.search)):
            raise BundleError(f"{index_path}: index holds {len(self.search)} vectors, manifest says {self.variant.info['bank_size']}")
        if hasattr(self.search, "set_grid"):   # the seeded walk reads queries as tiles of this patch grid
            self.search.set_grid(*self.grid)
        self.knn = knn
        self.prior_note = self._attach_prior() if position_prior else "off"

    def _check_input_channels(self) -> None:
        """The manifest pins the pixel channels its INT8 graph takes (3, or 4 with the widened stem): a model of
        another count is not the one the bundle was fitted with. Older manifests pin none."""
        quant = self.variant.info.get("quantization")
        pinned = quant.get("input_channels") if isinstance(quant, dict) else None
        if pinned is not None and self.extractor.takes_pixels and pinned != self.extractor.channels:
            raise BundleError(f"{self.bundle.path(self.variant.model_file)}: the model takes "
                              f"{self.extractor.channels} pixel channels, the manifest's "
                              f"variants.{self.variant.name}.quantization.input_channels says {pinned!r}")

    def set_threads(self, threads: int, providers: list[str] | None = None) -> None:
        """Run on `threads` cores from now on: a new onnxruntime session from the same verified model bytes (built,
        not run), the search's threads, the geometry's resample. Raises FeatureError."""
        model = self.variant.model_file
        self.extractor.session = make_session(self.bundle.read_verified(model), threads, providers,
                                              self.bundle.path(model))
        set_search_threads = getattr(self.search, "set_threads", None)
        if set_search_threads is not None:
            set_search_threads(threads)
        self.threads = threads

    def _attach_prior(self) -> str:
        """The search's position prior from this variant's golden images (edge_runtime.position_prior); what
        became of it, in words. It changes how long a part takes, never its score."""
        set_prior = getattr(self.search, "set_prior", None)
        if set_prior is None:
            return f"not used by knn: {self.knn}"
        feats = []
        for g in self.variant.golden:
            rel = g.get("file") if isinstance(g, dict) else None
            # A golden defect (edge-export fit keeps two of the calibration defects as golden images) is no part of
            # where good parts' patches land: with two of four golden images so unlike the good ones that nothing is
            # left open on them, a texture's median passed FIT_SHARE and every good part paid the prior, then the
            # full walk (magnetic tile fitted with a break and an uneven: search p50 5.0 -> 7.0 ms).
            if isinstance(g, dict) and isinstance(g.get("score"), (int, float)) and \
                    scoring.decide(float(g["score"]), self.threshold, self.review_threshold) is not Verdict.OK:
                continue
            try:
                # Bundle data, decoded as the self-test decodes it (no station decode limits: not a camera's frame).
                rgb = decode.decode_image(self.bundle.read_verified(rel), str(self.bundle.path(rel)),
                                          shift_16bit=self.bundle.shift_16bit)
                feats.append(self.extractor(preprocess(rgb, self.geometry, rel, self.threads)[0]))
            except Exception as exc:   # the self-test reports a bad golden image; here it only sits out
                log.debug("%s: golden image %s left out of the position prior: %s", self.bundle.root, rel, exc)
        prior, note = position_prior.build(self.search, feats, self.grid)
        renumber = getattr(self.search, "renumber", None)
        if prior is not None and renumber is not None and self.search.RENUMBER_FOR_PRIOR:
            prior = renumber(prior)[prior]   # its rows laid out together (FaissHnswSearch.renumber)
        # The lowest score this station does not pass: a part over it after a few walks starts from its worst patch.
        lowest = self.review_threshold if self.review_threshold is not None else self.threshold
        set_prior(prior, defect_above=lowest)
        return ("on: " if prior is not None else "off: ") + note

    def apply_overrides(self, roi: tuple[int, int, int, int] | None = None, size_policy: str | None = None) -> None:
        """The station file's ROI (same size as the bundle's region) and size policy."""
        self.geometry = self.geometry.with_overrides(roi, size_policy)

    # ---- the stages, callable one by one (evaluation, calibration and the self-test use them) ----------------
    def score_tiles(self, tensor: np.ndarray) -> np.ndarray:
        """(n_tiles, 3, H, W) -> per-patch scores (n_tiles * rows * cols,), as the station scores them: the
        position prior's where it fits the part (nn_search.patch_scores)."""
        return patch_scores(self.search, self.extractor(tensor))

    def load_image(self, path) -> np.ndarray:
        """An image file decoded as this bundle's frames are (its 16-bit pin): for evaluation and calibration."""
        return load_image(path, self.bundle.shift_16bit)

    def score_rgb(self, rgb: np.ndarray, name: str = "<frame>") -> Scored:
        return score_frame(self.score_tiles, self.geometry, rgb, name)

    def refuse_quality(self, quality, name: str) -> None:
        """ImageError when the frame check (the station file's `frame_check:`) refuses a frame of this quality."""
        if self.quality_band is not None and self.frame_check.enabled:
            refused = check_frame(quality, self.quality_band, self.frame_check)
            if refused is not None:   # not a frame this bank can judge: never OK, never NG by accident
                raise ImageError(f"{name}: frame check: {refused}")

    def check_rgb(self, rgb: np.ndarray, name: str = "<frame>") -> None:
        """ImageError when inspect() would FAULT this decoded frame before scoring it (its frame check): evaluate
        and the calibration defects call it before score_rgb, so they score only what a station scores."""
        if self.quality_band is not None and self.frame_check.enabled:
            self.refuse_quality(measure_quality(canvas_of(rgb, self.geometry, name)[0]), name)

    # ---- one part, timed ------------------------------------------------------------------------------------
    def inspect(self, frame: Frame) -> InspectionResult:
        timings: dict[str, float] = {}
        t_start = t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[stage] = (now - t) * 1000.0
            t = now

        region = quality = None
        try:
            if frame.unreadable is not None:
                raise ImageError(f"{frame.source}: {frame.unreadable}")
            if frame.encoded is not None:
                rgb = decode_image(frame.encoded, frame.source, self.decode_limits, self.bundle.shift_16bit)
            elif frame.image is not None:
                rgb = to_rgb(frame.image, frame.source, shift_16bit=self.bundle.shift_16bit)
            else:
                raise ImageError(f"{frame.source}: frame carries no image")
            lap("decode")
            region = region_of(rgb, self.geometry, frame.source)
            canvas, place = to_canvas(match_colour(region, self.geometry, frame.source), self.geometry,
                                      frame.source, self.threads)
            tiles = cut_tiles(canvas, self.geometry)
            lap("geometry")
            quality = measure_quality(canvas)
            self.refuse_quality(quality, frame.source)
            lap("quality")
            # An INT8 graph that takes the pixels needs no float tensor (FeatureExtractor.takes_pixels); a 4-channel
            # one gets RGBA here (features.model_input).
            tensor = (model_input(tiles, True, self.extractor.channels) if self.extractor.takes_pixels
                      else to_tensor(tiles))
            lap("preprocess")
            feats = self.extractor(tensor)
            if not np.isfinite(feats).all():
                # A broken model or input: a NaN reaches the searches as an empty argmin (a FAULT reading "internal
                # error: ValueError") or as a NaN score (NG); the part is a FAULT that says what went wrong.
                bad = int(feats.size - np.count_nonzero(np.isfinite(feats)))
                raise FeatureError(f"{frame.source}: the features model gave {bad} non-finite value(s) (NaN or "
                                   "inf): the model or its input is broken")
            lap("features")
            scores = patch_scores(self.search, feats)    # the maximum exact: the image score
            score = scoring.image_score(scores)
            lap("search")
            # Made on first read, after the verdict has gone to the line (InspectionResult.anomaly_map).
            heat = functools.partial(scoring.anomaly_map, scores, self.geometry, place, region.shape[:2])
            lap("scoring")
            verdict = scoring.decide(score, self.threshold, self.review_threshold)
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
                                bundle_id=self.bundle.bundle_id, error=error, anomaly_map=heat, image=region,
                                captured_at=frame.captured_at, review_threshold=self.review_threshold,
                                quality=quality)


__all__ = ["Pipeline", "Scored", "decide", "score_frame"]
