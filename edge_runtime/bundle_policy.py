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

# In state_dir: {"bundle_version": N (the highest below, for older readers), "floors": [{"bundle_version",
# "bundle_id", "product", "source"}, one per camera and product that ran in this folder]}. An older record is one
# floor: {"bundle_version", "bundle_id", "product"(, "source")}.
VERSION_STATE_FILE = "bundle_version.json"


@dataclass(frozen=True)
class Floor:
    """The highest release one camera (`source`) ran of one product. None: recorded before products or cameras
    were (it counts for every one)."""

    version: int
    product: str | None
    source: str | None
    path: Path


def read_floors(state_dir: str | None) -> list[Floor]:
    """The floors recorded in `state_dir` ([] when none).

    Raises BundleError when the record exists but cannot be read: without it a rollback could not be
    detected, so the station stays in FAULT until a person repairs or deliberately removes the file.
    """
    if not state_dir:
        return []
    path = Path(state_dir) / VERSION_STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the recorded bundle version ({exc.strerror or exc})") from None
    try:
        record = json.loads(raw[:65536])
        entries = record.get("floors") or [record]
        floors = [Floor(e["bundle_version"], e.get("product"), e.get("source"), path) for e in entries]
    except (ValueError, KeyError, TypeError, AttributeError):
        floors = []
    if not floors or any(not isinstance(f.version, int) or isinstance(f.version, bool) or f.version < 0
                         for f in floors):
        raise BundleError(f"{path}: the recorded bundle version is unreadable ({short_repr(raw[:200])}); "
                          "repair or remove the file deliberately to accept any version")
    return floors


def recorded_version(state_dir: str | None) -> int | None:
    """Highest bundle_version recorded in `state_dir`, None when nothing was recorded (BundleError: unreadable)."""
    floors = read_floors(state_dir)
    return max(f.version for f in floors) if floors else None


@dataclass(frozen=True)
class FloorScope:
    """Where a station keeps its version floors (`root`, its state_dir), which camera this line inspects with
    (`source`, e.g. "camera:/dev/video0"; recorded with each floor) and the cameras of the station's other lines
    (`others`: their floors are theirs)."""

    root: str
    source: str | None = None
    others: frozenset[str] = frozenset()


def source_key(src) -> str | None:
    """A line's camera identity for its floor records: the source's type and device, path or URL as the station
    file writes it (an index N is /dev/videoN; a stream's password is left out). Not resolved through links: a
    /dev/v4l/by-id name stays one camera when USB numbering changes at a reboot (probe 40); a camera written
    another way is a camera no line names, whose floors count for every line (the safe side)."""
    kind = getattr(src, "type", None)
    if kind is None:
        return None
    ident = getattr(src, "device", None)
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = f"/dev/video{ident}"
    if ident is None:
        ident = getattr(src, "path", None)
    if isinstance(ident, str) and "://" in ident:
        from edge_runtime.sources.video_source import redact_url
        ident = redact_url(ident)
    return f"{kind}:{ident}" if ident is not None else str(kind)


