"""The torch reference path: torch features + exact nearest neighbour in torch. The yardstick for parity.

It shares the bundle's FP32 memory bank and the runtime's scoring code (scores and heat map), so any
difference from the deployed path comes from the extractor or the search alone.
"""
from __future__ import annotations

import numpy as np
import torch

from edge_runtime.bundle import Bundle
from edge_runtime.nn_search import HnswSearch
from edge_runtime.pipeline import Scored, score_frame
from export.patch_features import PatchFeatures


def model_for(bundle: Bundle) -> PatchFeatures:
    m = bundle.manifest
    proj = m["features"].get("projection") or {}
    # Bundles from before the in-graph input map record none: their network saw (rgb - 127) / 128 directly.
    norm = (m["features"].get("input_norm") or {}).get("name", "native")
    return PatchFeatures(m["backbone"]["name"], proj.get("dim"), proj.get("seed", 0),
                         aggregation_size=int(m["features"]["aggregation"].get("size", 3)), input_norm=norm)


class ReferenceScorer:
    def __init__(self, bundle: Bundle, threads: int = 2):
        torch.set_num_threads(threads)
        self.bundle = bundle
        self.model = model_for(bundle)
        variant = bundle.variant("fp32")
        bank = HnswSearch.load(bundle.path(variant.index_file), bundle.dim, bundle.hnsw_params).exact.bank
        self.bank = torch.from_numpy(bank)
        self.geometry = bundle.geometry
        self.threshold = variant.threshold
        self.review_threshold = variant.review_threshold

    @torch.no_grad()
    def features(self, tensor: np.ndarray) -> torch.Tensor:
        return self.model.reference(torch.from_numpy(tensor)).reshape(-1, self.model.dim)

    @torch.no_grad()
    def score_tiles(self, tensor: np.ndarray) -> np.ndarray:
        feats = self.features(tensor)
        return torch.cdist(feats.double(), self.bank.double()).min(dim=1).values.float().numpy()

    def score_rgb(self, rgb: np.ndarray, name: str = "<frame>") -> Scored:
        return score_frame(self.score_tiles, self.geometry, rgb, name)
