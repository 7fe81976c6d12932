"""Frame sources: pick the adapter named by the station file's `source.type`."""
from __future__ import annotations

from typing import Any

# Each import registers its source with SOURCES (edge_runtime.registry); the order is the one error messages list.
from edge_runtime.sources.base import SOURCES, FrameSource, SourceError
from edge_runtime.sources.folder_source import FolderSource, FolderSourceConfig
from edge_runtime.sources.camera_source import CameraSource, CameraSourceConfig
from edge_runtime.sources.video_source import VideoSource, VideoSourceConfig
from edge_runtime.sources.paced_source import PacedSource, PacedSourceConfig

# The station file's `source:`: a tagged union of the registered configs, chosen by the `type` key.
SourceConfig: Any = SOURCES.annotation


def build_source(cfg: Any, start_frame_id: int = 0, state_dir: str | None = None,
                 result_logs: list[str] | None = None) -> FrameSource:
    """The source for `cfg`, numbering frames from `start_frame_id` (a restarted daemon passes its saved counter).

    `state_dir` (the station's) is where a watched folder keeps its journal of consumed files; `result_logs`
    (the station's) tell it whether the part in flight at a crash was recorded. Only the folder source keeps
    state across restarts, so only it is given them."""
    if isinstance(cfg, FolderSourceConfig):
        return FolderSource(cfg, start_frame_id, state_dir=state_dir, result_logs=result_logs)
    return SOURCES.build(cfg, start_frame_id)


__all__ = [
    "CameraSource", "CameraSourceConfig", "FolderSource", "FolderSourceConfig", "FrameSource", "PacedSource",
    "PacedSourceConfig", "SOURCES", "SourceConfig", "SourceError", "VideoSource", "VideoSourceConfig", "build_source",
]
