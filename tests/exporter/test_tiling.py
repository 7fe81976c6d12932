"""Tiled bundles end to end: tiles cover the frame, a defect on a seam is found, the heat map lines up."""
import cv2
import numpy as np
import pytest

from edge_runtime.bundle import Bundle
from edge_runtime.pipeline import Pipeline
from edge_runtime.decode import load_image
from edge_runtime.records import Frame, Verdict


@pytest.fixture(scope="module")
def tiled_bundle(synthetic_dataset, tmp_path_factory):
    from export.fit import FitSettings, fit

    out = tmp_path_factory.mktemp("bundles") / "tiled"
    # 224 px frames, 128 px tiles at scale 1: a 2 x 2 grid whose tiles overlap in x, y in [96, 128).
    fit(synthetic_dataset, out, FitSettings(coreset_ratio=0.05, scale=1.0, input_size=(128, 128),
                                           int8_calibration_images=16, cross_fit_folds=3))
    return out


def test_tiled_geometry_is_pinned(tiled_bundle):
    g = Bundle.load(tiled_bundle).geometry
    assert g.input_size == (128, 128) and g.canvas_size == (224, 224)
    assert g.tiles == ((0, 0), (96, 0), (0, 96), (96, 96))


def test_a_defect_on_a_tile_seam_is_found_and_the_heat_map_peaks_on_it(tiled_bundle, synthetic_dataset):
    pipe = Pipeline(Bundle.load(tiled_bundle), "int8", "hnsw")
    good = load_image(sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0])
    ok = pipe.inspect(Frame(frame_id=1, source="good", image=cv2.cvtColor(good, cv2.COLOR_RGB2BGR)))
    assert ok.verdict is Verdict.OK
    scratched = good.copy()
    # A dark scratch on the metal ring, across the right edge of the first tile (x = 128) inside the overlap.
    cv2.line(scratched, (110, 31), (136, 33), (20, 20, 20), 3)
    ng = pipe.inspect(Frame(frame_id=2, source="seam", image=cv2.cvtColor(scratched, cv2.COLOR_RGB2BGR)))
    assert ng.verdict is Verdict.NG and ng.score > 1.3 * ok.score
    assert ng.anomaly_map.shape == good.shape[:2] == ng.image.shape[:2]
    y, x = np.unravel_index(np.argmax(ng.anomaly_map), ng.anomaly_map.shape)
    assert abs(x - 123) <= 16 and abs(y - 32) <= 16


def test_every_tile_is_scored(tiled_bundle, synthetic_dataset):
    pipe = Pipeline(Bundle.load(tiled_bundle), "fp32", "exact")
    s = pipe.score_rgb(load_image(sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0]))
    rows, cols = pipe.geometry.grid()
    assert s.patch_scores.shape == (4 * rows * cols,) and np.all(np.isfinite(s.patch_scores))


def test_a_frame_of_the_wrong_size_is_a_fault_with_a_message(small_bundle, synthetic_dataset):
    pipe = Pipeline(Bundle.load(small_bundle), threads=1)
    frame = cv2.resize(cv2.imread(str(sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0])), (320, 240))
    r = pipe.inspect(Frame(frame_id=3, source="cam0", image=frame))
    assert r.verdict is Verdict.FAULT and "cam0: frame is 320x240 but the bundle was fitted on 224x224" in r.error
    pipe.apply_overrides(size_policy="resize")
    assert pipe.inspect(Frame(frame_id=4, source="cam0", image=frame)).verdict is not Verdict.FAULT


def test_a_camera_size_frame_shrunk_to_one_input_is_warned_about_with_the_tiles_that_would_keep_it(tmp_path):
    from export.fit import FitSettings, plan_geometry

    paths = []
    for i, (w, h) in enumerate([(2448, 2048)] * 3):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.zeros((h, w, 3), np.uint8))
        paths.append(p)
    geom, info = plan_geometry(paths, FitSettings())
    warning = next(n for n in info["notes"] if n.startswith("WARNING"))
    assert geom.n_tiles == 1 and "shrunk 9x" in warning
    assert "crop to it with --roi X,Y,W,H first" in warning, "the cheap way (probe 34) comes before tiling"
    # The counts it promises are the ones --scale then makes (it had divided by the one-input canvas: "about 6"
    # for what became 10 tiles).
    for sc in (0.5, 0.25):
        made = plan_geometry(paths, FitSettings(scale=sc))[0].n_tiles
        assert f"--scale {sc} gives {made} tiles" in warning
    small = plan_geometry(paths[:1], FitSettings(scale=0.25))[1]["notes"]
    assert not any(n.startswith("WARNING") for n in small)


