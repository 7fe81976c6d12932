"""The model bundle: the one contract between the exporter and the device (read, write, verify).

A bundle is a directory: manifest.yaml + ONNX feature extractors + HNSW indexes + golden images. The manifest
records everything needed to reproduce a score and the sha256 of every other file; nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from edge_runtime.nn_search import EF_MAX, HnswParams
from edge_runtime.decode import SHIFT_16BIT
from edge_runtime.geometry import Geometry
from edge_runtime.safe_yaml import YamlRefused, clip, load_strict, short_repr

# 2: input geometry (non-square input, tiles, size policy) replaced the square image_size; review band.
# 3: geometry.resample (region -> canvas) may be "halve-area": a runtime that reads only 2 would resample such a
#    bundle's frames differently from its fit, so it must refuse it, and does.
# 4: preprocessing.shift_16bit other than 8 (16-bit frames of narrower data): a runtime that reads only 3 would
#    take their top byte, nearly black, so fit writes 4 for such bundles only, and 3 otherwise.
SCHEMA_VERSION = 3                      # what the exporter writes
SCHEMA_VERSION_SHIFT_16BIT = 4          # ... for a bundle whose shift_16bit is not 8
READABLE_SCHEMA_VERSIONS = (2, 3, 4)    # what this runtime reads
MANIFEST = "manifest.yaml"
SIGNATURE = "manifest.sig"
# A manifest is a few kB; refusing anything this large keeps a hostile file from exhausting memory in the parser.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The score is an L2 distance (every search engine, the exact re-check and the thresholds measure L2); an index of
# another space would give hnswlib neighbours by another metric than the one scored.
HNSW_SPACES = ("l2",)


class BundleError(RuntimeError):
    """The bundle cannot be used; the message names the file and the cause (bounded in length)."""

    def __init__(self, message: str) -> None:
        super().__init__(clip(str(message)))


class StationMismatch(BundleError):
    """The bundle is sound but the station file asks what it cannot do (an ROI or size policy that would fault
    every frame or show the model what it was not fitted on, a review threshold above the threshold); the message
    names the station file's key."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_member(root: Path, rel: str) -> Path:
    """Resolve a manifest-relative path, refusing anything that escapes the bundle directory.

    Refused: absolute paths, '..', backslashes, NUL bytes, and symlinks (of the file or of a folder on the way)
    that resolve outside the bundle, so a bundle can never make the device read or verify a file elsewhere.
    """
    if not isinstance(rel, str):
        raise BundleError(f"{root / MANIFEST}: file path {short_repr(rel)} is not a string")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel or "\0" in rel:
        raise BundleError(f"{root / MANIFEST}: file path {short_repr(rel)} is not a plain relative path inside the bundle")
    try:
        full = (root / p).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise BundleError(f"{root / MANIFEST}: file path {short_repr(rel)} cannot be resolved ({exc})") from None
    if not full.is_relative_to(root.resolve()):
        raise BundleError(f"{root / MANIFEST}: file path {short_repr(rel)} resolves outside the bundle ({full})")
    return full


