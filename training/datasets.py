"""Labelled slices in memory, and the loader for folders of 8-bit images.

Every loader (this one, `training.dicom_data`, `training.volumes`) yields
`Sample`s, then `materialise` turns them into model inputs through the shared
preprocessing in `models.preprocessing`, so training sees exactly the tensors
the node computes. A folder of images looks like `ROOT/<class>/*.jpg`, or
`ROOT/<split>/<class>/*.jpg` with a `ROOT/split.csv` (`file,label,group,split`)
that fixes the split and the groups.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm  # type: ignore[import-untyped]

from models.preprocessing import Preprocessing, input_from_unit, unit_from_8bit

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SPLIT_FILE = "split.csv"
# Image modes that hold one 8-bit value per pixel (after conversion to "L").
EIGHT_BIT_MODES = ("L", "P", "RGB", "RGBA", "LA")


class DataError(ValueError):
    """A data folder is empty, unreadable or labelled with an unknown class."""


@dataclass(frozen=True)
class Sample:
    """One slice to load: where it is, its class, its group and fixed split."""

    source: str
    label: str
    # Slices of one group (a patient, a series, near-duplicates) never sit
    # on both sides of a split.
    group: str
    split: str | None = None


@dataclass(frozen=True)
class SliceSet:
    """Model inputs (n, 3, S, S), class indices (n,) and where each came from."""

    classes: tuple[str, ...]
    inputs: torch.Tensor
    labels: torch.Tensor
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int]) -> SliceSet:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return SliceSet(
            classes=self.classes,
            inputs=self.inputs[index],
            labels=self.labels[index],
            samples=tuple(self.samples[i] for i in index.tolist()),
        )

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels.tolist())
        return {name: counts.get(index, 0) for index, name in enumerate(self.classes)}

    def groups(self) -> list[str]:
        return [sample.group for sample in self.samples]


Reader = Callable[[Sample, Preprocessing], torch.Tensor]


def check_labels(samples: Sequence[Sample], classes: Sequence[str], require_all: bool) -> None:
    """Refuse labels outside `classes` and, with `require_all`, classes without samples."""
    known = set(classes)
    unknown = sorted({sample.label for sample in samples} - known)
    if unknown:
        example = next(sample.source for sample in samples if sample.label in unknown)
        raise DataError(
            f"unknown label(s) {', '.join(map(repr, unknown))} (e.g. {example}); "
            f"known classes are {', '.join(classes)}"
        )
    if require_all:
        present = {sample.label for sample in samples}
        empty = [name for name in classes if name not in present]
        if empty:
            raise DataError(f"class(es) with no samples: {', '.join(empty)}")


def describe(samples: Sequence[Sample], classes: Sequence[str], what: str) -> str:
    """A table of counts per class and split, printed by every loader."""
    splits = sorted({sample.split or "-" for sample in samples})
    counts = Counter((sample.split or "-", sample.label) for sample in samples)
    width = max(len(name) for name in (*classes, "class"))
    lines = [f"{what}: {len(samples)} slices, {len({s.group for s in samples})} groups"]
    lines.append("  " + "class".ljust(width) + "".join(f"{split:>10}" for split in splits))
    for name in classes:
        cells = "".join(f"{counts[(split, name)]:>10}" for split in splits)
        lines.append("  " + name.ljust(width) + cells)
    return "\n".join(lines)


def assign_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> list[Sample]:
    """Give samples without a fixed split a grouped, class-stratified train/val split."""
    if all(sample.split is not None for sample in samples):
        return list(samples)
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    folds = max(2, round(1.0 / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    labels = [sample.label for sample in samples]
    groups = [sample.group for sample in samples]
    _, val_index = next(splitter.split(np.zeros(len(samples)), labels, groups))
    val = set(val_index.tolist())
    return [
        Sample(s.source, s.label, s.group, "val" if i in val else "train")
        for i, s in enumerate(samples)
    ]


def materialise(
    samples: Sequence[Sample],
    classes: Sequence[str],
    preprocessing: Preprocessing,
    reader: Reader,
    what: str = "loading",
) -> SliceSet:
    """Read every sample into one tensor; an unreadable file is named in the error."""
    if not samples:
        raise DataError(f"{what}: no samples")
    inputs = torch.empty(len(samples), 3, preprocessing.input_size, preprocessing.input_size)
    for index, sample in enumerate(tqdm(samples, desc=what, unit="slice", leave=False)):
        try:
            inputs[index] = reader(sample, preprocessing)
        except DataError:
            raise
        except (OSError, ValueError, RuntimeError) as error:
            raise DataError(f"cannot read {sample.source}: {error}") from error
    labels = torch.tensor([list(classes).index(sample.label) for sample in samples])
    return SliceSet(tuple(classes), inputs, labels, tuple(samples))


def read_8bit(path: Path) -> np.ndarray:
    """An 8-bit greyscale export, padded with black to a square.

    Padding (not stretching) keeps the anatomy's proportions for the few
    non-square exports; the node only ever sees square CT slices.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in EIGHT_BIT_MODES:
                raise DataError(
                    f"{path} is a {image.mode!r} image; expected an 8-bit greyscale export"
                )
            pixels = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DataError(f"cannot read image {path}: {error}") from error
    height, width = pixels.shape
    side = max(height, width)
    if height == width:
        return pixels
    square = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = pixels
    return square