def _floor_folders(root: str) -> list[Path]:
    """Every folder a station's layouts keep floors in: root, lines/<n>, recipes/<r>, lines/<n>/recipes/<r>
    (read_floors reads each; one without a record has none). A folder that cannot be listed is an error, not an
    empty one (Path.glob had skipped it, and the floor in it; probe 40)."""
    def subfolders(folder: Path) -> list[Path]:
        try:
            return sorted(folder / name for name in os.listdir(folder) if (folder / name).is_dir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise BundleError(f"{folder}: cannot look for recorded bundle versions ({exc.strerror or exc})") from None

    base = Path(root)
    folders = [base] + subfolders(base / "recipes")
    for line in subfolders(base / "lines"):
        folders += [line] + subfolders(line / "recipes")
    return folders


def applicable_floor(product: str | None, state_dir: str | None, scope: FloorScope | None) -> Floor | None:
    """The highest floor that holds a bundle of `product` on this line: from its own folder and, with a scope,
    from every folder of the station, except floors of cameras the station's other lines use now.

    Floors follow the camera and product, not the folder: each line and recipe keeps its floors in its own folder,
    which changes when the station file is restructured (a single line rewritten as `lines:`, a line or recipe
    renamed) and changes back when the old file is restored (probes 33, 36: an older bundle served each time).
    A folder keeps one floor per camera that ran in it, so a line moved to another camera does not erase the
    first camera's floor (probe 39). A camera spelled otherwise, or replaced, counts (safe side); two cameras of
    one product in use keep their own series."""
    dirs = [state_dir] if state_dir else []
    if scope is not None:
        dirs += [str(f) for f in _floor_folders(scope.root)
                 if not state_dir or os.path.normpath(f) != os.path.normpath(state_dir)]
    best: Floor | None = None
    for folder in dirs:
        for f in read_floors(folder):
            if f.product is not None and product is not None and f.product != product:
                continue
            if scope is not None and f.source is not None and f.source != scope.source and f.source in scope.others:
                continue   # another line's camera now: its own series
            if best is None or f.version > best.version:
                best = f
    return best


def check_admission(bundle: Bundle, product: str | None, allow_downgrade: bool, state_dir: str | None,
                    current: Bundle | None = None, scope: FloorScope | None = None) -> None:
    """Refuse (BundleError naming both values) a bundle for another product, or older than what was loaded.

    `current` is the bundle in service (a reload must not go below it even without a state_dir). `scope`: the
    station's floors in its other folders count too (applicable_floor).
    """
    where = bundle.root
    if product is not None and bundle.product != product:
        have = "has no product (older bundle format)" if bundle.product is None else f"is for product {short_repr(bundle.product)}"
        raise BundleError(f"{where}: bundle {have}; this station inspects security.product {short_repr(product)}")
    if allow_downgrade:
        return
    found = applicable_floor(bundle.product, state_dir, scope)
    floor, source = (None, None) if found is None else (found.version, str(found.path))
    if found is not None and found.source is not None and scope is not None and found.source != scope.source:
        source += (f", recorded for camera {found.source}, which no line of this station names now (this camera "
                   "spelled otherwise, or the one it replaced); remove that entry deliberately if it is not")
    elif found is not None and state_dir and os.path.normpath(found.path.parent) != os.path.normpath(state_dir):
        source += ", recorded for this camera and product under another line or recipe name of this station"
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
    """Persist the bundle's version as the floor of its camera (`source`) and product in `state_dir` if it is the
    highest so far there (atomic, fsync'd file and folder); the folder's other floors are kept.

    Raises BundleError when it cannot be written: a station that cannot remember its floor would accept a
    rollback after the next restart.
    """
    version = bundle.release_version
    if not state_dir or version is None:
        return
    floors = read_floors(state_dir)
    # This camera's floor of this product; one of this product recorded here before cameras were is taken as this
    # camera's (it stops counting for every camera). One recorded before products were stays as it is: it counts
    # for every product (probe 40: it had been taken over by the next product loaded, and the first one's older
    # release then loaded).
    mine = [f for f in floors if f.product == bundle.product and f.source in (source, None)]
    if any(f.source == source and f.product == bundle.product and f.version >= version for f in mine) \
            and all(f.source == source and f.product == bundle.product for f in mine):
        return
    keep = [f for f in floors if f not in mine]
    entries = [{"bundle_version": f.version, "product": f.product, **({"source": f.source} if f.source else {})}
               for f in keep]
    entries.append({"bundle_version": max([version] + [f.version for f in mine]), "bundle_id": bundle.bundle_id,
                    "product": bundle.product, **({"source": source} if source is not None else {})})
    folder = Path(state_dir)
    path = folder / VERSION_STATE_FILE
    tmp = folder / (VERSION_STATE_FILE + ".tmp")
    record = json.dumps({"bundle_version": max(e["bundle_version"] for e in entries), "floors": entries})
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
