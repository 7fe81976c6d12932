"""The paced source (a folder replayed as a free-running camera) hands frames over as a camera driver would."""
from __future__ import annotations

import cv2
import numpy as np

from edge_runtime.sources.paced_source import PacedSource, PacedSourceConfig


def test_frames_keep_their_channels_and_bit_depth(tmp_path):
    # 16-bit stays 16-bit so that the bundle's preprocessing.shift_16bit applies, as to a 16-bit camera's frames;
    # grey stays one channel, as from a mono camera.
    wide = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) % 4096            # 12-bit values
    cv2.imwrite(str(tmp_path / "a_wide.png"), np.dstack([wide] * 3))
    cv2.imwrite(str(tmp_path / "b_grey.png"), (wide >> 4).astype(np.uint8))
    src = PacedSource(PacedSourceConfig(path=str(tmp_path), fps=1000, frames=2))
    src.open()
    first, second = src.read(1.0), src.read(1.0)
    assert first.image.dtype == np.uint16 and first.image.shape == (48, 64, 3)
    assert np.array_equal(first.image[..., 0], wide)
    assert second.image.dtype == np.uint8 and second.image.shape == (48, 64)
