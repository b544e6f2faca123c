"""Checks of COCO-format detection data, shared by the dataset (at start-up and
per image) and ``tools/check_dataset.py`` (everything, with a report).

Errors make training fail or silently wrong (a malformed annotation, an
unreadable image, a size in the JSON that does not match the file); warnings
are handled by dropping something (a degenerate box) and are counted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

REQUIRED_IMAGE_KEYS = ("id", "file_name")
REQUIRED_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


class DatasetError(ValueError):
    """A dataset file or annotation is unusable; the message names it. ``kind``
    tags the problem (e.g. "missing_file", "unreadable_image", "size_mismatch")."""

    def __init__(self, message: str, kind: str = "dataset") -> None:
        super().__init__(message)
        self.kind = kind


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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB (grayscale, palette, CMYK, RGBA, 16-bit, float)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max(initial=0))
        # 8-bit values stored in a wide mode stay as they are; 10/12/16-bit data is scaled by its bit depth
        high = 255.0 if peak <= 255 else float(2 ** math.ceil(math.log2(peak + 1)) - 1)
        array = np.clip(array / high * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb_image(path: Path, expected_size: tuple[int, int] | None = None, where: str = "") -> Image.Image:
    """Decodes ``path`` fully as RGB. EXIF orientation is applied when that makes
    the image agree with ``expected_size`` (width, height from the JSON) — or
    when the JSON gives no size — and ignored when the JSON size matches the
    stored pixels (the annotations were then made on the unrotated image).
    Raises DatasetError naming the file for missing, unreadable, truncated or
    wrongly-sized images."""
    prefix = f"{where}: " if where else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                stored = image.size
                rotated = ImageOps.exif_transpose(image)
                if expected_size is None or rotated.size == tuple(expected_size):
                    result = rotated
                elif stored == tuple(expected_size):
                    result = image
                else:
                    raise DatasetError(
                        f"{prefix}{path}: the JSON says {expected_size[0]}x{expected_size[1]} (width x height) but "
                        f"the file is {stored[0]}x{stored[1]}; the boxes would land in the wrong place. Fix the "
                        f"'width'/'height' of this image in the JSON or replace the file", kind="size_mismatch")
                return _to_rgb(result)
    except DatasetError:
        raise
    except FileNotFoundError as error:
        raise DatasetError(f"{prefix}image file not found: {path}", kind="missing_file") from error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as error:
        raise DatasetError(f"{prefix}cannot read image {path}: {error} (corrupt or truncated file?)",
                           kind="unreadable_image") from error


@dataclass
class DatasetReport:
    """What ``check_dataset`` found in one split."""
    annotation_file: Path
    image_folder: Path
    num_images: int = 0
    num_annotations: int = 0
    annotations_per_category: dict[str, int] | None = None
    images_without_annotations: int = 0
    files_checked: bool = False
    problems: list[Problem] | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems or [] if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems or [] if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        """False when training on this data would fail or be silently wrong."""
        return not self.errors

    def format(self, max_listed: int = 10) -> str:
        lines = [f"{self.annotation_file} (images in {self.image_folder})",
                 f"  {self.num_images} images, {self.num_annotations} annotations, "
                 f"{self.images_without_annotations} images without annotations (kept, as negatives)"]
        if self.annotations_per_category:
            width = max(len(name) for name in self.annotations_per_category)
            lines.append("  annotations per category:")
            lines += [f"    {name:<{width}}  {count}" for name, count in self.annotations_per_category.items()]
        if not self.files_checked:
            lines.append("  image files not checked (--no-files)")
        for severity, found in (("errors", self.errors), ("warnings", self.warnings)):
            if not found:
                continue
            kinds: dict[str, list[Problem]] = {}
            for problem in found:
                kinds.setdefault(problem.kind, []).append(problem)
            lines.append(f"  {len(found)} {severity}:")
            for kind, items in kinds.items():
                lines.append(f"    {kind} ({len(items)}):")
                lines += [f"      {item}" for item in items[:max_listed]]
                if len(items) > max_listed:
                    lines.append(f"      ... {len(items) - max_listed} more")
        lines.append("  OK" if self.ok else "  NOT USABLE as is: training would fail or be silently wrong "
                     "(fix the errors, or train with data.on_bad_sample=skip to leave those images out)")
        return "\n".join(lines)


def _check_file(image_folder: Path, entry: dict) -> Problem | None:
    size = (entry["width"], entry["height"]) if "width" in entry and "height" in entry else None
    where = f"image {entry['id']} ({entry['file_name']})"
    try:
        load_rgb_image(image_folder / entry["file_name"], size)
    except DatasetError as error:
        message = str(error)
        return Problem("error", error.kind, where, message, entry["id"])
    return None


def check_dataset(image_folder: str | Path, annotation_file: str | Path, check_files: bool = True,
                  workers: int = 4, progress: bool = False) -> DatasetReport:
    """Checks a COCO-format split: the JSON (structure, ids, boxes, categories)
    and, with ``check_files``, every image file (exists, decodes completely,
    size equals the JSON's). Never raises for data problems: they are in the report."""
    report = DatasetReport(Path(annotation_file), Path(image_folder), problems=[])
    try:
        content = read_instances_json(annotation_file)
    except DatasetError as error:
        report.problems.append(Problem("error", error.kind, str(annotation_file), str(error)))
        return report
    report.problems.extend(check_structure(content, str(annotation_file)))
    images = [e for e in content["images"] if check_image_entry(e) is None]
    annotations = [a for a in content["annotations"] if isinstance(a, dict)]
    report.num_images, report.num_annotations = len(content["images"]), len(content["annotations"])
    names = {c["id"]: str(c.get("name", c["id"])) for c in content["categories"]
             if isinstance(c, dict) and isinstance(c.get("id"), int)}
    counts = {name: 0 for name in names.values()}
    for annotation in annotations:
        name = names.get(annotation.get("category_id"))
        if name is not None:
            counts[name] += 1
    report.annotations_per_category = counts
    annotated = {a.get("image_id") for a in annotations}
    report.images_without_annotations = sum(1 for e in images if e["id"] not in annotated)
    if check_files and not Path(image_folder).is_dir():
        report.problems.append(Problem("error", "missing_file", str(image_folder), "image folder not found"))
    elif check_files:
        from concurrent.futures import ThreadPoolExecutor

        report.files_checked = True
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(images), desc="reading images", unit="img")
        with ThreadPoolExecutor(max(1, workers)) as pool:  # decoding releases the GIL
            for problem in pool.map(lambda e: _check_file(Path(image_folder), e), images):
                if problem is not None:
                    report.problems.append(problem)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    return report
