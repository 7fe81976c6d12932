"""The feature graph exported to ONNX: backbone taps -> locally aware patch features (PatchCore, sec. 3.1).

The graph's input is the runtime's tensor, (rgb - 127) / 128 (edge_runtime/preprocess.py). Bundles fitted with
the ImageNet input statistics start with a per-channel affine map from that tensor to (rgb / 255 - mean) / std:
it lives in the graph, so preprocessing on the device is one definition for every bundle.

Each tap is averaged over its 3x3 neighbourhood (local aggregation), the stride-16 map is bilinearly
upsampled to the stride-8 grid, both are concatenated and optionally projected by a fixed random
orthonormal matrix. Output: (n_tiles, grid_h * grid_w, dim), one row per patch, row-major over the grid.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from export.backbone import EfficientNetLiteTaps

# ImageNet statistics (rgb / 255 - mean) / std, the convention torchvision and timm (hence anomalib) feed these
# weights with; EfficientNet-Lite was trained on (rgb - 127) / 128. The ImageNet map stretches contrast about
# 2.2x: on bottle it raises pixel AUROC 0.983 -> 0.987, on the magnetic tile texture it costs 5 points of image
# AUROC (benchmarks/accuracy_levers.py), so it is a fit option, not the default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("native", "imagenet")


def input_norm(name: str) -> dict:
    """The manifest's record of the in-graph input map (x = (rgb - 127) / 128 is the graph's input)."""
    if name == "native":
        return {"name": "native", "graph": "identity: the network sees (rgb - 127) / 128"}
    if name == "imagenet":
        return {"name": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "graph": "per channel x * (128 / 255 / std) + (127 / 255 - mean) / std = (rgb / 255 - mean) / std"}
    raise ValueError(f"input normalisation must be one of {', '.join(INPUT_NORMS)}, got {name!r}")


def aggregation(size: int = 3) -> dict:
    """The manifest's record of the local aggregation (PatchCore's neighbourhood size p)."""
    return {
        "neighbourhood": f"{size}x{size} average pool, stride 1, zero padding {size // 2}, count_include_pad=True, on each tap",
        "size": size,
        "upsample": "stride-16 tap bilinear (align_corners=False) to the stride-8 grid",
        "combine": "concatenate channels [stride-8, stride-16]",
    }


def _linear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation, align_corners=False, exactly as F.interpolate computes
    them (each column: the interpolation of a unit impulse)."""
    eye = torch.eye(n_in).unsqueeze(0)                                          # (1, n_in channels, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


class PatchFeatures(nn.Module):
    def __init__(self, backbone: str = "lite0", projection_dim: int | None = None, seed: int = 0,
                 padding: str = "tf", aggregation_size: int = 3, input_norm: str = "native"):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"input normalisation must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
        self.input_norm = input_norm
        if input_norm == "imagenet":
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            self.register_buffer("in_scale", (128.0 / 255.0) / std)
            self.register_buffer("in_shift", (127.0 / 255.0 - mean) / std)
        else:
            self.in_scale = self.in_shift = None
        if aggregation_size < 1 or aggregation_size % 2 == 0:
            raise ValueError(f"aggregation size must be an odd number >= 1, got {aggregation_size}")
        self.aggregation_size = aggregation_size
        self.backbone = EfficientNetLiteTaps(backbone, padding)
        full_dim = sum(self.backbone.channels)
        self.full_dim = full_dim
        self.dim = projection_dim or full_dim
        if projection_dim:
            if projection_dim > full_dim:
                raise ValueError(f"projection_dim {projection_dim} exceeds the feature dimension {full_dim}")
            gen = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(full_dim, projection_dim, generator=gen))
            self.register_buffer("projection", q.contiguous())
        else:
            self.projection = None
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scale is not None:
            x = x * self.in_scale + self.in_shift
        f8, f16 = self.backbone(x)
        p = self.aggregation_size
        if p > 1:
            f8 = F.avg_pool2d(f8, p, stride=1, padding=p // 2, count_include_pad=True)
            f16 = F.avg_pool2d(f16, p, stride=1, padding=p // 2, count_include_pad=True)
        # Bilinear (align_corners=False) upsampling as two small matrix products, rows then columns: the same
        # weights as F.interpolate, but ONNX MatMuls instead of a Resize, and the grid sizes constants of the
        # fixed-size graph instead of Shape/Gather arithmetic: 0.04 vs 0.12 ms for the bottle grid in onnxruntime.
        rows = _linear_matrix(int(f16.shape[-2]), int(f8.shape[-2]))     # (h8, h16)
        cols = _linear_matrix(int(f16.shape[-1]), int(f8.shape[-1]))     # (w8, w16)
        f16 = rows @ f16 @ cols.T
        feats = torch.cat([f8, f16], dim=1)              # (n, D, h, w)
        # Sizes as constants (the graph's size is fixed; only the batch is free): no Shape arithmetic in ONNX.
        feats = feats.reshape(-1, int(feats.shape[1]), int(feats.shape[2]) * int(feats.shape[3])).transpose(1, 2)
        # (n, h*w, D)
        if self.projection is not None:
            feats = feats @ self.projection
        return feats

    @staticmethod
    def grid(input_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the stride-8 patch grid for a (W, H) input (TF SAME padding rounds up)."""
        return -(-input_size[1] // 8), -(-input_size[0] // 8)
