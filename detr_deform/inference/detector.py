"""The high-level Detector: a checkpoint ready to run on images of any kind.

    detector = detr_deform.Detector.from_pretrained("checkpoint.pth")
    for found in detector(["photo.jpg", "folder/", pil_image, array, tensor]):   # the calibrated threshold
        print(found.source, found.names, found.boxes)        # boxes xyxy in the input's pixels
    detector.draw("photo.jpg", detector("photo.jpg")[0]).save("drawn.png")
"""
from __future__ import annotations

import numbers
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as F

from detr_deform.config import ConfigError, DataConfig
from detr_deform.data.coco_names import COCO_CATEGORY_NAMES
from detr_deform.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OFFICIAL_MAX_SIZE,
    OFFICIAL_VAL_SIZE,
    official_resize_size,
)
from detr_deform.data.visualization import MIN_SIDE, draw_detections
from detr_deform.evaluation.score_threshold import DEFAULT_SCORE_THRESHOLD, stored_score_threshold
from detr_deform.inference.defaults import DEFAULT_BATCH_SIZE
from detr_deform.inference.inputs import ImageLike, InputError, Inputs, image_inputs, tensor_to_pil
from detr_deform.io.checkpoint import CheckpointError
from detr_deform.loading.model import model_from_content, read_content
from detr_deform.models.build import build_postprocessor
from detr_deform.models.config import ModelConfig
from detr_deform.models.postprocess import PostProcess
from detr_deform.utils.device import resolve_device

GROUP_WINDOW = 4        # batches of images loaded at a time, among which same-size images are batched together