def test_sixteen_bit_data_pins_the_shift_its_significant_bits_need(tmp_path):
    from export.fit import sixteen_bit_shift

    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.random.default_rng(i).integers(0, 4096, (40, 50), dtype=np.uint16))
        paths.append(p)
    shift, [note] = sixteen_bit_shift(paths)
    assert shift == 4 and "about 12 significant bits" in note and "min(v >> 4, 255)" in note
    full = tmp_path / "full.png"
    cv2.imwrite(str(full), np.random.default_rng(9).integers(0, 65536, (40, 50), dtype=np.uint16))
    assert sixteen_bit_shift([full]) == (8, [])
    eight = tmp_path / "eight.png"
    cv2.imwrite(str(eight), np.zeros((40, 50), np.uint8))
    assert sixteen_bit_shift([eight]) == (8, [])
    # One stray 8-bit file does not decide: the 16-bit ones keep their depth, and the mix is called out.
    shift, notes = sixteen_bit_shift([paths[0], eight, paths[1]])
    assert shift == 4 and notes[1].startswith("WARNING: 1 of 3 training images are 8-bit (first: eight.png)")
    shift, [note] = sixteen_bit_shift([full, eight])
    assert shift == 8 and note.startswith("WARNING: 1 of 2 training images are 8-bit")
    # Nor does one full-range file among 12-bit ones: it is called out, and saturates.
    shift, notes = sixteen_bit_shift([paths[0], full, paths[1], paths[2]])
    assert shift == 4 and any(n.startswith("WARNING: 1 of 4 sampled 16-bit training images hold values far above")
                              and "full.png" in n for n in notes)


def test_a_scale_that_leaves_a_side_under_32_px_keeps_the_region_aspect(tmp_path):
    """--scale on a small or thin region: the canvas is raised to 32 px on the short side in proportion, never
    stretched on that side alone (probe 69: 9 x 300 at 0.5 became a 32 x 150 canvas, 7x wider than the part)."""
    from export.fit import FitSettings, plan_geometry

    for (w, h), sc in (((9, 300), 0.5), ((48, 40), 0.5), ((2000, 40), 0.5)):
        paths = []
        for i in range(2):
            p = tmp_path / f"{w}x{h}_{i}.png"
            cv2.imwrite(str(p), np.zeros((h, w, 3), np.uint8))
            paths.append(p)
        geom, info = plan_geometry(paths, FitSettings(scale=sc))
        cw, ch = geom.canvas_size
        assert min(cw, ch) == 32 and abs(cw / ch / (w / h) - 1) < 0.05, (w, h, geom.canvas_size)
        assert any("keeping its aspect" in n for n in info["notes"])
    assert plan_geometry(paths, FitSettings(scale=1.0))[0].canvas_size == (2000, 40)   # 40 px: as it was


def test_twelve_bit_tiffs_with_their_directory_after_the_pixels_can_be_fitted(tmp_path):
    """OpenCV writes a TIFF's directory after its pixels: beyond fit's 64 kB header read for a 200 x 200 16-bit file.
    Its size comes from the whole file's header, not from decoding at the default shift, which refused 12-bit data
    as too dark before fit had pinned its shift (probe 69: every 12-bit TIFF folder failed to fit)."""
    from export.fit import image_sizes, sixteen_bit_shift

    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.tif"
        cv2.imwrite(str(p), np.random.default_rng(i).integers(0, 4096, (200, 200, 3), dtype=np.uint16))
        assert int.from_bytes(p.read_bytes()[4:8], "little") > 1 << 16   # the directory lies past 64 kB
        paths.append(p)
    assert image_sizes(paths) == [(200, 200), (200, 200)]
    assert sixteen_bit_shift(paths)[0] == 4


