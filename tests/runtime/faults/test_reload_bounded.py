"""A SIGHUP reload loads and self-tests on one thread (the inspection loop keeps its cores), then serves with the
configured threads; the old pipeline's memory is handed back to the OS after the swap."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime import bundle_loader, daemon
from edge_runtime.config import StationConfig
from edge_runtime.daemon import Station, load_pipeline
from edge_runtime.schema import from_mapping


def station(root: Path, threads: int = 2, knn: str = "hnsw") -> StationConfig:
    # hnsw: the search whose thread count is configurable (knn: ivf runs faiss on one thread always)
    return from_mapping(StationConfig, {"bundle": str(root), "source": {"type": "scripted"},
                                        "inference": {"threads": threads, "knn": knn}}, "test")


def threads_of(pipeline) -> tuple[int, int | None]:
    """(onnxruntime intra-op threads, search threads) of a pipeline."""
    intra = pipeline.extractor.session.get_session_options().intra_op_num_threads
    return intra, getattr(pipeline.search, "threads", None)


@pytest.fixture
def self_test_threads(monkeypatch) -> list[tuple[int, int | None]]:
    """Records the threads the pipeline had while its golden self-test ran."""
    seen: list[tuple[int, int | None]] = []
    real = bundle_loader.golden_check

    def recording(bundle, pipeline):
        seen.append(threads_of(pipeline))
        return real(bundle, pipeline)

    monkeypatch.setattr(bundle_loader, "golden_check", recording)
    return seen


def test_reload_self_tests_on_one_thread_then_serves_with_the_configured_threads(bundle_copy, self_test_threads):
    reference = load_pipeline(station(bundle_copy, threads=2))
    assert self_test_threads == [(2, 2)]                       # start-up: nothing to compete with
    reloaded = load_pipeline(station(bundle_copy, threads=2), reference.bundle, load_threads=1)
    assert self_test_threads[-1] == (1, 1)
    assert threads_of(reloaded) == (2, 2)
    w, h = reference.geometry.input_size
    tensor = np.random.default_rng(0).random((reference.geometry.n_tiles, 3, h, w), dtype=np.float32)
    assert reloaded.score_tiles(tensor).max() == pytest.approx(reference.score_tiles(tensor).max(), rel=1e-5)


def test_station_reload_thread_uses_one_thread(bundle_copy, self_test_threads):
    st = Station(station(bundle_copy, threads=2), outputs=[])
    assert st._load()
    st._reload_worker()                                        # what the bundle-reload thread runs
    st._apply_reload()
    assert self_test_threads[-1] == (1, 1)
    assert st.counters.reloads == 1 and threads_of(st.pipeline) == (2, 2)


def test_old_pipeline_memory_is_released_after_the_swap(bundle_copy, monkeypatch):
    trims = []
    monkeypatch.setattr(bundle_loader, "release_freed_memory", lambda: trims.append(1))
    st = Station(station(bundle_copy, threads=1), outputs=[])
    assert st._load()
    st._reload_worker()
    st._apply_reload()        # swap; the loop still holds the old pipeline in this iteration
    assert trims == []
    st._apply_reload()        # next iteration: the old pipeline is gone, its heap goes back to the OS
    assert trims == [1]
    st._apply_reload()
    assert trims == [1]


def test_release_freed_memory_runs_here():
    daemon.release_freed_memory()   # glibc malloc_trim, or a no-op elsewhere: never raises


def test_reload_with_the_default_ivf_search_serves_the_same_scores(bundle_copy, self_test_threads):
    reference = load_pipeline(station(bundle_copy, threads=2, knn="ivf"))
    reloaded = load_pipeline(station(bundle_copy, threads=2, knn="ivf"), reference.bundle, load_threads=1)
    assert self_test_threads[-1][0] == 1 and reloaded.extractor.session.get_session_options().intra_op_num_threads == 2
    w, h = reference.geometry.input_size
    tensor = np.random.default_rng(0).random((reference.geometry.n_tiles, 3, h, w), dtype=np.float32)
    assert reloaded.score_tiles(tensor).max() == pytest.approx(reference.score_tiles(tensor).max(), rel=1e-5)
