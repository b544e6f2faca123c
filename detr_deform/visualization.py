"""Drawing detections, ground truth and deformable-attention sampling points
on images (used by the tools and the TensorBoard image summaries)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.utils import draw_bounding_boxes

from detr_deform.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Colour-blind-friendly palette (Okabe-Ito + extras), cycled by category id.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999",
           "#FF4F4F", "#7FDBFF", "#2ECC40", "#B10DC9"]


def colour_of(category: int) -> str:
    return PALETTE[int(category) % len(PALETTE)]


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised (3, H, W) float image -> (3, H, W) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.detach().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], categories: list[int],
               width: int = 2) -> torch.Tensor:
    """(3, H, W) uint8 image with (K, 4) xyxy boxes and their captions drawn."""
    if len(boxes) == 0:
        return image
    colours = [colour_of(c) for c in categories]
    return draw_bounding_boxes(image, boxes.float().cpu(), labels=labels, colors=colours, width=width)


def detection_labels(scores: torch.Tensor, labels: torch.Tensor, names: dict[int, str]) -> list[str]:
    return [f"{names.get(int(l), int(l))} {float(s):.2f}" for s, l in zip(scores, labels)]


def save_image(image: torch.Tensor, path: Path) -> Path:
    """Writes a (3, H, W) uint8 tensor as PNG or JPEG (by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if path.suffix.lower() in (".jpg", ".jpeg"):
        picture.save(path, quality=92)
    else:
        picture.save(path)
    return path


def draw_sampling_points(image: Image.Image, points: torch.Tensor, weights: torch.Tensor, box=None,
                         reference=None, box_colour: str = "#00FF00") -> Image.Image:
    """Sampling points (K, 2) in pixels, coloured and sized by their attention
    weight (K,) (brighter/larger = more weight), over ``image``; with the
    predicted box (x0, y0, x1, y1) and the reference point (x, y)."""
    import matplotlib  # optional extra (tools): imported only for these pictures

    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas, "RGBA")
    if box is not None:
        draw.rectangle([float(v) for v in box], outline=box_colour, width=2)
    colormap = matplotlib.colormaps["plasma"]
    top = float(weights.max()) if len(weights) else 1.0
    unit = max(1.0, min(canvas.size) / 250)  # dot size follows the image size
    order = weights.argsort()  # heaviest drawn last, on top
    for index in order.tolist():
        x, y = (float(v) for v in points[index])
        strength = float(weights[index]) / top if top > 0 else 0.0
        r, g, b, _ = (int(255 * c) for c in colormap(0.15 + 0.85 * strength))
        radius = unit * (1.0 + 4.0 * strength ** 0.5)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(r, g, b, 220))
    if reference is not None:
        x, y = (float(v) for v in reference)
        draw.line([x - 6, y, x + 6, y], fill="#FFFFFF", width=2)
        draw.line([x, y - 6, x, y + 6], fill="#FFFFFF", width=2)
    return canvas
