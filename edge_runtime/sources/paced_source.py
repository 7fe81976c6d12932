"""A folder of images replayed at a fixed frame rate, like a free-running camera: frames come whether read or not.

For benchmarks and line trials without hardware (`type: paced`): frame k exists from t0 + k/fps; a read returns
the newest frame, and ticks nobody read in time are counted as `missed` (what a camera's driver overwrites).
Frames are decoded once at open and delivered as raw BGR uint8 arrays, as a camera delivers them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from edge_runtime.records import Frame
from edge_runtime.sources.base import SOURCES, FrameSource, SourceError, escape_name

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(kw_only=True)
class PacedSourceConfig:
    type: Literal["paced"] = "paced"
    path: str                        # a folder of images (searched recursively, cycled in name order) or one image
    fps: float = 30.0                # frames per second the "camera" produces
    frames: int | None = None        # ticks after which the source is exhausted; None: endless
    encoded: bool = False            # deliver the file bytes (decoded by the pipeline) instead of raw BGR frames
    name: str | None = None

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path: must name a folder of images or an image file")
        if not 0 < self.fps <= 10000:
            raise ValueError(f"fps: must be > 0 and <= 10000, got {self.fps}")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"frames: must be >= 1, got {self.frames}")


@SOURCES.register(PacedSourceConfig)
class PacedSource(FrameSource):
    live = True   # frames come at the source's pace: the line's capture thread drops (and counts) what it misses

    def __init__(self, cfg: PacedSourceConfig, start_frame_id: int = 0) -> None:
        cfg.validate()
        self.cfg = cfg
        self.name = escape_name(cfg.name or f"paced:{cfg.path}")
        self._images: list[tuple[str, object]] = []
        self._t0: float | None = None
        self._next_tick = 0
        self._next_id = start_frame_id
        self.missed = 0        # ticks that passed while nobody read (a camera overwrites them)
        self.delivered = 0

    @property
    def offered(self) -> int:
        """Frames the "camera" has produced so far (capped at `frames`)."""
        if self._t0 is None:
            return 0
        ticks = int((time.monotonic() - self._t0) * self.cfg.fps) + 1
        return min(ticks, self.cfg.frames) if self.cfg.frames else ticks

    def open(self) -> None:
        if not self._images:
            root = Path(self.cfg.path)
            if root.is_dir():
                paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            elif root.is_file():
                paths = [root]
            else:
                raise SourceError(f"{self.name}: {root} is neither an image folder nor an image file")
            for p in paths:
                data = p.read_bytes()
                if self.cfg.encoded:
                    self._images.append((str(p), data))
                else:
                    # As the camera's driver hands it over: grey stays one channel, 16-bit stays 16-bit (the bundle's
                    # preprocessing.shift_16bit applies in the pipeline, as to a camera's frames).
                    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
                    if image is None:
                        raise SourceError(f"{self.name}: {p}: not a decodable image")
                    self._images.append((str(p), image))
            if not self._images:
                raise SourceError(f"{self.name}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
        if self._t0 is None:
            self._t0 = time.monotonic()   # the camera keeps its clock across reopenings

    def read(self, timeout: float) -> Frame | None:
        if self._t0 is None:
            raise SourceError(f"{self.name}: read before open")
        if self.exhausted:
            return None
        period = 1.0 / self.cfg.fps
        due = self._t0 + self._next_tick * period
        now = time.monotonic()
        if now < due:
            if due - now > timeout:
                time.sleep(timeout)
                return None
            time.sleep(due - now)
            now = time.monotonic()
        newest = int((now - self._t0) * self.cfg.fps)
        if self.cfg.frames:
            newest = min(newest, self.cfg.frames - 1)
        self.missed += max(0, newest - self._next_tick)
        self._next_tick = newest + 1
        name, payload = self._images[newest % len(self._images)]
        frame = Frame(frame_id=self._next_id, source=name, captured_at=time.time() - (now - (self._t0 + newest * period)))
        if self.cfg.encoded:
            frame.encoded = payload
        else:
            frame.image = payload
        self._next_id += 1
        self.delivered += 1
        return frame

    @property
    def exhausted(self) -> bool:
        return bool(self.cfg.frames) and self._next_tick >= self.cfg.frames
