"""Frame sources: pick the adapter named by the station file's `source.type`."""
from __future__ import annotations

from typing import Union

from edge_runtime.sources.base import FrameSource, SourceError
from edge_runtime.sources.camera_source import CameraSource, CameraSourceConfig
from edge_runtime.sources.fake_source import ScriptedSource, ScriptedSourceConfig
from edge_runtime.sources.folder_source import FolderSource, FolderSourceConfig
from edge_runtime.sources.paced_source import PacedSource, PacedSourceConfig
from edge_runtime.sources.video_source import VideoSource, VideoSourceConfig

# A tagged union: edge_runtime.schema picks the dataclass by the mapping's `type` key.
SourceConfig = Union[FolderSourceConfig, CameraSourceConfig, VideoSourceConfig, ScriptedSourceConfig, PacedSourceConfig]


def build_source(cfg: SourceConfig, start_frame_id: int = 0, state_dir: str | None = None,
                 result_logs: list[str] | None = None) -> FrameSource:
    """The source for `cfg`, numbering frames from `start_frame_id` (a restarted daemon passes its saved counter).

    `state_dir` (the station's) is where a watched folder keeps its journal of consumed files; `result_logs`
    (the station's) tell it whether the part in flight at a crash was recorded."""
    if isinstance(cfg, FolderSourceConfig):
        return FolderSource(cfg, start_frame_id, state_dir=state_dir, result_logs=result_logs)
    if isinstance(cfg, CameraSourceConfig):
        return CameraSource(cfg, start_frame_id)
    if isinstance(cfg, VideoSourceConfig):
        return VideoSource(cfg, start_frame_id)
    if isinstance(cfg, ScriptedSourceConfig):
        return ScriptedSource(cfg, start_frame_id)
    if isinstance(cfg, PacedSourceConfig):
        return PacedSource(cfg, start_frame_id)
    raise TypeError(f"no frame source for config {type(cfg).__name__}")


__all__ = [
    "CameraSource", "CameraSourceConfig", "FolderSource", "FolderSourceConfig", "FrameSource", "PacedSource",
    "PacedSourceConfig", "ScriptedSource",
    "ScriptedSourceConfig", "SourceConfig", "SourceError", "VideoSource", "VideoSourceConfig", "build_source",
]
