"""The station's bundle versions: device-made versions in state_dir/bundles, which one is active, and rollback.

The station file's `bundle:` stays the base the workstation delivered. A version learned on the device is written
to `state_dir/bundles/<name>/` and made active by `active.json` (written atomically, fsync'd), so it survives a
restart; the daemon resolves the active folder on every (re)load (`active_bundle_dir`). When the station file
points at a different base bundle (a new workstation release), the pointer no longer applies and is ignored.

Rollback never lowers `bundle_version` (the station's downgrade protection stays on): rolling back to version X
re-issues X's exact files as a new, higher version whose manifest records the rollback. Every version ever made
stays on disk, so any earlier one can be restored.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from edge_runtime.bank_adapt import (LINEAGE_DIR, AdaptError, append_audit, check_station_signed, copy_verified,
                                     login_user, sign_version)
from edge_runtime.bundle import MANIFEST, SIGNATURE, Bundle, BundleError, read_regular, sha256_file, write_manifest

log = logging.getLogger(__name__)

VERSIONS_DIR = "bundles"
ACTIVE_FILE = "active.json"
AUDIT_LOG = "bundle_audit.jsonl"


class VersionStore:
    """Versions of one station's bundle. `base` is the station file's bundle folder (or a callable returning the
    folder the line loads now: a signed rollout moves it), `state_dir` the station's."""

    def __init__(self, base: str | Path | Callable[[], str | Path], state_dir: str | Path,
                 signing_key: str | Path | None = None):
        self._base = base
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / VERSIONS_DIR
        self.signing_key = signing_key

    @property
    def base(self) -> Path:
        return Path(self._base() if callable(self._base) else self._base)

    @property
    def audit_log(self) -> Path:
        return self.state_dir / AUDIT_LOG

    def _base_sha(self) -> str | None:
        try:
            return sha256_file(self.base / MANIFEST)
        except OSError:
            return None

    def active_dir(self) -> Path:
        """The folder to load: the active device-made version, or the base bundle."""
        try:
            record = json.loads((self.root / ACTIVE_FILE).read_text())
        except FileNotFoundError:
            return self.base
        except (OSError, ValueError) as exc:
            log.error("%s: unreadable (%s); loading the station file's bundle", self.root / ACTIVE_FILE, exc)
            return self.base
        if not isinstance(record, dict):   # valid JSON but not a record (a list, a number): as corrupt, not a crash
            log.warning("%s: not a JSON object (%s); loading the station file's bundle", self.root / ACTIVE_FILE,
                        type(record).__name__)
            return self.base
        name = record.get("name")
        if record.get("base_manifest_sha256") != self._base_sha():
            log.warning("%s: made for another base bundle than %s; loading the station file's bundle",
                        self.root / ACTIVE_FILE, self.base)
            return self.base
        if not isinstance(name, str) or "/" in name or name.startswith(".") or not (self.root / name).is_dir():
            log.error("%s: names no version folder (%r); loading the station file's bundle", self.root / ACTIVE_FILE, name)
            return self.base
        return self.root / name

    def activate(self, folder: Path | None) -> None:
        """Make `folder` (a version under root, or None for the base bundle) the one loaded from now on."""
        self.root.mkdir(parents=True, exist_ok=True)
        path, tmp = self.root / ACTIVE_FILE, self.root / (ACTIVE_FILE + ".tmp")
        if folder is None:
            path.unlink(missing_ok=True)
            return
        record = {"name": Path(folder).name, "base_manifest_sha256": self._base_sha(), "at": time.time()}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def new_folder(self) -> Path:
        """A fresh, not yet existing folder name for the next version (time-ordered)."""
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        return self.root / f"v{stamp}"

    def versions(self) -> list[dict]:
        """Every version (base first, then device-made ones, oldest first) with id, version, what made it."""
        active = self.active_dir().resolve()
        base_id = self.base_id()
        found = []
        folders = [self.base] + sorted(p for p in self.root.glob("v*") if p.is_dir() and not p.name.endswith(".partial")) \
            if self.root.is_dir() else [self.base]
        for folder in folders:
            try:
                m = Bundle.load(folder, verify=False).manifest
            except BundleError as exc:
                found.append({"name": folder.name, "path": str(folder), "error": str(exc)})
                continue
            made = m.get("made_on_device") or {}
            other_base = folder != self.base and base_id is not None and not Bundle(folder, m).descends_from(base_id)
            found.append({"name": "base" if folder == self.base else folder.name, "path": str(folder),
                          "other_base": other_base,
                          "bundle_id": m.get("bundle_id"), "bundle_version": m.get("bundle_version"),
                          "created": m.get("created"), "action": made.get("action", "workstation"),
                          "by": made.get("by"), "active": folder.resolve() == active,
                          "bank": {k: v.get("bank_size") for k, v in m.get("variants", {}).items()},
                          "threshold": {k: v.get("threshold") for k, v in m.get("variants", {}).items()}})
        return found

    def base_id(self) -> str | None:
        """The bundle id of the station file's bundle, None when it cannot be read."""
        try:
            return Bundle.load(self.base, verify=False).bundle_id
        except BundleError:
            return None

    def folder_of(self, name: str) -> Path:
        if name == "base":
            return self.base
        if "/" in name or name.startswith(".") or not (self.root / name).is_dir():
            raise AdaptError(f"no version {name!r} in {self.root}")
        return self.root / name

    def rollback(self, name: str, current: Bundle | None, who: str | None = None) -> Path:
        """Re-issue version `name` as a new, higher version and return its folder (not yet activated)."""
        target = Bundle.load(self.folder_of(name))
        base_id = self.base_id()
        if base_id is None:
            raise AdaptError(f"{self.base}: the station file's bundle cannot be read; nothing can be rolled back to")
        if not target.descends_from(base_id):
            raise AdaptError(f"version {name!r} was made from an earlier bundle than the station file's ({base_id}, "
                             f"{self.base}); it cannot come back while that release is in the station file")
        out = self.new_folder()
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        signed = (target.root / SIGNATURE).is_file()
        if signed and self.signing_key is None:
            raise AdaptError(f"{target.root / SIGNATURE}: the version is signed; re-issuing it needs the station key "
                             "(page.station_signing_key)")
        if signed:
            # Re-issuing signs its content with the station key (probe 102: a version edited after signing, refused
            # at load, was signed afresh by a rollback to it, and the re-issue loaded).
            check_station_signed(target, self.signing_key)
        copy_verified(target, tmp)
        m = copy.deepcopy(target.manifest)
        if signed and "made_on_device" not in m:  # the workstation's own release: keep its signed manifest
            (tmp / LINEAGE_DIR).mkdir(exist_ok=True)
            (tmp / LINEAGE_DIR / f"{target.bundle_id}.manifest.yaml").write_bytes((target.root / MANIFEST).read_bytes())
            (tmp / LINEAGE_DIR / f"{target.bundle_id}.manifest.sig").write_bytes((target.root / SIGNATURE).read_bytes())
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        who = who or login_user()
        m["lineage"] = list(m.get("lineage", [])) + [{
            "bundle_id": target.bundle_id, "bundle_version": target.bundle_version,
            "manifest_sha256": sha256_file(target.root / MANIFEST), "signed": signed,
            "workstation_signed": signed and "made_on_device" not in target.manifest}]
        m["made_on_device"] = {"action": "rollback", "at": now, "by": who, "parent": target.bundle_id,
                               "rolled_back_from": current.bundle_id if current else None}
        versions = [v for v in (target.bundle_version, current.bundle_version if current else None) if isinstance(v, int)]
        if versions:
            m["bundle_version"] = max(max(versions) + 1, int(time.time()))
        m["created"], m["bundle_id"] = now, None
        m.pop("files", None)
        write_manifest(tmp, m)
        if self.signing_key is not None and signed:
            sign_version(tmp, self.signing_key)
        os.replace(tmp, out)
        new = Bundle.load(out)
        append_audit(self.audit_log, {
            "time": now, "who": who, "action": "rollback", "to": name,
            "before": {"bundle_id": current.bundle_id if current else None,
                       "bundle_version": current.bundle_version if current else None},
            "after": {"bundle_id": new.bundle_id, "bundle_version": new.bundle_version, "path": str(out),
                      "same_content_as": target.bundle_id}})
        return out


