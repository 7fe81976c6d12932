"""Learning from the line on the device, without torch: good parts' patch features join the memory bank of a new
bundle version; defects found downstream are stored with it and can only tighten the threshold.

`prepare()` computes everything in memory (new bank vectors per variant, every given and stored image scored
before and after, the new thresholds), so a person can see the effect before `Adaptation.write()` makes it a
bundle: same manifest format, sha256 checksums, HNSW index and exact bank both extended (the runtime's exact
bank is the index's own vectors), golden scores re-recorded, parent chain in `lineage`.

Why the threshold cannot silently loosen: adding bank vectors only lowers every distance, so every score can
only fall. The threshold itself is never raised; the cross-fitted good scores in the manifest stay valid upper
bounds of the good parts' scores (the expected false-reject rate stays a conservative estimate). What can get
worse is the defects' margin, so every stored and given defect is re-scored: if one would fall below the
threshold, the threshold is lowered to keep it NG with the bundle's defect margin (fit's `defect_margin`), and
the new expected false-reject rate on the cross-fitted good scores is reported. A learned image that would
then still not be OK is a conflict (good and bad look alike): `write()` refuses it.

Signatures (see `sign_version` and `verify_lineage`): a device cannot sign with the workstation's key. A version
made from a signed parent must be signed with a station-local ed25519 key and carries the parent's manifest
and signature in `lineage/`, so a station trusting both keys can check that it descends from a workstation-
signed bundle with the same models, a bank that only grew and a threshold that never rose.
"""
from __future__ import annotations

import copy
import datetime as dt
import getpass
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_runtime.bundle import (MANIFEST, SIGNATURE, Bundle, BundleError, check_output_dir, sha256_file, staged_bundle,
                                 write_manifest)
from edge_runtime.decode import SHIFT_16BIT, decode_image
from edge_runtime.nn_search import ExactSearch
from edge_runtime.pipeline import Pipeline
from edge_runtime.preprocess import preprocess
from edge_runtime import scoring
from edge_runtime.safe_yaml import short_repr
from edge_runtime.self_test import golden_check, golden_image

# Manifest key of what was learned / stored on the device, and the folders for the images inside the bundle.
FEEDBACK_KEY = "feedback"
LEARNED_DIR = "feedback/learned"
DEFECTS_DIR = "feedback/defects"
LINEAGE_DIR = "lineage"
DEFAULT_DEFECT_MARGIN = 0.05
AUDIT_FILE = "bundle_audit.jsonl"


def copy_verified(bundle: Bundle, dest: Path) -> None:
    """Write the verified bytes of every file the manifest pins into `dest` (a staging folder).

    Only pinned files: an unlisted file in the source folder never enters a version."""
    for rel in bundle.manifest["files"]:
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(bundle.read_verified(rel))


class AdaptError(RuntimeError):
    """The adaptation cannot be made or written; the message names the image or the bundle."""


@dataclass
class ImageScores:
    """One image scored by a variant before and after the change."""

    name: str
    kind: str                  # "learn" (a good part to learn), "defect" (given now) or "stored-defect"
    before: float
    after: float
    verdict_before: str
    verdict_after: str


@dataclass
class VariantChange:
    variant: str
    bank_before: int
    bank_after: int
    threshold_before: float
    threshold_after: float
    review_before: float | None
    review_after: float | None
    coverage_radius: float      # learned patches are added until every patch of a learned image is this close
    expected_false_reject: dict  # empirical rate on the cross-fitted good scores at the new threshold
    images: list[ImageScores] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    new_vectors: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("new_vectors")
        return d


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_name(name: str, digest: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name)[-60:].lstrip(".-") or "image"
    if not re.search(r"\.(png|jpe?g|bmp|tiff?)$", stem, re.I):
        stem += ".png"
    return f"{digest[:12]}_{stem}"


