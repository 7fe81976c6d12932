"""`knn: ivf` (faiss IVF built on the device + the exact re-check): the image score equals exact search's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.nn_search import ExactSearch, IvfSearch

import faiss  # noqa: E402,F401 - a core dependency: a device install without it is broken, not skipped


def exact_reference(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Every query's nearest distance by brute force, in the re-check's own float32 kernel (no bound: whole bank)."""
    return ExactSearch(bank).nearest_within(queries, np.full(len(queries), np.inf))[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_score_is_exact_even_when_the_index_misses_neighbours(seed, anisotropic):
    bank, queries = anisotropic(seed, 6000, d=48, q=400, query_scale=1.3)
    search = IvfSearch(bank, nlist=128, nprobe=1)       # many small cells, one probed: a deliberately poor index
    ref = exact_reference(bank, queries)
    approx = search.approximate(queries)
    assert np.all(approx >= ref)                          # a real bank vector's distance: an upper bound
    assert np.mean(approx > ref) > 0.05                   # the index really is approximate here
    dist = search.distances(queries)
    assert np.float32(dist.max()) == np.float32(ref.max())
    assert 0 < search.rechecked_last < len(queries)


def test_ties_between_bank_vectors_and_between_patches():
    # Each query lies exactly halfway between two bank vectors, and several queries share the maximum score.
    bank = np.array([[0, 0, 0], [2, 0, 0], [0, 4, 0], [0, 4, 2], [9, 9, 9]], dtype=np.float32)
    queries = np.array([[1, 0, 0], [0, 4, 1], [1, 0, 0], [0, 4, 1], [0, 0, 0]], dtype=np.float32)
    search = IvfSearch(bank)
    dist = search.distances(queries)
    ref = exact_reference(bank, queries)
    assert dist.max() == ref.max() == np.float32(1.0)


def test_bank_of_one_vector():
    bank = np.array([[1.0, -2.0, 0.5, 3.0]], dtype=np.float32)
    queries = np.random.default_rng(5).normal(size=(64, 4)).astype(np.float32)
    search = IvfSearch(bank)
    assert (search.nlist, search.nprobe) == (1, 1)
    dist = search.distances(queries)
    assert np.array_equal(dist, np.linalg.norm(queries - bank[0], axis=1).astype(np.float32)) or \
        np.allclose(dist, np.linalg.norm(queries - bank[0], axis=1), rtol=1e-6)
    assert dist.max() == exact_reference(bank, queries).max()


def test_small_bank_gets_fewer_cells_than_points(anisotropic):
    bank, queries = anisotropic(7, 200, d=16, q=50, query_scale=1.3)
    search = IvfSearch(bank)
    assert search.nlist == 200 // IvfSearch.POINTS_PER_CELL
    assert search.distances(queries).max() == exact_reference(bank, queries).max()


def test_an_empty_probed_cell_still_gives_the_exact_image_score(monkeypatch, anisotropic):
    bank, queries = anisotropic(8, 3000, d=48, q=100, query_scale=1.3)
    search = IvfSearch(bank, nlist=32, nprobe=1)
    real = search.ivf.search

    def half_missing(q, k):           # faiss answers -1 when the probed cells hold nothing
        d, i = real(q, k)
        i[::2] = -1
        return d, i
    monkeypatch.setattr(search.ivf, "search", half_missing)
    assert search.distances(queries).max() == exact_reference(bank, queries).max()


@pytest.mark.realdata
@pytest.mark.exporter  # fits the bottle bundle (1% coreset), shared with the other real-data tests
def test_pipeline_ivf_on_real_bottle_frames_scores_like_exact_search(bottle_bundle, bottle_dir):
    """Real frames (the bundle's own INT8 extractor) through `knn: ivf`: every image score equals exact search."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.decode import decode_image
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.preprocess import preprocess

    pipe = Pipeline(Bundle.load(bottle_bundle), precision="int8", knn="ivf", threads=2)
    exact = Pipeline(Bundle.load(bottle_bundle), precision="int8", knn="exact", threads=2)
    assert isinstance(pipe.search, IvfSearch)
    paths = sorted(Path(bottle_dir, "test").rglob("*.png"))[::6]
    assert len(paths) >= 10
    for p in paths:
        tensor, _, _ = preprocess(decode_image(p.read_bytes(), str(p), pipe.decode_limits), pipe.geometry, str(p))
        feats = pipe.extractor(tensor)
        score = pipe.search.distances(feats).max()
        assert score == exact_reference(pipe.search.exact.bank, feats).max(), p
        assert score == pytest.approx(exact.search.distances(feats).max(), rel=1e-4), p   # knn: exact's BLAS form


def test_pipeline_builds_the_ivf_index_from_the_verified_bank(small_bundle):
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline

    pipe = Pipeline(Bundle.load(small_bundle), knn="ivf", threads=2, ivf_nprobe=1)
    assert pipe.search.nprobe == 1
    hnsw = Pipeline(Bundle.load(small_bundle), knn="hnsw", threads=2)
    assert pipe.knn == "ivf" and isinstance(pipe.search, IvfSearch)
    # the same rows: the HNSW pipeline's laid out around its position prior (FaissHnswSearch.renumber)
    assert np.array_equal(pipe.search.exact.bank[hnsw.search.file_rows], hnsw.search.exact.bank)
    rng = np.random.default_rng(0)
    bank = pipe.search.exact.bank
    queries = (bank[rng.integers(0, len(bank), 300)] + rng.normal(scale=0.5, size=(300, bank.shape[1]))).astype(np.float32)
    assert pipe.search.distances(queries).max() == exact_reference(bank, queries).max()


def test_without_faiss_the_bundle_error_names_the_package_and_the_fallback(small_bundle, monkeypatch):
    import sys

    from edge_runtime.bundle import Bundle, BundleError
    from edge_runtime.pipeline import Pipeline

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(BundleError, match=r"faiss-cpu.*knn: hnsw"):
        Pipeline(Bundle.load(small_bundle), knn="ivf", threads=2)


def test_station_file_accepts_knn_ivf(small_bundle, tmp_path):
    import yaml

    from edge_runtime.config import load_station

    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump({"bundle": str(small_bundle), "source": {"type": "folder", "path": "images"},
                                    "http": {"enabled": False}, "inference": {"knn": "ivf"}}))
    assert (load_station(path).inference.knn, load_station(path).inference.ivf_nprobe) == ("ivf", 2)
    path.write_text(path.read_text().replace("knn: ivf", "knn: ivf\n  ivf_nprobe: 0"))
    with pytest.raises(Exception, match="ivf_nprobe"):
        load_station(path)
    path.write_text(path.read_text().replace("ivf_nprobe: 0", "ivf_nprobe: 1"))
    assert load_station(path).inference.ivf_nprobe == 1
    path.write_text(path.read_text().replace("knn: ivf", "knn: ivf2"))
    with pytest.raises(Exception, match="ivf"):
        load_station(path)
