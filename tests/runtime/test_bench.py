"""edge-bench on a real (synthetic-data) bundle: report structure and internal consistency, never timing thresholds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edge_runtime.bench import (MODEL_ALONE_RUNS, STAGES, BenchError, cpu_counters, cpu_during, cpu_info, format_table,
                                main, run_bench, summarize)

# Timer granularity and the few statements between laps: stage sums may exceed total by this much, no more.
EPS_MS = 0.05


def check_report(report: dict, frames: int) -> None:
    assert set(report["stages_ms"]) == set(STAGES)
    for stage in STAGES:
        st = report["stages_ms"][stage]
        assert st["count"] == frames
        assert len(report["samples_ms"][stage]) == frames
        assert 0 <= st["p50"] <= st["p95"] <= st["p99"] <= st["max"]
        assert st["mean"] <= st["max"]
    samples = report["samples_ms"]
    for i in range(frames):
        parts = sum(samples[s][i] for s in STAGES if s != "total")
        assert parts <= samples["total"][i] * 1.05 + EPS_MS
    # The heat map is made after the verdict: timed on its own, outside `total`, and added in the second figure.
    assert report["heat_map_ms"]["count"] == frames and report["heat_map_ms"]["p50"] > 0
    assert report["total_with_heat_map_ms"]["max"] >= report["stages_ms"]["total"]["max"]
    assert report["throughput_fps"] > 0
    # The model alone, back to back after the frames: the machine's pace for the features stage in that minute.
    assert report["model_alone_ms"]["count"] == MODEL_ALONE_RUNS and report["model_alone_ms"]["p50"] > 0
    assert sum(report["verdicts"].values()) == frames
    b = report["bundle"]
    assert b["model_bytes"] > 0 and b["index_bytes"] > 0 and b["bank_size"] > 0
    assert b["patches_per_frame"] == b["grid"][0] * b["grid"][1] * b["tiles"]
    assert b["grid"] == [-(-b["input_size"][1] // 8), -(-b["input_size"][0] // 8)]   # rows from H, cols from W
    mem = report["memory"]["after_run"]
    assert mem["vm_rss_mib"] > 0 and mem["vm_hwm_mib"] >= mem["vm_rss_mib"]
    m = report["machine"]
    assert m["cpu"]["logical_cpus"] >= 1 and "avx2" in m["cpu"]["isa"] and "asimd" in m["cpu"]["isa"]
    assert m["software"]["onnxruntime"]
    # What else the machine did meanwhile (Linux: /proc/stat), to read a slow run against.
    during = m["during_run"]
    assert 0.0 <= during["steal_percent"] <= 100.0 and during["other_processes_cores"] >= 0.0


def test_main_writes_consistent_json(small_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main([str(small_bundle), "--frames", "5", "--warmup", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    check_report(report, 5)
    s = report["settings"]
    assert s["knn"] == "hnsw" and s["ef_search"] == s["ef_search_manifest"] and s["threads"] == 2
    assert s["providers"] == ["CPUExecutionProvider"]
    assert s["images_source"] == "bundle golden images"
    r = report["rechecked_patches"]
    # The re-check always verifies at least the top patch and never more patches than a frame has.
    assert r["count"] == 5 and 1 <= r["mean"] <= r["per_frame_of"]
    table = capsys.readouterr().out
    for stage in STAGES:
        assert stage in table
    assert "frames/s" in table and "VmHWM" in table and "model alone" in table


@pytest.mark.exporter  # the FP32 variant: only in the exporter-fitted bundle
def test_exact_fp32_with_image_dir_and_ef(small_bundle, synthetic_dataset):
    images = synthetic_dataset / "test"   # good/ and one folder per defect type: found recursively
    report = run_bench(small_bundle, images_dir=images, frames=3, warmup=0, precision="fp32", knn="exact")
    check_report(report, 3)
    assert report["settings"]["precision"] == "fp32" and report["bundle"]["model_file"].endswith("fp32.onnx")
    assert report["settings"]["ef_search"] is None and report["rechecked_patches"] is None
    n_files = sum(len(list(d.glob("*.png"))) for d in images.iterdir())
    assert n_files > len(list((images / "good").iterdir())) and report["settings"]["images"] == n_files
    hnsw = run_bench(small_bundle, frames=2, warmup=0, ef=7, gap_ms=5)
    check_report(hnsw, 2)
    assert hnsw["settings"]["ef_search"] == 7 and hnsw["settings"]["gap_ms"] == 5


def test_raw_frames_skip_decoding_but_give_the_same_verdicts(small_bundle):
    encoded = run_bench(small_bundle, frames=4, warmup=0)
    raw = run_bench(small_bundle, frames=4, warmup=0, raw=True)
    check_report(raw, 4)
    assert raw["settings"]["input"].startswith("raw") and encoded["settings"]["input"] == "encoded files"
    assert raw["verdicts"] == encoded["verdicts"]


@pytest.fixture(scope="module")
def tiled_bundle(synthetic_dataset, tmp_path_factory):
    """The synthetic flange (224x224 frames) at full detail in 2x2 tiles of 128x128; small and quick to fit."""
    from export.fit import FitSettings, fit

    out = tmp_path_factory.mktemp("bundles") / "flange_tiled"
    fit(synthetic_dataset, out, FitSettings(coreset_ratio=0.05, input_size=(128, 128), scale=1.0,
                                            cross_fit_folds=0, int8_calibration_images=8))
    return out


@pytest.mark.exporter  # fits a tiled bundle with the exporter
def test_tiled_bundle_reports_tiles_and_patches_per_frame(tiled_bundle, synthetic_dataset):
    report = run_bench(tiled_bundle, images_dir=synthetic_dataset / "test", frames=3, warmup=1)
    check_report(report, 3)
    b = report["bundle"]
    assert b["tiles"] == 4 and b["input_size"] == [128, 128] and b["canvas_size"] == [224, 224]
    assert b["grid"] == [16, 16] and b["patches_per_frame"] == 4 * 16 * 16
    # Re-checked patches are counted over every tile of the frame, never beyond it.
    assert 1 <= report["rechecked_patches"]["max"] <= 4 * 16 * 16
    assert "input 128x128, 4 tile(s) on a 224x224 canvas" in format_table(report)


def test_faulting_frames_stop_the_benchmark(small_bundle, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BenchError, match="broken.png: frame faulted"):
        run_bench(small_bundle, images_dir=tmp_path, frames=2, warmup=0)


def test_model_alone_times_a_frame_the_run_inspected(small_bundle, synthetic_dataset, tmp_path):
    """A folder's last image may never be reached in a short run (and may be one the bundle refuses): the model
    alone runs on the last frame inspected, never on an image the run skipped."""
    good = sorted((synthetic_dataset / "test" / "good").glob("*.png"))
    for i, src in enumerate(good[:2]):
        (tmp_path / f"a{i}.png").write_bytes(src.read_bytes())
    (tmp_path / "z_broken.png").write_bytes(b"\x89PNG not really")   # sorted last, never inspected below
    report = run_bench(small_bundle, images_dir=tmp_path, frames=2, warmup=0)
    check_report(report, 2)


def test_invalid_settings_are_refused(small_bundle):
    for kwargs, field in (({"frames": 0}, "--frames"), ({"warmup": -1}, "--warmup"), ({"gap_ms": -1}, "--gap-ms"),
                          ({"gap_ms": float("nan")}, "--gap-ms"), ({"gap_ms": float("inf")}, "--gap-ms")):
        with pytest.raises(BenchError, match=field):
            run_bench(small_bundle, **kwargs)


def test_cli_errors_exit_2(small_bundle, tmp_path, capsys):
    assert main([str(tmp_path / "missing_bundle"), "--frames", "1"]) == 2
    assert "bundle directory does not exist" in capsys.readouterr().err
    assert main([str(small_bundle), "--images", str(tmp_path), "--frames", "1"]) == 2
    assert "no image files" in capsys.readouterr().err
    one = tmp_path / "part.png"
    one.write_bytes(b"\x89PNG")
    assert main([str(small_bundle), "--images", str(one), "--frames", "1"]) == 2
    assert "part.png: is not a directory (--images takes a folder of images)" in capsys.readouterr().err
    assert main([str(small_bundle), "--images", str(tmp_path / "gone"), "--frames", "1"]) == 2
    assert "gone: image directory does not exist" in capsys.readouterr().err


def test_cpu_info_parses_x86_and_arm():
    x86 = cpu_info("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_2 avx2 avx512f avx512_vnni\n")
    assert x86["model"] == "Some CPU"
    assert x86["isa"]["avx2"] and x86["isa"]["avx512_vnni"] and not x86["isa"]["avx_vnni"] and not x86["isa"]["asimd"]
    arm = cpu_info("processor\t: 0\nFeatures\t: fp asimd evtstrm asimddp\nCPU part\t: 0xd0b\n")
    assert arm["isa"]["asimd"] and arm["isa"]["asimddp"] and not arm["isa"]["avx2"]


def test_cpu_counters_read_steal_and_the_share_of_others():
    before = cpu_counters("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n")
    assert before == {"total": 1000, "busy": 190, "steal": 40}
    after = cpu_counters("cpu  300 0 100 1300 10 0 0 90 0 0\n")   # 800 more jiffies: 250 run, 50 stolen
    tick = os.sysconf("SC_CLK_TCK")
    own_s = 100 / tick                                                  # this process ran 100 of the 250
    during = cpu_during(before, after, own_s, wall_s=400 / tick)
    assert during["steal_percent"] == pytest.approx(100 * 50 / 800, abs=0.01)
    assert during["other_processes_cores"] == pytest.approx(150 / 400, abs=1e-3)   # the other 150, over 400
    # A kernel too old to list steal, and no /proc/stat at all
    assert cpu_counters("cpu  100 0 50 800 10\n") == {"total": 960, "busy": 150, "steal": 0}
    assert cpu_counters("") is None and cpu_during(None, after, 0.0, 1.0) is None
    assert cpu_during(before, before, 0.0, 1.0) is None               # no time passed


def test_summarize_percentiles():
    s = summarize(list(range(1, 101)))
    assert s["max"] == 100 and s["count"] == 100 and s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    with pytest.raises(BenchError):
        summarize([])


def test_bench_run_never_imports_torch(small_bundle):
    # In a fresh interpreter: the whole benchmark (load, inspect, report) must work on a device without torch.
    code = ("import sys; from edge_runtime.bench import main; "
            f"rc = main([{str(small_bundle)!r}, '--frames', '1', '--warmup', '0']); "
            "sys.exit(3 if 'torch' in sys.modules else rc)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_review_verdicts_are_counted(small_bundle, monkeypatch):
    """A bundle with a review band yields REVIEW parts; the bench counts them instead of failing on them."""
    from edge_runtime import bench
    from edge_runtime.records import Verdict

    real_inspect = bench.Pipeline.inspect

    def inspect_with_band(self, frame):
        result = real_inspect(self, frame)
        if frame.frame_id % 2:
            result.verdict = Verdict.REVIEW   # stands in for a score in the band until fit writes one
        return result

    monkeypatch.setattr(bench.Pipeline, "inspect", inspect_with_band)
    report = run_bench(small_bundle, frames=6, warmup=1)
    assert report["verdicts"]["REVIEW"] == 3 and sum(report["verdicts"].values()) == 6
    assert "3 REVIEW" in bench.format_table(report)


def test_benchmark_helpers_parse_sizes_and_name_the_geometry():
    # benchmarks/ is not a package: the scripts put their folder on sys.path, as done here.
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        from bench_report import geometry_text, parse_size
    finally:
        sys.path.pop(0)
    from edge_runtime.geometry import Geometry

    assert parse_size("224") == (224, 224) and parse_size("320x224") == (320, 224) and parse_size("448X320") == (448, 320)
    for bad in ("abc", "224x", "16x224"):
        with pytest.raises(ValueError, match="input size"):
            parse_size(bad)
    assert geometry_text(Geometry((256, 256), (256, 256), ((0, 0),))) == "input 256x256, 1 tile"
    tiled = Geometry((224, 224), (384, 384), ((0, 0), (160, 0), (0, 160), (160, 160)))
    assert geometry_text(tiled) == "input 224x224, 4 tiles on a 384x384 canvas"


def test_sustained_mode_accounts_for_every_offered_frame(small_bundle, synthetic_dataset, tmp_path):
    """`edge-bench --sustained-fps`: the real station loop fed by a paced source; offered = inspected + dropped
    (+ faults), per line, and the JSON has what the README table shows."""
    out = tmp_path / "sustained.json"
    rc = main([str(small_bundle), "--images", str(synthetic_dataset / "test"), "--sustained-fps", "200",
               "--duration-s", "0.5", "--threads", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "sustained" and report["capture_thread"] is True
    (line,) = report["per_line"]
    assert line["offered"] == 100
    assert line["inspected"] + line["faults"] + line["dropped"] == line["offered"] == line["accounted"]
    assert line["inspected"] > 0 and line["pipeline_ms"]["p50"] <= line["pipeline_ms"]["p99"]
    assert line["capture_to_verdict_ms"]["count"] == line["inspected"]


@pytest.mark.parametrize("args, expected", [
    (["--threads", "0"], "--threads must be 1-256, got 0"),
    (["--threads", "999999"], "--threads must be 1-256"),
    (["--sustained-fps", "nan", "--images", "."], "must be > 0 and finite"),
    (["--sustained-fps", "1e308", "--images", "."], "must be > 0 and finite"),
    (["--sustained-fps", "5", "--duration-s", "inf", "--images", "."], "must be > 0 and finite"),
])
def test_odd_arguments_are_refused_before_the_run(small_bundle, capsys, args, expected):
    """probe 100: each of these ran (a traceback, a pool of 999999 threads, or NaN frames) instead of an error."""
    with pytest.raises(SystemExit) as exit_:
        main([str(small_bundle), *args])
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_json_to_a_folder_or_a_full_disk_is_an_error_not_a_traceback(small_bundle, tmp_path, capsys):
    with pytest.raises(SystemExit):   # refused before the frames are timed
        main([str(small_bundle), "--frames", "1", "--json", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err
    if os.path.exists("/dev/full"):
        assert main([str(small_bundle), "--frames", "1", "--warmup", "0", "--json", "/dev/full"]) == 2
        assert "cannot write the report" in capsys.readouterr().err


def test_sustained_mode_needs_images(small_bundle, capsys):
    with pytest.raises(SystemExit):
        main([str(small_bundle), "--sustained-fps", "60"])
    assert "--images" in capsys.readouterr().err


def test_model_alone_times_the_model_on_the_input_the_station_gives_it(small_bundle, synthetic_dataset, monkeypatch):
    """The model alone is timed on what Pipeline.inspect hands the model (a 4-channel pixel graph: RGBA, made in
    the preprocess stage), not on RGB tiles the extractor would first have to widen inside the timed call."""
    from edge_runtime.bench import model_alone
    from edge_runtime.bundle import Bundle
    from edge_runtime.features import FeatureExtractor
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.records import Frame

    pipe = Pipeline(Bundle.load(small_bundle), threads=1)
    assert pipe.extractor.takes_pixels and pipe.extractor.channels == 4
    seen = []
    real_call = FeatureExtractor.__call__

    def recording(self, tensor):
        seen.append((tensor.dtype, tensor.shape))
        return real_call(self, tensor)

    monkeypatch.setattr(FeatureExtractor, "__call__", recording)
    src = sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0]
    data = src.read_bytes()
    assert pipe.inspect(Frame(frame_id=0, source=str(src), encoded=data)).error is None
    station = seen[-1]
    seen.clear()
    model_alone(pipe, (str(src), data), None)
    assert seen and set(seen) == {station} and station[1][-1] == 4
