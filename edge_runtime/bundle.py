"""The model bundle: the one contract between the exporter and the device (read, write, verify).

A bundle is a directory: manifest.yaml + ONNX feature extractors + HNSW indexes + golden images. The manifest
records everything needed to reproduce a score and the sha256 of every other file; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from edge_runtime.nn_search import HnswParams
from edge_runtime.geometry import Geometry

# 2: input geometry (non-square input, tiles, size policy) replaced the square image_size; review band.
SCHEMA_VERSION = 2
MANIFEST = "manifest.yaml"
SIGNATURE = "manifest.sig"
# A manifest is a few kB; refusing anything this large keeps a hostile file from exhausting memory in the parser.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
HNSW_SPACES = ("l2", "ip", "cosine")


class BundleError(RuntimeError):
    """The bundle cannot be used; the message names the file and the cause."""


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
        raise BundleError(f"{root / MANIFEST}: file path {rel!r} is not a string")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel or "\0" in rel:
        raise BundleError(f"{root / MANIFEST}: file path {rel!r} is not a plain relative path inside the bundle")
    try:
        full = (root / p).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise BundleError(f"{root / MANIFEST}: file path {rel!r} cannot be resolved ({exc})") from None
    if not full.is_relative_to(root.resolve()):
        raise BundleError(f"{root / MANIFEST}: file path {rel!r} resolves outside the bundle ({full})")
    return full


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# hnswlib's saved-index header (hnswalg.h saveIndex): offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData (size_t); maxlevel (int); enterpoint (uint);
# maxM, maxM0, M (size_t); mult (double); ef_construction (size_t). Little-endian on every supported board.
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def check_index_file(path: Path, dim: int, count: int | None = None) -> None:
    """Refuse an HNSW index whose header disagrees with the manifest, before hnswlib reads it.

    hnswlib itself trusts the dimension it is given: an index saved with another dim loads "successfully" and
    then reads vectors across element boundaries (garbage scores, or a read past the buffer). The vector size
    is recoverable from the header (label_offset - offsetData = dim * 4 bytes), so check it here.
    """
    try:
        with open(path, "rb") as fh:
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
        self.root = Path(root)
        self.manifest = manifest

    # ---- reading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path, verify: bool = True, public_key: bytes | None = None) -> "Bundle":
        root = Path(root)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: bundle directory does not exist")
        if not mpath.is_file():
            raise BundleError(f"{mpath}: manifest is missing")
        safe_member(root, MANIFEST)  # a manifest symlinked from elsewhere is not this bundle's manifest
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mpath}: manifest is {mpath.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES} limit")
        raw = mpath.read_bytes()
        try:
            manifest = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise BundleError(f"{mpath}: manifest is not valid YAML ({exc})") from None
        except (ValueError, RecursionError) as exc:  # e.g. an impossible date, or nesting deeper than the parser
            raise BundleError(f"{mpath}: manifest cannot be parsed ({type(exc).__name__}: {exc})") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath}: manifest is not a mapping")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{mpath}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION}; "
                              "refit the bundle with this release's edge-export)")
        for key in ("bundle_id", "geometry", "features", "score", "index", "variants", "default_variant", "files"):
            if key not in manifest:
                raise BundleError(f"{mpath}: required key {key!r} is missing")
        bundle = cls(root, manifest)
        if public_key is not None:
            bundle.verify_signature(public_key, raw)
        if verify:
            bundle.verify_files()
        bundle._check_consistency()
        return bundle

    def verify_files(self) -> None:
        files = self.manifest["files"]
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{self.root / MANIFEST}: 'files' must list every bundle file with its sha256")
        for rel, meta in files.items():
            path = safe_member(self.root, rel)
            if not isinstance(meta, dict) or not _SHA256.match(str(meta.get("sha256"))) \
                    or not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool):
                raise BundleError(f"{self.root / MANIFEST}: files.{rel} must be {{sha256: <64 hex>, bytes: <int>}}, "
                                  f"got {meta!r}")
            if not path.exists():
                raise BundleError(f"{path}: file listed in the manifest is missing")
            if not path.is_file():  # a FIFO or device would block or never end when hashed
                raise BundleError(f"{path}: listed in the manifest but is not a regular file")
            size = path.stat().st_size
            if size != meta.get("bytes"):
                raise BundleError(f"{path}: size {size} bytes, manifest says {meta.get('bytes')} (truncated or replaced)")
            actual = sha256_file(path)
            if actual != meta.get("sha256"):
                raise BundleError(f"{path}: sha256 {actual} does not match the manifest ({meta.get('sha256')}): file was modified")

    def verify_signature(self, public_key: bytes, raw: bytes | None = None) -> None:
        """ed25519 signature of manifest.yaml (which pins every other file by sha256)."""
        try:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        except ImportError:
            raise BundleError("a bundle public key is configured but the 'cryptography' package is not installed") from None
        sig_path = self.root / SIGNATURE
        if not sig_path.is_file():
            raise BundleError(f"{sig_path}: signature is missing and a public key is configured")
        safe_member(self.root, SIGNATURE)
        raw = raw if raw is not None else (self.root / MANIFEST).read_bytes()
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(sig_path.read_bytes(), raw)
        except (InvalidSignature, ValueError):
            raise BundleError(f"{sig_path}: ed25519 signature does not verify against the configured key") from None

    def _check_consistency(self) -> None:
        """Types and cross-references of the manifest, so a bad manifest fails here with its key, not later."""
        m = self.manifest
        where = self.root / MANIFEST

        def section(key: str) -> dict:
            if not isinstance(m[key], dict):
                raise BundleError(f"{where}: {key!r} must be a mapping, got {type(m[key]).__name__}")
            return m[key]

        files = m["files"]
        if not isinstance(files, dict):
            raise BundleError(f"{where}: 'files' must map each bundle file to its sha256")
        listed = set(files)
        geom, feats, index = section("geometry"), section("features"), section("index")
        try:
            geometry = Geometry.from_manifest(geom)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{where}: geometry is invalid ({type(exc).__name__}: {exc})") from None
        grid = feats.get("grid")
        if not (isinstance(grid, list) and len(grid) == 2 and all(_positive_int(g) for g in grid)):
            raise BundleError(f"{where}: features.grid must be [rows, cols] positive integers, got {grid!r}")
        if tuple(grid) != geometry.grid():
            raise BundleError(f"{where}: features.grid {grid} does not match geometry.input_size "
                              f"{list(geometry.input_size)} (expected {list(geometry.grid())})")
        dim = feats.get("dim")
        if not _positive_int(dim):
            raise BundleError(f"{where}: features.dim must be a positive integer, got {dim!r}")
        if index.get("dim") != dim:
            raise BundleError(f"{where}: index.dim {index.get('dim')} does not match features.dim {dim}")
        if index.get("space") not in HNSW_SPACES:
            raise BundleError(f"{where}: index.space must be one of {', '.join(HNSW_SPACES)}, got {index.get('space')!r}")
        for key in ("M", "ef_construction", "ef_search"):
            if not _positive_int(index.get(key)):
                raise BundleError(f"{where}: index.{key} must be a positive integer, got {index.get(key)!r}")
        variants = section("variants")
        if not variants:
            raise BundleError(f"{where}: 'variants' is empty")
        if not isinstance(m["default_variant"], str) or m["default_variant"] not in variants:
            raise BundleError(f"{where}: default_variant {m['default_variant']!r} is not one of {sorted(map(str, variants))}")
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
                    raise BundleError(f"{where}: variants.{name}.{key} {v[key]!r} is not covered by 'files' checksums")
            # inf would pass every part; NaN or <= 0 would reject every part or make decisions meaningless.
            if not (_finite_number(v["threshold"]) and v["threshold"] > 0):
                raise BundleError(f"{where}: variants.{name}.threshold must be a positive finite number, got {v['threshold']!r}")
            review = v.get("review_threshold")
            if review is not None and not (_finite_number(review) and 0 < review < v["threshold"]):
                raise BundleError(f"{where}: variants.{name}.review_threshold must be null or a number in "
                                  f"(0, threshold {v['threshold']!r}), got {review!r}")
            if "bank_size" in v and not _positive_int(v["bank_size"]):
                raise BundleError(f"{where}: variants.{name}.bank_size must be a positive integer, got {v['bank_size']!r}")
            golden = v.get("golden", [])
            if not isinstance(golden, list):
                raise BundleError(f"{where}: variants.{name}.golden must be a list")
            for i, g in enumerate(golden):
                if not (isinstance(g, dict) and isinstance(g.get("file"), str) and _finite_number(g.get("score"))):
                    raise BundleError(f"{where}: variants.{name}.golden[{i}] must be {{file: <path>, score: <number>}}, got {g!r}")
                if g["file"] not in listed:
                    raise BundleError(f"{where}: variants.{name}.golden[{i}] {g['file']!r} is not covered by 'files' checksums")
            tol = v.get("golden_tolerance", {})
            if not (isinstance(tol, dict) and _finite_number(tol.get("relative", 1e-2)) and tol.get("relative", 1e-2) >= 0):
                raise BundleError(f"{where}: variants.{name}.golden_tolerance must be {{relative: <number >= 0>}}, got {tol!r}")

    # ---- accessors -----------------------------------------------------------------------------------------
    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_manifest(self.manifest["geometry"])

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
                          ef_search=int(i["ef_search"]), exact_recheck=bool(i.get("exact_recheck", True)))

    def variant(self, name: str | None = None) -> Variant:
        name = name or self.manifest["default_variant"]
        if name not in self.manifest["variants"]:
            raise BundleError(f"{self.root / MANIFEST}: no variant {name!r} (have {sorted(self.manifest['variants'])})")
        v = self.manifest["variants"][name]
        return Variant(name=name, model_file=v["model"], index_file=v["index"], threshold=float(v["threshold"]), info=v)

    def path(self, rel: str) -> Path:
        return safe_member(self.root, rel)


# ---- writing (used by the exporter) ------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """Round-trip through JSON so numpy scalars and tuples become plain YAML types."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else list(o)))


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
    ident = hashlib.sha256(json.dumps(_plain({k: v for k, v in manifest.items() if k not in ("created", "bundle_id")}),
                                      sort_keys=True).encode()).hexdigest()
    manifest["bundle_id"] = manifest.get("bundle_id") or ident[:16]
    manifest = _plain(manifest)
    (root / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False, width=120))
    return manifest
