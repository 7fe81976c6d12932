"""`knn: hnsw`: the bundle's hnswlib graph, read by our parser and searched by faiss."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from extras import require

import faiss  # noqa: F401 - a core dependency: a device install without it is broken, not skipped
from edge_runtime.hnsw_graph import _HEADER, FaissHnswSearch, GraphError, read_hnsw_graph
from edge_runtime.nn_search import ExactSearch, HnswParams, HnswSearch, build_hnsw


def saved_index(tmp_path: Path, n=3000, d=32, seed=0, threads=2):
    """A bank and its hnswlib index bytes; added on 2 threads, so internal ids are NOT the labels."""
    require("hnswlib", "hnswlib")
    rng = np.random.default_rng(seed)
    scales = np.geomspace(3.0, 0.1, d).astype(np.float32)
    bank = (rng.normal(size=(n, d)) * scales).astype(np.float32)
    params = HnswParams(M=16, ef_construction=100, ef_search=32)
    path = tmp_path / "i.hnsw"
    build_hnsw(bank, params, threads=threads).save_index(str(path))
    queries = (bank[rng.integers(0, n, 400)] + rng.normal(scale=0.3, size=(400, d)) * scales).astype(np.float32)
    return bank, path.read_bytes(), params, queries


def test_graph_is_read_in_label_order_and_searched_like_hnswlib(tmp_path):
    bank, raw, params, queries = saved_index(tmp_path)
    graph = read_hnsw_graph(raw, bank.shape[1])
    assert np.array_equal(graph.vectors, bank)                 # row i is bank vector i, whatever the insert order
    ours = FaissHnswSearch(graph, params, threads=2)
    theirs = HnswSearch.load(raw, bank.shape[1], params, threads=2)
    same = np.mean(ours.labels(queries) == theirs.labels(queries))
    assert same > 0.98                                         # same graph, same greedy search (ties may differ)
    exact = ExactSearch(bank).nearest_within(queries, np.full(len(queries), np.inf))[0]
    assert ours.distances(queries).max() == exact.max()        # the re-check keeps the image score exact
    # Real bank vectors' distances in faiss's float32 kernel: upper bounds once widened by its rounding slack.
    approx = ours.approximate(queries)
    assert np.all(approx * (1 + ours.bound_slack) >= exact) and np.all(approx >= exact * (1 - 1e-6))


def test_the_bank_is_held_once_in_faiss_storage(tmp_path):
    bank, raw, params, _ = saved_index(tmp_path, n=500)
    search = FaissHnswSearch.load(raw, bank.shape[1], params)
    view = search.exact.bank
    assert not view.flags.owndata and not view.flags.writeable  # a view of faiss's storage, not a copy
    storage = faiss.downcast_index(search.graph.storage)
    assert view.__array_interface__["data"][0] == int(storage.get_xb())
    assert np.array_equal(view, bank)


def _patched(raw: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_corrupt_graphs_are_refused_with_the_reason(tmp_path):
    bank, raw, params, _ = saved_index(tmp_path, n=400, d=8)
    (_, _, n, per, label_off, data_off, *_rest) = _HEADER.unpack_from(raw, 0)
    first = _HEADER.size                                       # element 0 of the level-0 block
    cases = {
        "outside the bank": _patched(raw, first + 4, "<i", n + 5),            # its first level-0 link
        "labels are not the bank rows": _patched(raw, first + label_off, "<Q", 1 if
                                                 struct.unpack_from("<Q", raw, first + label_off)[0] != 1 else 2),
        "truncated": raw[:len(raw) - 10] if len(raw) > _HEADER.size + n * per + 10 else raw[:_HEADER.size + 5],
        "longer than maxM0": _patched(raw, first, "<I", 1000),
        "entry point": _patched(raw, 52, "<I", n + 1),                       # enterpoint_node (after 6 Q + i)
        "NaN": _patched(raw, first + data_off, "<f", float("nan")),
        "too large for float32 distances": _patched(raw, first + data_off, "<f", 1e19),   # probe 110: faiss abort
        "marked deleted": _patched(raw, first + 2, "<B", 1),                  # hnswlib's DELETE_MARK byte
    }
    for reason, data in cases.items():
        with pytest.raises(GraphError, match=reason):
            read_hnsw_graph(data, bank.shape[1])
    with pytest.raises(GraphError, match="element layout"):
        read_hnsw_graph(raw, bank.shape[1] + 1)                # another dimension than the manifest's


def _upper_blocks(raw: bytes) -> dict[int, int]:
    """Internal id -> file offset of its upper-level blocks, for every node above level 0."""
    (_, _, n, per, *_rest) = _HEADER.unpack_from(raw, 0)
    pos, found = _HEADER.size + n * per, {}
    for i in range(n):
        (size,) = struct.unpack_from("<I", raw, pos)
        if size:
            found[i] = pos + 4
        pos += 4 + size
    return found


def test_an_upper_level_link_to_a_node_without_that_level_is_refused(tmp_path):
    """hnswlib follows a level-L link into the target's level-L list: a node of level 0 has none, and a crafted
    index linking to one segfaults hnswlib. Refused with the node and level named."""
    bank, raw, params, _ = saved_index(tmp_path, n=400, d=8)
    upper = _upper_blocks(raw)
    node, at = next(iter(upper.items()))
    flat = next(i for i in range(len(bank)) if i not in upper)    # a node on level 0 only
    bad = _patched(_patched(raw, at, "<I", 1), at + 4, "<I", flat)  # its level-1 list: [flat]
    with pytest.raises(GraphError, match=rf"node {node}: a level-1 link points to node {flat}, which has no level 1"):
        read_hnsw_graph(bad, bank.shape[1])
    read_hnsw_graph(raw, bank.shape[1])                           # the untouched index passes


def test_hnswlib_loads_only_an_index_that_passed_the_graph_check(tmp_path):
    """knn: hnswlib (and the fallback without faiss) hands the file to hnswlib, which trusts every link: it is
    checked by read_hnsw_graph first, from bytes or from a path, as knn: hnsw is."""
    require("hnswlib", "hnswlib")
    from edge_runtime.bundle import BundleError
    from edge_runtime.pipeline import open_search

    bank, raw, params, _ = saved_index(tmp_path, n=400, d=8)
    bad = _patched(raw, _HEADER.size + 4, "<i", len(bank) + 5)     # a level-0 link outside the bank
    with pytest.raises(BundleError, match=r"bad\.hnsw: not a usable HNSW index \(a level-0 link points outside"):
        open_search("hnswlib", bad, bank.shape[1], params, 1, None, None, tmp_path / "bad.hnsw")
    (tmp_path / "bad.hnsw").write_bytes(bad)
    with pytest.raises(GraphError, match="outside the bank"):
        HnswSearch.load(tmp_path / "bad.hnsw", bank.shape[1], params)
    search, knn = open_search("hnswlib", raw, bank.shape[1], params, 1, None, None, tmp_path / "i.hnsw")
    assert knn == "hnswlib" and len(search) == len(bank)


def test_pipeline_default_search_is_the_faiss_engine_and_matches_hnswlib(small_bundle):
    require("hnswlib", "hnswlib")
    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline

    ours = Pipeline(Bundle.load(small_bundle), knn="hnsw", threads=2)
    theirs = Pipeline(Bundle.load(small_bundle), knn="hnswlib", threads=2)
    assert isinstance(ours.search, FaissHnswSearch) and isinstance(theirs.search, HnswSearch)
    # the same rows; ours laid out around the position prior's (FaissHnswSearch.renumber)
    assert np.array_equal(ours.search.exact.bank, theirs.search.exact.bank[ours.search.file_rows])
    w, h = ours.geometry.input_size
    tensor = np.random.default_rng(1).random((ours.geometry.n_tiles, 3, h, w), dtype=np.float32)
    a, b = ours.score_tiles(tensor), theirs.score_tiles(tensor)
    assert a.max() == b.max()                                  # the image score: exact by re-check in both
    # Patch scores: faiss's seeded walk and hnswlib's walk from the top are both approximate, and on a noise frame
    # (every patch far from the bank) they settle on different neighbours for a few per cent of the patches.
    assert np.mean(np.isclose(a, b, rtol=1e-5)) > 0.95


def test_without_faiss_the_default_search_falls_back_to_hnswlib(small_bundle, monkeypatch, caplog):
    require("hnswlib", "hnswlib")
    import sys

    from edge_runtime.bundle import Bundle
    from edge_runtime.pipeline import Pipeline

    monkeypatch.setitem(sys.modules, "faiss", None)
    with caplog.at_level("WARNING"):
        pipe = Pipeline(Bundle.load(small_bundle), knn="hnsw", threads=2)
    assert pipe.knn == "hnswlib" and isinstance(pipe.search, HnswSearch)
    assert "faiss" in caplog.text and "hnswlib instead" in caplog.text


def test_a_device_without_hnswlib_runs_the_default_search(small_bundle, monkeypatch):
    """hnswlib is the exporter's and an optional engine; the device path never imports it."""
    import sys

    from edge_runtime.bundle import Bundle, BundleError
    from edge_runtime.pipeline import Pipeline

    monkeypatch.setitem(sys.modules, "hnswlib", None)
    pipe = Pipeline(Bundle.load(small_bundle), knn="hnsw", threads=2)
    w, h = pipe.geometry.input_size
    tensor = np.random.default_rng(2).random((pipe.geometry.n_tiles, 3, h, w), dtype=np.float32)
    assert np.isfinite(pipe.score_tiles(tensor)).all()
    with pytest.raises(BundleError, match=r"patchcore-edge\[hnswlib\].*knn: hnsw"):
        Pipeline(Bundle.load(small_bundle), knn="hnswlib", threads=2)


