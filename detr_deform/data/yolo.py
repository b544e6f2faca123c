"""YOLO (Ultralytics) folders read as they are: a ``data.yaml`` naming the image
folders of each split and the class names, and one ``.txt`` label file per image,
converted in memory to the COCO instances layout.

Conventions (Ultralytics'):

- ``data.yaml``: ``path`` (the dataset folder; relative to the YAML's folder, default
  that folder), ``train`` / ``val`` (a folder of images, a ``.txt`` list of image
  paths, or a list of either; relative to ``path``), ``names`` (a list, or a mapping
  ``index: name``; ``nc`` is checked against it when present).
- The label file of ``.../images/.../a.jpg`` is ``.../labels/.../a.txt`` (the last
  ``images`` folder of the path replaced by ``labels``). An image without one has no
  objects (a negative).
- A line is ``class cx cy w h``: the box centre and size normalised by the image's
  width and height (0..1), after its EXIF orientation. A polygon line (``class x1 y1 x2
  y2 ...``, segmentation labels) becomes the box around its points. The COCO box is
  ``[(cx - w/2)·W, (cy - h/2)·H, w·W, h·H]``.
- Category id k is class index k of the files (0..nc-1), so predictions keep the
  indices the user knows.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from detr_deform.data.errors import DatasetError
from detr_deform.data.images import oriented_size
from detr_deform.data.schema import Problem
from detr_deform.data.voc import IMAGE_EXTENSIONS

# Coordinates this far outside 0..1 are pixel coordinates, not normalised ones (smaller excesses are clamped).
_NORMALISED_TOLERANCE = 0.01


def yaml_file(root: Path) -> Path | None:
    """The dataset YAML: ``root`` itself when it is one, else ``root/data.yaml``, else
    the only ``*.yaml`` in ``root``."""
    if root.is_file() and root.suffix in (".yaml", ".yml"):
        return root
    if not root.is_dir():
        return None
    if (root / "data.yaml").is_file():
        return root / "data.yaml"
    found = sorted(root.glob("*.yaml")) + sorted(root.glob("*.yml"))
    return found[0] if len(found) == 1 else None


def _is_dataset_yaml(path: Path) -> bool:
    """A YAML that names classes and at least one split (not any YAML that happens to be there)."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and "names" in content and any(k in content for k in ("train", "val"))


def read_data_yaml(path: Path) -> dict:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise DatasetError(f"{path}: not a readable YAML file ({error})", kind="malformed_json") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected a mapping with 'train', 'val' and 'names'", kind="malformed_json")
    return content


def class_names(content: dict, path: Path) -> list[str]:
    """``names`` as a list indexed by class (a mapping must number the classes 0..N-1)."""
    names = content.get("names")
    if isinstance(names, dict):
        if not all(isinstance(k, int) for k in names) or sorted(names) != list(range(len(names))):
            raise DatasetError(f"{path}: 'names' must number the classes 0..{len(names) - 1}, got keys "
                               f"{sorted(names, key=str)[:10]}", kind="malformed_category")
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: 'names' (the class names, a list or a mapping index: name) is missing or empty",
                           kind="malformed_json")
    if "nc" in content and content["nc"] != len(names):
        raise DatasetError(f"{path}: nc={content['nc']} but 'names' has {len(names)} entries", kind="malformed_json")
    return [str(n) for n in names]


def dataset_folder(content: dict, path: Path) -> Path:
    base = content.get("path")
    if base is None:
        return path.parent
    base = Path(str(base)).expanduser()
    return base if base.is_absolute() else path.parent / base


