"""Learning on the device (edge_runtime.bank_adapt, `edge-runtime adapt`) on the committed device bundle, no torch."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from extras import require

from edge_runtime.bank_adapt import AdaptError, InputImage, prepare, verify_lineage
from edge_runtime.bundle import MANIFEST, SIGNATURE, Bundle, BundleError, sha256_file
from edge_runtime.decode import load_image
from edge_runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[2]
NO_TORCH = REPO / "tests" / "fixtures" / "no_torch"


@pytest.fixture(scope="module")
def images(device_bundle, tmp_path_factory) -> dict[str, Path]:
    """A good part with a small painted mark the bundle has never seen (a false reject, ~1.14 x the threshold), one
    with a larger mark (~1.34 x: above the 1.25 x learn limit, an engineer must confirm it) and a scratched part (a
    defect)."""
    folder = tmp_path_factory.mktemp("adapt_images")
    good = cv2.imread(str(device_bundle / "golden" / "00_good.png"))
    marked = good.copy()
    cv2.circle(marked, (60, 80), 9, (0, 0, 255), -1)
    big_mark = good.copy()
    cv2.circle(big_mark, (60, 80), 12, (0, 0, 255), -1)
    scratched = good.copy()
    cv2.line(scratched, (120, 30), (180, 160), (255, 255, 255), 5)
    out = {"false_reject": folder / "marked.png", "above_limit": folder / "big_mark.png",
           "defect": folder / "scratched.png", "good": device_bundle / "golden" / "01_good.png"}
    cv2.imwrite(str(out["false_reject"]), marked)
    cv2.imwrite(str(out["above_limit"]), big_mark)
    cv2.imwrite(str(out["defect"]), scratched)
    return out


def score(bundle_dir: Path, image: Path) -> tuple[float, float]:
    pipe = Pipeline(Bundle.load(bundle_dir), threads=1)
    return pipe.score_rgb(load_image(image)).score, pipe.threshold


def test_learned_false_reject_scores_ok_defect_stays_ng(device_bundle, images, tmp_path):
    parent_manifest = sha256_file(device_bundle / MANIFEST)
    before_fr, thr = score(device_bundle, images["false_reject"])
    before_defect, _ = score(device_bundle, images["defect"])
    assert before_fr >= thr and before_defect >= thr, "the fixture images must start as NG"

    plan = prepare(device_bundle, [InputImage.from_file(images["false_reject"])],
                   [InputImage.from_file(images["defect"])], threads=1)
    ch = plan.changes["int8"]
    assert ch.bank_after > ch.bank_before and ch.threshold_after <= ch.threshold_before
    new = plan.write(tmp_path / "v2", who="tester", audit_log=tmp_path / "audit.jsonl")

    after_fr, new_thr = score(new.root, images["false_reject"])
    after_defect, _ = score(new.root, images["defect"])
    assert after_fr < new_thr <= thr, "the learned part is OK now and the threshold did not rise"
    assert after_defect >= new_thr
    assert after_fr == pytest.approx(ch.images[0].after, rel=1e-5), "the preview shows what the version does"
    assert new.manifest["variants"]["int8"]["bank_size"] == ch.bank_after
    assert new.bundle_version > Bundle.load(device_bundle).bundle_version
    assert [d["source"] for d in new.manifest["feedback"]["defects"]] == [str(images["defect"])]
    assert new.manifest["lineage"][-1]["bundle_id"] == Bundle.load(device_bundle).bundle_id
    assert sha256_file(device_bundle / MANIFEST) == parent_manifest, "the parent version is never modified"
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["who"] == "tester" and audit[-1]["after"]["bundle_id"] == new.bundle_id
    assert audit[-1]["before"]["bundle_id"] == Bundle.load(device_bundle).bundle_id


def test_stored_defect_is_rescored_and_a_conflicting_good_is_refused(device_bundle, images, tmp_path):
    v2 = prepare(device_bundle, [], [InputImage.from_file(images["defect"])], threads=1).write(tmp_path / "v2")
    plan = prepare(v2.root, [InputImage.from_file(images["good"])], [], threads=1)
    stored = [i for i in plan.changes["int8"].images if i.kind == "stored-defect"]
    assert len(stored) == 1 and stored[0].verdict_after == "NG"
    # Calling the stored defect itself good: it cannot be OK while it stays NG as a defect.
    bad = prepare(v2.root, [InputImage.from_file(images["defect"])], [], threads=1)
    assert bad.conflicts
    with pytest.raises(AdaptError, match="not written"):
        bad.write(tmp_path / "v3")
    assert not (tmp_path / "v3").exists()


def test_tampered_version_is_refused(device_bundle, images, tmp_path):
    new = prepare(device_bundle, [InputImage.from_file(images["false_reject"])], [], threads=1).write(tmp_path / "v2")
    index = new.root / new.manifest["variants"]["int8"]["index"]
    data = bytearray(index.read_bytes())
    data[-100] ^= 0xFF
    index.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        Bundle.load(new.root)


def _keypair(folder: Path, name: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = folder / f"{name}.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return key, key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw), pem


def test_signed_parent_needs_a_station_key_and_the_chain_verifies(device_bundle, images, tmp_path):
    require("cryptography", "sign")
    import shutil

    parent = tmp_path / "signed"
    shutil.copytree(device_bundle, parent)
    ws_key, ws_pub, _ = _keypair(tmp_path, "workstation")
    _, st_pub, st_pem = _keypair(tmp_path, "station")
    (parent / SIGNATURE).write_bytes(ws_key.sign((parent / MANIFEST).read_bytes()))
    plan = prepare(Bundle.load(parent, public_key=ws_pub), [InputImage.from_file(images["false_reject"])], [], threads=1)
    with pytest.raises(AdaptError, match="signed with a station key"):
        plan.write(tmp_path / "unsigned")
    v2 = plan.write(tmp_path / "v2", signing_key=st_pem)
    verify_lineage(Bundle.load(v2.root, public_key=st_pub), ws_pub, st_pub)
    with pytest.raises(BundleError, match="signature"):
        Bundle.load(v2.root, public_key=ws_pub)     # the workstation key alone does not vouch for it
    # A grandchild still reaches the workstation-signed ancestor through lineage/.
    v3 = prepare(Bundle.load(v2.root, public_key=st_pub), [InputImage.from_file(images["good"])], [],
                 threads=1).write(tmp_path / "v3", signing_key=st_pem)
    verify_lineage(Bundle.load(v3.root, public_key=st_pub), ws_pub, st_pub)
    # Raising the threshold in the manifest breaks the station signature.
    text = (v3.root / MANIFEST).read_text()
    m, n = re.subn(r"(?m)^(\s+threshold: )[0-9.]+$", r"\g<1>99.5", text, count=1)
    assert n == 1 and m != text
    (v3.root / MANIFEST).write_text(m)
    with pytest.raises(BundleError, match="signature does not verify"):
        Bundle.load(v3.root, public_key=st_pub)


def test_a_version_edited_after_its_station_signature_is_not_learned_from(device_bundle, images, tmp_path):
    """Probe 102: `edge-runtime adapt --signing-key` on a station-signed version edited afterwards (a bank value
    changed, checksums and id recomputed: refused at load) wrote a version signed with the station key, which then
    loaded on the signed station with the edited bank."""
    require("cryptography", "sign")
    import shutil
    import struct

    import yaml

    from edge_runtime.bank_adapt import sign_version
    from edge_runtime.bundle import write_manifest

    parent = tmp_path / "release"
    shutil.copytree(device_bundle, parent)
    _, ws_pub, ws_pem = _keypair(tmp_path, "workstation")
    _, st_pub, st_pem = _keypair(tmp_path, "station")
    sign_version(parent, ws_pem)
    v2 = prepare(Bundle.load(parent, public_key=ws_pub), [InputImage.from_file(images["false_reject"])], [],
                 threads=1).write(tmp_path / "v2", signing_key=st_pem)
    index = v2.root / v2.manifest["variants"]["int8"]["index"]
    data = bytearray(index.read_bytes())
    data[96 + struct.unpack_from("<Q", data, 40)[0]] ^= 0x01   # the first bank value, past hnswlib's header
    index.write_bytes(bytes(data))
    m = yaml.safe_load((v2.root / MANIFEST).read_text())
    m.pop("files")
    m["bundle_id"] = None
    write_manifest(v2.root, m)
    with pytest.raises(BundleError, match="signature does not verify"):
        Bundle.load(v2.root, public_key=st_pub)
    plan = prepare(Bundle.load(v2.root), [InputImage.from_file(images["good"])], [], threads=1)
    with pytest.raises(AdaptError, match="not signed by this station's key"):
        plan.write(tmp_path / "v3", signing_key=st_pem)
    assert not (tmp_path / "v3").exists()


def test_cli_adapt_without_torch(device_bundle, images, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(NO_TORCH), str(REPO)])}
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "adapt", str(device_bundle),
                          "--good", str(images["false_reject"]), "--defect", str(images["defect"]),
                          "--out", str(tmp_path / "v2"), "--who", "cli-test", "--threads", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    threshold = Bundle.load(device_bundle).variant().threshold    # unchanged: adapt keeps the operating point
    assert f"threshold {threshold:.4f} -> {threshold:.4f}" in out.stdout
    lines = {line.split()[-1]: line for line in out.stdout.splitlines() if line.startswith("[int8] ") and ".png" in line}
    assert "NG     ->" in lines[str(images["false_reject"])] and lines[str(images["false_reject"])].split()[-2] == "OK"
    assert lines[str(images["defect"])].split()[-2] == "NG"
    audit = json.loads((tmp_path / "bundle_audit.jsonl").read_text().splitlines()[-1])
    assert audit["who"] == "cli-test"
    assert "learn_limit_overridden" not in audit, "a false reject under the learn limit needs no confirmation"
    assert Bundle.load(tmp_path / "v2").manifest["made_on_device"]["action"] == "adapt"


def test_cli_adapt_names_an_image_of_another_size_without_a_traceback(device_bundle, tmp_path, capsys):
    from edge_runtime.cli import main

    big = tmp_path / "bigger.png"
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(device_bundle / "golden" / "00_good.png")), (400, 300)))
    assert main(["adapt", str(device_bundle), "--good", str(big), "--out", str(tmp_path / "v2"), "--dry-run",
                 "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-runtime adapt: ") and "400x300" in err and "Traceback" not in err


def test_cli_adapt_refuses_an_image_that_is_no_regular_file_and_odd_threads(device_bundle, tmp_path, capsys):
    """Probe 100: `--good /dev/zero` read for ever into memory, a FIFO blocked, a folder was an IsADirectoryError
    traceback; --threads 999999 started that many threads. Each is an error naming the argument now."""
    from edge_runtime.cli import main

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo), str(tmp_path)):
        assert main(["adapt", str(device_bundle), "--good", path, "--out", str(tmp_path / "v2"), "--dry-run"]) == 2
        assert f"edge-runtime adapt: {path}: image is not a regular file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["adapt", str(device_bundle), "--good", "x.png", "--out", str(tmp_path / "v2"), "--threads", "999999"])
    assert "argument --threads: must be 1-256, got 999999" in capsys.readouterr().err


def test_station_key_cannot_bring_back_a_replaced_release_or_move_the_region(device_bundle, images, tmp_path):
    """A version the station key made from another signed release than the station's bundle, or with the region
    inspected moved, is refused: the key may extend the bank and tighten thresholds, nothing else."""
    require("cryptography", "sign")
    import shutil

    import yaml

    from edge_runtime.bank_adapt import sign_version
    from edge_runtime.bundle import write_manifest

    ws_key, ws_pub, _ = _keypair(tmp_path, "workstation")
    _, st_pub, st_pem = _keypair(tmp_path, "station")
    releases = {}
    for version in (50, 100):
        root = tmp_path / f"release{version}"
        shutil.copytree(device_bundle, root)
        m = yaml.safe_load((root / MANIFEST).read_text())
        m["bundle_version"] = version
        write_manifest(root, m)
        (root / SIGNATURE).write_bytes(ws_key.sign((root / MANIFEST).read_bytes()))
        releases[version] = Bundle.load(root, public_key=ws_pub)
    plan = prepare(releases[50], [InputImage.from_file(images["good"])], [], threads=1)
    old = Bundle.load(plan.write(tmp_path / "from50", signing_key=st_pem).root, public_key=st_pub)
    verify_lineage(old, ws_pub, st_pub)                       # a genuine chain, of the old release
    with pytest.raises(BundleError, match=f"not from the station's bundle {releases[100].bundle_id}"):
        verify_lineage(old, ws_pub, st_pub, releases[100])
    assert old.release_version == 50, "a version made from v50 stands for release 50, not its timestamp"
    # Relabelled: the lineage names the station's release and its manifest file is renamed, re-signed with the
    # station key; the ancestor's bytes are still the revoked release's.
    relabel = tmp_path / "relabelled"
    shutil.copytree(old.root, relabel)
    m = yaml.safe_load((relabel / MANIFEST).read_text())
    old_id, new_id = releases[50].bundle_id, releases[100].bundle_id
    for ext in ("yaml", "sig"):
        (relabel / "lineage" / f"{old_id}.manifest.{ext}").rename(relabel / "lineage" / f"{new_id}.manifest.{ext}")
    for entry in m["lineage"]:
        if entry["bundle_id"] == old_id:
            entry["bundle_id"] = new_id
    write_manifest(relabel, m)
    sign_version(relabel, st_pem)
    with pytest.raises(BundleError, match="its manifest differs"):
        verify_lineage(Bundle.load(relabel, public_key=st_pub), ws_pub, st_pub, releases[100])
    plan = prepare(releases[100], [InputImage.from_file(images["good"])], [], threads=1)
    moved = plan.write(tmp_path / "from100", signing_key=st_pem).root
    verify_lineage(Bundle.load(moved, public_key=st_pub), ws_pub, st_pub, releases[100])
    m = yaml.safe_load((moved / MANIFEST).read_text())
    m["geometry"]["roi"] = [10, 10, 40, 40]
    write_manifest(moved, m)
    sign_version(moved, st_pem)
    with pytest.raises(BundleError, match="geometry differs from the signed ancestor's"):
        verify_lineage(Bundle.load(moved, public_key=st_pub), ws_pub, st_pub, releases[100])


def _forge(version: Path, dest: Path, change, station_pem: Path) -> Path:
    """A copy of a device-made `version` whose manifest `change(manifest)` edits, re-written and re-signed with the
    station key: what anyone holding that key (it lives on the station) can make."""
    import copy
    import shutil

    import yaml

    from edge_runtime.bank_adapt import sign_version
    from edge_runtime.bundle import write_manifest

    shutil.copytree(version, dest)
    (dest / SIGNATURE).unlink()
    m = copy.deepcopy(yaml.safe_load((dest / MANIFEST).read_text()))
    change(m)
    m.pop("files")
    m["bundle_id"] = None
    write_manifest(dest, m)
    sign_version(dest, station_pem)
    return dest


def _drop_review(m):
    m["variants"]["int8"]["review_threshold"] = None


def _raise_review(m):
    v = m["variants"]["int8"]
    v["review_threshold"] = (v["review_threshold"] + v["threshold"]) / 2


def _widen_frame_band(m):
    m["frame_quality"]["brightness"]["low"] = 0.0
    m["frame_quality"]["sharpness"]["low"] = 0.0


def _index_settings(m):
    m["index"]["exact_recheck"] = False


def _quantization_pin(m):
    m["variants"]["int8"]["quantization"] = {}


def _golden_tolerance(m):
    m["variants"]["int8"]["golden_tolerance"] = {"relative": 1e9}


@pytest.mark.parametrize("change", [_drop_review, _raise_review, _widen_frame_band, _index_settings,
                                    _quantization_pin, _golden_tolerance])
def test_station_key_cannot_loosen_what_the_release_pins(device_bundle, images, tmp_path, change):
    """A station key may extend the bank and tighten thresholds, nothing else (probe 60: a station-signed version
    without the release's REVIEW band, or with a frame-quality band that takes any brightness and sharpness,
    verified and was loaded: parts in the band passed OK, dark frames were inspected instead of FAULT)."""
    require("cryptography", "sign")
    import shutil

    import yaml

    from edge_runtime.bank_adapt import sign_version
    from edge_runtime.bundle import write_manifest

    parent = tmp_path / "release"
    shutil.copytree(device_bundle, parent)
    m = yaml.safe_load((parent / MANIFEST).read_text())
    m["variants"]["int8"]["review_threshold"] = 0.8 * m["variants"]["int8"]["threshold"]   # a release with a band
    m.pop("files")
    m["bundle_id"] = None
    write_manifest(parent, m)
    _, ws_pub, ws_pem = _keypair(tmp_path, "workstation")
    _, st_pub, st_pem = _keypair(tmp_path, "station")
    sign_version(parent, ws_pem)
    base = Bundle.load(parent, public_key=ws_pub)
    v2 = prepare(base, [InputImage.from_file(images["false_reject"])], [], threads=1).write(tmp_path / "v2",
                                                                                             signing_key=st_pem)
    assert v2.manifest["variants"]["int8"]["review_threshold"] is not None
    verify_lineage(Bundle.load(v2.root, public_key=st_pub), ws_pub, st_pub, base)   # learning itself passes
    forged = _forge(v2.root, tmp_path / "forged", change, st_pem)
    with pytest.raises(BundleError, match="differs from the signed ancestor|REVIEW band"):
        verify_lineage(Bundle.load(forged, public_key=st_pub), ws_pub, st_pub, base)


@pytest.mark.parametrize("radius", [-1.0, float("nan")])
def test_a_coverage_radius_that_is_not_a_distance_is_refused(device_bundle, images, radius):
    """--coverage-radius -1 had looped for ever (the greedy cover never gets every patch within a negative
    distance), NaN learned nothing and wrote .nan into the manifest (probe 81)."""
    with pytest.raises(AdaptError, match="--coverage-radius"):
        prepare(device_bundle, [InputImage.from_file(images["false_reject"])], [], coverage_radius=radius, threads=1)


def test_an_image_the_frame_check_refuses_is_neither_learned_nor_stored(device_bundle, tmp_path):
    """A good part under 30% light: the station FAULTs such a frame before any score (its frame check), so learning
    it put frames no station judges into the bank (probe 81: over 200 vectors per variant), and storing it as a
    defect would set a threshold from a score no station gives."""
    dark = tmp_path / "dark.png"
    cv2.imwrite(str(dark), (cv2.imread(str(device_bundle / "golden" / "01_good.png")) * 0.3).astype("uint8"))
    with pytest.raises(AdaptError, match=r"dark.png: frame check: .*cannot be learned or stored"):
        prepare(device_bundle, [InputImage.from_file(dark)], [], threads=1)
    with pytest.raises(AdaptError, match=r"dark.png: frame check"):
        prepare(device_bundle, [], [InputImage.from_file(dark)], threads=1)


def test_cli_adapt_refuses_a_frame_the_station_would_fault(device_bundle, tmp_path, capsys):
    """`adapt --good dark.png`: the station FAULTs a frame at 30% light, so adapt names the file and the frame check
    and writes nothing, with --dry-run too (probe 84)."""
    from edge_runtime.cli import main

    dark = tmp_path / "dark.png"
    cv2.imwrite(str(dark), (cv2.imread(str(device_bundle / "golden" / "01_good.png")) * 0.3).astype("uint8"))
    for extra in ([], ["--dry-run"]):
        assert main(["adapt", str(device_bundle), "--good", str(dark), "--out", str(tmp_path / "v2"),
                     "--threads", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"edge-runtime adapt: {dark}: frame check: ") and "Traceback" not in err
    assert not (tmp_path / "v2").exists() and not (tmp_path / "bundle_audit.jsonl").exists()


def test_cli_adapt_learns_a_good_image_above_the_learn_limit_only_when_confirmed(device_bundle, images, tmp_path,
                                                                                capsys):
    """`adapt --good` of a part at 1.34 x the threshold turned an NG part OK silently (probe 84: a broken bottle at
    2.2 x); like the operator page (page.operator_learn_max), adapt refuses parts above 1.25 x the threshold unless
    the engineer confirms them, and the audit log says which were confirmed."""
    from edge_runtime.cli import main

    before, thr = score(device_bundle, images["above_limit"])
    assert before > 1.25 * thr and score(device_bundle, images["false_reject"])[0] <= 1.25 * thr
    image, out = str(images["above_limit"]), tmp_path / "v2"
    args = ["adapt", str(device_bundle), "--good", image, "--out", str(out), "--who", "eng", "--threads", "1"]
    for extra in (["--dry-run"], []):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert re.search(rf"{re.escape(image)}: scores \d+\.\d{{4}}, 1\.3\d x the int8 threshold {thr:.4f}, above the "
                         r"limit of 1\.25 x .*pass --confirm-above-limit", err), err
    assert not out.exists() and not (tmp_path / "bundle_audit.jsonl").exists()

    assert main(args + ["--confirm-above-limit"]) == 0
    after, new_thr = score(out, images["above_limit"])
    assert after < new_thr, "confirmed, the part is learned as good"
    audit = json.loads((tmp_path / "bundle_audit.jsonl").read_text().splitlines()[-1])
    override = audit["learn_limit_overridden"]
    assert audit["who"] == "eng" and override["limit"] == 1.25
    assert [(o["image"], o["variant"], o["threshold"]) for o in override["images"]] == [(image, "int8", thr)]
    assert override["images"][0]["ratio"] > 1.25
