"""A watched folder across kill -9: the real daemon is killed repeatedly while a camera writer keeps adding parts;
every part ends up with exactly one record (none lost while the daemon was down, none inspected twice)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

MAX_PARTS = 400   # the camera keeps writing (one part per 0.15 s) until the kills are done, at most this many
KILLS = 5


def part_png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    ok, buf = cv2.imencode(".png", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line torn by kill -9 is not a record
    return out


def wait_for(predicate, what: str, limit_s: float) -> None:
    end = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_every_part_gets_exactly_one_record_across_kill_9(small_bundle, tmp_path):
    folder, state, log = tmp_path / "incoming", tmp_path / "state", tmp_path / "results.jsonl"
    folder.mkdir()
    station = tmp_path / "station.yaml"
    station.write_text(yaml.safe_dump({
        "bundle": str(small_bundle), "state_dir": str(state), "http": {"enabled": False},
        "inference": {"threads": 1},
        "source": {"type": "folder", "path": str(folder), "mode": "watch", "poll_interval_s": 0.05,
                   "process_existing": True},
        "outputs": [{"type": "result_log", "path": str(log)}],
    }))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    command = [sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(station)]
    names: list[str] = []
    stop_writing = threading.Event()

    def camera() -> None:
        # The documented convention: write under a temporary name, rename into place. Parts keep arriving for as
        # long as the daemon is being killed, however slowly it starts on a loaded machine.
        for i in range(MAX_PARTS):
            if stop_writing.is_set():
                break
            name = f"part_{i:03d}.png"
            tmp = folder / f".{name}.tmp"
            tmp.write_bytes(part_png(i))
            tmp.rename(folder / name)
            names.append(name)
            time.sleep(0.15)

    writer = threading.Thread(target=camera, daemon=True)
    writer.start()
    procs: list[subprocess.Popen] = []
    try:
        for kill in range(KILLS):
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            seen = len(records(log))
            # Killed while it works through parts, at a moment unrelated to when records are written.
            wait_for(lambda: len(records(log)) > seen or proc.poll() is not None, "the daemon to inspect a part", 120)
            assert proc.poll() is None, "the daemon exited on its own"
            time.sleep(0.05 + 0.07 * kill)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            time.sleep(0.3)  # parts keep arriving while it is down
        stop_writing.set()
        writer.join(30)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_for(lambda: len({Path(r["source"]).name for r in records(log)}) >= len(names), "every part to be recorded", 120)
        time.sleep(1.0)  # time for a wrong second inspection to show up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        writer.join(30)
    recorded = [Path(r["source"]).name for r in records(log)]
    assert len(names) > KILLS and sorted(recorded) == sorted(names), {n: recorded.count(n) for n in set(recorded) if recorded.count(n) != 1}
