"""Where fitting and evaluation find their images, with errors that say what was expected.

Good images for fitting come from either layout:
  - a flat folder of good images (what a user has): every image in it, not its subfolders;
  - the benchmark (MVTec AD) layout: DATA_DIR/train/good/* (DATA_DIR/test is left for evaluation).
Calibration defects come from a flat folder of defect images or a folder with one subfolder per defect type.
Evaluation reads DATA_DIR/test/<good|defect type>/* (optional ground_truth masks) or two flat folders.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
LAYOUT = ("a flat folder of good images (DATA_DIR/*.png|jpg), or the benchmark layout DATA_DIR/train/good/*.png|jpg "
          "(good images to fit on) with DATA_DIR/test/<good|defect type>/* and optional "
          "DATA_DIR/ground_truth/<defect type>/<stem>_mask.png for evaluation")
DEFECT_LAYOUT = "a flat folder of defect images, or one subfolder per defect type (DEFECTS/<type>/*.png|jpg)"
# How fitting uses the good images; one place, so the line `edge-export fit` prints says what fit.py does.
GOOD_USAGE = "all used for the bank and for cross-fitting the threshold"
UNTYPED = "defect"   # the type of calibration defects that sit directly in the folder, not in a type subfolder


class DatasetError(ValueError):
    pass


def list_images(folder: Path) -> list[Path]:
    """The image files directly in `folder` (not in subfolders), sorted by name. Hidden names (".x.png", the
    "._x.png" metadata files macOS leaves on shared drives) are not images of parts, as the runtime's folder
    source also skips them."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def unique_images(paths: list[Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """(paths without byte-identical repeats, [(repeat, the first copy)]). A copied good image adds nothing to
    the bank and makes the cross-fitted scores look tighter than good parts are (its twin is in the bank)."""
    import collections
    import hashlib

    # Only files that share their size with another can be copies: the rest are never read here.
    sizes = collections.Counter(p.stat().st_size for p in paths)
    first: dict[tuple[int, str], Path] = {}
    kept, repeats = [], []
    for p in paths:
        size = p.stat().st_size
        if sizes[size] == 1:
            kept.append(p)
            continue
        digest = (size, hashlib.sha256(p.read_bytes()).hexdigest())
        if digest in first:
            repeats.append((p, first[digest]))
        else:
            first[digest] = p
            kept.append(p)
    return kept, repeats


def _missing_folder(path: Path, what: str) -> str:
    """Why `path` is no folder: a file given for it is named as such (probe 107: `fit part.png` said "data
    directory does not exist", which sends a user looking for a typo in a path that is there)."""
    return f"is a file, not a folder (the {what})" if path.exists() else f"{what} does not exist"


def _subfolders_with_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and list_images(p))


def training_layout(data_dir: Path) -> tuple[str, Path]:
    """('benchmark' | 'flat', the folder holding the good images). Raises DatasetError naming what was expected."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: {_missing_folder(data_dir, 'data directory')}")
    good = data_dir / "train" / "good"
    if good.is_dir():
        return "benchmark", good
    if list_images(data_dir):
        return "flat", data_dir
    hint = ""
    subs = _subfolders_with_images(data_dir)
    others = sorted({p.suffix.lower() for p in data_dir.iterdir() if p.is_file() and p.suffix
                     and p.suffix.lower() not in IMAGE_EXTENSIONS and not p.name.startswith(".")})
    if subs:
        names = ", ".join(p.name for p in subs[:5])
        hint = f" (images found only in subfolders: {names}; point at the folder of good images itself)"
    elif others:
        hint = (f" (found only files of other types: {', '.join(others[:6])}; the formats read are "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}: convert them, e.g. to PNG)")
    # Name the folder the user gave: "train/good missing" reads as a wrong path to someone who brought a flat folder.
    raise DatasetError(f"{data_dir}: no good images found, neither in the folder itself nor in train/good "
                       f"(missing). Expected layout: {LAYOUT}{hint}")


def train_images(data_dir: Path) -> list[Path]:
    """The good images to fit on, for either layout (flat folder or DATA_DIR/train/good).

    Raises DatasetError when the folder is missing, has neither layout, or holds fewer than 2 images."""
    _, good = training_layout(data_dir)
    images, repeats = unique_images(list_images(good))
    if len(images) < 2:
        # Say where the other files went: "found 1 images" of a folder of 8 copies of one frame reads as a bug.
        copies = (f" ({len(repeats)} byte-identical cop{'ies' if len(repeats) > 1 else 'y'} of "
                  f"{'it' if len(images) == 1 else 'them'} left out, first: {repeats[0][0].name} = {repeats[0][1].name})"
                  if repeats else "")
        raise DatasetError(f"{good}: found {len(images)} images{copies}; at least 2 good images are needed to fit and "
                           "calibrate")
    return images


def calibration_defects_by_type(folder: Path) -> dict[str, list[Path]]:
    """Defect images for threshold calibration by type: images directly in `folder` are of type 'defect',
    each subfolder with images is one type. Raises DatasetError for a missing/empty folder or a 'good' subfolder
    (a calibration defect that is a good part would pull the threshold below good parts)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: {_missing_folder(folder, 'calibration defects folder')}. "
                           f"Expected {DEFECT_LAYOUT}")
    found: dict[str, list[Path]] = {}
    if list_images(folder):
        found[UNTYPED] = list_images(folder)
    for sub in _subfolders_with_images(folder):
        if sub.name == "good":
            raise DatasetError(f"{sub}: a 'good' folder among the calibration defects; give only defective parts "
                               f"({DEFECT_LAYOUT})")
        found.setdefault(sub.name, []).extend(list_images(sub))
    if not found:
        raise DatasetError(f"{folder}: no images found for threshold calibration. Expected {DEFECT_LAYOUT}")
    return found


