"""Which authentic bundles a station accepts: the right product, and never an older release (rollback).

A signature proves who made a bundle, not that it is the newest one or that it is meant for this line. The
manifest carries `product` and a monotonic `bundle_version` (edge-export fit --product/--bundle-version); the
station file says which product it inspects (`security.product`) and whether older releases may be loaded
(`security.allow_downgrade`, default false). The highest version loaded is kept in `state_dir`, so a restart
does not forget it.

Versions made on the station (learning, adapt, rollback) stand for the release of the base bundle they descend
from (Bundle.release_version): they never raise the floor above the workstation's numbering.

Older bundles (no `product`/`bundle_version` in the manifest) are refused only when the station names a product,
or when this station has loaded a versioned bundle before and downgrades are not allowed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.bundle import Bundle, BundleError
from edge_runtime.safe_yaml import short_repr

# In state_dir: {"bundle_version": N, "bundle_id": ..., "product": ...} of the highest version loaded.
VERSION_STATE_FILE = "bundle_version.json"


def recorded_version(state_dir: str | None) -> int | None:
    """Highest bundle_version recorded in `state_dir`, None when nothing was recorded.

    Raises BundleError when the record exists but cannot be read: without it a rollback could not be
    detected, so the station stays in FAULT until a person repairs or deliberately removes the file.
    """
    if not state_dir:
        return None
    path = Path(state_dir) / VERSION_STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the recorded bundle version ({exc.strerror or exc})") from None
    try:
        version = json.loads(raw[:4096])["bundle_version"]
    except (ValueError, KeyError, TypeError):
        version = None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BundleError(f"{path}: the recorded bundle version is unreadable ({short_repr(raw[:200])}); "
                          "repair or remove the file deliberately to accept any version")
    return version


@dataclass(frozen=True)
class FloorScope:
    """Where a station keeps its version floors (`root`, its state_dir), which camera this line inspects with
    (`source`, e.g. "camera:/dev/video0"; recorded with each floor) and the cameras of the station's other lines
    (`others`: their floors are theirs)."""

    root: str
    source: str | None = None
    others: frozenset[str] = frozenset()


def source_key(src) -> str | None:
    """A line's camera identity for its floor records: the source's type and device, path or URL, one spelling
    per device (an index N is /dev/videoN; a /dev/v4l/by-id link is the device it names, when it is there)."""
    kind = getattr(src, "type", None)
    if kind is None:
        return None
    ident = getattr(src, "device", None)
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = f"/dev/video{ident}"
    if ident is None:
        ident = getattr(src, "path", None)
    if isinstance(ident, str) and ident.startswith("/") and "://" not in ident:
        ident = os.path.realpath(ident)
    return f"{kind}:{ident}" if ident is not None else str(kind)


def _floor_files(root: str) -> list[Path]:
    """Every floor a station's layouts keep: root, lines/<n>, recipes/<r>, lines/<n>/recipes/<r>."""
    base = Path(root)
    found: list[Path] = []
    for pattern in (VERSION_STATE_FILE, f"lines/*/{VERSION_STATE_FILE}", f"recipes/*/{VERSION_STATE_FILE}",
                    f"lines/*/recipes/*/{VERSION_STATE_FILE}"):
        found += sorted(base.glob(pattern))
    return found


