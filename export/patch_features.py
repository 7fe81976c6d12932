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
        "graph": "the pool (stride-16 tap: pool then bilinear) as one matrix per axis on the channels-last taps "
                 "(PatchFeatures.forward; the plain operations give the same features to float rounding)",
    }


def _pool_matrix(n: int, size: int) -> torch.Tensor:
    """(n, n) weights of a 1-D `size`-wide average over zero padding (count_include_pad=True): 1/size within
    reach, 0 beyond the edges."""
    i = torch.arange(n)
    return ((i[:, None] - i[None, :]).abs() <= size // 2).to(torch.float32) / size


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

    def _taps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.in_scale is not None:
            x = x * self.in_scale + self.in_shift
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The exported graph: each tap's aggregation (and the stride-16 tap's upsampling) as one small matrix per
        axis, applied to the tap channels-last, so rows come out patch-major with no transpose. Same numbers as
        `reference` up to float rounding (~1e-6 of 30). It replaces the AveragePools, their layout reorders and
        the final 1024 x 152 transpose in onnxruntime: INT8 bottle features stage ~0.1 ms faster, interleaved
        (benchmarks/feature_graphs.py)."""
        f8, f16 = self._taps(x)
        grid = (int(f8.shape[-2]), int(f8.shape[-1]))
        feats = torch.cat([self._aggregate(f8, grid), self._aggregate(f16, grid)], dim=2)   # (n, h*w, D)
        if self.projection is not None:
            feats = feats @ self.projection
        return feats

    def _aggregate(self, f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(n, C, h, w) tap -> (n, grid_h * grid_w, C): the p x p average (zero padding, count_include_pad) is
        separable, 1/p along each axis; bilinear resampling (align_corners=False) too, so pool-then-upsample
        is one (out, in) matrix per axis. The grid sizes are constants of the fixed-size graph (no Shape
        arithmetic in ONNX)."""
        c, h, w = (int(v) for v in f.shape[1:])
        h_out, w_out = grid
        rows, cols = _pool_matrix(h, self.aggregation_size), _pool_matrix(w, self.aggregation_size)
        if (h, w) != grid:
            rows, cols = _linear_matrix(h, h_out) @ rows, _linear_matrix(w, w_out) @ cols
        a = f.permute(0, 2, 3, 1)                                       # (n, h, w, C)
        if self.aggregation_size > 1 or (h, w) != grid:
            a = cols @ a                                                # along each row: (n, h, w_out, C)
            a = rows @ a.reshape(-1, h, w_out * c)                      # along each column: (n, h_out, w_out * C)
        return a.reshape(-1, h_out * w_out, c)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same features by the plain operations, as PatchCore's code computes them (avg_pool2d, bilinear
        F.interpolate, concatenation, flattening): what export.reference.ReferenceScorer runs, so the parity
        tests hold the exported graph to an independent computation of the definition."""
        f8, f16 = self._taps(x)
        p = self.aggregation_size
        if p > 1:
            f8 = F.avg_pool2d(f8, p, stride=1, padding=p // 2, count_include_pad=True)
            f16 = F.avg_pool2d(f16, p, stride=1, padding=p // 2, count_include_pad=True)
        f16 = F.interpolate(f16, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        feats = torch.cat([f8, f16], dim=1).flatten(2).transpose(1, 2)   # (n, h*w, D)
        if self.projection is not None:
            feats = feats @ self.projection
        return feats

    @staticmethod
    def grid(input_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the stride-8 patch grid for a (W, H) input (TF SAME padding rounds up)."""
        return -(-input_size[1] // 8), -(-input_size[0] // 8)