@dataclass
class InputImage:
    """An image given to learn or to store as a defect: its name, encoded bytes and decoded RGB."""

    name: str
    data: bytes
    rgb: np.ndarray

    @classmethod
    def from_file(cls, path: str | Path, shift_16bit: int = SHIFT_16BIT) -> "InputImage":
        """`shift_16bit`: the bundle's (Bundle.shift_16bit), so a 16-bit file reads as the bundle's frames do."""
        from edge_runtime.bundle import read_regular
        from edge_runtime.decode import DEFAULT_LIMITS, MAX_PIXELS

        path = Path(path)
        # A regular file no larger than the decoder accepts (as the folder source reads): `--good /dev/zero` read
        # for ever into memory, and a FIFO blocked (probe 100).
        limit = int(MAX_PIXELS * DEFAULT_LIMITS.max_bytes_per_pixel) + DEFAULT_LIMITS.metadata_allowance_bytes
        try:
            data = read_regular(path, limit, "image")
        except BundleError as exc:
            raise AdaptError(str(exc)) from None
        return cls.from_bytes(str(path), data, shift_16bit)

    @classmethod
    def from_bytes(cls, name: str, data: bytes, shift_16bit: int = SHIFT_16BIT) -> "InputImage":
        from edge_runtime.decode import ImageError

        try:
            return cls(name, data, decode_image(data, name, shift_16bit=shift_16bit))
        except ImageError as exc:
            raise AdaptError(str(exc)) from None

    @classmethod
    def from_rgb(cls, name: str, rgb: np.ndarray) -> "InputImage":
        """A frame the station inspected (its decoded region), stored losslessly as PNG."""
        import cv2

        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
        ok, png = cv2.imencode(".png", bgr)
        if not ok:
            raise AdaptError(f"{name}: cannot encode the frame as PNG")
        return cls(name if name.lower().endswith(".png") else name + ".png", png.tobytes(), rgb)


def stored_defects(bundle: Bundle) -> list[dict]:
    """The calibration defects stored in the bundle by earlier device-made versions ({file, sha256, ...})."""
    return list(bundle.manifest.get(FEEDBACK_KEY, {}).get("defects", []))