def read_regular(path: Path, limit: int | None, what: str) -> bytes:
    """All bytes of regular file `path` (one open, no FIFO or device), refusing more than `limit` bytes."""
    try:
        # O_NONBLOCK: opening a FIFO planted in the bundle must not block the daemon; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise BundleError(f"{path}: {what} is missing") from None
        raise BundleError(f"{path}: cannot open {what} ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        os.close(fd)   # checked before fdopen, which raised IsADirectoryError for a folder (probe 100)
        raise BundleError(f"{path}: {what} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if limit is not None and st.st_size > limit:
            raise BundleError(f"{path}: {what} is {st.st_size} bytes, over the {limit} bytes expected")
        try:
            data = fh.read() if limit is None else fh.read(limit + 1)
        except OSError as exc:
            raise BundleError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if limit is not None and len(data) > limit:  # grew after fstat
        raise BundleError(f"{path}: {what} is over the {limit} bytes expected")
    return data


def verify_manifest_signature(root: Path, raw: bytes, public_key: bytes) -> None:
    """Check manifest.sig (ed25519) over the raw manifest bytes; raises BundleError. Runs before any parsing."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        raise BundleError("a bundle public key is configured but the 'cryptography' package is not installed") from None
    sig_path = root / SIGNATURE
    if not sig_path.is_file():
        raise BundleError(f"{sig_path}: signature is missing and a public key is configured")
    safe_member(root, SIGNATURE)
    signature = read_regular(sig_path, 1024, "signature")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, raw)
    except (InvalidSignature, ValueError):
        raise BundleError(f"{sig_path}: ed25519 signature does not verify against the configured key") from None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# hnswlib's saved-index header (hnswalg.h saveIndex): offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData (size_t); maxlevel (int); enterpoint (uint);
# maxM, maxM0, M (size_t); mult (double); ef_construction (size_t). Little-endian on every supported board.
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def check_index_file(source: Path | bytes, dim: int, count: int | None = None, name: str | Path | None = None) -> None:
    """Refuse an HNSW index whose header disagrees with the manifest, before hnswlib reads it.

    `source` is the index file or its bytes (the verified bytes the device then loads); `name` names it in
    errors. hnswlib itself trusts the dimension it is given: an index saved with another dim loads
    "successfully" and then reads vectors across element boundaries (garbage scores, or a read past the
    buffer). The vector size is recoverable from the header (label_offset - offsetData = dim * 4 bytes), so
    check it here. Raises BundleError.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        path = name or "<index bytes>"
        head, size = bytes(source[:_HNSW_HEADER.size]), len(source)
    else:
        path = name or source
        try:
            with open(source, "rb") as fh:
                head = fh.read(_HNSW_HEADER.size)
                size = fh.seek(0, 2)
        except OSError as exc:
            raise BundleError(f"{path}: cannot read the index ({exc.strerror or exc})") from None
    if len(head) < _HNSW_HEADER.size:
        raise BundleError(f"{path}: index is {size} bytes, too short for an hnswlib header (truncated or not an index)")
    (offset_level0, max_elements, count_in_file, per_element, label_offset, offset_data,
     _max_level, _enter, _max_m, _max_m0, _m, _mult, _efc) = _HNSW_HEADER.unpack(head)
    vector_bytes = label_offset - offset_data
    # hnswlib writes cur_element_count elements but allocates max_elements on load: a header claiming far more
    # room than it holds would make the device allocate for it (the exporter writes max == count).
    if (offset_level0 != 0 or count_in_file > max_elements or max_elements > 2 * count_in_file
            or label_offset <= offset_data or vector_bytes % 4 or per_element != label_offset + 8
            or size < _HNSW_HEADER.size + count_in_file * per_element):
        raise BundleError(f"{path}: not a valid hnswlib index (inconsistent header or truncated)")
    if vector_bytes // 4 != dim:
        raise BundleError(f"{path}: index holds {vector_bytes // 4}-d vectors, but the manifest's features.dim "
                          f"(the model's output) is {dim}")
    if count is not None and count_in_file != count:
        raise BundleError(f"{path}: index holds {count_in_file} vectors, manifest says bank_size {count}")


@dataclass(frozen=True)
class Variant:
    """One deployable extractor (fp32 or int8) with the memory bank and threshold built from its own features."""

    name: str
    model_file: str
    index_file: str
    threshold: float
    info: dict

    @property
    def review_threshold(self) -> float | None:
        """Lower edge of the review band (REVIEW when review_threshold <= score < threshold); None: no band."""
        r = self.info.get("review_threshold")
        return None if r is None else float(r)

    @property
    def golden(self) -> list[dict]:
        return self.info.get("golden", [])


class Bundle:
    def __init__(self, root: Path, manifest: dict):
        """A bundle in memory. Use `Bundle.load` on the device; direct construction is the exporter's draft."""
        self.root = Path(root)
        self.manifest = manifest
        self._pinned = False                     # set by load(): every file read must match the manifest
        self.base_release: int | None = None     # a device-made version's base bundle_version (release_version)
        self._verified: dict[str, bytes] = {}    # rel path -> the verified bytes handed to the consumers

    # ---- reading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, verify: bool = True, public_key: bytes | None = None) -> "Bundle":
        """Read, authenticate and check a bundle directory.

        The directory is resolved once, here; every later read is relative to that resolved path. With
        `public_key`, the ed25519 signature is checked over the raw manifest bytes BEFORE they are parsed, so an
        unsigned manifest never reaches the YAML parser. With `verify`, every listed file is read once, hashed,
        and its bytes kept for `read_verified` (what the consumers load is what was hashed).
        Raises BundleError naming the file and the cause.
        """
        try:
            root = Path(root).resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            raise BundleError(f"{short_repr(str(root))}: bundle directory cannot be resolved ({exc})") from None
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: bundle directory does not exist")
        if not mpath.is_file():
            raise BundleError(f"{mpath}: manifest is missing")
        safe_member(root, MANIFEST)  # a manifest symlinked from elsewhere is not this bundle's manifest
        raw = read_regular(mpath, MAX_MANIFEST_BYTES, "manifest")
        if public_key is not None:
            verify_manifest_signature(root, raw, public_key)
        try:
            manifest = load_strict(raw, str(mpath))
        except YamlRefused as exc:
            raise BundleError(str(exc)) from None
        except yaml.YAMLError as exc:
            raise BundleError(f"{mpath}: manifest is not valid YAML ({exc})") from None
        except (ValueError, RecursionError) as exc:  # e.g. an impossible date, or nesting deeper than the parser
            raise BundleError(f"{mpath}: manifest cannot be parsed ({type(exc).__name__}: {exc})") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath}: manifest is not a mapping")
        version = manifest.get("schema_version")
        if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
            raise BundleError(f"{mpath}: schema_version {short_repr(version)} is not supported (this runtime reads "
                              f"{' and '.join(map(str, READABLE_SCHEMA_VERSIONS))}; refit the bundle with this "
                              "release's edge-export)")
        for key in ("bundle_id", "geometry", "features", "score", "index", "variants", "default_variant", "files"):
            if key not in manifest:
                raise BundleError(f"{mpath}: required key {short_repr(key)} is missing")
        bundle = cls(root, manifest)
        bundle._pinned = True
        bundle._check_identity()
        if verify:
            bundle.verify_files()
        bundle._check_consistency()
        return bundle

    def _file_meta(self, rel: str) -> dict:
        files = self.manifest.get("files")
        meta = files.get(rel) if isinstance(files, dict) else None
        if not isinstance(meta, dict) or not _SHA256.match(str(meta.get("sha256"))) \
                or not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool) or meta["bytes"] < 0:
            raise BundleError(f"{self.root / MANIFEST}: files.{short_repr(rel)} must be {{sha256: <64 hex>, bytes: <int>}}, "
                              f"got {short_repr(meta)}")
        return meta

    def read_verified(self, rel: str) -> bytes:
        """The bytes of bundle file `rel`, read once and checked against the manifest's size and sha256.

        The same bytes object is returned on every call until `release()`, so the model onnxruntime parses, the
        index hnswlib loads and the golden images the self-test decodes are exactly the bytes that were hashed:
        replacing a file on disk after the check changes nothing. A file the manifest does not list is refused,
        except in a draft bundle the exporter builds in memory (not made by `load`) before it writes the
        checksums. Raises BundleError naming the file.
        """
        cached = self._verified.get(rel)
        if cached is not None:
            return cached
        path = safe_member(self.root, rel)
        files = self.manifest.get("files")
        if not self._pinned and not (isinstance(files, dict) and rel in files):
            data = read_regular(path, None, "file")
        else:
            meta = self._file_meta(rel)
            data = read_regular(path, meta["bytes"], "file listed in the manifest")
            if len(data) != meta["bytes"]:
                raise BundleError(f"{path}: size {len(data)} bytes, manifest says {meta['bytes']} (truncated or replaced)")
            actual = hashlib.sha256(data).hexdigest()
            if actual != meta["sha256"]:
                raise BundleError(f"{path}: sha256 {actual} does not match the manifest ({meta['sha256']}): "
                                  "file was modified")
        self._verified[rel] = data
        return data

    def release(self) -> None:
        """Drop the verified bytes kept for the consumers (they hold their own copies once loaded)."""
        self._verified.clear()

    def verify_files(self) -> None:
        """Read and check every file the manifest lists (size and sha256); keeps the bytes for read_verified."""
        files = self.manifest["files"]
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{self.root / MANIFEST}: 'files' must list every bundle file with its sha256")
        self._verified.clear()  # re-read everything: a second verification must look at the disk again
        for rel in files:
            self.read_verified(rel)

    def verify_signature(self, public_key: bytes, raw: bytes | None = None) -> None:
        """ed25519 signature of manifest.yaml (which pins every other file by sha256)."""
        if raw is None:
            raw = read_regular(self.root / MANIFEST, MAX_MANIFEST_BYTES, "manifest")
        verify_manifest_signature(self.root, raw, public_key)

    def _check_identity(self) -> None:
        """The bundle id is the hash of the manifest's content (write_manifest): a manifest edited after export
        (a threshold raised, a file's checksum swapped) no longer matches the id it claims, so it cannot pass as
        the bundle that was verified and recorded under that id. Someone who also recomputes the id gets a new id,
        which the records show; only a signature (security.bundle_public_key) makes a manifest unforgeable."""
        stated = self.manifest["bundle_id"]
        try:
            actual = content_id(self.manifest)
        except (TypeError, ValueError, RecursionError) as exc:   # a value JSON cannot hold (a date, binary)
            raise BundleError(f"{self.root / MANIFEST}: content cannot be hashed to check bundle_id "
                              f"({type(exc).__name__}: {str(exc)[:120]})") from None
        if str(stated) != actual:
            raise BundleError(f"{self.root / MANIFEST}: content does not match bundle_id {short_repr(stated)} "
                              f"(its hash is {actual}): the manifest was edited after export; re-export or "
                              "recalibrate the bundle with edge-export instead of editing it")

    def _check_consistency(self) -> None:
        """Types and cross-references of the manifest, so a bad manifest fails here with its key, not later."""
        m = self.manifest
        where = self.root / MANIFEST

        def section(key: str) -> dict:
            if not isinstance(m[key], dict):
                raise BundleError(f"{where}: {short_repr(key)} must be a mapping, got {type(m[key]).__name__}")
            return m[key]

        files = m["files"]
        if not isinstance(files, dict):
            raise BundleError(f"{where}: 'files' must map each bundle file to its sha256")
        # Optional (older bundles lack them): release order and the product the bundle inspects.
        if "bundle_version" in m and not (isinstance(m["bundle_version"], int) and not isinstance(m["bundle_version"], bool)
                                          and 0 <= m["bundle_version"] < 2**63):
            raise BundleError(f"{where}: bundle_version must be a non-negative integer, got {short_repr(m['bundle_version'])}")
        if "product" in m and not (isinstance(m["product"], str) and m["product"].strip()):
            raise BundleError(f"{where}: product must be a non-empty string, got {short_repr(m['product'])}")
        listed = set(files)
        pre = m.get("preprocessing", {})
        if not isinstance(pre, dict):
            raise BundleError(f"{where}: preprocessing must be a mapping, got {short_repr(pre)}")
        shift = pre.get("shift_16bit", SHIFT_16BIT)
        if not (isinstance(shift, int) and not isinstance(shift, bool) and 0 <= shift <= SHIFT_16BIT):
            raise BundleError(f"{where}: preprocessing.shift_16bit must be an integer from 0 to 8, got {short_repr(shift)}")
        if shift != SHIFT_16BIT and m.get("schema_version", 0) < SCHEMA_VERSION_SHIFT_16BIT:
            raise BundleError(f"{where}: preprocessing.shift_16bit {shift} needs schema_version "
                              f"{SCHEMA_VERSION_SHIFT_16BIT} (a runtime that reads only 3 would take the top byte)")
        geom, feats, index = section("geometry"), section("features"), section("index")
        try:
            geometry = Geometry.from_manifest(geom)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{where}: geometry is invalid ({type(exc).__name__}: {exc})") from None
        if geometry.resample != "area" and m.get("schema_version") == 2:
            raise BundleError(f"{where}: geometry.resample {geometry.resample!r} needs schema_version 3 (a runtime "
                              "that reads only 2 would resample the frames differently from the fit)")
        grid = feats.get("grid")
        if not (isinstance(grid, list) and len(grid) == 2 and all(_positive_int(g) for g in grid)):
            raise BundleError(f"{where}: features.grid must be [rows, cols] positive integers, got {short_repr(grid)}")
        if tuple(grid) != geometry.grid():
            raise BundleError(f"{where}: features.grid {grid} does not match geometry.input_size "
                              f"{list(geometry.input_size)} (expected {list(geometry.grid())})")
        dim = feats.get("dim")
        if not _positive_int(dim):
            raise BundleError(f"{where}: features.dim must be a positive integer, got {short_repr(dim)}")
        if index.get("dim") != dim:
            raise BundleError(f"{where}: index.dim {index.get('dim')} does not match features.dim {dim}")
        if index.get("space") not in HNSW_SPACES:
            raise BundleError(f"{where}: index.space must be {' or '.join(map(repr, HNSW_SPACES))} (the score is an L2 "
                              f"distance), got {short_repr(index.get('space'))}")
        for key in ("M", "ef_construction", "ef_search"):
            if not _positive_int(index.get(key)):
                raise BundleError(f"{where}: index.{key} must be a positive integer, got {short_repr(index.get(key))}")
        # true/false only: bool("false") is True and bool(0) is False, so a hand-edited value could switch off the
        # re-check that makes the image score exact (the score definition) without a word.
        recheck = index.get("exact_recheck", True)
        if not isinstance(recheck, bool):
            raise BundleError(f"{where}: index.exact_recheck must be true or false, got {short_repr(recheck)}")
        # The seeded walk (absent in bundles made before it: every patch walks from the top).
        for key in ("seed_step", "ef_seeded"):
            value = index.get(key, 0)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise BundleError(f"{where}: index.{key} must be a non-negative integer, got {short_repr(index[key])}")
        for key in ("ef_search", "ef_seeded"):
            if index.get(key, 0) > EF_MAX:
                raise BundleError(f"{where}: index.{key} {index[key]} is above {EF_MAX}, the widest search the runtime runs")
        if index.get("seed_step", 0) == 1:
            raise BundleError(f"{where}: index.seed_step must be 0 (off) or >= 2, got 1")
        if index.get("seed_step", 0) and not index.get("ef_seeded"):
            raise BundleError(f"{where}: index.ef_seeded must be a positive integer when index.seed_step is set")
        variants = section("variants")
        if not variants:
            raise BundleError(f"{where}: 'variants' is empty")
        if not isinstance(m["default_variant"], str) or m["default_variant"] not in variants:
            raise BundleError(f"{where}: default_variant {short_repr(m['default_variant'])} is not one of {sorted(map(str, variants))}")
        for name, v in variants.items():
            if not isinstance(v, dict):
                raise BundleError(f"{where}: variants.{name} must be a mapping")
            for key in ("model", "index", "threshold"):
                if key not in v:
                    raise BundleError(f"{where}: variants.{name}.{key} is missing")
            # Everything the runtime opens must be pinned by a checksum; files that are merely present in the
            # folder (not listed) are never opened, so an extra file cannot change what is inspected.
            for key in ("model", "index"):
                if not isinstance(v[key], str) or v[key] not in listed:
                    raise BundleError(f"{where}: variants.{name}.{key} {short_repr(v[key])} is not covered by 'files' checksums")
            # inf would pass every part; NaN or <= 0 would reject every part or make decisions meaningless.
            if not (_finite_number(v["threshold"]) and v["threshold"] > 0):
                raise BundleError(f"{where}: variants.{name}.threshold must be a positive finite number, got {short_repr(v['threshold'])}")
            review = v.get("review_threshold")
            if review is not None and not (_finite_number(review) and 0 < review < v["threshold"]):
                raise BundleError(f"{where}: variants.{name}.review_threshold must be null or a number in "
                                  f"(0, threshold {v['threshold']!r}), got {short_repr(review)}")
            if "bank_size" in v and not _positive_int(v["bank_size"]):
                raise BundleError(f"{where}: variants.{name}.bank_size must be a positive integer, got {short_repr(v['bank_size'])}")
            golden = v.get("golden", [])
            if not isinstance(golden, list):
                raise BundleError(f"{where}: variants.{name}.golden must be a list")
            for i, g in enumerate(golden):
                if not (isinstance(g, dict) and isinstance(g.get("file"), str) and _finite_number(g.get("score"))):
                    raise BundleError(f"{where}: variants.{name}.golden[{i}] must be {{file: <path>, score: <number>}}, got {short_repr(g)}")
                if g["file"] not in listed:
                    raise BundleError(f"{where}: variants.{name}.golden[{i}] {short_repr(g['file'])} is not covered by 'files' checksums")
            tol = v.get("golden_tolerance", {})
            if not (isinstance(tol, dict) and _finite_number(tol.get("relative", 1e-2)) and tol.get("relative", 1e-2) >= 0):
                raise BundleError(f"{where}: variants.{name}.golden_tolerance must be {{relative: <number >= 0>}}, got {short_repr(tol)}")

    # ---- accessors -----------------------------------------------------------------------------------------
    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_manifest(self.manifest["geometry"])

    @property
    def shift_16bit(self) -> int:
        """16-bit pixels reach the model as min(v >> this, 255) (edge_runtime.decode.to_rgb); 8 unless pinned."""
        return int(self.manifest.get("preprocessing", {}).get("shift_16bit", SHIFT_16BIT))

    @property
    def bundle_version(self) -> int | None:
        """Monotonic release number (the exporter's --bundle-version), or None for an older bundle."""
        return self.manifest.get("bundle_version")

    @property
    def release_version(self) -> int | None:
        """The workstation release this bundle stands for, what the downgrade floor compares: its bundle_version,
        or for a version made from another bundle (learning, adapt, rollback: `made_on_device`) the release it
        descends from: the station's base bundle's where that descent was checked (base_release, set by
        bundle_versions.load_station_bundle), else the first ancestor its lineage records. A device-made version's
        own number is a timestamp: as a floor it would refuse every later numbered release, and one made from a
        revoked release would pass a floor set by its successor."""
        if self.base_release is not None:
            return self.base_release
        lineage = self.manifest.get("lineage")
        if "made_on_device" in self.manifest and isinstance(lineage, list) and lineage \
                and isinstance(lineage[0], dict) and _positive_int(lineage[0].get("bundle_version")):
            return int(lineage[0]["bundle_version"])
        return self.bundle_version

    def descends_from(self, bundle_id: str) -> bool:
        """`bundle_id` is this bundle or one of the ancestors its manifest records (`lineage`)."""
        lineage = self.manifest.get("lineage")
        return self.bundle_id == bundle_id or (isinstance(lineage, list) and any(
            isinstance(e, dict) and e.get("bundle_id") == bundle_id for e in lineage))

    @property
    def product(self) -> str | None:
        """Name of the product the bundle was fitted for (the exporter's --product), or None for an older bundle."""
        return self.manifest.get("product")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.manifest["features"]["grid"]
        return int(g[0]), int(g[1])

    @property
    def dim(self) -> int:
        return int(self.manifest["features"]["dim"])

    @property
    def hnsw_params(self) -> HnswParams:
        i = self.manifest["index"]
        return HnswParams(space=i["space"], M=int(i["M"]), ef_construction=int(i["ef_construction"]),
                          ef_search=int(i["ef_search"]), exact_recheck=bool(i.get("exact_recheck", True)),
                          seed_step=int(i.get("seed_step", 0)), ef_seeded=int(i.get("ef_seeded", 0)))

    def variant(self, name: str | None = None) -> Variant:
        name = name or self.manifest["default_variant"]
        if name not in self.manifest["variants"]:
            raise BundleError(f"{self.root / MANIFEST}: no variant {short_repr(name)} (have {sorted(self.manifest['variants'])})")
        v = self.manifest["variants"][name]
        return Variant(name=name, model_file=v["model"], index_file=v["index"], threshold=float(v["threshold"]), info=v)

    def path(self, rel: str) -> Path:
        return safe_member(self.root, rel)


