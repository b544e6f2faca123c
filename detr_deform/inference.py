"""Running a checkpoint on image files: loading, preprocessing, detections,
category names, and where the deformable attention sampled (for the tools)."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from detr_deform.checkpoint import CheckpointError, read_checkpoint
from detr_deform.config import DataConfig
from detr_deform.loading import model_from_content
from detr_deform.data.coco_names import COCO_CATEGORY_NAMES
from detr_deform.data.transforms import IMAGENET_MEAN, IMAGENET_STD, official_resize_size
from detr_deform.utils.device import resolve_device
from detr_deform.layers.ms_deform_attn import MSDeformAttn
from detr_deform.models.build import build_postprocessor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(sources: Iterable[str]) -> list[Path]:
    """Image files from paths, folders (not recursive) and glob patterns, in a
    stable order; a source that matches nothing is an error."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True)
                             if Path(p).suffix.lower() in IMAGE_SUFFIXES)
        if not matches:
            raise FileNotFoundError(f"no image files found for {source!r} (a file, a folder or a glob pattern)")
        found.extend(m for m in matches if m not in found)
    return found


@dataclass
class Prediction:
    """Detections of one image in its original pixel coordinates."""
    boxes: torch.Tensor      # (K, 4) x0, y0, x1, y1
    scores: torch.Tensor     # (K,)
    labels: torch.Tensor     # (K,) category ids
    queries: torch.Tensor    # (K,) decoder query that produced each detection
    input_size: tuple[int, int]      # (h, w) fed to the network
    original_size: tuple[int, int]   # (h, w) of the image file


class Predictor:
    """A checkpoint (ours or official) ready to run on images.

    ``predict`` resizes like validation (shorter side ``val_size``, longer at
    most ``max_size``; defaults: the checkpoint's training config, else the
    official 800/1333), runs the model and returns the top detections.
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", val_size: int | None = None,
                 max_size: int | None = None, topk: int = 100) -> None:
        path = Path(checkpoint)
        content = read_checkpoint(path)
        self.device = resolve_device(device, option="--device")
        self.model, self.cfg = model_from_content(content, path, self.device)
        self.postprocessor = build_postprocessor(self.cfg)
        self.postprocessor.num_select = topk
        self.category_names = category_names_of(content, self.cfg.num_classes)
        saved = content.get("config", {}) if isinstance(content, dict) else {}
        data = DataConfig.from_saved(saved.get("data", {}) if isinstance(saved, dict) else {})
        self.val_size = val_size or data.val_size
        self.max_size = max_size or data.max_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> normalised 3xHxW float tensor at the network input size."""
        height, width = official_resize_size(image.height, image.width, self.val_size, self.max_size)
        tensor = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        tensor = F.resize(tensor, [height, width], antialias=True)
        return F.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)

    def name(self, label: int) -> str:
        return self.category_names.get(int(label), str(int(label)))

    @torch.no_grad()
    def predict(self, images: list[Image.Image], keep_sampling: bool = False) -> list[Prediction]:
        """Detections for a batch of PIL images. With ``keep_sampling``, every
        MSDeformAttn layer keeps its sampling locations/weights (see ``attention_layers``)."""
        for layer in self.attention_layers():
            layer.keep_sampling = keep_sampling
        inputs = [self.preprocess(image).to(self.device) for image in images]
        outputs = self.model(inputs)
        sizes = torch.tensor([[image.height, image.width] for image in images], device=self.device)
        results = self.postprocessor({k: outputs[k] for k in ("pred_logits", "pred_boxes")}, sizes)
        return [Prediction(boxes=r["boxes"].cpu(), scores=r["scores"].cpu(), labels=r["labels"].cpu(),
                           queries=r["queries"].cpu(), input_size=tuple(x.shape[-2:]),
                           original_size=(im.height, im.width))
                for r, x, im in zip(results, inputs, images)]

    def attention_layers(self) -> list[MSDeformAttn]:
        return [m for m in self.model.modules() if isinstance(m, MSDeformAttn)]



@dataclass
class SamplingPoints:
    """Where one query of one MSDeformAttn layer sampled, in original-image pixels."""
    points: torch.Tensor      # (K, 2) x, y for K = heads x levels x points
    weights: torch.Tensor     # (K,) attention weights (each head's weights sum to 1)
    levels: torch.Tensor      # (K,) feature level of each point
    reference: torch.Tensor   # (2,) x, y of the reference point (box centre for box references)


def _sampling_of(layer: MSDeformAttn, query: int, original_size: tuple[int, int]) -> SamplingPoints:
    if layer.last_sampling_locations is None:
        raise RuntimeError("no sampling recorded: run Predictor.predict(..., keep_sampling=True) first")
    if layer.last_sampling_locations.shape[0] != 1:
        raise ValueError("sampling points are drawn for one image at a time (batch of 1, no padding)")
    height, width = original_size
    # Locations are normalised to the (unpadded, batch of 1) network input, which is the resized image.
    scale = torch.tensor([width, height], dtype=torch.float32)
    locations = layer.last_sampling_locations[0, query].float().cpu()   # (M, L, P, 2)
    weights = layer.last_attention_weights[0, query].float().cpu()      # (M, L, P)
    levels = torch.arange(locations.shape[1])[None, :, None].expand(weights.shape)
    reference = layer.last_reference_points[0, query].float().cpu()     # (L, 2) or (L, 4)
    # Reference points carry the valid ratios of each level (all 1 without padding): take level 0.
    return SamplingPoints(points=locations.reshape(-1, 2) * scale, weights=weights.reshape(-1),
                          levels=levels.reshape(-1), reference=reference[0, :2] * scale)


def decoder_sampling(predictor: Predictor, prediction: Prediction, query: int) -> SamplingPoints:
    """The last decoder layer's cross-attention sampling points of ``query``."""
    layer = predictor.model.transformer.decoder.layers[-1].cross_attn
    return _sampling_of(layer, query, prediction.original_size)


def encoder_sampling(predictor: Predictor, prediction: Prediction, x: float, y: float) -> SamplingPoints:
    """The last encoder layer's sampling points for the level-0 (finest) feature
    position under pixel (x, y) of the original image."""
    layer = predictor.model.transformer.encoder.layers[-1].self_attn
    height, width = prediction.original_size
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
    level_h, level_w = (int(v) for v in layer.last_spatial_shapes[0])
    row, col = min(int(y / height * level_h), level_h - 1), min(int(x / width * level_w), level_w - 1)
    return _sampling_of(layer, row * level_w + col, prediction.original_size)


def category_names_of(content: Any, num_classes: int) -> dict[int, str]:
    """Names stored in our checkpoints; COCO names for official (91-class)
    files; the class index as text otherwise."""
    if isinstance(content, dict) and content.get("category_names"):
        return {int(k): str(v) for k, v in content["category_names"].items()}
    if num_classes == 91:
        return dict(COCO_CATEGORY_NAMES)
    return {i: str(i) for i in range(num_classes)}


__all__ = ["CheckpointError", "Prediction", "Predictor", "SamplingPoints", "category_names_of", "collect_images",
           "decoder_sampling", "encoder_sampling"]
