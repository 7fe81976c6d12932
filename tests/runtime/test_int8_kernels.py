"""The INT8 exactness check: an INT8 model this machine would compute differently from the fitting machine is
refused (by the station at load and by the exporter before a fit), never run against a bank of other features.

The other kind of CPU (x86 without VNNI) is run for real: under qemu's user-mode emulator with its Haswell model
(AVX2, no AVX-512, no VNNI), and on this CPU with CPUID masked (the whole station check at native speed). Its
onnxruntime picks the saturating AVX2 kernels there.
"""
from __future__ import annotations

import base64
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from extras import require_program
import yaml

from edge_runtime import int8_kernels
from edge_runtime.bundle import MANIFEST, Bundle, write_manifest
from edge_runtime.features import FeatureError
from edge_runtime.int8_kernels import PROBES, check_quantization, exact_products
from edge_runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[2]
# The quantisation each INT8 target writes into a manifest (export/onnx_export.py INT8_TARGETS).
TARGETS = {
    "x86-avx2": {"target": "x86-avx2", "activation": "QUInt8", "weight": "QInt8", "reduce_range": True},
    "x86-vnni": {"target": "x86-vnni", "activation": "QUInt8", "weight": "QInt8", "reduce_range": False},
    "arm": {"target": "arm", "activation": "QInt8", "weight": "QInt8", "reduce_range": True},
}
# Bundles made before the arm target took 7-bit weights: exact on ARM and on x86 with VNNI only.
ARM_8BIT = {"target": "arm", "activation": "QInt8", "weight": "QInt8", "reduce_range": False}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _emulated(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run python code on an emulated Haswell (no AVX-512, no VNNI)."""
    if platform.machine() != "x86_64":
        pytest.skip("emulates the other kind of x86 CPU: needs an x86-64 host")
    require_program("qemu-x86_64", "qemu-user")
    return subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", code, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.exporter
def test_targets_here_are_the_exporters():
    from export.onnx_export import INT8_TARGETS

    for name, q in TARGETS.items():
        assert {k: INT8_TARGETS[name][k] for k in ("activation", "weight", "reduce_range")} == \
            {k: q[k] for k in ("activation", "weight", "reduce_range")}
    assert set(TARGETS) == set(INT8_TARGETS)


@pytest.mark.exporter
def test_shipped_probe_models_are_the_ones_build_probe_makes():
    for activation, weight in PROBES:
        assert base64.b64decode(PROBES[activation, weight]) == int8_kernels.build_probe(activation, weight), (
            "PROBES is stale: paste the output of "
            "python -c 'from edge_runtime.int8_kernels import probes_literal; print(probes_literal())'")


def test_products_that_cannot_saturate_are_exact_here():
    # 7-bit weights keep every pair sum under 32767, whatever the kernel.
    assert exact_products("QUInt8", 63)
    assert exact_products("QInt8", 63)
    check_quantization(TARGETS["x86-avx2"], None, "m.onnx")
    check_quantization(TARGETS["arm"], None, "m.onnx")          # a Pi's bundle can be fitted on any x86


def test_full_range_products_are_exact_exactly_where_the_cpu_has_vnni():
    flags = _cpu_flags()
    results = {a: exact_products(a, 127) for a in ("QUInt8", "QInt8")}
    if platform.machine() != "x86_64":
        assert all(results.values())                    # ARM's dot-product kernels do not saturate
    elif "avx512_vnni" in flags:
        assert all(results.values())
    elif "avx_vnni" not in flags:
        assert not any(results.values())                # vpmaddubsw: saturating pair sums
        for q in (TARGETS["x86-vnni"], ARM_8BIT):
            with pytest.raises(FeatureError, match=q["target"]):
                check_quantization(q, None, "m.onnx")


def test_unknown_activation_type_is_a_clear_error():
    with pytest.raises(FeatureError, match="QUInt4"):
        exact_products("QUInt4", 127)
    check_quantization(None, None, "m.onnx")            # older manifests: nothing to check (the golden test still is)
    check_quantization({"target": "x86-avx2"}, None, "m.onnx")


def test_on_a_cpu_without_vnni_only_the_7_bit_targets_are_accepted():
    code = ("import json; from edge_runtime.int8_kernels import check_quantization, exact_products\n"
            "from edge_runtime.features import FeatureError\n"
            "import sys; targets = json.loads(sys.argv[1]); out = {}\n"
            "for name, q in targets.items():\n"
            "    try:\n"
            "        check_quantization(q, None, name + '.onnx'); out[name] = 'ok'\n"
            "    except FeatureError as exc:\n"
            "        out[name] = str(exc)\n"
            "print(json.dumps(out))")
    import json

    proc = _emulated(code, json.dumps({**TARGETS, "arm-8bit": ARM_8BIT}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["x86-avx2"] == "ok" and out["arm"] == "ok"
    assert out["x86-vnni"].startswith("x86-vnni.onnx: INT8 model quantised for x86-vnni (u8 x s8, 8-bit weights)")
    assert out["arm-8bit"].startswith("arm-8bit.onnx: INT8 model quantised for arm (s8 x s8, 8-bit weights)")
    assert "edge-export fit --device x86" in out["x86-vnni"] and "inference.precision: fp32" in out["x86-vnni"]


def _masked(tmp_path: Path) -> dict:
    """Environment for a subprocess that sees this CPU without AVX-512, VNNI and AMX (CPUID masked:
    benchmarks/cpuid_mask/mask_cpuid.c), so that onnxruntime, numpy and faiss take their AVX2 kernels at native
    speed (qemu's emulation crashes in numpy's AVX2 sort, so the whole pipeline runs this way). On a CPU that
    already lacks them (an AVX2-only Intel or AMD Zen 1-3) the test runs natively, with no mask."""
    flags = _cpu_flags()
    if platform.machine() == "x86_64" and "avx2" in flags and not flags & {"avx512f", "avx512_vnni", "avx_vnni",
                                                                              "amx_int8"}:
        return {**os.environ, "PYTHONPATH": str(REPO)}
    if platform.machine() != "x86_64" or shutil.which("gcc") is None or "cpuid_fault" not in flags:
        pytest.skip("needs an x86-64 CPU with CPUID faulting and gcc for the CPUID mask (the qemu tests cover the "
                    "probe on other machines)")
    so = tmp_path / "mask_cpuid.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(REPO / "benchmarks" / "cpuid_mask" /
                                                                        "mask_cpuid.c")], check=True)
    env = {**os.environ, "LD_PRELOAD": str(so), "PYTHONPATH": str(REPO)}
    seen = subprocess.run([sys.executable, "-c", "from numpy._core._multiarray_umath import __cpu_features__ as f; "
                           "print(bool(f['AVX512F']), bool(f['AVX2']))"], env=env, capture_output=True, text=True)
    assert seen.stdout.split() == ["False", "True"], seen.stderr[-2000:]
    return env


def test_default_bundle_runs_and_a_vnni_one_is_refused_with_avx2_only_kernels(device_bundle, tmp_path):
    env = _masked(tmp_path)
    check = [sys.executable, "-m", "edge_runtime.cli", "check"]
    ok = subprocess.run([*check, str(device_bundle)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "golden: " in ok.stdout and "7-bit exact (no VNNI: only x86-avx2 bundles run here)" in ok.stdout
    vnni = _as_target(device_bundle, tmp_path / "vnni", "x86-vnni")
    bad = subprocess.run([*check, str(vnni)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert f"{vnni}/features_int8.onnx: INT8 model quantised for x86-vnni" in bad.stdout + bad.stderr


def _as_target(src: Path, dst: Path, target: str) -> Path:
    """A copy of a bundle whose manifest says its INT8 model was quantised for `target` (a new bundle id)."""
    shutil.copytree(src, dst)
    manifest = yaml.safe_load((dst / MANIFEST).read_text())
    manifest["variants"]["int8"]["quantization"].update(TARGETS[target])
    manifest["bundle_id"] = None
    write_manifest(dst, manifest)
    return dst


def test_station_check_refuses_a_vnni_bundle_on_a_cpu_without_vnni(device_bundle, tmp_path):
    vnni = _as_target(device_bundle, tmp_path / "vnni", "x86-vnni")
    Bundle.load(vnni)                                   # a valid bundle: only the CPU is wrong for it
    code = "import sys; from edge_runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = _emulated(code, "check", str(vnni))
    assert proc.returncode != 0
    assert f"{vnni}/features_int8.onnx: INT8 model quantised for x86-vnni" in proc.stdout + proc.stderr


def test_pipeline_refuses_an_int8_model_this_machine_computes_differently(small_bundle, monkeypatch):
    Pipeline(Bundle.load(small_bundle), precision="int8")          # exact here: loads
    monkeypatch.setattr(int8_kernels, "exact_products", lambda *a, **k: False)
    with pytest.raises(FeatureError, match=r"features_int8\.onnx: INT8 model quantised for x86-avx2"):
        Pipeline(Bundle.load(small_bundle), precision="int8")


def test_station_loader_turns_the_refusal_into_a_bundle_error(device_bundle, monkeypatch):
    from edge_runtime.bundle import BundleError
    from edge_runtime.bundle_loader import load_pipeline
    from edge_runtime.config import StationConfig
    from edge_runtime.schema import from_mapping

    cfg = from_mapping(StationConfig, {"bundle": str(device_bundle), "source": {"type": "scripted"}}, "test")
    assert load_pipeline(cfg).bundle.bundle_id                     # exact here: the station loads it
    monkeypatch.setattr(int8_kernels, "exact_products", lambda *a, **k: False)
    with pytest.raises(BundleError, match="INT8 model quantised for"):
        load_pipeline(cfg)


@pytest.mark.exporter
def test_fit_refuses_a_target_this_machine_cannot_compute_before_any_work(synthetic_dataset, tmp_path, monkeypatch):
    from export.fit import FitSettings, fit

    monkeypatch.setattr(int8_kernels, "exact_products", lambda a, w, *rest: w == 63)   # an x86 CPU without VNNI
    out = tmp_path / "b"
    with pytest.raises(FeatureError, match="Fit on a CPU with VNNI .* --int8-target x86-avx2"):
        fit(synthetic_dataset, out, FitSettings(int8_target="x86-vnni", coreset_ratio=0.05))
    assert not out.exists()



@pytest.mark.exporter  # narrows the graph with the exporter's own pass (onnx package)
def test_on_a_cpu_without_vnni_the_4_channel_stem_gives_the_3_channel_features(tmp_path):
    """The widened stem (export.onnx_export.widen_pixel_input) runs on onnxruntime's symmetric conv kernel, the RGB
    stem on im2col + GEMM: on the AVX2 kernels too, the two graphs give bit-identical features."""
    from export.onnx_export import narrow_pixel_input

    wide = REPO / "tests" / "fixtures" / "device_bundle" / "features_int8.onnx"
    narrow = tmp_path / "rgb.onnx"
    narrow.write_bytes(wide.read_bytes())
    assert narrow_pixel_input(narrow)
    code = ("import sys, numpy as np\n"
            "from edge_runtime.features import make_session, model_input, pixel_channels\n"
            "wide, narrow = make_session(sys.argv[1], 1), make_session(sys.argv[2], 1)\n"
            "shape = [2] + wide.get_inputs()[0].shape[1:3] + [3]\n"
            "x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)\n"
            "a = wide.run(None, {'image': model_input(x, True, pixel_channels(wide))})[0]\n"
            "b = narrow.run(None, {'image': model_input(x, True, pixel_channels(narrow))})[0]\n"
            "print(pixel_channels(wide), pixel_channels(narrow), bool(np.array_equal(a, b)), float(np.abs(a).max()))")
    proc = _emulated(code, str(wide), str(narrow))
    assert proc.returncode == 0, proc.stderr[-2000:]
    wide_c, narrow_c, same, peak = proc.stdout.split()[-4:]
    assert (wide_c, narrow_c, same) == ("4", "3", "True") and float(peak) > 0