def defects_among_good(defects: list[Path], good: list[Path]) -> list[tuple[Path, Path]]:
    """(calibration defect, good image) pairs whose files are byte-identical: a good image copied among the defects
    too. It scores like the good parts, so the zero-escape point drops under them (probe 103: one such copy among 4
    bottle defects gave a REVIEW band that held every good part, written with exit 0 and advice to fit on more
    images). Only files of a defect's size are read."""
    import hashlib

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    sizes = {p.stat().st_size for p in defects}
    good_by_digest: dict[str, Path] = {}
    for p in good:
        if p.stat().st_size in sizes:
            good_by_digest.setdefault(digest(p), p)
    return [(d, good_by_digest[h]) for d in defects if (h := digest(d)) in good_by_digest] if good_by_digest else []


def calibration_images(folder: Path) -> list[Path]:
    """All calibration defect images (flat folder or one subfolder per type), in a stable order."""
    return [p for paths in calibration_defects_by_type(folder).values() for p in paths]


def describe_training_data(data_dir: Path, calibration_defects: Path | None = None,
                           max_train: int | None = None) -> str:
    """One line for the user: what was found where and how fitting uses it. Raises DatasetError like train_images."""
    layout, good = training_layout(data_dir)
    n_good = len(train_images(data_dir))
    where = "flat folder" if layout == "flat" else f"benchmark layout; {Path(data_dir) / 'test'} is left for evaluate"
    usage = (GOOD_USAGE if max_train is None or max_train >= n_good else
             f"{max_train} of them (--max-train, a seeded choice) {GOOD_USAGE.removeprefix('all ')}")
    line = f"found {n_good} good images in {good} ({where}): {usage}"
    _, repeats = unique_images(list_images(good))
    if repeats:
        shown = ", ".join(f"{a.name} = {b.name}" for a, b in repeats[:3])
        line += f"; {len(repeats)} byte-identical cop{'ies' if len(repeats) > 1 else 'y'} left out ({shown})"
    skipped = [p for p in good.iterdir() if p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS]
    if skipped:
        line += f"; {len(skipped)} hidden file{'s' if len(skipped) > 1 else ''} left out ({skipped[0].name})"
    # Files of formats fit does not read (WebP, JPEG 2000, ...) beside ones it does: not silently a smaller set.
    others = sorted(p for p in good.iterdir() if p.is_file() and p.suffix and not p.name.startswith(".")
                    and p.suffix.lower() not in IMAGE_EXTENSIONS)
    if others:
        kinds = ", ".join(sorted({p.suffix.lower() for p in others})[:6])
        line += (f"; {len(others)} file{'s' if len(others) > 1 else ''} of other types left out ({kinds}; first: "
                 f"{others[0].name}; the formats read are {', '.join(sorted(IMAGE_EXTENSIONS))}: convert images, e.g. "
                 "to PNG)")
    subs = [p for p in _subfolders_with_images(good) if p.name not in ("train", "test", "ground_truth")]
    if subs:
        line += (f"; images in subfolders are not used ({', '.join(f'{p.name}/: {len(list_images(p))}' for p in subs[:3])}"
                 f"{', ...' if len(subs) > 3 else ''}): point at each folder, or move them up")
    if calibration_defects is None:
        return line + "; no calibration defects (threshold from good images only)"
    by_type = calibration_defects_by_type(calibration_defects)
    n = sum(len(v) for v in by_type.values())
    types = (f"{len(by_type)} type{'s' if len(by_type) != 1 else ''}" if list(by_type) != [UNTYPED]
             else "one untyped folder")
    return line + f"; {n} defect image{'s' if n != 1 else ''} in {types} for calibration"


@dataclass(frozen=True)
class TestImage:
    path: Path
    label: str               # "good" or the defect type
    mask: Path | None        # ground-truth mask for defects, when the set has them

    @property
    def is_defect(self) -> bool:
        return self.label != "good"


def test_images(data_dir: Path) -> list[TestImage]:
    data_dir = Path(data_dir)
    test = data_dir / "test"
    if not test.is_dir():
        raise DatasetError(f"{test}: missing. Expected DATA_DIR/test/<good|defect type>/* "
                           "(good parts in test/good, defects in one folder per type)")
    gt = data_dir / "ground_truth"
    out = []
    for sub in sorted(p for p in test.iterdir() if p.is_dir()):
        for img in list_images(sub):
            mask = None
            if sub.name != "good" and gt.is_dir():
                candidate = gt / sub.name / f"{img.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            out.append(TestImage(img, sub.name, mask))
    labels = {t.label for t in out}
    if "good" not in labels or len(labels) < 2:
        raise DatasetError(f"{test}: needs a 'good' folder and at least one defect folder with images (found {sorted(labels)})")
    return out


def evaluation_images(good: Path, defects: Path) -> list[TestImage]:
    """Evaluation images from two folders: `good` (flat) and `defects` (flat, or one subfolder per type).

    No masks (no pixel AUROC). Raises DatasetError for a missing or empty folder."""
    good = Path(good)
    if not good.is_dir():
        raise DatasetError(f"{good}: {_missing_folder(good, 'folder of good images to evaluate')}")
    goods = list_images(good)
    if not goods:
        raise DatasetError(f"{good}: no images (expected good parts directly in this folder)")
    out = [TestImage(p, "good", None) for p in goods]
    for kind, paths in calibration_defects_by_type(defects).items():
        out.extend(TestImage(p, kind, None) for p in paths)
    return out


def has_masks(items: list[TestImage]) -> bool:
    return any(t.mask is not None for t in items if t.is_defect)
