"""Pascal VOC folders read as they are: a year folder with ``Annotations/*.xml``,
``JPEGImages/`` and ``ImageSets/Main/<split>.txt``, converted in memory to the
COCO instances layout that the dataset, ``check_dataset`` and the COCO metrics read.

Conventions (those of the VOC devkit):

- ``<bndbox>`` corners are 1-based and inclusive pixel indices: an object that
  covers pixels 1..W has ``xmin=1, xmax=W``. The COCO box is
  ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` (0-based corner, width
  in pixels), the conversion Detectron2 and the devkit use.
- ``<difficult>1</difficult>`` objects become ``iscrowd=1`` annotations: they are left
  out of the training targets and a detection on one is neither a true nor a false
  positive in the evaluation (pycocotools' ignore regions; VOC ignores them too).
- Classes: ``class_names`` when given (objects of other classes are errors), else
  the sorted names found in every XML file of ``Annotations/`` (the same list for
  every split). Category ids are 1..N in that order, as COCO numbers categories.
- Image ids are 1..M in the order of the split's list; ``voc_id`` keeps the VOC id.
  An image is found by its id with any common extension (the XML's ``<filename>``
  first when it is in ``JPEGImages/``).
"""
from __future__ import annotations

import functools
import math
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from detr_deform.data.errors import DatasetError
from detr_deform.data.images import oriented_size
from detr_deform.data.schema import Problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_voc_folder(root: Path) -> bool:
    return (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir()


def split_list(root: Path, split: str) -> Path:
    """``ImageSets/Main/<split>.txt``; a DatasetError naming the sets that exist when it is missing."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if path.is_file():
        return path
    folder = path.parent
    stems = {p.stem for p in folder.glob("*.txt")} if folder.is_dir() else set()
    # <class>_<split>.txt are the devkit's per-class lists of a split, not splits
    present = sorted(s for s in stems if not ("_" in s and s.rsplit("_", 1)[1] in stems))
    found = f"; the split lists there: {present}" if present else f"; {folder} has no split lists"
    raise DatasetError(f"Pascal VOC folder {root}: split list not found: {path}{found}. Set data.train_split / "
                       f"data.val_split to one of them (e.g. data.train_split=trainval data.val_split=test for "
                       f"VOC2007; check_dataset.py --splits, eval.py --split)", kind="missing_file")


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot be read ({error})", kind="missing_file") from error
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DatasetError(f"{path}: the split list is empty: there is nothing to train or evaluate on",
                           kind="no_images")
    return ids


def _text(element: ElementTree.Element | None, tag: str) -> str | None:
    child = element.find(tag) if element is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _parse(xml_path: Path) -> ElementTree.Element:
    try:
        return ElementTree.parse(xml_path).getroot()
    except FileNotFoundError as error:
        raise DatasetError(f"annotation file not found: {xml_path}", kind="missing_file") from error
    except (ElementTree.ParseError, OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{xml_path}: not a readable VOC XML file ({error})", kind="malformed_annotation") from error


@functools.lru_cache(maxsize=8)
def _names_in_folder(annotations: str, modified: float) -> tuple[str, ...]:
    names: set[str] = set()
    for entry in os.scandir(annotations):
        if entry.name.endswith(".xml"):
            try:
                root = ElementTree.parse(entry.path).getroot()
            except (ElementTree.ParseError, OSError, UnicodeDecodeError):
                continue  # reported with the split that uses the file
            names.update(n for n in (_text(o, "name") for o in root.iter("object")) if n)
    return tuple(sorted(names))


def voc_class_names(root: Path) -> list[str]:
    """The sorted object names of every XML file in ``root/Annotations`` (the default class list)."""
    folder = root / "Annotations"
    names = list(_names_in_folder(str(folder), folder.stat().st_mtime))
    if not names:
        raise DatasetError(f"Pascal VOC folder {root}: no <object><name> in any file of {folder}; there are no "
                           f"classes to train on", kind="malformed_json")
    return names


def _image_files(folder: Path) -> dict[str, str]:
    """Image stem -> file name in ``folder`` (by extension priority when a stem has several)."""
    found: dict[str, str] = {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for entry in os.scandir(folder):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in rank and (stem not in found or
                                    rank[ext.lower()] < rank[os.path.splitext(found[stem])[1].lower()]):
            found[stem] = entry.name
    return found


def _box(obj: ElementTree.Element) -> list[float] | None:
    box = obj.find("bndbox")
    values = [_text(box, tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
    try:
        xmin, ymin, xmax, ymax = (float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (xmin, ymin, xmax, ymax)):
        return None
    # 1-based inclusive corners -> 0-based corner and a size in pixels
    return [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]


def read_voc_split(root: str | Path, split: str, class_names: list[str] | None = None
                   ) -> tuple[dict, list[Problem]]:
    """The COCO instances content of one split, and the problems met reading it (an
    unreadable XML file or a missing image is an error of that image; an object of an
    undeclared class, or without a box, is an error of that image too)."""
    root = Path(root)
    ids = _read_ids(split_list(root, split))
    names = list(class_names) if class_names else voc_class_names(root)
    category_of = {name: i + 1 for i, name in enumerate(names)}
    files = _image_files(root / "JPEGImages")
    content: dict = {"images": [], "annotations": [],
                     "categories": [{"id": i + 1, "name": name} for i, name in enumerate(names)]}
    problems: list[Problem] = []
    for image_id, voc_id in enumerate(ids, start=1):
        xml_path = root / "Annotations" / f"{voc_id}.xml"
        where = f"image {image_id} ({voc_id})"
        try:
            annotation = _parse(xml_path)
        except DatasetError as error:
            problems.append(Problem("error", error.kind, where, str(error), image_id))
            continue
        declared = _text(annotation, "filename")
        file_name = declared if declared and (root / "JPEGImages" / declared).is_file() else files.get(voc_id)
        if file_name is None:
            problems.append(Problem("error", "missing_file", where, f"no image for id {voc_id!r} in "
                                    f"{root / 'JPEGImages'} (looked for {voc_id}.jpg/.png/...)", image_id))
            continue
        entry = {"id": image_id, "file_name": f"JPEGImages/{file_name}", "voc_id": voc_id}
        size = annotation.find("size")
        width, height = _text(size, "width"), _text(size, "height")
        if width and height and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0:
            entry["width"], entry["height"] = int(width), int(height)
        else:  # no <size>: the file's, after its EXIF orientation (as the loader shows it)
            try:
                entry["width"], entry["height"] = oriented_size(root / "JPEGImages" / file_name)
            except DatasetError as error:
                problems.append(Problem("error", error.kind, where, str(error), image_id))
                continue
        content["images"].append(entry)
        for index, obj in enumerate(annotation.iter("object")):
            name = _text(obj, "name")
            bbox = _box(obj)
            if name not in category_of:
                problems.append(Problem("error", "unknown_category", f"{xml_path.name} object {index}",
                                        f"class {name!r} is not in the class list {names[:20]} (data.class_names)",
                                        image_id))
                continue
            if bbox is None:
                problems.append(Problem("error", "malformed_annotation", f"{xml_path.name} object {index}",
                                        "<bndbox> needs numeric xmin, ymin, xmax, ymax", image_id))
                continue
            difficult = _text(obj, "difficult") == "1"
            content["annotations"].append({"id": len(content["annotations"]) + 1, "image_id": image_id,
                                           "category_id": category_of[name], "bbox": bbox,
                                           "area": bbox[2] * bbox[3], "iscrowd": int(difficult)})
    return content, problems