def active_bundle_dir(bundle: str | Path, state_dir: str | Path | None) -> Path:
    """What the daemon loads for a station: its active device-made version, else the station file's bundle."""
    if not state_dir:
        return Path(bundle)
    return VersionStore(bundle, state_dir).active_dir()


def station_public_key(private_pem: str | Path) -> bytes:
    """Raw ed25519 public key of the station-local signing key (page.station_signing_key)."""
    from cryptography.hazmat.primitives import serialization

    from edge_runtime.bundle_loader import KEY_FILE_MAX_BYTES

    raw = read_regular(Path(private_pem), KEY_FILE_MAX_BYTES, "page.station_signing_key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{private_pem}: page.station_signing_key is not an unencrypted PEM private key "
                          f"({str(exc)[:120]})") from None
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_station_bundle(cfg, workstation_key: bytes | None) -> Bundle:
    """Load what the station runs: its active version (verified), else the station file's bundle.

    With signatures required (`workstation_key`), a device-made version must verify against the station key
    (page.station_signing_key) and descend from a workstation-signed release (bank_adapt.verify_lineage);
    otherwise it is refused (BundleError) and the station stays in FAULT or keeps the bundle in service.
    """
    folder = active_bundle_dir(cfg.bundle, cfg.state_dir)
    if folder == Path(cfg.bundle):
        return Bundle.load(folder, public_key=workstation_key)
    # A device-made version stands in for the station file's bundle only if it was made from it: one learned on,
    # or re-issued from, a release that has since been replaced must not bring that release back.
    base = Bundle.load(cfg.bundle, verify=False, public_key=workstation_key)
    if workstation_key is None:
        bundle = Bundle.load(folder)
    else:
        from edge_runtime.bank_adapt import verify_lineage

        key_path = getattr(getattr(cfg, "page", None), "station_signing_key", None)
        if not key_path:
            raise BundleError(f"{folder}: a device-made version, but this station requires signatures and no "
                              "page.station_signing_key is configured to verify it")
        try:
            station_key = station_public_key(key_path)
        except (OSError, ValueError, TypeError, ImportError) as exc:
            raise BundleError(f"page.station_signing_key {key_path}: cannot read the key ({exc})") from None
        bundle = Bundle.load(folder, public_key=station_key)
        verify_lineage(bundle, workstation_key, station_key, base)
    if not bundle.descends_from(base.bundle_id):
        raise BundleError(f"{folder}: this device-made version was not made from the station's bundle "
                          f"{base.bundle_id} ({cfg.bundle}) but from an earlier one; roll back or learn again on "
                          "the bundle in the station file")
    bundle.base_release = base.release_version
    return bundle
