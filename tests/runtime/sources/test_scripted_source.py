import numpy as np
import pytest

from edge_runtime.records import Frame
from edge_runtime.sources import SourceError, build_source
from doubles import ScriptedSource, ScriptedSourceConfig


def test_plays_steps_in_order_then_exhausted():
    image = np.zeros((2, 3), np.uint8)
    src = ScriptedSource(steps=[image, b"PNGBYTES", None, SourceError("camera gone"), Frame(0, "cam", encoded=b"X")],
                         start_frame_id=3)
    src.open()
    first = src.read(0.1)
    assert first.image is image and first.encoded is None and first.frame_id == 3
    second = src.read(0.1)
    assert second.encoded == b"PNGBYTES" and second.frame_id == 4
    assert src.read(0.1) is None                     # a timeout
    with pytest.raises(SourceError, match="camera gone"):
        src.read(0.1)
    last = src.read(0.1)
    assert last.source == "cam" and last.frame_id == 5  # ids come from the source, not the scripted Frame
    assert src.exhausted and src.read(0.1) is None
    assert src.read_calls == 6


def test_open_errors_then_success_and_call_counts():
    src = build_source(ScriptedSourceConfig(steps=[b"A"], open_errors=[SourceError("not yet"), SourceError("still not")]))
    for _ in range(2):
        with pytest.raises(SourceError):
            src.open()
    src.open()
    assert src.is_open and src.open_calls == 3
    src.close()
    assert not src.is_open and src.close_calls == 1


def test_loop_and_bad_steps():
    src = ScriptedSource(ScriptedSourceConfig(steps=[b"A", b"B"], loop=True))
    assert [src.read(0).encoded for _ in range(5)] == [b"A", b"B", b"A", b"B", b"A"]
    assert not src.exhausted
    with pytest.raises(ValueError, match=r"steps\[1\]"):
        ScriptedSource(steps=[b"A", "not a step"])