@dataclass
class Detections:
    """The detections of one image, by decreasing score.

    ``boxes`` are (x0, y0, x1, y1) in the pixels of the image as given (after EXIF
    orientation for files and PIL images); like the official model they are not
    clipped to the image."""
    boxes: torch.Tensor                 # (K, 4) float32, xyxy pixels
    scores: torch.Tensor                # (K,) float32 in [0, 1]
    labels: torch.Tensor                # (K,) int64 category ids
    names: list[str]                    # (K,) category names
    queries: torch.Tensor               # (K,) int64 decoder query of each detection (one query may give several)
    width: int                          # of the input image
    height: int
    source: str = ""                    # file path, or "inputs[i]" for in-memory images

    def __len__(self) -> int:
        return len(self.scores)

    def records(self) -> list[dict[str, Any]]:
        """One COCO-results-style dict per detection: {"category_id", "category_name",
        "bbox": [x, y, width, height], "score"}."""
        return [{"category_id": label, "category_name": name, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
                for (x0, y0, x1, y1), score, label, name in zip(self.boxes.tolist(), self.scores.tolist(),
                                                               self.labels.tolist(), self.names)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: {"source", "width", "height", "detections": :meth:`records`}."""
        return {"source": self.source, "width": self.width, "height": self.height, "detections": self.records()}


class Detector:
    """A Deformable DETR model with its preprocessing and category names.

    Images are resized like validation — shorter side ``val_size``, longer side at
    most ``max_size`` (the checkpoint's training settings, else the official
    800/1333) — and normalised with the ImageNet mean and std; boxes come back in
    the input's pixels.

    ``score_threshold`` is the default minimum score of a detection: the one that
    maximised F1 on the validation set of the run (stored in our checkpoints at
    each evaluation, see :mod:`detr_deform.evaluation.score_threshold`), else
    ``DEFAULT_SCORE_THRESHOLD`` (0.3; official and Hugging Face files). The source
    is in ``score_threshold_source``.
    """

    def __init__(self, model: nn.Module, cfg: ModelConfig, category_names: dict[int, str] | None = None,
                 val_size: int = OFFICIAL_VAL_SIZE, max_size: int = OFFICIAL_MAX_SIZE,
                 score_threshold: float | None = None) -> None:
        if val_size < 1 or max_size < 1:
            raise InputError(f"val_size and max_size must be >= 1, got {val_size} and {max_size}")
        self.model = model.eval()
        self.cfg = cfg
        self.category_names = category_names if category_names is not None else category_names_of({}, cfg.num_classes)
        self.val_size = val_size
        self.max_size = max_size
        self.postprocessor: PostProcess = build_postprocessor(cfg)
        self.score_threshold = DEFAULT_SCORE_THRESHOLD if score_threshold is None else float(score_threshold)
        self.score_threshold_source = ("default" if score_threshold is None else
                                       "calibrated: maximum F1 on the validation set")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        val_size: int | None = None, max_size: int | None = None,
                        revision: str | None = None) -> Detector:
        """Loads a checkpoint (ours, an official model-zoo file, or a Hugging Face
        DeformableDetr directory / model.safetensors / pytorch_model.bin), or a Hugging Face
        hub id of such a folder (``"SenseTime/deformable-detr"``, at ``revision``; the hub
        cache first, offline with ``HF_HUB_OFFLINE=1``) on ``device`` (auto: a GPU when one
        is visible). ``val_size``/``max_size`` override the checkpoint's validation sizes.
        Raises CheckpointError (unusable file, not in the cache offline) or DeviceError (no
        such device) with a one-line message."""
        device = resolve_device(str(device), option="device")  # before reading a large file
        path = Path(path).expanduser()
        content = read_content(path, revision)  # the one place the file is read (ours, official or Hugging Face)
        model, cfg = model_from_content(content, path, device)
        saved = content.get("config", {}) if isinstance(content, dict) else {}
        try:
            data = DataConfig.from_saved(saved.get("data") if isinstance(saved, dict) else None, source=str(path))
        except ConfigError as error:
            raise CheckpointError(str(error)) from error
        return cls(model, cfg, category_names_of(content, cfg.num_classes, path), val_size or data.val_size,
                   max_size or data.max_size, score_threshold=stored_score_threshold(content, path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def category_name(self, label: int) -> str:
        return self.category_names.get(int(label), str(int(label)))

    @torch.no_grad()  # not inference_mode: its tensors would refuse in-place edits by the caller
    def __call__(self, inputs: Inputs, threshold: float | None = None, topk: int = 100,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> list[Detections]:
        """Detections for each image of ``inputs`` (a path, a folder, a PIL image, a
        numpy array, a tensor or a list of these; see :mod:`detr_deform.inference.inputs`), in
        order: at most ``topk`` (query, class) pairs by score, those with a score of at
        least ``threshold`` (default: ``self.score_threshold``, the checkpoint's
        calibrated threshold).

        Up to ``batch_size`` images of the same network input size run together:
        images are loaded ``GROUP_WINDOW`` batches at a time and grouped by size, so
        that no image is padded (padding to the largest image of a batch moves the
        scores of this model, as of the official one). Every image gets its own
        result whatever the batch size, up to float rounding.
        """
        threshold = self.score_threshold if threshold is None else threshold
        _check_options(threshold, topk, batch_size)
        items = image_inputs(inputs)  # checks every input before any work
        results: list[Detections] = []
        window = batch_size * GROUP_WINDOW
        for start in range(0, len(items), window):
            results.extend(self._detect_window(items[start:start + window], threshold, topk, batch_size))
        return results

    def _detect_window(self, items: list, threshold: float, topk: int, batch_size: int) -> list[Detections]:
        """The detections of ``items`` in order, computed in batches of same-size network inputs."""
        inputs, sizes = [], []
        for item in items:
            image = item.load()
            sizes.append((int(image.shape[-2]), int(image.shape[-1])))
            inputs.append(self.preprocess(image))  # the original is not kept: a window holds network inputs only
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, tensor in enumerate(inputs):
            groups[tuple(tensor.shape[-2:])].append(index)
        found: list[Detections | None] = [None] * len(items)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                detections = self._detect([inputs[i] for i in chunk], [sizes[i] for i in chunk],
                                          [items[i].source for i in chunk], threshold, topk)
                for index, detection in zip(chunk, detections):
                    found[index] = detection
        return found  # type: ignore[return-value]  (every index is in one group)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 or float (0-1) image -> normalised (3, h, w) float32 at the
        network input size, on the model's device."""
        height, width = official_resize_size(image.shape[-2], image.shape[-1], self.val_size, self.max_size)
        # uint8 is resized as uint8, as the validation transforms resize PIL images (the same pixels in the tests)
        image = F.resize(image.to(self.device), [height, width], antialias=True)
        return F.normalize(F.to_dtype(image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)

    def _detect(self, inputs: list[torch.Tensor], sizes: list[tuple[int, int]], sources: list[str],
                threshold: float, topk: int) -> list[Detections]:
        """``inputs``: preprocessed (3, h, w) network inputs; ``sizes``: (H, W) of the original images."""
        outputs = self.model(inputs)
        self.postprocessor.num_select = topk
        results = self.postprocessor({k: outputs[k] for k in ("pred_logits", "pred_boxes")},
                                     torch.tensor(sizes, device=self.device))
        found = []
        for result, (height, width), source in zip(results, sizes, sources):
            keep = result["scores"] >= threshold
            labels = result["labels"][keep].cpu()
            found.append(Detections(boxes=result["boxes"][keep].float().cpu(), scores=result["scores"][keep].cpu(),
                                    labels=labels, names=[self.category_name(label) for label in labels.tolist()],
                                    queries=result["queries"][keep].cpu(), width=width, height=height,
                                    source=source))
        return found

    def draw(self, image: ImageLike, detections: Detections, min_side: int = MIN_SIDE) -> Image.Image:
        """``image`` (one input of any kind) with the boxes, names and scores of
        ``detections`` drawn; images whose shorter side is under ``min_side`` pixels are
        enlarged first so that the labels are legible (0: never)."""
        items = image_inputs(image)
        if len(items) != 1:
            raise InputError(f"draw takes one image, got {len(items)} (a folder or a batch?)")
        picture = tensor_to_pil(items[0].load())
        if picture.size != (detections.width, detections.height):
            raise InputError(f"{items[0].source}: the image is {picture.width}x{picture.height} but the detections "
                             f"are for a {detections.width}x{detections.height} image ({detections.source})")
        captions = [f"{name} {score:.2f}" for name, score in zip(detections.names, detections.scores.tolist())]
        return draw_detections(picture, detections.boxes, captions, detections.labels.tolist(), min_side=min_side)


def _check_options(threshold: float, topk: int, batch_size: int) -> None:
    for name, value in (("topk", topk), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or threshold != threshold:
        raise InputError(f"threshold must be a number (a score in [0, 1]), got {threshold!r}")


def category_names_of(content: Any, num_classes: int, path: str | os.PathLike = "the checkpoint") -> dict[int, str]:
    """Names stored in our checkpoints; COCO names for official (91-class)
    files; the class index as text otherwise. Unusable stored names are a
    CheckpointError naming ``path``."""
    if isinstance(content, dict) and content.get("category_names"):
        names = content["category_names"]
        try:
            return {int(k): str(v) for k, v in names.items()}
        except (AttributeError, TypeError, ValueError):
            raise CheckpointError(f"{path}: 'category_names' must map class ids to names, got {names!r:.80}; "
                                  f"the file was not written by detr_deform (or was edited)") from None
    if num_classes == 91:
        return dict(COCO_CATEGORY_NAMES)
    return {i: str(i) for i in range(num_classes)}


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_SCORE_THRESHOLD", "Detections", "Detector", "category_names_of"]
