"""Keeps the frames of rejected (NG), to-be-reviewed (REVIEW) and not-inspected (FAULT) parts, with heat-map
overlays, in a bounded folder.

Operators review these to tune the threshold (and the person at the re-check station looks at REVIEW parts); the
folder never grows past max_files / max_bytes (oldest go first), and before each image the store makes sure the
file system keeps `min_free_mb` free (deleting its own oldest images, else not saving), so it cannot fill the
device's disk, which the result log shares. Only files this store wrote (its own name pattern) are ever deleted.
It is a `slow` record output: the output bus writes it from a worker thread after the line outputs.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from edge_runtime.outputs.base import OUTPUTS, Output, OutputError
from edge_runtime.records import InspectionResult, Verdict

# <UTC time>_f<frame id>_<verdict>_<source stem>[_overlay].<ext>; the stem is reduced to [A-Za-z0-9-]. \Z, not $:
# $ also matches before a final newline, and such a name is not one this store writes (it would be deleted).
_OWN_FILE = re.compile(r"^\d{8}T\d{6}\.\d{3}Z_f\d+_(NG|REVIEW|FAULT)_[A-Za-z0-9-]*(_overlay)?\.(jpg|png)\Z")
# JET maps 0.875 to pure red: the threshold lands there, so red means "at or above threshold".
_THRESHOLD_LEVEL = 224


@dataclass(kw_only=True)
class NgImageStoreConfig:
    type: Literal["ng_images"] = "ng_images"
    dir: str
    max_files: int = 2000             # images and overlays each count as one file
    max_bytes: int = 1024 * 1024 * 1024
    save_faults: bool = True          # also keep frames that could not be inspected (when they were decoded)
    save_review: bool = True          # also keep REVIEW frames (score in the review band) for the re-check
    min_free_mb: float = 256.0        # leave at least this much free on the file system (the result log needs it)
    format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = 90
    overlay_alpha: float = 0.5        # weight of the heat map in the overlay

    def validate(self) -> None:
        if not self.dir:
            raise ValueError("dir: must not be empty")
        if self.max_files < 2:
            raise ValueError(f"max_files: must be at least 2 (an image and its overlay), got {self.max_files}")
        if self.min_free_mb < 0:
            raise ValueError(f"min_free_mb: must be 0 or more, got {self.min_free_mb}")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes: must be positive, got {self.max_bytes}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: must be 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise ValueError(f"overlay_alpha: must be 0..1, got {self.overlay_alpha}")


def safe_stem(source: str, limit: int = 40) -> str:
    """A file-name fragment from a source (path, URL, camera name): its last component reduced to [A-Za-z0-9-]."""
    last = re.split(r"[/\\]", source.rstrip("/\\"))[-1] if source else ""
    last = last.rsplit(".", 1)[0] if "." in last else last
    return re.sub(r"[^A-Za-z0-9]+", "-", last).strip("-")[:limit].strip("-")


def to_bgr(image: np.ndarray) -> np.ndarray:
    """The result's RGB (or grey) frame as 3-channel BGR uint8 for OpenCV."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
    raise ValueError(f"image of shape {img.shape} is not a grey, RGB or RGBA frame")


