"""Checks of a COCO-format instances JSON (structure, ids, boxes, categories),
shared by the dataset (at start-up) and ``tools/check_dataset.py``.

Errors make training fail or silently wrong (a malformed annotation, an unknown
image or category); warnings are handled by dropping or clamping something (a
degenerate box) and are counted.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from detr_deform.data.errors import DatasetError

REQUIRED_IMAGE_KEYS = ("id", "file_name")
REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
# The class head has max category id + 1 outputs (official convention): an id of 1e9 would
# allocate gigabytes. Above this ceiling (data.max_category_id) ids must be remapped.
DEFAULT_MAX_CATEGORY_ID = 10_000


@dataclass(frozen=True)
class Problem:
    severity: str          # "error" | "warning"
    kind: str              # short machine-readable tag, e.g. "missing_file"
    where: str             # "image 12 (a.jpg)", "annotation 7", "annotations JSON"
    message: str
    image_id: int | None = None
    annotation_index: int | None = None   # position in 'annotations' for annotation problems

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_image_entry(entry: Any) -> Problem | None:
    """The 'images' entry itself (keys and types), not the file."""
    if not isinstance(entry, dict):
        return Problem("error", "malformed_image", "images entry", f"expected an object, got {entry!r:.60}")
    where = f"image {entry.get('id', '?')}"
    missing = [k for k in REQUIRED_IMAGE_KEYS if k not in entry]
    if missing:
        return Problem("error", "malformed_image", where, f"missing required key(s) {missing}")
    if not isinstance(entry["id"], int) or isinstance(entry["id"], bool):
        return Problem("error", "malformed_image", where, f"'id' must be an integer, got {entry['id']!r}")
    unsafe = unsafe_file_name(entry["file_name"])
    if unsafe is not None:
        return Problem("error", "unsafe_file_name", where, unsafe, entry["id"])
    for key in ("width", "height"):
        if key in entry and not (isinstance(entry[key], int) and entry[key] > 0):
            return Problem("error", "malformed_image", where, f"'{key}' must be a positive integer, got "
                           f"{entry[key]!r}", entry["id"])
    return None


def unsafe_file_name(name: Any) -> str | None:
    """Why an image's ``file_name`` is refused (not a relative path inside the image
    folder: absolute, a drive, or a ``..`` component — a path-traversal guard), or None."""
    if not isinstance(name, str) or not name.strip():
        return f"'file_name' must be a non-empty string, got {name!r:.60}"
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        return (f"'file_name' {name!r:.80} is an absolute path; file names are read relative to the image folder "
                f"(give the path inside it)")
    if ".." in windows.parts:  # PureWindowsPath splits on both / and \
        return (f"'file_name' {name!r:.80} goes up with '..', outside the image folder (refused); give the path "
                f"inside the image folder")
    return None


def category_id_problem(category_id: Any, max_category_id: int) -> str | None:
    """Why a category id cannot be a class index (negative, or above the ceiling), or None."""
    if not isinstance(category_id, int) or isinstance(category_id, bool):
        return None  # not an id at all: reported where it is declared or used
    if category_id < 0:
        return f"category id {category_id} is negative; category ids must be >= 0 (they index the class head)"
    if category_id > max_category_id:
        return (f"category id {category_id} is above the limit data.max_category_id={max_category_id} (the class "
                f"head would get {category_id + 1} outputs); remap the category ids to 1..N, or raise "
                f"data.max_category_id (check_dataset.py --max-category-id)")
    return None


def check_annotation(annotation: Any, image_sizes: dict[int, tuple[int, int] | None],
                     category_ids: set[int], max_category_id: int = DEFAULT_MAX_CATEGORY_ID) -> Problem | None:
    """One 'annotations' entry against the images (id -> (width, height) or None) and
    categories. Malformed entries are errors; degenerate boxes are warnings."""
    if not isinstance(annotation, dict):
        return Problem("error", "malformed_annotation", "annotations entry",
                       f"expected an object, got {annotation!r:.60}")
    where = f"annotation {annotation.get('id', '?')}"
    image_id = annotation.get("image_id")
    missing = [k for k in REQUIRED_ANNOTATION_KEYS if k not in annotation]
    if missing:
        return Problem("error", "malformed_annotation", where, f"missing required key(s) {missing}",
                       image_id if isinstance(image_id, int) else None)
    bbox = annotation["bbox"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return Problem("error", "malformed_annotation", where,
                       f"'bbox' must be [x, y, width, height] of finite numbers, got {bbox!r:.80}", image_id)
    if image_id not in image_sizes:
        return Problem("error", "unknown_image", where, f"image_id {image_id!r} is not in 'images'")
    if annotation["category_id"] not in category_ids:
        return Problem("error", "unknown_category", where,
                       f"category_id {annotation['category_id']!r} is not declared in 'categories' "
                       f"(declared: {sorted(category_ids)[:20]})", image_id)
    bad_id = category_id_problem(annotation["category_id"], max_category_id)
    if bad_id is not None:
        return Problem("error", "bad_category_id", where, f"(image {image_id}): {bad_id}", image_id)
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return Problem("warning", "degenerate_box", where,
                       f"box {list(bbox)} has non-positive width/height (dropped)", image_id)
    size = image_sizes[image_id]
    if size is not None:
        width, height = size
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            return Problem("warning", "degenerate_box", where,
                           f"box {list(bbox)} lies outside the {width}x{height} image (dropped)", image_id)
        if x < 0 or y < 0 or x + w > width or y + h > height:
            return Problem("warning", "box_clamped", where,
                           f"box {list(bbox)} extends past the {width}x{height} image (clamped)", image_id)
    return None


def check_structure(content: dict, source: str, max_category_id: int = DEFAULT_MAX_CATEGORY_ID) -> list[Problem]:
    """Image entries, duplicate ids, annotations and categories of a parsed
    instances JSON (``source`` names the file in messages); category ids must lie
    in 0..``max_category_id``."""
    problems: list[Problem] = []
    categories = content.get("categories")
    if not isinstance(categories, list) or not categories:
        return [Problem("error", "malformed_json", source, "'categories' must be a non-empty list")]
    if not content["images"]:
        problems.append(Problem("error", "no_images", source, "'images' is an empty list: there is nothing to "
                                "train or evaluate on (is this the right annotation file?)"))
    category_ids: set[int] = set()
    for category in categories:
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            problems.append(Problem("error", "malformed_category", source,
                                    f"category {category!r:.60} needs an integer 'id'"))
            continue
        if category["id"] in category_ids:
            problems.append(Problem("error", "duplicate_category", source,
                                    f"category id {category['id']} declared twice"))
        bad_id = category_id_problem(category["id"], max_category_id)
        if bad_id is not None:
            problems.append(Problem("error", "bad_category_id", source,
                                    f"category {category.get('name', '?')!r:.40}: {bad_id}"))
        category_ids.add(category["id"])
    image_sizes: dict[int, tuple[int, int] | None] = {}
    for entry in content["images"]:
        problem = check_image_entry(entry)
        if problem is not None:
            problems.append(problem)
            if isinstance(entry, dict) and isinstance(entry.get("id"), int):
                image_sizes.setdefault(entry["id"], None)
            continue
        if entry["id"] in image_sizes:
            problems.append(Problem("error", "duplicate_image_id", f"image {entry['id']}",
                                    f"image id {entry['id']} appears more than once in 'images'", entry["id"]))
            continue
        size = (entry["width"], entry["height"]) if "width" in entry and "height" in entry else None
        image_sizes[entry["id"]] = size
    seen_annotations: set = set()
    for index, annotation in enumerate(content["annotations"]):
        problem = check_annotation(annotation, image_sizes, category_ids, max_category_id)
        if problem is not None:
            problems.append(dataclasses.replace(problem, annotation_index=index))
        elif isinstance(annotation, dict) and ("area" not in annotation or "iscrowd" not in annotation):
            absent = [key for key in ("area", "iscrowd") if key not in annotation]
            problems.append(Problem("warning", "coco_default_filled", f"annotation {annotation.get('id', '?')}",
                                    f"no {' / '.join(absent)} (filled: area = box w x h, iscrowd = 0)",
                                    annotation.get("image_id"), index))
        if isinstance(annotation, dict) and isinstance(annotation.get("id"), (int, str)):
            if annotation["id"] in seen_annotations:
                problems.append(Problem("error", "duplicate_annotation_id", f"annotation {annotation['id']}",
                                        f"annotation id {annotation['id']!r} appears more than once",
                                        annotation.get("image_id"), index))
            seen_annotations.add(annotation["id"])
    return problems


def read_instances_json(annotation_file: str | Path) -> dict:
    """The parsed JSON, with clear errors for a missing file, invalid JSON or
    missing top-level keys."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}", kind="missing_file")
    try:
        if path.stat().st_size == 0:
            raise DatasetError(f"{path}: the file is empty (0 bytes); an interrupted copy or download? Write the "
                               f"COCO instances JSON again", kind="malformed_json")
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})", kind="malformed_json") from error
    except OSError as error:  # no read permission, a network mount that went away, ...
        raise DatasetError(f"{path}: cannot be read ({error.strerror or error}); check the file's permissions",
                           kind="missing_file") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'",
                           kind="malformed_json")
    for key in ("images", "annotations", "categories"):
        if key not in content:
            raise DatasetError(f"{path}: missing required top-level key '{key}' (COCO instances format)",
                               kind="malformed_json")
        if not isinstance(content[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list, got {type(content[key]).__name__}",
                               kind="malformed_json")
    return content


def fill_coco_defaults(content: dict) -> int:
    """Sets the optional COCO fields that evaluation reads, where an annotation
    lacks them: ``area`` = box width × height, ``iscrowd`` = 0. Returns how many
    annotations were completed."""
    filled = 0
    for annotation in content["annotations"]:
        if not isinstance(annotation, dict):
            continue
        missing = "area" not in annotation or "iscrowd" not in annotation
        if "area" not in annotation and _is_box(annotation.get("bbox")):
            annotation["area"] = float(annotation["bbox"][2]) * float(annotation["bbox"][3])
        annotation.setdefault("iscrowd", 0)
        filled += missing
    return filled


def _is_box(bbox: Any) -> bool:
    return isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
