"""The page's sink on the output bus: keeps the recent parts (record, overlay, thumbnail, frame) for the page.

A `record` output marked `slow`, so the bus drives it from its own worker thread after the line outputs: image
encoding never sits between a verdict and the PLC, and a full queue drops page updates, never inspections.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from edge_runtime.outputs.base import Output
from edge_runtime.outputs.ng_image_store import heat_overlay, to_bgr
from edge_runtime.outputs.result_log import _finite
from edge_runtime.records import InspectionResult


@dataclass
class Part:
    record: dict
    overlay_jpg: bytes | None
    thumb_jpg: bytes | None
    frame: np.ndarray | None = None     # the inspected RGB region, kept for the newest keep_frames parts
    feedback: list[str] = field(default_factory=list)


def _fit(img: np.ndarray, longest: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = longest / max(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def _jpg(img: np.ndarray, quality: int = 85) -> bytes | None:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes() if ok else None


class PartHistory(Output):
    """The newest `history` parts, newest last; `seq` grows with every part (the page's live updates wait on it)."""

    name = "operator_page"
    role: Literal["record"] = "record"
    slow = True
    # An OK part's heat map costs CPU when read (the map is made then, and the page draws its overlay and
    # thumbnail): drawn for at most one OK part in this many seconds, every NG and REVIEW part always. The live
    # view still shows an OK part's heat map several times a second; a 60 parts/s line does not pay for pictures
    # nobody can follow. OK parts in between show their plain image.
    OK_HEAT_INTERVAL_S = 0.2

    def __init__(self, history: int = 200, keep_frames: int = 32, view_px: int = 640, thumbnail_px: int = 160):
        self.history, self.keep_frames = history, keep_frames
        self.view_px, self.thumbnail_px = view_px, thumbnail_px
        self._parts: collections.OrderedDict[int, Part] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.seq = 0
        self.shift_started = time.time()
        self.shift_counts: dict[str, int] = {"OK": 0, "NG": 0, "REVIEW": 0, "FAULT": 0}
        self.last_fault: dict | None = None
        self._last_ok_heat = -float("inf")   # monotonic time of the newest OK part drawn with its heat map

    def publish(self, result: InspectionResult) -> None:
        # As the result log writes it: NaN/inf as null. A part FAULTed while no bundle was in service has threshold
        # NaN, which JSON cannot hold: /api/parts answered 500 and the live view never opened its event stream for
        # as long as that part was in the history (probe 104).
        record = _finite(result.to_record())
        overlay = thumb = None
        if result.image is not None:
            small = _fit(to_bgr(result.image), self.view_px)
            if self._draws_heat(record["verdict"]) and result.anomaly_map is not None:
                amap = cv2.resize(np.asarray(result.anomaly_map, np.float32), (small.shape[1], small.shape[0]))
                small = heat_overlay(small, amap, result.threshold)
            overlay = _jpg(small)
            thumb = _jpg(_fit(small, self.thumbnail_px), 80)
        part = Part(record, overlay, thumb, result.image)
        with self._lock:
            self._parts[result.frame_id] = part
            while len(self._parts) > self.history:
                self._parts.popitem(last=False)
            # Full frames only for the newest keep_frames parts: they are what "this part is good" learns from.
            for i, p in enumerate(reversed(self._parts.values())):
                if i >= self.keep_frames and p.frame is None:
                    break
                if i >= self.keep_frames:
                    p.frame = None
            self.shift_counts[record["verdict"]] = self.shift_counts.get(record["verdict"], 0) + 1
            if record["verdict"] == "FAULT":
                self.last_fault = {"time": record["time"], "frame_id": record["frame_id"], "error": record["error"]}
            self.seq += 1

    def _draws_heat(self, verdict: str) -> bool:
        if verdict != "OK":
            return True
        now = time.monotonic()
        if now - self._last_ok_heat < self.OK_HEAT_INTERVAL_S:
            return False
        self._last_ok_heat = now
        return True

    def new_shift(self) -> None:
        with self._lock:
            self.shift_started = time.time()
            self.shift_counts = {k: 0 for k in self.shift_counts}

    def get(self, frame_id: int) -> Part | None:
        with self._lock:
            return self._parts.get(frame_id)

    def records(self, verdict: str | None = None, limit: int | None = None) -> list[dict]:
        """Records newest first, optionally of one verdict."""
        with self._lock:
            parts = list(self._parts.values())
        out = [dict(p.record, feedback=list(p.feedback), has_frame=p.frame is not None) for p in reversed(parts)
               if verdict is None or p.record["verdict"] == verdict]
        return out[:limit] if limit else out

    def latest(self) -> dict | None:
        recs = self.records(limit=1)
        return recs[0] if recs else None

    def mark(self, frame_id: int, note: str) -> None:
        with self._lock:
            p = self._parts.get(frame_id)
            if p is not None:
                p.feedback.append(note)
