"""COCO-format detection dataset (images folder + instances JSON)."""
from __future__ import annotations

import contextlib
import io
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from detr_deform.data.errors import DatasetError
from detr_deform.data.formats import SplitData
from detr_deform.data.images import load_rgb_image
from detr_deform.data.schema import (
    DEFAULT_MAX_CATEGORY_ID,
    Problem,
    check_structure,
    fill_coco_defaults,
    read_instances_json,
)

__all__ = ["CocoDetection", "collate_fn", "load_coco_json", "raise_worker_errors_cleanly", "skipped_in"]

BAD_SAMPLE_POLICIES = ("error", "skip")
_MAX_CONSECUTIVE_BAD = 50
# Problems that leave no sensible way to read the file, whatever on_bad_sample says.
_STRUCTURAL = {"malformed_json", "malformed_category", "duplicate_category", "duplicate_image_id", "no_images",
               "bad_category_id"}


def load_coco_json(annotation_file: str | Path, content: dict | None = None):
    """pycocotools COCO index, quiet."""
    coco = COCO()
    coco.dataset = content if content is not None else read_instances_json(annotation_file)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """Returns (image, target) with target = {boxes: tv_tensors.BoundingBoxes (XYXY,
    absolute), labels (int64), image_id, orig_size (h, w)} before transforms;
    the transforms produce a normalised image and normalised cxcywh boxes.

    Crowd annotations are dropped, boxes converted from xywh to xyxy, clamped to
    the image and degenerate ones removed (official ConvertCocoPolysToMask);
    degenerate boxes are counted in one warning at start-up. Images without
    annotations are kept (empty targets).

    ``on_bad_sample``: "error" fails on the first malformed annotation (at
    start-up) or unreadable image (when it is read) with the file and reason;
    "skip" leaves such images out, counts them in a warning and, for an image
    found unreadable when read, either serves the next good one instead
    (``replace_bad``, training: batches keep their size) or returns ``(None,
    target)`` (evaluation: the image is left out, not evaluated twice); both record
    ``target["skipped"] = [(image_id, reason), ...]``.

    Annotations without the optional COCO fields get their defaults, as
    pycocotools-based tools assume them: ``area`` = box width × height, ``iscrowd`` = 0.

    Random augmentations are seeded per sample from (``seed``, epoch set by
    ``set_epoch``, index), so a sample's augmentation does not depend on the
    worker that loads it or on the samples loaded before it (determinism and
    exact mid-epoch resume).

    Category ids must lie in 0..``max_category_id`` (the class head has max id + 1
    outputs) and image file names inside ``image_folder`` (no absolute paths, no ``..``).

    ``content``: the instances content already parsed or converted (Pascal VOC, YOLO;
    ``annotation_file`` then names its source in messages), with ``conversion_problems``
    the problems met converting it, treated like those of the JSON.
    """

    def __init__(self, image_folder: str | Path, annotation_file: str | Path,
                 transforms: Callable | None = None, on_bad_sample: str = "error", seed: int = 0,
                 replace_bad: bool = True, max_category_id: int = DEFAULT_MAX_CATEGORY_ID,
                 content: dict | None = None, conversion_problems: Sequence[Problem] = ()) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {on_bad_sample!r}")
        self.image_folder = Path(image_folder)
        if not self.image_folder.is_dir():
            raise DatasetError(f"image folder not found: {self.image_folder}")
        self.annotation_file = Path(annotation_file)
        self.on_bad_sample = on_bad_sample
        self.replace_bad = replace_bad
        self.seed = seed
        self.epoch = 0
        self.max_category_id = max_category_id
        content = read_instances_json(annotation_file) if content is None else content
        excluded = self._check(content, conversion_problems)
        fill_coco_defaults(content)
        self.coco = load_coco_json(annotation_file, content)
        self.ids = sorted(i for i in self.coco.imgs if i not in excluded)
        self.transforms = transforms
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in content["categories"]}
        self.data_format, self.source_label = "coco", str(self.annotation_file)

    @classmethod
    def from_split(cls, split: SplitData, transforms: Callable | None = None, **kwargs) -> CocoDetection:
        """The dataset of one split in any layout (see ``DataConfig.split_data``)."""
        dataset = cls(split.image_folder, split.source, transforms, content=split.content,
                      conversion_problems=split.problems, **kwargs)
        dataset.data_format, dataset.source_label = split.format, split.describe()
        return dataset

    def objects_per_image(self) -> list[int]:
        """How many (non-crowd) objects each image has, in ``ids`` order."""
        return [sum(1 for a in self.coco.imgToAnns.get(i, []) if not a.get("iscrowd", 0)) for i in self.ids]

    def _check(self, content: dict, conversion_problems: Sequence[Problem] = ()) -> set[int]:
        """Start-up checks of the content. In skip mode, drops bad annotations from
        ``content`` and returns the ids of the images they belong to (left out)."""
        problems = list(conversion_problems) + check_structure(content, str(self.annotation_file),
                                                               self.max_category_id)
        errors = [p for p in problems if p.severity == "error"]
        fatal = [p for p in errors if self.on_bad_sample == "error" or p.kind in _STRUCTURAL
                 or (p.image_id is None and p.annotation_index is None)]
        if fatal:
            shown = "; ".join(str(p) for p in fatal[:3])
            more = f" (+{len(fatal) - 3} more)" if len(fatal) > 3 else ""
            hint = ("" if self.on_bad_sample == "skip" or any(p.kind in _STRUCTURAL for p in fatal)
                    else " Or set data.on_bad_sample=skip to leave the images concerned out.")
            raise DatasetError(f"{self.annotation_file}: {len(fatal)} problem(s): {shown}{more}. Run "
                               f"tools/check_dataset.py for a full report.{hint}")
        bad_annotations = {p.annotation_index for p in errors if p.annotation_index is not None}
        if bad_annotations:
            content["annotations"] = [a for i, a in enumerate(content["annotations"]) if i not in bad_annotations]
        excluded = {p.image_id for p in errors if isinstance(p.image_id, int)}
        if errors:
            warnings.warn(f"{self.annotation_file}: data.on_bad_sample=skip: ignoring {len(bad_annotations)} "
                          f"malformed annotation(s) and leaving out the {len(excluded)} image(s) they belong to, "
                          f"e.g. {errors[0]}", stacklevel=3)
        dropped = [p for p in problems if p.kind == "degenerate_box"]
        if dropped:
            warnings.warn(f"{self.annotation_file}: {len(dropped)} degenerate box(es) will be dropped "
                          f"(non-positive width/height or outside the image), e.g. {dropped[0]}", stacklevel=3)
        return excluded

    @property
    def num_classes(self) -> int:
        """Official convention: max category id + 1 (91 for COCO)."""
        return max(self.category_names) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_image(self, image_id: int) -> Image.Image:
        info = self.coco.imgs[image_id]
        size = (info["width"], info["height"]) if "width" in info and "height" in info else None
        return load_rgb_image(self.image_folder / info["file_name"], size, where=f"image {image_id}")

    def _sample(self, index: int):
        image_id = self.ids[index]
        image = self.load_image(image_id)
        width, height = image.size
        annotations = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        labels = torch.as_tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": labels[keep],
            "image_id": torch.tensor(image_id),
            "orig_size": torch.tensor([height, width]),
        }
        if self.transforms is not None:
            sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
            python_state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed % 2**63)
                random.seed(sample_seed)
                try:
                    image, target = self.transforms(image, target)
                finally:
                    random.setstate(python_state)
        return image, target

    def __getitem__(self, index: int):
        if self.on_bad_sample == "error":
            return self._sample(index)
        if not self.replace_bad:
            try:
                return self._sample(index)
            except DatasetError as error:
                image_id = self.ids[index]
                return None, {"image_id": torch.tensor(image_id), "skipped": [(image_id, str(error))]}
        skipped: list[tuple[int, str]] = []
        for attempt in range(min(len(self.ids), _MAX_CONSECUTIVE_BAD)):
            position = (index + attempt) % len(self.ids)
            try:
                image, target = self._sample(position)
            except DatasetError as error:
                skipped.append((self.ids[position], str(error)))
                continue
            if skipped:
                target["skipped"] = skipped
            return image, target
        raise DatasetError(f"{len(skipped)} consecutive unreadable images from index {index} "
                           f"(data.on_bad_sample=skip), last: {skipped[-1][1]}")


def collate_fn(batch):
    """List of (image, target) -> (list of images, list of targets); the model pads."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def skipped_in(targets: list[dict]) -> list[tuple[int, str]]:
    """The (image_id, reason) records of images skipped to build this batch."""
    return [record for t in targets for record in t.get("skipped", ())]


def raise_worker_errors_cleanly(loader: Iterable) -> Iterator:
    """Iterates a DataLoader; a DatasetError raised in a worker process comes out
    as a DatasetError with the original one-line message instead of the
    worker's traceback text."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except DatasetError as error:
            text = str(error)
            marker = "DatasetError: "
            if "Original Traceback" in text and marker in text:
                text = text[text.rindex(marker) + len(marker):].strip()
                raise DatasetError(text) from None
            raise
        yield batch

