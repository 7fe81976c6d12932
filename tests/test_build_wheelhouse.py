"""device_configs/build_wheelhouse.sh refuses an unknown instruction-set choice before building anything."""
from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "device_configs" / "build_wheelhouse.sh"


def test_unknown_isa_is_refused_with_the_choices_and_nothing_is_built(tmp_path):
    out = tmp_path / "wheelhouse"
    run = subprocess.run(["bash", str(SCRIPT), str(out), "avx512"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "ISA must be portable, x86-64-v3 or native, got 'avx512'" in run.stderr
    assert not out.exists()


def test_portable_build_turns_off_march_native():
    # hnswlib's setup.py drops -march=native only when HNSWLIB_NO_NATIVE is set; the portable branch must set it.
    text = SCRIPT.read_text()
    portable = next(line for line in text.splitlines() if line.strip().startswith("portable)"))
    assert "export HNSWLIB_NO_NATIVE=1" in portable and "march" not in portable
    assert "--no-cache-dir" in text and "--no-binary hnswlib" in text   # never reuse a native wheel from the cache


def test_dependencies_come_from_the_package_metadata_not_a_hand_kept_list():
    # A hand-kept `pip download` list once omitted paho-mqtt (io extra) and the documented install failed with
    # "No matching distribution found for paho-mqtt". The download must resolve the built wheel's own requirements
    # with the extras the install line names, so the two can never disagree.
    text = SCRIPT.read_text()
    download = next(line for line in text.splitlines() if "pip download" in line and not line.lstrip().startswith("#"))
    assert '"$WHEEL[$EXTRAS]"' in download and "--no-deps" not in download
    assert "EXTRAS=${EXTRAS:-io,sign}" in text
    install = next(line for line in text.splitlines() if "pip install --no-index" in line and "echo" in line)
    assert "patchcore-edge[$EXTRAS]" in install
    # No requirement pinned by hand anywhere in the download step.
    assert not any("'numpy" in line or "'paho" in line for line in text.splitlines() if not line.lstrip().startswith("#"))
