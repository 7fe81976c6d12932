"""Records that cross pipeline stages: a captured frame in, an inspection result out."""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from edge_runtime.frame_quality import FrameQuality


class Verdict(str, enum.Enum):
    OK = "OK"        # inspected and within the threshold
    NG = "NG"        # inspected and anomalous
    REVIEW = "REVIEW"  # inspected, score in the bundle's review band: a person re-checks it; never a pass
    FAULT = "FAULT"  # not inspected (bad image, internal error): treated as not-OK by every output


@dataclass
class Frame:
    """One unit of work from a source. Exactly one of `encoded` (file bytes) or `image` (decoded array) is set."""

    frame_id: int
    source: str                       # file path, camera name or URL: where the frame came from
    encoded: bytes | None = None
    image: np.ndarray | None = None   # HxW or HxWxC uint8, as the camera delivered it (BGR for OpenCV)
    captured_at: float = field(default_factory=time.time)
    # When the part's image came into being, where the source knows it earlier than it handed the frame over (a
    # watch folder: when the file appeared, wall clock). A recipe switch faults images that arrived before it ended
    # even when they are read after it (a backlog in the folder is the old product's).
    arrived_at: float | None = None
    # Set instead of encoded/image when the source found a part it could not read (permissions, I/O error, a file
    # too large to read): the pipeline answers it FAULT with this reason, so the part is on record, not skipped.
    unreadable: str | None = None
    # time.monotonic() by which the frame was captured, where this process knows it (the capture thread): the
    # deadline runs from it too, since the wall clock may be stepped back while the frame waits (NTP).
    captured_mono: float | None = None


@dataclass
class InspectionResult:
    frame_id: int
    source: str
    verdict: Verdict
    score: float | None               # raw image score (largest patch distance); None when not inspected
    normalized_score: float | None    # 0.5 at the threshold, clipped to [0, 1]
    threshold: float
    timings_ms: dict[str, float]      # per pipeline stage, plus "total"
    bundle_id: str
    error: str | None = None          # why the frame was not inspected (verdict FAULT)
    # float32, the same height x width as `image`: overlays line up. May be given as a zero-argument callable
    # that makes it: it is then made on first read, in the reader's thread (see the property below).
    anomaly_map: np.ndarray | Callable[[], np.ndarray] | None = None
    image: np.ndarray | None = None        # the decoded RGB frame (ROI applied): what was inspected
    captured_at: float = 0.0
    review_threshold: float | None = None  # lower edge of the review band (REVIEW when it <= score < threshold)
    finished_at: float = field(default_factory=time.time)
    quality: FrameQuality | None = None    # brightness, sharpness, noise of the inspected region (frame_quality.py)

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.OK

    def to_record(self) -> dict:
        """The JSON-serialisable form written to the result log and served to clients."""
        return {
            "time": self.finished_at,
            "captured_at": self.captured_at,
            "frame_id": self.frame_id,
            "source": self.source,
            "verdict": self.verdict.value,
            "score": self.score,
            "normalized_score": self.normalized_score,
            "threshold": self.threshold,
            "review_threshold": self.review_threshold,
            "latency_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "bundle_id": self.bundle_id,
            "error": self.error,
            **({"quality": self.quality.to_record()} if self.quality is not None else {}),
        }


def _read_anomaly_map(self: InspectionResult) -> np.ndarray | None:
    value = self.__dict__.get("_anomaly_map")
    if callable(value):
        with self.__dict__["_anomaly_map_lock"]:
            value = self.__dict__["_anomaly_map"]
            if callable(value):   # not made yet by another reader
                value = value()
                self.__dict__["_anomaly_map"] = value
    return value


def _write_anomaly_map(self: InspectionResult, value) -> None:
    if callable(value):
        self.__dict__["_anomaly_map_lock"] = threading.Lock()
    self.__dict__["_anomaly_map"] = value


# The heat map is deferred: the verdict (and the PLC) does not wait for it. It is made once, by whichever reader
# comes first (the NG image store's worker, the operator page, evaluation), and never for a part nobody looks at.
# A property set after the dataclass is built, so the field stays an ordinary constructor argument.
InspectionResult.anomaly_map = property(_read_anomaly_map, _write_anomaly_map,
                                        doc="The heat map (float32, image-sized), made on first read when deferred.")