def station_floor(scope: FloorScope, product: str | None, own_dir: str) -> tuple[int, Path] | None:
    """The highest floor of `product` recorded for the same camera in another folder of the station, and its file.

    Each line and recipe keeps its floor in its own folder (two cameras' bundles of one product are numbered
    independently), so the folder changes when the station file is restructured (a single line rewritten as
    `lines:`, a line or recipe renamed) and changes back when the old file is restored. Either way the floor of
    the camera and product goes with it (probe 33: a rewrite with `lines:` served an older bundle for 207 parts;
    probe 36: restoring the old file did). Only the floors of cameras the station's other lines use now are left
    out (two cameras of one product keep their own series); a camera spelled otherwise (probe 38: device 0 and
    its /dev/v4l/by-id link) or replaced counts, on the safe side."""
    best: tuple[int, Path] | None = None
    own = os.path.normpath(own_dir)
    for path in _floor_files(scope.root):
        if os.path.normpath(path.parent) == own:
            continue
        version = recorded_version(str(path.parent))   # raises on an unreadable record, as the own one does
        try:
            record = json.loads(path.read_bytes()[:4096])
        except (OSError, ValueError):
            record = {}
        if not isinstance(record, dict) or record.get("product") != product:
            continue
        if "source" in record and record["source"] != scope.source and record["source"] in scope.others:
            continue   # another line's camera: its own series
        # Same camera, a record from before cameras were recorded, or a camera no line of the file names now (it
        # may be this one spelled another way, or replaced): it counts; the message names the file to remove.
        if version is not None and (best is None or version > best[0]):
            best = (version, path)
    return best


def _recorded_source(state_dir: str) -> str | None:
    try:
        record = json.loads((Path(state_dir) / VERSION_STATE_FILE).read_bytes()[:4096])
    except (OSError, ValueError):
        return None
    return record.get("source") if isinstance(record, dict) else None


def check_admission(bundle: Bundle, product: str | None, allow_downgrade: bool, state_dir: str | None,
                    current: Bundle | None = None, scope: FloorScope | None = None) -> None:
    """Refuse (BundleError naming both values) a bundle for another product, or older than what was loaded.

    `current` is the bundle in service (a reload must not go below it even without a state_dir). `scope`: the
    station's floors: those of the same camera and product in its other folders count too (station_floor).
    """
    where = bundle.root
    if product is not None and bundle.product != product:
        have = "has no product (older bundle format)" if bundle.product is None else f"is for product {short_repr(bundle.product)}"
        raise BundleError(f"{where}: bundle {have}; this station inspects security.product {short_repr(product)}")
    if allow_downgrade:
        return
    floor, source = recorded_version(state_dir), Path(state_dir or ".") / VERSION_STATE_FILE
    if state_dir and scope is not None:
        other = station_floor(scope, bundle.product, state_dir)
        if other is not None and (floor is None or other[0] > floor):
            floor, source = other[0], (f"{other[1]}, recorded for this product under another line or recipe name "
                                       "of this station, by this camera or one no line names now; remove that "
                                       "file deliberately if it is not this camera's")
    serving = current.release_version if current is not None else None
    if serving is not None and (floor is None or serving > floor):
        floor, source = serving, f"bundle {current.bundle_id} in service"
    if floor is None:
        return
    version = bundle.release_version
    if version is None:
        raise BundleError(f"{where}: bundle has no bundle_version (older bundle format) but this station has loaded "
                          f"bundle_version {floor} ({source}); set security.allow_downgrade: true to roll back")
    if version < floor:
        raise BundleError(f"{where}: bundle_version {version} is lower than {floor}, the highest this station has "
                          f"loaded ({source}); set security.allow_downgrade: true to roll back deliberately")


def record_loaded(bundle: Bundle, state_dir: str | None, source: str | None = None) -> None:
    """Persist the bundle's version in `state_dir` if it is the highest so far (atomic, fsync'd file and folder).

    Raises BundleError when it cannot be written: a station that cannot remember its floor would accept a
    rollback after the next restart.
    """
    version = bundle.release_version
    if not state_dir or version is None:
        return
    recorded = recorded_version(state_dir)
    if recorded is not None and recorded > version:
        return
    if recorded == version and (source is None or _recorded_source(state_dir) is not None):
        return   # (a record from before cameras were recorded gets its camera, so it stops counting for all)
    folder = Path(state_dir)
    path = folder / VERSION_STATE_FILE
    tmp = folder / (VERSION_STATE_FILE + ".tmp")
    record = json.dumps({"bundle_version": version, "bundle_id": bundle.bundle_id, "product": bundle.product,
                         **({"source": source} if source is not None else {})})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, (record + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # a power cut leaves the old record or the new one, never a torn one
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise BundleError(f"{path}: cannot record bundle_version {version} ({exc.strerror or exc})") from None
