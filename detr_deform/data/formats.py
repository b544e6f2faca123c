"""The three dataset layouts read as they are — COCO (instances JSON), Pascal VOC
(XML per image) and YOLO (data.yaml + a .txt per image) — and how a folder's
layout is recognised. VOC and YOLO are converted in memory to the COCO instances
content, so the dataset, ``tools/check_dataset.py`` and the COCO metrics treat every
layout alike (docs/custom_datasets.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from detr_deform.data.errors import DatasetError
from detr_deform.data.schema import Problem
from detr_deform.data.voc import is_voc_folder, read_voc_split
from detr_deform.data.yolo import is_yolo_folder, read_yolo_split

DATA_FORMATS = ("coco", "voc", "yolo")
FORMAT_NAMES = {"coco": "COCO", "voc": "Pascal VOC", "yolo": "YOLO"}


@dataclass
class SplitData:
    """Where one split's images and annotations are. ``content`` is the converted COCO
    content (VOC, YOLO) or None (COCO: ``source`` is the instances JSON to read);
    ``problems`` are those met converting; ``source`` is the file that messages name."""
    format: str
    image_folder: Path
    source: Path
    content: dict | None = None
    problems: list[Problem] = field(default_factory=list)
    split: str | None = None

    def describe(self) -> str:
        """The source, with the split when the file holds several (YOLO's data.yaml)."""
        return f"{self.source} [{self.split}]" if self.format == "yolo" else str(self.source)


def coco_layout(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of ``split`` in the COCO layout under ``root``."""
    root = Path(root)
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


def detect_format(root: str | Path) -> str:
    """coco (an ``annotations/`` folder), voc (``Annotations/`` and ``JPEGImages/``) or
    yolo (a data.yaml, or ``root`` is one); a DatasetError when none or several fit."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"data folder not found: {root}", kind="missing_file")
    found = [name for name, fits in (("coco", root.is_dir() and (root / "annotations").is_dir()),
                                     ("voc", root.is_dir() and is_voc_folder(root)),
                                     ("yolo", is_yolo_folder(root))) if fits]
    if len(found) == 1:
        return found[0]
    if found:
        raise DatasetError(f"{root} looks like several dataset layouts ({', '.join(found)}); choose one with "
                           f"data.format= (check_dataset.py --format)", kind="dataset")
    years = sorted(p.name for p in root.glob("VOC20*") if p.is_dir()) if root.is_dir() else []
    hint = (f" It holds {years}: point at one year folder, e.g. {root / years[0]}" if years else
            " Expected a COCO root (annotations/ and <split>2017/), a Pascal VOC year folder (Annotations/, "
            "JPEGImages/, ImageSets/Main/) or a YOLO folder (data.yaml with images/ and labels/)")
    raise DatasetError(f"{root}: not a dataset folder of a known layout.{hint}", kind="dataset")


def open_split(root: str | Path, split: str, data_format: str = "auto",
               class_names: list[str] | None = None) -> SplitData:
    """One split of the dataset under ``root`` in ``data_format`` (auto: detected).
    ``class_names`` fixes the VOC class list (default: the sorted names of its XML files)."""
    root = Path(root)
    data_format = detect_format(root) if data_format == "auto" else data_format
    if data_format not in DATA_FORMATS:
        raise DatasetError(f"unknown dataset format {data_format!r}; one of {DATA_FORMATS} or auto")
    if class_names and data_format != "voc":
        raise DatasetError(f"a class list (data.class_names, --class-names) applies to Pascal VOC folders only; "
                           f"{root} is {FORMAT_NAMES[data_format]} data, which names its classes itself",
                           kind="dataset")
    if data_format == "coco":
        images, annotations = coco_layout(root, split)
        return SplitData("coco", images, annotations)
    if data_format == "voc":
        if not is_voc_folder(root):
            raise DatasetError(f"{root}: not a Pascal VOC year folder (needs Annotations/ and JPEGImages/)",
                               kind="missing_file")
        content, problems = read_voc_split(root, split, class_names)
        return SplitData("voc", root, root / "ImageSets" / "Main" / f"{split}.txt", content, problems, split)
    content, problems, folder, yaml_path = read_yolo_split(root, split)
    return SplitData("yolo", folder, yaml_path, content, problems, split)