def test_written_graph_round_trips_and_loads_in_hnswlib(tmp_path):
    """What page learning writes (faiss graph -> hnswlib's format) reads back identically, passes the bundle's
    header check and searches the same in hnswlib."""
    require("hnswlib", "hnswlib")
    from edge_runtime.bundle import check_index_file
    from edge_runtime.hnsw_graph import write_hnsw_graph

    bank, raw, params, queries = saved_index(tmp_path, n=2000, d=16)
    search = FaissHnswSearch.load(raw, 16, params)
    rng = np.random.default_rng(5)
    new = rng.normal(size=(50, 16)).astype(np.float32)
    search.add(new)                                            # what learning does: insert into the shipped graph
    assert len(search) == 2050 and np.array_equal(search.exact.bank[2000:], new)
    written = write_hnsw_graph(search.graph_arrays(), params.ef_construction)
    check_index_file(written, 16, 2050)
    again = read_hnsw_graph(written, 16)
    mine = search.graph_arrays()
    for field in ("vectors", "levels", "offsets", "neighbors"):
        assert np.array_equal(getattr(again, field), getattr(mine, field)), field
    theirs = HnswSearch.load(written, 16, params, threads=2)
    both = np.vstack([queries, new + 0.01])
    assert np.mean(theirs.labels(both) == FaissHnswSearch(again, params).labels(both)) > 0.98
    assert np.all(theirs.labels(new) == np.arange(2000, 2050))  # the new vectors are found, under their own rows


def test_without_faiss_or_hnswlib_the_bundle_error_names_both(small_bundle, monkeypatch):
    import sys

    from edge_runtime.bundle import Bundle, BundleError
    from edge_runtime.pipeline import Pipeline

    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setitem(sys.modules, "hnswlib", None)
    with pytest.raises(BundleError, match=r"index.*faiss-cpu.*hnswlib \(the fallback\) is not installed either"):
        Pipeline(Bundle.load(small_bundle), knn="hnsw", threads=2)
