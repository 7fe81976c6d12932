"""Loading a bundle into a pipeline: verify (checksums, signature, product, version), build, self-test.

Shared by every line of the daemon and by reloads; `release_freed_memory` hands a dropped pipeline's heap back.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

from edge_runtime.bundle import Bundle, BundleError, StationMismatch, read_regular
from edge_runtime.bundle_versions import load_station_bundle
from edge_runtime.bundle_policy import check_admission, record_loaded
from edge_runtime.config import StationConfig
from edge_runtime.features import FeatureError
from edge_runtime.pipeline import Pipeline
from edge_runtime.self_test import golden_check

log = logging.getLogger("edge_runtime.daemon")

__all__ = ["bundle_on_disk", "load_pipeline", "load_public_key", "release_freed_memory"]


# A raw ed25519 key is 32 bytes and a PEM one about 100: far more is not a key (and /dev/zero would never end).
KEY_FILE_MAX_BYTES = 64 * 1024


def load_public_key(path: str | None) -> bytes | None:
    if not path:
        return None
    raw = read_regular(Path(path), KEY_FILE_MAX_BYTES, "public key")
    if len(raw) == 32:
        return raw
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    return load_pem_public_key(raw).public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_pipeline(cfg: StationConfig, current: Bundle | None = None, load_threads: int | None = None) -> Pipeline:
    """Verify the bundle (checksums, optional signature), check product and version, build the pipeline and
    reproduce the golden scores. Raises BundleError with the reason.

    `current`: the bundle in service (a reload never goes below its version unless downgrades are allowed).
    `load_threads`: threads for loading and the self-test (a reload runs beside the inspection loop and must
    not take its cores); the pipeline returned always runs with `inference.frame_threads` (threads // workers).
    """
    try:
        key = load_public_key(cfg.security.bundle_public_key)
    except (OSError, ValueError, ImportError) as exc:
        raise BundleError(f"security.bundle_public_key {cfg.security.bundle_public_key}: cannot read key ({exc})") from None
    bundle = load_station_bundle(cfg, key)  # the active device-made version (page / adapt), else cfg.bundle
    sec = cfg.security
    if current is None and not sec.allow_downgrade and not cfg.state_dir:
        log.warning("security.allow_downgrade is false but no state_dir is set: an older bundle_version is refused "
                    "on reload, not across restarts")
    check_admission(bundle, sec.product, sec.allow_downgrade, cfg.state_dir, current,
                    scope=getattr(cfg, "floor_scope", None))
    check_station_against(cfg, bundle)
    inf = cfg.inference
    run_threads = inf.frame_threads
    threads = min(load_threads, run_threads) if load_threads else run_threads
    try:
        pipeline = Pipeline(bundle, precision=inf.precision, knn=inf.knn, threads=threads,
                            providers=inf.providers, ef_search=inf.ef_search, review_threshold=inf.review_threshold,
                            ivf_nprobe=inf.ivf_nprobe, position_prior=inf.position_prior)
    except FeatureError as exc:
        raise BundleError(str(exc)) from None
    # Golden scores were recorded with the bundle's own preprocessing, so the self-test runs before the
    # station's ROI override is applied.
    failures = golden_check(bundle, pipeline)
    if failures:
        raise BundleError("self-test failed: " + "; ".join(failures))
    if threads != run_threads:
        # Same verified model bytes, now with the configured threads; built, not run, so it costs no cores.
        try:
            pipeline.set_threads(run_threads, inf.providers)
        except FeatureError as exc:
            raise BundleError(str(exc)) from None
    bundle.release()  # onnxruntime and the search hold their own copies of the verified bytes now
    scope = getattr(cfg, "floor_scope", None)
    record_loaded(bundle, cfg.state_dir, scope.source if scope is not None else None)
    pipeline.apply_overrides(tuple(cfg.roi) if cfg.roi is not None else None, cfg.size_policy)
    pipeline.decode_limits = cfg.decode
    pipeline.frame_check = cfg.frame_check
    return pipeline


def bundle_on_disk(cfg: StationConfig) -> str:
    """The id of the bundle a load of `cfg` would take now, verified as a load verifies it (checksums of every
    file, signatures, descent); raises BundleError. A preloaded recipe is switched to only while this is still the
    id of the copy in memory: a new version installed in the recipe's folder is loaded instead, a damaged one
    fails the switch."""
    try:
        key = load_public_key(cfg.security.bundle_public_key)
    except (OSError, ValueError, ImportError) as exc:
        raise BundleError(f"security.bundle_public_key {cfg.security.bundle_public_key}: cannot read key ({exc})") from None
    bundle = load_station_bundle(cfg, key)
    bundle.release()
    return bundle.bundle_id


def check_station_against(cfg: StationConfig, bundle: Bundle) -> None:
    """What the station file overrides must suit the bundle: its ROI and size policy (Geometry.with_overrides) and
    its review threshold. Raises StationMismatch naming the key; `edge-runtime validate` runs the same check."""
    try:
        bundle.geometry.with_overrides(tuple(cfg.roi) if cfg.roi is not None else None, cfg.size_policy)
    except ValueError as exc:
        raise StationMismatch(f"station file {exc}") from None
    try:
        # inference.precision names a variant the bundle must hold: an int8-only bundle under `precision: fp32`
        # was "valid" at validate and then FAULTed every part (probe 66).
        variant = bundle.variant(cfg.inference.precision)
    except BundleError as exc:
        raise StationMismatch(f"station file inference.precision: {exc}") from None
    review = cfg.inference.review_threshold
    if review is not None:
        if not 0 < review < variant.threshold:
            raise StationMismatch(f"station file inference.review_threshold: {review} must lie between 0 and the "
                                  f"bundle's {variant.name} threshold {variant.threshold:.4f} (REVIEW is the band "
                                  "just below it)")
        if variant.review_threshold is not None and review > variant.review_threshold:
            # The bundle's band may be where fit put the calibration defects it could not make NG (--max-frr):
            # a narrower one from the station file (a leftover from the previous bundle) passed 4 of 5 as OK
            # (probe 38). Widening it is the station's choice; narrowing it is refitting.
            raise StationMismatch(f"station file inference.review_threshold: {review} is above the bundle's "
                                  f"{variant.name} REVIEW band, which starts at {variant.review_threshold:.4f}: "
                                  "parts between them would be OK; remove the key, or set it at or below that")


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc malloc_trim), after a reload dropped the old pipeline.

    onnxruntime and the search free a whole pipeline's worth of buffers at once; glibc keeps most of it mapped in
    its arenas, so without this the resident size climbs reload after reload (benchmarks/reload_memory.py).
    No-op where glibc is not the C library.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