def _split_images(content: dict, path: Path, folder: Path, split: str) -> list[Path]:
    entries = content.get(split)
    if entries is None:
        present = [k for k in ("train", "val", "test") if content.get(k)]
        raise DatasetError(f"{path}: no '{split}' entry (it has {present}); set data.train_split / data.val_split "
                           f"to one of them (check_dataset.py --splits, eval.py --split)", kind="malformed_json")
    images: list[Path] = []
    for entry in entries if isinstance(entries, list) else [entries]:
        location = Path(str(entry)).expanduser()
        location = location if location.is_absolute() else folder / location
        if not location.exists() and str(entry).startswith("../"):
            location = folder / str(entry)[3:]  # Ultralytics' fallback (Roboflow exports: train: ../train/images)
        if location.is_dir():
            images += sorted(p for p in location.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif location.is_file() and location.suffix == ".txt":
            for line in location.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    item = Path(line.strip())
                    images.append(item if item.is_absolute() else location.parent / item)
        else:
            raise DatasetError(f"{path}: {split} entry {entry!r}: {location} is neither a folder of images nor a .txt "
                               f"list of image paths", kind="missing_file")
    if not images:
        raise DatasetError(f"{path}: the {split} split has no images ({entries!r})", kind="no_images")
    return images


def label_file(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``."""
    text = os.path.abspath(image)  # a relative path has no leading separator before "images"
    marker, replacement = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if marker in text:
        head, tail = text.rsplit(marker, 1)
        text = head + replacement + tail
    return Path(text).with_suffix(".txt")


def _parse_line(line: str, num_classes: int) -> tuple[int, list[float]] | str:
    """(class, [cx, cy, w, h]) of a label line, or why it is refused."""
    parts = line.split()
    try:
        values = [float(v) for v in parts]
    except ValueError:
        return f"not numbers: {line.strip()!r:.80}"
    if len(values) < 5 or (len(values) > 5 and len(values) % 2 == 0):
        return f"expected 'class cx cy w h' (or 'class x1 y1 x2 y2 ...'), got {len(values)} values"
    if not all(math.isfinite(v) for v in values) or values[0] != int(values[0]):
        return f"class must be an integer and coordinates finite: {line.strip()!r:.80}"
    cls = int(values[0])
    if not 0 <= cls < num_classes:
        return f"class {cls} is not in 0..{num_classes - 1} ('names' of the YAML)"
    coords = values[1:]
    if any(v < -_NORMALISED_TOLERANCE or v > 1 + _NORMALISED_TOLERANCE for v in coords):
        return (f"coordinates {coords[:4]} are not normalised to 0..1 (YOLO labels are fractions of the image "
                f"width and height; pixel coordinates?)")
    if len(coords) > 4:  # polygon: the box around its points
        xs, ys = coords[0::2], coords[1::2]
        return cls, [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
    return cls, coords


def _to_coco_box(box: list[float], width: int, height: int) -> list[float]:
    cx, cy, w, h = box
    return [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]


def read_yolo_split(root: str | Path, split: str) -> tuple[dict, list[Problem], Path, Path]:
    """The COCO instances content of one split, the problems met reading it, the
    dataset folder (file names are relative to it) and the YAML file."""
    path = yaml_file(Path(root))
    if path is None:
        raise DatasetError(f"{root}: no data.yaml (a YOLO dataset folder needs one naming train/val and the "
                           f"class names)", kind="missing_file")
    content = read_data_yaml(path)
    names = class_names(content, path)
    folder = dataset_folder(content, path)
    images = _split_images(content, path, folder, split)
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in enumerate(names)]}
    problems: list[Problem] = []
    labelled = sum(1 for image in images if label_file(image).is_file())
    base = os.path.abspath(folder)
    for image_id, image in enumerate(images, start=1):
        # inside the dataset folder by name (symlinked images/ to shared storage are inside too)
        relative = os.path.relpath(os.path.abspath(image), base)
        file_name = Path(relative).as_posix()
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            problems.append(Problem("error", "unsafe_file_name", f"image {image_id}", f"{image} is outside the dataset "
                                    f"folder {folder} ('path' of {path.name}); move it inside", image_id))
            continue
        where = f"image {image_id} ({file_name})"
        try:
            width, height = oriented_size(image)
        except DatasetError as error:
            problems.append(Problem("error", error.kind, where, str(error), image_id))
            continue
        coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        labels = label_file(image)
        if not labels.is_file():
            continue
        try:
            lines = labels.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            problems.append(Problem("error", "malformed_annotation", where, f"{labels}: cannot be read ({error})",
                                    image_id))
            continue
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            parsed = _parse_line(line, len(names))
            if isinstance(parsed, str):
                problems.append(Problem("error", "malformed_annotation", f"{labels.name} line {number}", parsed,
                                        image_id))
                continue
            cls, box = parsed
            bbox = _to_coco_box(box, width, height)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": cls,
                                        "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    if images and labelled == 0:
        problems.append(Problem("error", "missing_file", str(path), f"none of the {len(images)} {split} images has a "
                                f"label file (expected e.g. {label_file(images[0])}: labels/ beside images/)"))
    return coco, problems, folder, path


def is_yolo_folder(root: Path) -> bool:
    path = yaml_file(root)
    return path is not None and _is_dataset_yaml(path)

