"""The page draws every NG and REVIEW part's heat map, and an OK part's at most once in OK_HEAT_INTERVAL_S: with
the position prior, reading a heat map costs a search of every patch."""
from __future__ import annotations

import numpy as np

from edge_runtime.operator_page import part_history
from edge_runtime.operator_page.part_history import PartHistory
from edge_runtime.records import InspectionResult, Verdict


def _result(frame_id: int, verdict: Verdict, reads: list[int]) -> InspectionResult:
    def heat() -> np.ndarray:
        reads.append(frame_id)
        return np.zeros((32, 48), np.float32)
    return InspectionResult(frame_id=frame_id, source="cam", verdict=verdict, score=1.0, normalized_score=0.1,
                            threshold=10.0, timings_ms={"total": 5.0}, bundle_id="b", anomaly_map=heat,
                            image=np.full((32, 48, 3), 128, np.uint8))


def test_ok_heat_maps_are_drawn_at_most_every_interval_and_ng_always(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(part_history.time, "monotonic", lambda: now[0])
    page, reads = PartHistory(), []
    for i, verdict in enumerate([Verdict.OK, Verdict.OK, Verdict.NG, Verdict.REVIEW, Verdict.OK]):
        page.publish(_result(i, verdict, reads))
        now[0] += 0.05                                  # 20 parts a second
    assert reads == [0, 2, 3]                           # OK part 1 and 4 fell within 0.2 s of part 0
    now[0] += PartHistory.OK_HEAT_INTERVAL_S
    page.publish(_result(5, Verdict.OK, reads))
    assert reads == [0, 2, 3, 5]
    # Every part is on the page, with an overlay picture, heat map or not.
    assert all(page.get(i).overlay_jpg for i in range(6))
