"""Tests of the synthetic flange data set: layout, determinism, and masks that match what the defects change."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from export.synthetic_parts import (
    DEFECT_TYPES,
    MARKER_NAME,
    generate_dataset,
    render_part,
    sample_defect,
    sample_part_params,
    write_sample_frames,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _read_color(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "flange"
    assert generate_dataset(out) == out
    return out


def test_default_set_has_mvtec_layout_and_counts(default_set: Path) -> None:
    assert sorted(p.name for p in (default_set / "train").iterdir()) == ["good"]
    assert len(list((default_set / "train" / "good").glob("*.png"))) == 60
    assert sorted(p.name for p in (default_set / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])
    assert len(list((default_set / "test" / "good").glob("*.png"))) == 12
    # No ground truth for good images, one folder per defect type.
    assert sorted(p.name for p in (default_set / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)
    for kind in DEFECT_TYPES:
        stems = sorted(p.stem for p in (default_set / "test" / kind).glob("*.png"))
        assert stems == [f"{i:03d}" for i in range(6)]
        masks = sorted(p.name for p in (default_set / "ground_truth" / kind).glob("*.png"))
        assert masks == [f"{stem}_mask.png" for stem in stems]


def test_images_are_colour_and_masks_binary_nonempty_and_same_size(default_set: Path) -> None:
    for path in (default_set / "train" / "good").glob("*.png"):
        image = _read_color(path)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    for kind in DEFECT_TYPES:
        for path in (default_set / "test" / kind).glob("*.png"):
            image = _read_color(path)
            mask = _read_color(default_set / "ground_truth" / kind / f"{path.stem}_mask.png")
            assert mask.shape == image.shape[:2] and mask.dtype == np.uint8
            assert set(np.unique(mask)) == {0, 255}
            # Local: visible but only a small part of the frame.
            assert 0.001 < (mask > 0).mean() < 0.05, (kind, path.name)


def test_good_images_vary_like_real_nominal_parts(default_set: Path) -> None:
    goods = [_read_color(p).astype(np.float32) for p in sorted((default_set / "train" / "good").glob("*.png"))[:8]]
    for a, b in zip(goods, goods[1:]):
        assert np.abs(a - b).mean() > 3.0  # jitter, lighting and noise: no two parts look the same


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path: Path) -> None:
    counts = dict(n_train=3, n_test_good=2, n_test_defect_per_type=1, size=128)
    first = _files(generate_dataset(tmp_path / "a", seed=5, **counts))
    second = _files(generate_dataset(tmp_path / "b", seed=5, **counts))
    other = _files(generate_dataset(tmp_path / "c", seed=6, **counts))
    assert len(first) == 3 + 2 + 2 * len(DEFECT_TYPES)
    assert first == second
    assert first.keys() == other.keys()
    differing = [name for name in first if first[name] != other[name] and not name.startswith("ground_truth")]
    assert len(differing) == 3 + 2 + len(DEFECT_TYPES)


def test_test_images_do_not_depend_on_training_count(tmp_path: Path) -> None:
    small = _files(generate_dataset(tmp_path / "a", n_train=1, n_test_good=2, n_test_defect_per_type=1, size=96))
    large = _files(generate_dataset(tmp_path / "b", n_train=4, n_test_good=2, n_test_defect_per_type=1, size=96))
    assert {k: v for k, v in small.items() if not k.startswith("train")} == \
        {k: v for k, v in large.items() if not k.startswith("train")}


def test_good_render_has_empty_mask() -> None:
    for i in range(3):
        image, mask = render_part(sample_part_params(np.random.default_rng(i)))
        assert mask.shape == image.shape[:2]
        assert not mask.any()


@pytest.mark.parametrize("kind", DEFECT_TYPES)
@pytest.mark.parametrize("size", [256, 128])
def test_defect_changes_the_part_only_inside_its_mask(kind: str, size: int) -> None:
    for i in range(4):
        rng = np.random.default_rng([42, i])
        params = sample_part_params(rng, size)
        good, good_mask = render_part(params)
        bad, mask = render_part(params, sample_defect(rng, params, kind))
        assert not good_mask.any()
        inside = mask > 0
        assert inside.any()
        diff = np.abs(good.astype(np.int16) - bad.astype(np.int16)).mean(axis=2)
        # Clearly visible: a person sees tens of grey levels of change inside the mask.
        assert diff[inside].mean() > 10.0, (kind, i)
        # ...and nothing a person could see outside it.
        assert diff[~inside].mean() < 0.05, (kind, i)
        assert (diff[~inside] > 10).sum() == 0, (kind, i)


def test_surface_defects_lie_on_the_steel() -> None:
    # The belt is dark; a stain, dent or scratch mask over it would be a mask on nothing.
    for kind in ("scratch", "dent", "stain"):
        for i in range(4):
            rng = np.random.default_rng([7, i])
            params = sample_part_params(rng)
            good, _ = render_part(params)
            _, mask = render_part(params, sample_defect(rng, params, kind))
            assert np.median(good[mask > 0]) > 100, (kind, i)


def test_unknown_defect_type_is_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="crack"):
        sample_defect(rng, sample_part_params(rng), "crack")


def test_regeneration_replaces_an_earlier_generation(tmp_path: Path) -> None:
    out = tmp_path / "flange"
    generate_dataset(out, n_train=4, n_test_good=2, n_test_defect_per_type=2, size=96)
    generate_dataset(out, n_train=2, n_test_good=1, n_test_defect_per_type=1, size=96)
    assert len(list((out / "train" / "good").glob("*.png"))) == 2
    assert len(list((out / "test" / "good").glob("*.png"))) == 1
    for kind in DEFECT_TYPES:
        assert len(list((out / "ground_truth" / kind).glob("*.png"))) == 1
    assert (out / MARKER_NAME).is_file()


def test_refuses_a_foreign_nonempty_folder_and_leaves_it_alone(tmp_path: Path) -> None:
    out = tmp_path / "real_data"
    (out / "train" / "good").mkdir(parents=True)
    keep = out / "train" / "good" / "000.png"
    keep.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="real_data"):
        generate_dataset(out, n_train=1, n_test_good=1, n_test_defect_per_type=1, size=96)
    assert keep.read_bytes() == b"not ours"
    assert not (out / MARKER_NAME).exists()


def test_sample_frames_mix_labels_deterministically(tmp_path: Path, default_set: Path) -> None:
    paths = write_sample_frames(tmp_path / "a", n_good=4, n_defect=7, seed=3)
    again = write_sample_frames(tmp_path / "b", n_good=4, n_defect=7, seed=3)
    assert [p.name for p in paths] == [p.name for p in again]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    names = [p.name for p in paths]
    labels = [re.fullmatch(r"frame_(\d{3})_(\w+)\.png", n).group(2) for n in names]
    assert [n[6:9] for n in names] == [f"{i:03d}" for i in range(11)]
    assert labels.count("good") == 4
    assert sorted(set(labels) - {"good"}) == sorted(DEFECT_TYPES)  # 7 defects cycle through all 5 types
    assert labels != sorted(labels, key=lambda label: label != "good")  # shuffled, not all good first
    training = {p.read_bytes() for p in (default_set / "train" / "good").glob("*.png")}
    assert not training & {p.read_bytes() for p in paths}


def test_sample_frames_replace_stale_frames_only(tmp_path: Path) -> None:
    out = tmp_path / "frames"
    write_sample_frames(out, n_good=5, n_defect=5)
    (out / "notes.txt").write_text("operator notes")
    paths = write_sample_frames(out, n_good=1, n_defect=1)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in paths)
    assert (out / "notes.txt").read_text() == "operator notes"


def test_module_does_not_pull_in_torch() -> None:
    # The data set is used in device-side tests and the demo; importing it must stay cheap.
    code = "import sys, export.synthetic_parts; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