def read_image_sample(sample: Sample, preprocessing: Preprocessing) -> torch.Tensor:
    """An 8-bit export enters the shared pipeline at the [0, 1] step."""
    unit = unit_from_8bit(read_8bit(Path(sample.source)))
    return torch.from_numpy(input_from_unit(unit, preprocessing))


def image_classes(root: Path) -> tuple[str, ...]:
    """Class names: the sub-folders of `root` (or of its split folders), sorted."""
    split_rows = _read_split_file(root) if (root / SPLIT_FILE).is_file() else None
    if split_rows is not None:
        return tuple(sorted({row["label"] for row in split_rows}))
    names = sorted(child.name for child in root.iterdir() if child.is_dir())
    if not names:
        raise DataError(f"{root} has no class sub-folders")
    return tuple(names)


def scan_image_folder(root: Path, classes: Sequence[str] | None = None) -> list[Sample]:
    """Samples of an image folder, with split and groups from `split.csv` when present."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    if (root / SPLIT_FILE).is_file():
        samples = _samples_from_split_file(root)
    else:
        samples = _samples_from_class_folders(root, classes)
    if not samples:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def _read_split_file(root: Path) -> list[dict[str, str]]:
    with (root / SPLIT_FILE).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise DataError(f"{root / SPLIT_FILE} needs the columns file,label[,group,split]")
    return rows


def _samples_from_split_file(root: Path) -> list[Sample]:
    samples = []
    for line, row in enumerate(_read_split_file(root), start=2):
        split = row.get("split") or None
        candidates = [root / row["label"] / row["file"], root / row["file"]]
        if split:
            candidates.insert(0, root / split / row["label"] / row["file"])
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            raise DataError(f"{root / SPLIT_FILE} line {line}: file {row['file']!r} not found")
        group = row.get("group") or f"file:{row['file']}"
        samples.append(Sample(str(path), row["label"], f"group:{group}", split))
    return samples


def _samples_from_class_folders(root: Path, classes: Sequence[str] | None) -> list[Sample]:
    folders = sorted(child for child in root.iterdir() if child.is_dir())
    if classes is not None:
        unknown = [folder.name for folder in folders if folder.name not in classes]
        if unknown:
            raise DataError(
                f"{root} has folder(s) for unknown class(es) {', '.join(unknown)}; "
                f"known classes are {', '.join(classes)}"
            )
    samples = []
    for folder in folders:
        files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {folder} holds no images")
        for path in files:
            # Byte-identical copies form one group, so they never straddle a split.
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            samples.append(Sample(str(path), folder.name, f"sha1:{digest}"))
    return samples