def _greedy_cover(bank: ExactSearch, feats: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the rows of `feats` to add so every row lies within `radius` of the bank (greedy k-centre).

    The same rule the exporter's coreset follows: always add the patch farthest from everything kept, so a few
    vectors cover a whole image and the bank grows only where the new parts differ from what it knows.
    """
    dist = bank.distances(feats).astype(np.float64)
    chosen: list[int] = []
    f64 = feats.astype(np.float64)
    while dist.size and dist.max() > radius:
        i = int(np.argmax(dist))
        chosen.append(i)
        d_new = np.sqrt(np.maximum(((f64 - f64[i]) ** 2).sum(axis=1), 0.0))
        np.minimum(dist, d_new, out=dist)
    return np.asarray(chosen, dtype=np.int64)


class Adaptation:
    """A prepared change of one bundle: call `write(out)` to make it a bundle version."""

    def __init__(self, parent: Bundle, learn: list[InputImage], defects: list[InputImage],
                 changes: dict[str, VariantChange], seconds: float):
        self.parent = parent
        self.learn = learn
        self.defects = defects
        self.changes = changes
        self.seconds = seconds

    @property
    def conflicts(self) -> list[str]:
        return [c for ch in self.changes.values() for c in ch.conflicts]

    def above_learn_limit(self, limit: float) -> list[dict]:
        """The images to learn that score above `limit` x the parent's threshold in some variant, one entry each
        (image, variant, score, threshold, ratio). A false reject lies near the threshold; a part far above it is more
        likely a defect, and learning it makes it and defects like it OK, so a person must confirm it
        (page.operator_learn_max, `edge-runtime adapt --confirm-above-limit`)."""
        over: dict[str, dict] = {}
        for name, ch in self.changes.items():
            for i in ch.images:
                ratio = i.before / ch.threshold_before if ch.threshold_before > 0 else math.inf
                worst = over.get(i.name, {}).get("ratio", -math.inf)
                # `not <=`: NaN is over; the variant where the image lies furthest above is the one reported
                if i.kind == "learn" and not ratio <= limit and not ratio <= worst:
                    over[i.name] = {"image": i.name, "variant": name, "score": i.before,
                                    "threshold": ch.threshold_before, "ratio": ratio}
        return list(over.values())

    def summary(self) -> dict:
        return {"parent": {"bundle_id": self.parent.bundle_id, "bundle_version": self.parent.bundle_version},
                "learn": [i.name for i in self.learn], "defects": [i.name for i in self.defects],
                "seconds": round(self.seconds, 3),
                "variants": {k: v.summary() for k, v in self.changes.items()}, "conflicts": self.conflicts}

    def write(self, out: str | Path, *, who: str | None = None, signing_key: str | Path | None = None,
              audit_log: str | Path | None = None, action: str = "adapt", overwrite: bool = False,
              audit_fields: dict | None = None) -> Bundle:
        """Write the new version to `out` and return it, loaded and self-tested. The parent is never modified.
        `audit_fields`: added to the audit log's entry (e.g. which images a person confirmed above the learn limit).

        Raises AdaptError for a conflict, an existing `out`, a signed parent without `signing_key`, or a new
        version that does not load or reproduce its golden scores.
        """
        if self.conflicts:
            raise AdaptError("not written: " + "; ".join(self.conflicts))
        parent, src = self.parent, self.parent.root
        out = Path(out)
        signed_parent = (src / SIGNATURE).is_file()
        if signed_parent and signing_key is None:
            raise AdaptError(f"{src / SIGNATURE}: the parent bundle is signed; a device-made version must be signed "
                             "with a station key (--signing-key) so a station that requires signatures can verify it")
        if signed_parent:
            check_station_signed(parent, signing_key)
        if out.resolve() == src.resolve():
            raise AdaptError("--out must differ from the bundle: the parent version is kept for rollback")
        inputs = {"bundle": src}
        try:
            check_output_dir(out, overwrite, inputs)
        except FileExistsError as exc:
            raise AdaptError(str(exc)) from None
        # Written beside `out` and moved there only when complete and self-tested; a failure leaves `out` as it was
        # and no half-made version behind (staged_bundle: never a folder of the user's).
        try:
            with staged_bundle(out, overwrite, inputs) as tmp:
                self._write_into(tmp, out, now=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                 who=who or login_user(), signing_key=signing_key, action=action,
                                 signed_parent=signed_parent)
        except OSError as exc:   # install_bundle's, naming where the complete version is; or a disk error
            raise AdaptError(str(exc)) from None
        bundle = Bundle.load(out)
        bundle.release()
        if audit_log is not None:
            append_audit(audit_log, {
                "time": bundle.manifest["created"], "who": bundle.manifest["made_on_device"]["by"], "action": action,
                "before": {"bundle_id": parent.bundle_id, "bundle_version": parent.bundle_version, "path": str(src)},
                "after": {"bundle_id": bundle.bundle_id, "bundle_version": bundle.bundle_version, "path": str(out)},
                "learned": [i.name for i in self.learn], "defects": [i.name for i in self.defects],
                "thresholds": {k: [c.threshold_before, c.threshold_after] for k, c in self.changes.items()},
                "bank": {k: [c.bank_before, c.bank_after] for k, c in self.changes.items()}, **(audit_fields or {})})
        return bundle

    def _write_into(self, tmp: Path, out: Path, *, now: str, who: str, signing_key: str | Path | None, action: str,
                    signed_parent: bool) -> None:
        """The new version, written and self-tested in the staging folder `tmp` (`out`: for messages)."""
        parent, src = self.parent, self.parent.root
        copy_verified(parent, tmp)
        m = copy.deepcopy(parent.manifest)
        fb = m.setdefault(FEEDBACK_KEY, {"learned": [], "defects": []})
        fb.setdefault("learned", [])
        fb.setdefault("defects", [])
        for kind, images, folder in (("learned", self.learn, LEARNED_DIR), ("defects", self.defects, DEFECTS_DIR)):
            for img in images:
                digest = _digest(img.data)
                rel = f"{folder}/{_safe_name(img.name, digest)}"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(img.data)
                fb[kind].append({"file": rel, "sha256": digest, "source": img.name[-200:], "added": now, "by": who})
        for name, ch in self.changes.items():
            v = m["variants"][name]
            index_rel = v["index"]
            _write_extended_index(parent, name, ch.new_vectors, tmp / index_rel)
            v["bank_size"] = ch.bank_after
            v["threshold"] = ch.threshold_after
            v["review_threshold"] = ch.review_after
            v.setdefault("threshold_info", {})["device_adaptations"] = (
                v.get("threshold_info", {}).get("device_adaptations", []) + [{
                    "at": now, "learned": len(self.learn), "defects": len(self.defects),
                    "bank_before": ch.bank_before, "bank_after": ch.bank_after,
                    "threshold_before": ch.threshold_before, "threshold_after": ch.threshold_after,
                    "coverage_radius": ch.coverage_radius, "expected_false_reject": ch.expected_false_reject}])
        # The nearest workstation-signed ancestor's manifest and signature travel with every descendant (they
        # are files of a device-made parent already), so verify_lineage can always reach it.
        workstation_signed = signed_parent and "made_on_device" not in parent.manifest
        if workstation_signed:
            (tmp / LINEAGE_DIR).mkdir(exist_ok=True)
            (tmp / LINEAGE_DIR / f"{parent.bundle_id}.manifest.yaml").write_bytes((src / MANIFEST).read_bytes())
            (tmp / LINEAGE_DIR / f"{parent.bundle_id}.manifest.sig").write_bytes((src / SIGNATURE).read_bytes())
        m["lineage"] = list(m.get("lineage", [])) + [{
            "bundle_id": parent.bundle_id, "bundle_version": parent.bundle_version,
            "manifest_sha256": sha256_file(src / MANIFEST), "signed": signed_parent,
            "workstation_signed": workstation_signed}]
        m["made_on_device"] = {"action": action, "at": now, "by": who, "parent": parent.bundle_id}
        m["created"] = now
        m["bundle_id"] = None
        if isinstance(m.get("bundle_version"), int):
            m["bundle_version"] = max(m["bundle_version"] + 1, int(time.time()))
        m.pop("files", None)
        # Golden scores move with the bank (they can only fall): record them from the new index, then checksum.
        write_manifest(tmp, m)
        draft = Bundle.load(tmp)
        for name in m["variants"]:
            pipe = Pipeline(draft, precision=name, knn="hnsw", threads=2)
            for g in m["variants"][name].get("golden", []):
                g["score"] = pipe.score_rgb(golden_image(draft, g["file"]), g["file"]).score
        m["bundle_id"] = None
        m.pop("files", None)
        write_manifest(tmp, m)
        if signing_key is not None:
            sign_version(tmp, signing_key)
        bundle = Bundle.load(tmp)
        for name in bundle.manifest["variants"]:
            failures = golden_check(bundle, Pipeline(bundle, precision=name, knn="hnsw", threads=2))
            if failures:
                raise AdaptError(f"{out}: the new version fails its self-test: {'; '.join(failures)}")
        bundle.release()


def login_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _write_extended_index(parent: Bundle, variant: str, new: np.ndarray | None, path: Path) -> None:
    """The parent's HNSW index with `new` vectors appended (labels continue), in hnswlib's file format.

    faiss inserts them into the parent's own graph (same M, the manifest's ef_construction), one thread so the
    result is reproducible; the device needs no hnswlib for it (edge_runtime.hnsw_graph)."""
    from edge_runtime.hnsw_graph import FaissHnswSearch, write_hnsw_graph

    v = parent.variant(variant)
    params = parent.hnsw_params
    search = FaissHnswSearch.load(parent.read_verified(v.index_file), parent.dim, params, threads=1)
    if new is not None and len(new):
        search.graph.hnsw.efConstruction = params.ef_construction
        search.set_threads(1)
        search.add(np.ascontiguousarray(new, dtype=np.float32))
    path.unlink(missing_ok=True)
    path.write_bytes(write_hnsw_graph(search.graph_arrays(), params.ef_construction))


def _image_features(pipe: Pipeline, img: InputImage) -> np.ndarray:
    """The image's patch features as the station computes them; AdaptError for an image the station would FAULT
    before scoring it (another size, the frame check: too dark, blurred or noisy against the training frames):
    learned as good, it put frames the station never judges into the bank (probe 81: a good part at 30% light
    added over 200 vectors per variant); stored as a defect, it set a threshold from a score no station gives."""
    from edge_runtime.decode import ImageError

    try:
        pipe.check_rgb(img.rgb, img.name)
        tensor, _, _ = preprocess(img.rgb, pipe.geometry, img.name)
    except ImageError as exc:
        raise AdaptError(f"{exc}: the station would not inspect this image, so it cannot be learned or stored") from None
    return pipe.extractor(tensor)


def prepare(bundle: Bundle | str | Path, learn: list[InputImage], defects: list[InputImage] | None = None,
            *, coverage_radius: float | None = None, defect_margin: float | None = None,
            threads: int = 2) -> Adaptation:
    """Plan a new version of `bundle` that knows `learn` as good and keeps `defects` (and stored ones) NG.

    `coverage_radius`: learned patches are added until each lies this close to the bank (default: the median
    cross-fitted good score, i.e. a learned part then scores like a typical good part; 0.8 x threshold when the
    bundle has no cross-fitted scores). Raises AdaptError / BundleError.
    """
    t0 = time.perf_counter()
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    defects = list(defects or [])
    # A negative radius never stops the greedy cover once every patch is in the bank (0 > -1 for ever: the process
    # grew until killed); NaN stops it at once and records .nan in the manifest.
    if coverage_radius is not None and not coverage_radius >= 0:
        raise AdaptError(f"coverage radius (--coverage-radius) must be a distance >= 0, got {coverage_radius!r}")
    if not learn and not defects:
        raise AdaptError("nothing to do: give at least one good image to learn or one defect to store")
    stored = []
    for d in stored_defects(bundle):
        stored.append(InputImage.from_bytes(d["file"], bundle.read_verified(d["file"]), bundle.shift_16bit))
    margin = defect_margin if defect_margin is not None else float(
        bundle.manifest.get("fit", {}).get("settings", {}).get("defect_margin", DEFAULT_DEFECT_MARGIN))
    changes = {}
    for name in bundle.manifest["variants"]:
        pipe = Pipeline(bundle, precision=name, knn="hnsw", threads=threads)
        v = pipe.variant
        bank = pipe.search.exact
        threshold, review = pipe.threshold, pipe.variant.review_threshold
        cross = np.array(list((v.info.get("cross_fit_scores") or {}).values()), dtype=np.float64)
        radius = coverage_radius
        if radius is None:
            radius = float(np.median(cross)) if cross.size else 0.8 * threshold
        radius = min(radius, 0.95 * (review if review is not None else threshold))
        feats = {id(img): _image_features(pipe, img) for img in [*learn, *defects, *stored]}
        new = np.zeros((0, bank.dim), dtype=np.float32)
        if learn:
            all_learn = np.concatenate([feats[id(i)] for i in learn])
            new = all_learn[_greedy_cover(bank, all_learn, radius)]
        after_bank = ExactSearch(np.concatenate([bank.bank, new])) if len(new) else bank
        rows = []
        for kind, imgs in (("learn", learn), ("defect", defects), ("stored-defect", stored)):
            for img in imgs:
                f = feats[id(img)]
                before = scoring.image_score(bank.distances(f))
                after = scoring.image_score(after_bank.distances(f))
                rows.append((kind, img.name, before, after))
        # The threshold never rises; a defect that would slip under it pulls it down (with the fit's margin).
        new_threshold = threshold
        defect_after = [a for k, _, _, a in rows if k != "learn"]
        if defect_after and min(defect_after) < threshold * (1 + margin):
            new_threshold = min(threshold, min(defect_after) / (1 + margin))
        new_review = None if review is None else review * new_threshold / threshold
        images = [ImageScores(n, k, b, a, scoring.decide(b, threshold, review).value,
                              scoring.decide(a, new_threshold, new_review).value) for k, n, b, a in rows]
        conflicts = [f"{name}: learned image {i.name} would score {i.after:.3f}, not OK at the threshold "
                     f"{new_threshold:.3f} that keeps the stored defects NG" for i in images
                     if i.kind == "learn" and i.verdict_after != "OK"]
        frr = {"n": int(cross.size)}
        if cross.size:
            k = int((cross >= new_threshold).sum())
            frr.update(count=k, rate=k / cross.size,
                       note="cross-fitted good scores against the parent bank: upper bounds after learning")
        changes[name] = VariantChange(name, len(bank), len(bank) + len(new), threshold, new_threshold, review,
                                      new_review, radius, frr, images, conflicts, new)
    return Adaptation(bundle, list(learn), defects, changes, time.perf_counter() - t0)


# ---- signatures and lineage ------------------------------------------------------------------------------------
def sign_version(bundle_dir: str | Path, private_key_pem: str | Path) -> None:
    """manifest.sig over the version's manifest with a station-local ed25519 key (PKCS#8 PEM, unencrypted)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    except ImportError:
        raise AdaptError("signing a device-made version needs the 'cryptography' package") from None
    path = Path(private_key_pem)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise AdaptError(f"{path}: cannot load an unencrypted PEM ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AdaptError(f"{path}: is a {type(key).__name__}; versions are signed with ed25519 keys")
    root = Path(bundle_dir)
    (root / SIGNATURE).write_bytes(key.sign((root / MANIFEST).read_bytes()))


def check_station_signed(bundle: Bundle, signing_key: str | Path) -> None:
    """Before a version made from `bundle` is signed with the station key (learning, adapt, a rollback's re-issue):
    a device-made `bundle` that carries a signature must verify against that key, over a manifest of the content
    read (its id). Signing vouches for what is copied: a version edited after it was signed, its checksums and id
    recomputed, is refused at load, and was signed afresh by learning or a rollback from it (probe 102). A
    workstation release's own signature is checked through lineage/ when its descendant loads. Raises AdaptError."""
    if "made_on_device" not in bundle.manifest or not (bundle.root / SIGNATURE).is_file():
        return
    from edge_runtime.bundle_versions import station_public_key

    try:
        signed = Bundle.load(bundle.root, verify=False, public_key=station_public_key(signing_key))
    except (BundleError, OSError, ValueError, TypeError, ImportError) as exc:
        raise AdaptError(f"{bundle.root}: not signed by this station's key ({exc}); no version is made from it") from None
    if signed.bundle_id != bundle.bundle_id:
        raise AdaptError(f"{bundle.root}: the manifest changed since it was read; no version is made from it")


# What a device-made version inherits unchanged from its signed ancestor: how a frame becomes patch scores.
# What a station key can never change: what is inspected and how it is scored, the search settings, and the training
# frames' brightness/sharpness band the frame check refuses frames outside of (a version widening it had dark and
# blurred frames inspected, and passed, instead of FAULT).
PINNED_SECTIONS = ("geometry", "preprocessing", "features", "score", "product", "index", "frame_quality")
# Per variant: the INT8 kernels' pin (check_quantization refuses a model this CPU computes differently) and the
# self-test's tolerance.
PINNED_VARIANT_KEYS = ("quantization", "golden_tolerance")


def verify_lineage(bundle: Bundle, workstation_key: bytes, station_key: bytes, base: Bundle | None = None) -> None:
    """Check a device-made version for a station that requires signatures. Raises BundleError.

    The version's manifest must verify against the station key, and its nearest workstation-signed ancestor
    (manifest + signature kept in lineage/) against the workstation key; with `base` (the station file's bundle)
    that ancestor must be it, so the station key cannot bring back a release the workstation has replaced. Models
    must be byte-identical to that ancestor's, geometry, preprocessing, features, score and product the same, the
    bank no smaller and no threshold higher. So a station key can teach the bank good parts and tighten thresholds,
    never swap a model, move the region inspected or loosen the station.
    """
    from edge_runtime.safe_yaml import load_strict

    bundle.verify_signature(station_key)
    signed = [e for e in bundle.manifest.get("lineage", []) if isinstance(e, dict) and e.get("workstation_signed")]
    if not signed:
        raise BundleError(f"{bundle.root / MANIFEST}: no workstation-signed ancestor recorded in 'lineage'")
    anc = signed[-1]
    rel = f"{LINEAGE_DIR}/{anc['bundle_id']}.manifest"
    raw = bundle.read_verified(rel + ".yaml")
    sig = bundle.read_verified(rel + ".sig")
    if _digest(raw) != anc.get("manifest_sha256"):
        raise BundleError(f"{bundle.path(rel + '.yaml')}: does not match the lineage's manifest_sha256")
    # The ancestor's manifest must be the station's bundle's, byte for byte: its id in the lineage is only a label
    # the station key signed (a version made from a revoked release, relabelled, had passed a check of the id).
    if base is not None and _digest(raw) != sha256_file(base.root / MANIFEST):
        raise BundleError(f"{bundle.root / MANIFEST}: made from the signed release {short_repr(anc.get('bundle_id'))}, "
                          f"not from the station's bundle {base.bundle_id} ({base.root}): its manifest differs")
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        Ed25519PublicKey.from_public_bytes(workstation_key).verify(sig, raw)
    except (InvalidSignature, ValueError):
        raise BundleError(f"{bundle.path(rel + '.sig')}: the ancestor's signature does not verify against the "
                          "workstation key") from None
    parent = load_strict(raw, rel + ".yaml")
    for key in PINNED_SECTIONS:
        if bundle.manifest.get(key) != parent.get(key):
            raise BundleError(f"{bundle.root / MANIFEST}: {key} differs from the signed ancestor's (a station key "
                              "may extend the bank and tighten thresholds, nothing else)")
    files, pfiles = bundle.manifest["files"], parent.get("files", {})
    for name, v in bundle.manifest["variants"].items():
        pv = parent.get("variants", {}).get(name)
        if pv is None:
            raise BundleError(f"{bundle.root / MANIFEST}: variant {name} is not in the signed ancestor")
        if files.get(v["model"], {}).get("sha256") != pfiles.get(pv["model"], {}).get("sha256"):
            raise BundleError(f"{bundle.root / MANIFEST}: variant {name} model differs from the signed ancestor's")
        if float(v["threshold"]) > float(pv["threshold"]) or int(v.get("bank_size", 0)) < int(pv.get("bank_size", 0)):
            raise BundleError(f"{bundle.root / MANIFEST}: variant {name} raised the threshold or shrank the bank "
                              "relative to the signed ancestor")
        # The REVIEW band is a threshold too: parts in it are never OK. Learning scales it with the threshold (down);
        # a version without it, or with its edge raised, passes as OK parts the signed release sends to REVIEW.
        review, parent_review = v.get("review_threshold"), pv.get("review_threshold")
        # (1e-9: learning's review * new / old threshold can round one ulp above the release's edge.)
        if parent_review is not None and (review is None or float(review) > float(parent_review) * (1 + 1e-9)):
            raise BundleError(f"{bundle.root / MANIFEST}: variant {name} review_threshold {short_repr(review)} drops "
                              f"or narrows the signed ancestor's REVIEW band (from {parent_review}): parts in it "
                              "would be OK")
        for key in PINNED_VARIANT_KEYS:
            if v.get(key) != pv.get(key):
                raise BundleError(f"{bundle.root / MANIFEST}: variant {name} {key} differs from the signed ancestor's "
                                  "(a station key may extend the bank and tighten thresholds, nothing else)")


# ---- audit -----------------------------------------------------------------------------------------------------
def append_audit(path: str | Path, entry: dict) -> None:
    """One JSON line per change, appended and fsync'd (who, when, what, versions before and after)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (json.dumps(entry, default=float) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_audit(path: str | Path, limit: int = 200) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines[-limit:]:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
