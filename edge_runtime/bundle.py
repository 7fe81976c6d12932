"""The model bundle: the one contract between the exporter and the device (read, write, verify).

A bundle is a directory: manifest.yaml + ONNX feature extractors + HNSW indexes + golden images. The manifest
records everything needed to reproduce a score and the sha256 of every other file; nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from edge_runtime.nn_search import HnswParams
from edge_runtime.preprocess import Preprocessing

SCHEMA_VERSION = 1
MANIFEST = "manifest.yaml"
SIGNATURE = "manifest.sig"


class BundleError(RuntimeError):
    """The bundle cannot be used; the message names the file and the cause."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_member(root: Path, rel: str) -> Path:
    """Resolve a manifest-relative path, refusing anything that escapes the bundle directory."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise BundleError(f"{root / MANIFEST}: file path {rel!r} is not a plain relative path inside the bundle")
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise BundleError(f"{root / MANIFEST}: file path {rel!r} resolves outside the bundle ({full})")
    return full


@dataclass(frozen=True)
class Variant:
    """One deployable extractor (fp32 or int8) with the memory bank and threshold built from its own features."""

    name: str
    model_file: str
    index_file: str
    threshold: float
    info: dict

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
        raw = mpath.read_bytes()
        try:
            manifest = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise BundleError(f"{mpath}: manifest is not valid YAML ({exc})") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{mpath}: manifest is not a mapping")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{mpath}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})")
        for key in ("bundle_id", "preprocessing", "features", "score", "index", "variants", "default_variant", "files"):
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
            if not path.is_file():
                raise BundleError(f"{path}: file listed in the manifest is missing")
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
        raw = raw if raw is not None else (self.root / MANIFEST).read_bytes()
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(sig_path.read_bytes(), raw)
        except (InvalidSignature, ValueError):
            raise BundleError(f"{sig_path}: ed25519 signature does not verify against the configured key") from None

    def _check_consistency(self) -> None:
        m = self.manifest
        where = self.root / MANIFEST
        variants = m["variants"]
        if not isinstance(variants, dict) or not variants:
            raise BundleError(f"{where}: 'variants' is empty")
        if m["default_variant"] not in variants:
            raise BundleError(f"{where}: default_variant {m['default_variant']!r} is not one of {sorted(variants)}")
        listed = set(m["files"])
        for name, v in variants.items():
            for key in ("model", "index", "threshold"):
                if key not in v:
                    raise BundleError(f"{where}: variants.{name}.{key} is missing")
            for key in ("model", "index"):
                if v[key] not in listed:
                    raise BundleError(f"{where}: variants.{name}.{key} {v[key]!r} is not covered by 'files' checksums")
            if not (isinstance(v["threshold"], (int, float)) and v["threshold"] > 0):
                raise BundleError(f"{where}: variants.{name}.threshold must be a positive number, got {v['threshold']!r}")
        dim = m["features"].get("dim")
        if m["index"].get("dim") != dim:
            raise BundleError(f"{where}: index.dim {m['index'].get('dim')} does not match features.dim {dim}")

    # ---- accessors -----------------------------------------------------------------------------------------
    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def preprocessing(self) -> Preprocessing:
        p = self.manifest["preprocessing"]
        return Preprocessing(image_size=int(p["image_size"]), roi=tuple(p["roi"]) if p.get("roi") else None)

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
