"""Accuracy floor on real data (MVTec AD bottle, ../shared/data). The full figures: benchmarks/accuracy.py."""
from export.evaluate import evaluate


def test_bottle_deployed_path_accuracy(bottle_bundle, bottle_dir):
    r = evaluate(bottle_bundle, bottle_dir, "onnx-int8", "hnsw")
    assert r["n_good"] == 20 and r["n_defect"] == 63
    assert r["image_auroc"] >= 0.97, r
    assert r["pixel_auroc"] >= 0.94, r
    assert min(r["per_defect"].values()) >= 0.9
