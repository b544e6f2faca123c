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
from pathlib import Path
from typing import Any

from detr_deform.data.errors import DatasetError

REQUIRED_IMAGE_KEYS = ("id", "file_name")
REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


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
    for key in ("width", "height"):
        if key in entry and not (isinstance(entry[key], int) and entry[key] > 0):
            return Problem("error", "malformed_image", where, f"'{key}' must be a positive integer, got "
                           f"{entry[key]!r}", entry["id"])
    return None


def check_annotation(annotation: Any, image_sizes: dict[int, tuple[int, int] | None],
                     category_ids: set[int]) -> Problem | None:
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


def check_structure(content: dict, source: str) -> list[Problem]:
    """Image entries, duplicate ids, annotations and categories of a parsed
    instances JSON (``source`` names the file in messages)."""
    problems: list[Problem] = []
    categories = content.get("categories")
    if not isinstance(categories, list) or not categories:
        return [Problem("error", "malformed_json", source, "'categories' must be a non-empty list")]
    category_ids: set[int] = set()
    for category in categories:
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            problems.append(Problem("error", "malformed_category", source,
                                    f"category {category!r:.60} needs an integer 'id'"))
            continue
        if category["id"] in category_ids:
            problems.append(Problem("error", "duplicate_category", source,
                                    f"category id {category['id']} declared twice"))
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
        problem = check_annotation(annotation, image_sizes, category_ids)
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