def test_an_opaque_alpha_channel_does_not_decide_the_sixteen_bit_depth(tmp_path):
    """12-bit colour in 16-bit RGBA files with an opaque alpha (65535): the shift comes from the colour (4), and the
    same frame read through the top byte is refused, not inspected at 0-15 (probe 69: shift 8 and near-black
    training images, the alpha's 65535 hiding both)."""
    from edge_runtime.decode import ImageError, decode_image
    from export.fit import sixteen_bit_shift

    rgb = np.random.default_rng(0).integers(0, 4096, (40, 50, 3), dtype=np.uint16)
    p = tmp_path / "rgba12.png"
    cv2.imwrite(str(p), np.dstack([rgb, np.full((40, 50), 65535, np.uint16)]))
    shift, notes = sixteen_bit_shift([p])
    assert shift == 4 and "about 12 significant bits" in notes[0]
    assert decode_image(p.read_bytes(), p.name, shift_16bit=4).max() == 255
    with pytest.raises(ImageError, match=r"rgba12.png: 16-bit frame whose highest value is 40\d\d:"):
        decode_image(p.read_bytes(), p.name)   # the default top byte: 0-15


def test_an_roi_fit_pins_the_training_frame_size_and_says_what_it_checks(tmp_path):
    from export.fit import FitSettings, plan_geometry

    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.zeros((384, 960, 3), np.uint8))
        paths.append(p)
    geom, info = plan_geometry(paths, FitSettings(roi=(288, 0, 384, 384)))
    assert geom.frame_size == (960, 384) and geom.region_size == (384, 384)
    assert info["training_sizes"] == ["960x384"] and info["training_roi_size"] == "384x384"
    note = next(n for n in info["notes"] if n.startswith("all training images"))
    assert "960x384, their ROI 384x384 at (288, 0): a frame or ROI of another size is a FAULT" in note
    assert plan_geometry(paths, FitSettings())[0].frame_size is None   # no ROI: region_size is the frame's


def test_an_roi_fit_on_frames_of_varied_sizes_says_what_it_does_not_check(tmp_path):
    from export.fit import FitSettings, plan_geometry

    paths = []
    for i, w in enumerate((384, 480, 384)):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.zeros((384, w, 3), np.uint8))
        paths.append(p)
    geom, info = plan_geometry(paths, FitSettings(roi=(0, 0, 384, 384)))
    assert geom.frame_size is None
    note = next(n for n in info["notes"] if n.startswith("the training images vary"))
    assert "frames of any size are cut at the ROI" in note and "is a FAULT" not in note


def test_a_few_training_images_of_another_size_are_left_out_and_the_size_stays_pinned(tmp_path):
    """One stray file (another camera, a resized export) among one camera's images had silently turned the size
    policy from refuse into resize: then a wrong camera's frames are scored instead of faulted."""
    from export.fit import FitSettings, drop_size_strays, plan_geometry

    paths = []
    for i in range(20):
        p = tmp_path / f"{i:02d}.png"
        w, h = (900, 900) if i == 7 else (384, 384)
        cv2.imwrite(str(p), np.zeros((h, w, 3), np.uint8))
        paths.append(p)
    kept, note = drop_size_strays(paths, FitSettings())
    assert len(kept) == 19 and paths[7] not in kept
    assert note.startswith("WARNING: 1 of 20 training images is not 384x384") and "07.png, 900x900" in note
    geom = plan_geometry(kept, FitSettings())[0]
    assert geom.size_policy == "refuse" and geom.region_size == (384, 384)
    # Asked to resize, or too many to be strays (two cameras): all kept, resized as before.
    assert drop_size_strays(paths, FitSettings(size_policy="resize")) == (paths, None)
    for i in (3, 11, 15):
        cv2.imwrite(str(paths[i]), np.zeros((900, 900, 3), np.uint8))
    assert drop_size_strays(paths, FitSettings()) == (paths, None)
    assert plan_geometry(paths, FitSettings())[0].size_policy == "resize"


def test_a_negative_roi_gets_the_roi_message_not_argparse_s(tmp_path, capsys):
    from export.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["fit", str(tmp_path), "--out", str(tmp_path / "b"), "--roi", "-10,0,100,100"])
    assert stop.value.code == 2
    assert "argument --roi: ROI -10,0,100,100: need x, y >= 0" in capsys.readouterr().err
