"""The MVTec-AD folder layout that fitting and evaluation read, with errors that say what was expected."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
LAYOUT = ("DATA_DIR/train/good/*.png|jpg (good images to fit on), DATA_DIR/test/<good|defect type>/*, "
          "optional DATA_DIR/ground_truth/<defect type>/<stem>_mask.png")


class DatasetError(ValueError):
    pass


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def train_images(data_dir: Path) -> list[Path]:
    data_dir = Path(data_dir)
    good = data_dir / "train" / "good"
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: data directory does not exist")
    if not good.is_dir():
        raise DatasetError(f"{good}: missing. Expected layout: {LAYOUT}")
    images = list_images(good)
    if len(images) < 2:
        raise DatasetError(f"{good}: found {len(images)} images; at least 2 good images are needed to fit and calibrate")
    return images


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
        raise DatasetError(f"{test}: missing. Expected layout: {LAYOUT}")
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


def has_masks(items: list[TestImage]) -> bool:
    return any(t.mask is not None for t in items if t.is_defect)
