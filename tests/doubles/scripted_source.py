"""ScriptedSource: a test double that plays a fixed list of steps, so daemon fault handling can be tested without hardware.

Steps: a numpy array (decoded frame), bytes (encoded file), a Frame, None (a read that times out), or an
exception (instance or class) that read() raises, e.g. SourceError("camera gone").
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from edge_runtime.records import Frame
from edge_runtime.sources.base import SOURCES, FrameSource


def _is_exception(step: Any) -> bool:
    return isinstance(step, BaseException) or (isinstance(step, type) and issubclass(step, BaseException))


def _check_step(step: Any, where: str) -> None:
    if step is None or isinstance(step, (np.ndarray, bytes, Frame)) or _is_exception(step):
        return
    raise ValueError(f"{where}: expected an image array, bytes, a Frame, None or an exception, got {type(step).__name__}")


@dataclass(kw_only=True)
class ScriptedSourceConfig:
    type: Literal["scripted"] = "scripted"
    steps: list[Any] = field(default_factory=list)
    open_errors: list[Any] = field(default_factory=list)   # raised by successive open() calls, then opens succeed
    loop: bool = False                                     # play the steps again instead of becoming exhausted
    name: str = "scripted"

    def validate(self) -> None:
        for i, step in enumerate(self.steps):
            _check_step(step, f"steps[{i}]")
        for i, err in enumerate(self.open_errors):
            if not _is_exception(err):
                raise ValueError(f"open_errors[{i}]: expected an exception, got {type(err).__name__}")
        if self.loop and not self.steps:
            raise ValueError("loop: needs at least one step")


@SOURCES.register(ScriptedSourceConfig)
class ScriptedSource(FrameSource):
    def __init__(self, cfg: ScriptedSourceConfig | None = None, start_frame_id: int = 0, *, steps: list[Any] | None = None) -> None:
        cfg = cfg or ScriptedSourceConfig(steps=list(steps or []))
        cfg.validate()
        self.cfg = cfg
        self.name = cfg.name
        self._steps = list(cfg.steps)
        self._open_errors = list(cfg.open_errors)
        self._pos = 0
        self._next_id = start_frame_id
        self._lock = threading.Lock()  # tests may read the counters from another thread
        # What the daemon did, for assertions.
        self.open_calls = 0
        self.close_calls = 0
        self.read_calls = 0
        self.is_open = False

    @property
    def next_frame_id(self) -> int:
        return self._next_id

    def open(self) -> None:
        with self._lock:
            self.open_calls += 1
            if self._open_errors:
                err = self._open_errors.pop(0)
                raise err
            self.is_open = True

    def read(self, timeout: float) -> Frame | None:
        with self._lock:
            self.read_calls += 1
            if self._pos >= len(self._steps):
                if not self.cfg.loop:
                    return None
                self._pos = 0
            step = self._steps[self._pos]
            self._pos += 1
            if step is None:
                return None
            if _is_exception(step):
                raise step
            if isinstance(step, Frame):
                frame = Frame(frame_id=self._next_id, source=step.source, encoded=step.encoded, image=step.image,
                              captured_at=step.captured_at)
            elif isinstance(step, bytes):
                frame = Frame(frame_id=self._next_id, source=f"{self.name}#{self._pos - 1}", encoded=step)
            else:
                frame = Frame(frame_id=self._next_id, source=f"{self.name}#{self._pos - 1}", image=step)
            self._next_id += 1
            return frame

    @property
    def exhausted(self) -> bool:
        return not self.cfg.loop and self._pos >= len(self._steps)

    def close(self) -> None:
        with self._lock:
            self.close_calls += 1
            self.is_open = False