# ---- writing (used by the exporter) ------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """Round-trip through JSON so numpy scalars and tuples become plain YAML types."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else list(o)))


def staging_dir(out: Path) -> Path:
    """A new, empty folder beside `out` to write a bundle in before `install_bundle` moves it there: hidden,
    named for this process plus a random part (a killed run's leftover never blocks the next), and on the same
    file system, so the move is a rename."""
    target = Path(out).resolve()
    stage = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        stage.mkdir(parents=True)
    except OSError as exc:   # probe 107: the error named only the hidden staging folder, never the --out given
        raise OSError(f"{out}: cannot write a bundle there: no new folder can be made in {target.parent} "
                      f"({exc.strerror or exc})") from None
    return stage


def stale_staging(out: Path, own: Path | None = None) -> list[Path]:
    """Staging folders of `out` that another run left (a run killed outright cannot remove its own; one killed
    while installing leaves the bundle it replaced as `.<name>.old-...`): for the caller to name, never deleted
    here, since a run on another machine sharing the folder may still be writing one."""
    target = Path(out).resolve()
    return sorted(p for pattern in (f".{target.name}.partial-*", f".{target.name}.old-*")
                  for p in target.parent.glob(pattern) if p != own)


@contextlib.contextmanager
def staged_bundle(out: Path, overwrite: bool, inputs: dict[str, Path | None]) -> Iterator[Path]:
    """A staging folder to write a new bundle in (staging_dir): removed if the block raises (or is stopped),
    installed at `out` when it completes (install_bundle). How fit, recalibrate and adapt write a bundle."""
    stage = staging_dir(out)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    install_bundle(stage, out, overwrite, inputs)


