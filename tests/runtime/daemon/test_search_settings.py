"""A station file's search settings are checked like the bundle's own."""
from __future__ import annotations

import pytest


def test_a_station_cannot_ask_for_a_search_wider_than_the_runtime_runs(write_station, small_bundle):
    from edge_runtime.config import load_station
    from edge_runtime.schema import ConfigError

    with pytest.raises(ConfigError, match=r"ef_search: must be 1-4096"):
        load_station(write_station(bundle=small_bundle, source={"type": "scripted"}, inference={"ef_search": 2**40}))
