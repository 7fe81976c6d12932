"""`edge-export demo`: the whole product on the embedded data set in one command.

Generates the synthetic flange set, fits and exports a bundle (with a few defects for threshold
calibration, as a user would bring them), writes a station file, runs the real daemon (`edge-runtime run`)
on mixed sample frames and prints each verdict and the per-stage latency.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from export.fit import FitSettings, fit
from export.synthetic_parts import DEFECT_TYPES, generate_dataset, write_sample_frames


# What the demo writes in its folder: --fresh deletes the folder only when it holds nothing else.
DEMO_ENTRIES = {"bundle", "calibration_defects", "data", "frames", "ng_images", "results.jsonl", "state", "station.yaml"}


def run_demo(workdir: Path, fresh: bool = False) -> int:
    workdir = workdir.resolve()
    data = workdir / "data" / "flange"
    bundle = workdir / "bundle"
    if fresh and workdir.exists():
        other = sorted(p.name for p in workdir.iterdir() if p.name not in DEMO_ENTRIES)
        if other:
            raise FileExistsError(f"--fresh deletes a demo folder, and {workdir} holds other things too (first: "
                                  f"{other[0]}): pick another --workdir or remove them yourself")
        shutil.rmtree(workdir)
    if not (data / "train").is_dir():
        print(f"[demo] generating the embedded data set in {data}")
        generate_dataset(data, n_train=100, n_test_good=12, n_test_defect_per_type=6, size=256, seed=0)
    if not (bundle / "manifest.yaml").is_file():
        calib = workdir / "calibration_defects"
        calib.mkdir(parents=True, exist_ok=True)
        for kind in DEFECT_TYPES:  # two of each defect type, as a user brings about ten per type
            for src in sorted((data / "test" / kind).glob("*.png"))[:2]:
                shutil.copy(src, calib / f"{kind}_{src.name}")
        print(f"[demo] fitting PatchCore and exporting the bundle to {bundle}")
        fit(data, bundle, FitSettings(coreset_ratio=0.1), calibration_defects=calib,
            overwrite=True)
    else:   # said, so a second run's speed and results are not mistaken for a fresh fit
        created = (yaml.safe_load((bundle / "manifest.yaml").read_text()) or {}).get("created", "earlier")
        print(f"[demo] reusing the bundle fitted {created} in {bundle} (--fresh deletes the folder and refits)")
    frames = workdir / "frames"
    write_sample_frames(frames, n_good=6, n_defect=6, seed=1)
    log = workdir / "results.jsonl"
    log.unlink(missing_ok=True)
    station = {
        "name": "demo",
        "bundle": str(bundle),
        "source": {"type": "folder", "path": str(frames), "mode": "replay"},
        "outputs": [{"type": "result_log", "path": str(log)},
                    {"type": "ng_images", "dir": str(workdir / "ng_images"), "max_files": 200}],
        "http": {"enabled": False},
        "logging": {"level": "WARNING"},
    }
    (workdir / "station.yaml").write_text(yaml.safe_dump(station, sort_keys=False))
    print(f"[demo] running the daemon: edge-runtime run --config {workdir / 'station.yaml'}")
    rc = subprocess.call([sys.executable, "-m", "edge_runtime.cli", "run", "--config", str(workdir / "station.yaml")])
    if rc != 0:
        print(f"[demo] daemon exited with {rc}", file=sys.stderr)
        return rc
    records = [json.loads(line) for line in log.read_text().splitlines()]
    print(f"\n{'frame':>5}  {'file':<28} {'expected':<9} {'verdict':<7} {'score':>7} {'norm':>5} {'ms':>6}")
    agree = 0
    for r in records:
        name = Path(r["source"]).name
        expected = "OK" if name.endswith("_good.png") else "NG"
        agree += expected == r["verdict"]
        print(f"{r['frame_id']:>5}  {name:<28} {expected:<9} {r['verdict']:<7} {r['score'] or 0:>7.3f} "
              f"{r['normalized_score'] or 0:>5.2f} {r['latency_ms']['total']:>6.1f}")
    print(f"\n{agree}/{len(records)} verdicts match the expected label")
    stages = [k for k in records[0]["latency_ms"]] if records else []
    print(f"\n{'stage':<13} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7}")
    for s in stages:
        v = np.array([r["latency_ms"][s] for r in records if s in r["latency_ms"]])
        print(f"{s:<13} {np.percentile(v, 50):>7.2f} {np.percentile(v, 95):>7.2f} {v.max():>7.2f}")
    print(f"\nresult log: {log}\nNG images and heat maps: {workdir / 'ng_images'}\nbundle: {bundle}")
    return 0