def heat_overlay(image_bgr: np.ndarray, anomaly_map: np.ndarray, threshold: float, alpha: float = 0.5) -> np.ndarray:
    """JET heat map of `anomaly_map` blended on the frame; scaled so the threshold is red (blue = normal)."""
    amap = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be HxW, got shape {amap.shape}")
    h, w = image_bgr.shape[:2]
    if amap.shape != (h, w):  # the pipeline upsamples to frame size; tolerate a map that was not
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    # Without a usable threshold, fall back to the map's own maximum (red = the worst patch of this frame).
    scale = threshold if np.isfinite(threshold) and threshold > 0 else float(amap.max()) or 1.0
    levels = np.clip(amap / scale * _THRESHOLD_LEVEL, 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(levels, cv2.COLORMAP_JET)
    return cv2.addWeighted(image_bgr, 1.0 - alpha, heat, alpha, 0.0)


@OUTPUTS.register(NgImageStoreConfig)
class NgImageStore(Output):
    """Saves NG/REVIEW/FAULT frames and overlays; deletes its own oldest files to stay within the bounds."""

    role = "record"
    slow = True

    def __init__(self, cfg: NgImageStoreConfig) -> None:
        self.cfg = cfg
        self.name = f"ng_images:{cfg.dir}"
        self._files: deque[tuple[str, int]] = deque()  # (name, bytes), oldest first
        self._total_bytes = 0
        self._started = False
        self.refused_low_space = 0   # images not saved to keep min_free_mb free

    def start(self) -> None:
        try:
            os.makedirs(self.cfg.dir, exist_ok=True)
            entries = []
            with os.scandir(self.cfg.dir) as it:
                for entry in it:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if entry.name.endswith(".part") and _OWN_FILE.match(entry.name[:-len(".part")]):
                        # Our write that a crash or power cut interrupted: never counted, it would stay for good.
                        try:
                            os.unlink(entry.path)
                        except OSError:
                            pass   # the folder still opens; the next start tries again
                    elif _OWN_FILE.match(entry.name):
                        st = entry.stat(follow_symlinks=False)
                        entries.append((st.st_mtime, entry.name, st.st_size))
        except OSError as exc:
            raise OutputError(f"NG image store {self.cfg.dir}: cannot open folder: {exc}") from exc
        entries.sort()
        self._files = deque((name, size) for _, name, size in entries)
        self._total_bytes = sum(size for _, size in self._files)
        self._started = True
        self._enforce_bounds()

    def wants(self, result: InspectionResult) -> bool:
        if result.verdict is Verdict.OK:
            return False
        if result.verdict is Verdict.FAULT and not self.cfg.save_faults:
            return False
        if result.verdict is Verdict.REVIEW and not self.cfg.save_review:
            return False
        return result.image is not None  # a FAULT before decoding has no pixels to keep; the result log has the reason

    def publish(self, result: InspectionResult) -> None:
        if not self.wants(result):
            return
        if not self._started:
            self.start()
        try:
            frame = to_bgr(result.image)
            images = {"": frame}
            if result.anomaly_map is not None:
                images["_overlay"] = heat_overlay(frame, result.anomaly_map, result.threshold, self.cfg.overlay_alpha)
        except (ValueError, cv2.error) as exc:
            raise OutputError(f"NG image store: frame {result.frame_id} not saved: {exc}") from exc
        base = self._base_name(result)
        for suffix, img in images.items():
            self._save(f"{base}{suffix}.{self.cfg.format}", img, result.frame_id)
        self._enforce_bounds()

    # -- internals -------------------------------------------------------------------------------------------
    def _base_name(self, result: InspectionResult) -> str:
        when = result.captured_at or result.finished_at or time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(when)) + f".{int((when % 1) * 1000):03d}Z"
        return f"{stamp}_f{max(int(result.frame_id), 0)}_{result.verdict.value}_{safe_stem(result.source) or 'frame'}"

    def _save(self, name: str, img: np.ndarray, frame_id: int) -> None:
        params = [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality] if self.cfg.format == "jpg" else []
        ok, data = cv2.imencode(f".{self.cfg.format}", img, params)
        if not ok:
            raise OutputError(f"NG image store: frame {frame_id}: cannot encode {name}")
        path = os.path.join(self.cfg.dir, name)
        self._make_room(len(data), path)
        tmp = path + ".part"
        try:
            # Written under a temporary name and renamed, so a reader never sees half an image; fsync'd before the
            # rename, or a power cut could leave the finished name on an empty or half-written file (probe 113).
            with open(tmp, "wb") as f:
                f.write(data.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise OutputError(f"NG image store: cannot write {path}: {exc.strerror or exc}") from exc
        if any(n == name for n, _ in self._files):  # the same name rewritten (repeated frame id): count it once
            self._files = deque((n, s) for n, s in self._files if n != name)
            self._total_bytes = sum(size for _, size in self._files)
        self._files.append((name, len(data)))
        self._total_bytes += len(data)

    def _free_bytes(self) -> int:
        return shutil.disk_usage(self.cfg.dir).free

    def _make_room(self, size: int, path: str) -> None:
        """Keep min_free_mb free after writing `size` bytes: delete own oldest images, else refuse this one."""
        floor = int(self.cfg.min_free_mb * 1024 * 1024)
        try:
            free = self._free_bytes()
            while free - size < floor and self._files:
                name, old_size = self._files.popleft()
                self._total_bytes -= old_size
                try:
                    os.unlink(os.path.join(self.cfg.dir, name))
                except FileNotFoundError:
                    pass
                free = self._free_bytes()
        except OSError as exc:
            raise OutputError(f"NG image store: cannot check free space for {path}: {exc.strerror or exc}") from exc
        if free - size < floor:
            self.refused_low_space += 1
            raise OutputError(f"NG image store: {path} not saved: {free / 2**20:.0f} MiB free on the file system, "
                              f"min_free_mb is {self.cfg.min_free_mb:g}")

    def _enforce_bounds(self) -> None:
        while self._files and (len(self._files) > self.cfg.max_files or self._total_bytes > self.cfg.max_bytes):
            name, size = self._files.popleft()
            self._total_bytes -= size
            try:
                os.unlink(os.path.join(self.cfg.dir, name))
            except FileNotFoundError:
                pass  # already removed by an operator
            except OSError as exc:
                raise OutputError(f"NG image store: cannot delete {os.path.join(self.cfg.dir, name)}: {exc}") from exc
