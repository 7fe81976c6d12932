"""Feature extraction: the bundle's ONNX graph (backbone + patch aggregation) run by onnxruntime."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort


class FeatureError(RuntimeError):
    """The ONNX model cannot be loaded or run on this device."""


def make_session(model: Path | bytes, threads: int = 2, providers: list[str] | None = None,
                 name: str | Path | None = None) -> ort.InferenceSession:
    """An onnxruntime session for `model` (a path, or the model's verified bytes); `name` names it in errors."""
    model_path = name or (model if not isinstance(model, (bytes, bytearray)) else "<model bytes>")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Intra-op threads spin while a run lasts (the 33 convolutions hand work to each other without a sleep and
    # wake-up between them: INT8 features 3.4-3.65 -> 2.8-3.0 ms) and stop when it ends: left spinning ~40 ms
    # after each run they stole a core from the search stage (INT8 + HNSW 32.9 vs 16.4 ms per frame,
    # benchmarks/runtime_knobs.py). benchmarks/ort_spinning.py compares the settings.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    available = ort.get_available_providers()
    wanted = providers or ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise FeatureError(f"onnxruntime here has no {', '.join(missing)} (available: {', '.join(available)})")
    try:
        # Bytes are parsed from memory: what runs is what the bundle check hashed, whatever is on disk now.
        source = bytes(model) if isinstance(model, (bytes, bytearray)) else str(model)
        return ort.InferenceSession(source, sess_options=opts, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own exception types for invalid or unsupported graphs
        raise FeatureError(f"{model_path}: onnxruntime cannot load the model ({exc})") from None


class FeatureExtractor:
    """(n_tiles, 3, H, W) float32 -> (n_tiles * grid_h * grid_w, dim) float32 patch features, tile-major.

    All tiles of a frame go through one session run: one batch, one set of kernel launches.
    A model whose input is uint8 (`takes_pixels`: the INT8 graph of bundles from this release) takes the tiles'
    RGB pixels, (n_tiles, H, W, 3) uint8, as they are; given the float tensor instead, it maps it back to those
    pixels exactly (rgb = x * 128 + 127: the tensor is `preprocess.to_tensor`'s), so every caller gets the same
    features whichever it passes. A pixel graph with a 4th input channel (`pixel_channels`, see `model_input`)
    gets it added here, so callers pass RGB either way.
    """

    def __init__(self, model: Path | bytes, expected: tuple[int, int, tuple[int, int], int], threads: int = 2,
                 providers: list[str] | None = None, name: str | Path | None = None):
        """`model`: the ONNX file, or its bytes (the bundle's verified copy); `name` names it in errors."""
        model_path = name or (model if not isinstance(model, (bytes, bytearray)) else "<model bytes>")
        self.session = make_session(model, threads, providers, model_path)
        self.input_name = self.session.get_inputs()[0].name
        self.model_path = model_path
        n_patches, dim, (width, height), n_tiles = expected
        self.dim = dim
        out_shape = self.session.get_outputs()[0].shape
        if len(out_shape) != 3 or out_shape[1:] != [n_patches, dim]:
            raise FeatureError(f"{model_path}: model output shape {out_shape} does not match the manifest "
                               f"(tiles, {n_patches}, {dim})")
        inp = self.session.get_inputs()[0]
        in_shape = inp.shape
        self.takes_pixels = takes_pixels(self.session)
        if inp.type not in ("tensor(uint8)", "tensor(float)"):
            raise FeatureError(f"{model_path}: model input is {inp.type}, not float32 or uint8")
        spatial = in_shape[1:3] if self.takes_pixels else in_shape[2:]
        channels = (in_shape[3] if self.takes_pixels else in_shape[1]) if len(in_shape) == 4 else None
        self.channels = channels
        allowed = (3, 4) if self.takes_pixels else (3,)
        if len(in_shape) != 4 or spatial != [height, width] or channels not in allowed:
            layout = "(tiles, H, W, 3 or 4) uint8" if self.takes_pixels else "(tiles, 3, H, W) float32"
            raise FeatureError(f"{model_path}: model input {in_shape} does not match the manifest's input_size "
                               f"{width}x{height} (W x H) as {layout}")
        if isinstance(in_shape[0], int) and in_shape[0] != n_tiles:
            raise FeatureError(f"{model_path}: model takes a fixed batch of {in_shape[0]}, the geometry has {n_tiles} tiles")

    def __call__(self, tensor: np.ndarray) -> np.ndarray:
        x = model_input(tensor, self.takes_pixels, self.channels)
        return self.session.run(None, {self.input_name: x})[0].reshape(-1, self.dim)


def takes_pixels(session: ort.InferenceSession) -> bool:
    """Whether the model's input is the tiles' uint8 RGB pixels (NHWC) rather than the float tensor (NCHW)."""
    return session.get_inputs()[0].type == "tensor(uint8)"


def pixel_channels(session: ort.InferenceSession) -> int:
    """The channels a pixel graph takes (its input's last axis: 3, or 4 for a graph whose first convolution was
    widened, export.onnx_export.widen_pixel_input); 3 for a float graph. FeatureExtractor refuses other counts."""
    inp = session.get_inputs()[0]
    last = inp.shape[3] if takes_pixels(session) and len(inp.shape) == 4 else 3
    return last if isinstance(last, int) else 3


def model_input(tensor: np.ndarray, pixels: bool, channels: int = 3) -> np.ndarray:
    """What a model takes, from the float tensor (n, 3, H, W) or the uint8 pixels (n, H, W, 3): the pixels are
    rgb = x * 128 + 127 exactly (`preprocess.to_tensor` is its inverse). A 4-channel pixel graph gets RGBA: its
    first convolution's weights for the 4th channel are zero, so the value there (255) changes nothing; 4
    channels put that convolution on onnxruntime's faster kernel (export.onnx_export.widen_pixel_input)."""
    if pixels and tensor.dtype != np.uint8:
        tensor = np.rint(tensor * np.float32(128.0) + np.float32(127.0)).clip(0, 255).astype(np.uint8)
        tensor = tensor.transpose(0, 2, 3, 1)
    tensor = np.ascontiguousarray(tensor)
    if pixels and channels == 4 and tensor.shape[-1] == 3:
        n, h, w = tensor.shape[:3]
        # One OpenCV call over the tiles stacked as one tall image: ~0.03 ms for a 256 x 256 tile.
        tensor = cv2.cvtColor(tensor.reshape(n * h, w, 3), cv2.COLOR_RGB2RGBA).reshape(n, h, w, 4)
    return tensor
