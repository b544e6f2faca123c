"""The dataset report of ``tools/check_dataset.py``: every problem of a split
(COCO, or Pascal VOC / YOLO converted to COCO content), its annotations and
(optionally) every image file, read by a thread pool."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from detr_deform.data.errors import DatasetError
from detr_deform.data.formats import SplitData
from detr_deform.data.images import load_rgb_image
from detr_deform.data.schema import (
    DEFAULT_MAX_CATEGORY_ID,
    Problem,
    check_image_entry,
    check_structure,
    read_instances_json,
)


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
    files_not_checked_because: str = "--no-files"
    problems: list[Problem] | None = None
    label: str = ""  # names the split when the annotation file holds several (YOLO's data.yaml)

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
        lines = [f"{self.label or self.annotation_file} (images in {self.image_folder})",
                 f"  {self.num_images} images, {self.num_annotations} annotations, "
                 f"{self.images_without_annotations} images without annotations (kept, as negatives)"]
        if self.annotations_per_category:
            width = max(len(name) for name in self.annotations_per_category)
            lines.append("  annotations per category:")
            lines += [f"    {name:<{width}}  {count}" for name, count in self.annotations_per_category.items()]
        if not self.files_checked:
            lines.append(f"  image files not checked ({self.files_not_checked_because})")
        for severity, found in (("error", self.errors), ("warning", self.warnings)):
            if not found:
                continue
            kinds: dict[str, list[Problem]] = {}
            for problem in found:
                kinds.setdefault(problem.kind, []).append(problem)
            lines.append(f"  {len(found)} {severity}{'s' if len(found) != 1 else ''}:")
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


def _crowded_images(images: list[dict], annotations: list[dict], num_queries: int) -> list[Problem]:
    """Images with more objects than the model has queries: trained on (the surplus objects stay
    unmatched), but the model cannot find them all."""
    counts: dict = {}
    for annotation in annotations:
        if not annotation.get("iscrowd", 0):
            counts[annotation.get("image_id")] = counts.get(annotation.get("image_id"), 0) + 1
    return [Problem("warning", "more_objects_than_queries", f"image {e['id']} ({e['file_name']})",
                    f"{counts[e['id']]} objects, more than num_queries={num_queries}: the model finds at most "
                    f"num_queries per image (raise model.num_queries for such data)", e["id"])
            for e in images if counts.get(e["id"], 0) > num_queries]


def check_dataset(image_folder: str | Path, annotation_file: str | Path, check_files: bool = True,
                  workers: int = 4, progress: bool = False,
                  max_category_id: int = DEFAULT_MAX_CATEGORY_ID, num_queries: int = 300,
                  split: SplitData | None = None) -> DatasetReport:
    """Checks a split: the annotations (structure, ids, boxes, categories in
    0..``max_category_id``, images with more objects than ``num_queries``) and, with
    ``check_files``, every image file (exists, decodes completely, size equals the
    annotations'). ``split``: a Pascal VOC or YOLO split converted to COCO content (its
    conversion problems are reported too); else ``annotation_file`` is a COCO JSON.
    Never raises for data problems: they are in the report."""
    report = DatasetReport(Path(annotation_file), Path(image_folder), problems=[],
                           label=split.describe() if split is not None else "")
    if split is not None and split.content is not None:
        content = split.content
        report.problems.extend(split.problems)
    else:
        try:
            content = read_instances_json(annotation_file)
        except DatasetError as error:
            # The message names the file already (and the report's first line does too).
            report.problems.append(Problem("error", error.kind, "annotations JSON", str(error)))
            report.files_not_checked_because = "the annotation file could not be read"
            return report
    report.problems.extend(check_structure(content, str(annotation_file), max_category_id))
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
    report.problems.extend(_crowded_images(images, annotations, num_queries))
    annotated = {a.get("image_id") for a in annotations}
    report.images_without_annotations = sum(1 for e in images if e["id"] not in annotated)
    if check_files and not Path(image_folder).is_dir():
        report.problems.append(Problem("error", "missing_file", str(image_folder), "image folder not found"))
        report.files_not_checked_because = "the image folder was not found"
    elif check_files:
        report.files_checked = True
        bar = None
        if progress:
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