def install_bundle(stage: Path, out: Path, overwrite: bool, inputs: dict[str, Path | None]) -> None:
    """Move the complete bundle in `stage` to `out`. `out` is checked again (check_output_dir: minutes may have
    passed); a bundle there is moved aside and deleted only once the new one is in place, so nothing is lost if
    the move fails (a mount point cannot be renamed). Raises FileExistsError or OSError naming `stage`, which is
    then kept: the new bundle is complete."""
    target = Path(out).resolve()
    old = None
    try:
        replacing = check_output_dir(out, overwrite, inputs)
        if replacing:
            old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
            os.rename(target, old)
        elif target.exists():
            target.rmdir()                      # empty
        os.rename(stage, target)
    except OSError as exc:
        if old is not None and not target.exists():
            os.rename(old, target)
        kind = FileExistsError if isinstance(exc, FileExistsError) else OSError
        raise kind(f"{out} was not replaced ({exc.strerror or exc}); the new bundle is complete in {stage}: "
                   "move it there yourself") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(out: Path, overwrite: bool, inputs: dict[str, Path | None]) -> bool:
    """Whether `out` can take a new bundle: refuse a symlink, and a folder that is or holds one of `inputs` (name
    -> folder the command reads: training images, calibration defects, the source bundle), refuse a non-empty one
    without `overwrite`, and with it accept only a folder that holds a bundle (its manifest.yaml). True when a
    bundle there is to be replaced. Raises FileExistsError; a user's photos or project folder are never deleted
    by a mistyped --out."""
    if os.path.islink(out):
        # A `current -> v3` link (the layout the docs use): deleting would remove v3, not the link.
        raise FileExistsError(f"--out {out} is a symlink (to {os.readlink(out)}): give a new folder, then point the "
                              "link at it")
    target = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        # Replacing it would pull the folder from under the shell (and `.` has no name to stage a bundle beside).
        raise FileExistsError(f"--out {out} is or contains the current folder: give the path of a new folder")
    for what, folder in inputs.items():
        if folder is None:
            continue
        src = Path(folder).resolve()
        if target == src or target in src.parents:
            raise FileExistsError(f"--out {out} is or contains the {what} ({folder}): writing the bundle there "
                                  "would delete it; choose a new folder")
    if not target.exists():
        return False
    if not target.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not any(target.iterdir()):
        return False
    if not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (use --overwrite to replace a bundle there)")
    if not (target / MANIFEST).is_file():
        raise FileExistsError(f"{out}: --overwrite replaces a bundle, and this folder holds none ({MANIFEST} is "
                              "missing): delete it yourself if it is really to go")
    return True


def content_id(manifest: dict) -> str:
    """The bundle id: sha256 of the manifest's content (every key but `created` and `bundle_id`), 16 hex digits."""
    content = _plain({k: v for k, v in manifest.items() if k not in ("created", "bundle_id")})
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def write_manifest(root: Path, manifest: dict) -> dict:
    """Checksum every file under root (except the manifest and its signature) into manifest['files'], then write it."""
    root = Path(root)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in (MANIFEST, SIGNATURE):
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = dict(manifest, files=files)
    manifest["bundle_id"] = content_id(manifest)
    manifest = _plain(manifest)
    (root / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False, width=120))
    return manifest
