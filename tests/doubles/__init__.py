"""Test doubles of the station's narrow adapters: a frame source, a line output and GPIO lines.

They implement the product's interfaces (FrameSource, Output, GpioLines) and register with its adapter
registries on import, so a test's station mapping can name `type: scripted` or `type: recording`; they live here,
not in the product, so a station file never can. tests/conftest.py imports this package.
"""
from doubles.full_disk_log import FullDiskLog
from doubles.gpio_lines import FakeGpioLines
from doubles.recording_output import RecordingOutput, RecordingOutputConfig
from doubles.scripted_source import ScriptedSource, ScriptedSourceConfig

__all__ = ["FakeGpioLines", "FullDiskLog", "RecordingOutput", "RecordingOutputConfig", "ScriptedSource", "ScriptedSourceConfig"]
