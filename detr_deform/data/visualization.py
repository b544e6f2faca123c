"""Drawing detections, ground truth and deformable-attention sampling points on
images (used by the Detector, the tools and the TensorBoard image summaries).

Pictures are made to be read: images whose shorter side is under ``min_side``
(512) pixels are enlarged first (boxes and points with them), the font (DejaVu
Sans Bold, which ships with matplotlib; else Pillow's scalable default) and the
line widths grow with the picture, labels sit on a filled background of their
class colour with black or white text, above the box — inside it at the top
border — and always inside the picture.
"""
from __future__ import annotations

import colorsys
import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from detr_deform.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detr_deform.errors import optional_import
from detr_deform.utils.files import writing

# Colour-blind-friendly palette (Okabe-Ito + extras) for ids 0-11; larger ids get
# hues spaced by the golden angle, so that every class keeps one stable colour.
PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999",
           "#FF4F4F", "#7FDBFF", "#2ECC40", "#B10DC9"]
MIN_SIDE = 512  # shorter side below which pictures are enlarged before drawing
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def colour_of(category: int) -> str:
    """The colour of a category id, as #RRGGBB."""
    category = int(category)
    if 0 <= category < len(PALETTE):
        return PALETTE[category]
    red, green, blue = colorsys.hsv_to_rgb((category * 0.381966) % 1.0, 0.75, 0.95)
    return f"#{round(red * 255):02X}{round(green * 255):02X}{round(blue * 255):02X}"


def text_colour(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (#RRGGBB)."""
    red, green, blue = (int(background[i:i + 2], 16) / 255 for i in (1, 3, 5))
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "#000000" if luminance > 0.45 else "#FFFFFF"


@functools.lru_cache(maxsize=32)
def label_font(size: int) -> Font:
    """A TrueType font ``size`` pixels high: DejaVu Sans Bold from matplotlib's data
    (found without importing matplotlib), else Pillow's scalable default."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def drawing_scale(width: int, height: int, min_side: int = MIN_SIDE) -> float:
    """The factor a width x height picture is enlarged by before drawing (>= 1)."""
    return max(1.0, min_side / max(1, min(width, height))) if min_side else 1.0


def enlarged(image: Image.Image, min_side: int = MIN_SIDE) -> tuple[Image.Image, float]:
    """``image`` enlarged (bicubic) so that its shorter side is at least ``min_side``,
    and the factor used."""
    scale = drawing_scale(image.width, image.height, min_side)
    if scale == 1.0:
        return image.convert("RGB").copy(), 1.0
    size = (round(image.width * scale), round(image.height * scale))
    return image.convert("RGB").resize(size, Image.Resampling.BICUBIC), scale


def _sizes(image: Image.Image) -> tuple[int, int]:
    """(font pixels, line width) for a picture of this size."""
    diagonal = math.sqrt(image.width * image.height)
    return max(12, round(diagonal / 36)), max(3, round(diagonal / 250))


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def label_box(size: tuple[float, float], box: Sequence[float], taken: list[Sequence[float]],
              canvas: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where a (width, height) label of ``box`` (x0, y0, x1, y1) goes, as (x0, y0, x1, y1)
    inside the ``canvas`` (width, height): above the box, else inside its top, below it
    or inside its bottom — the first of these that covers none of the labels ``taken``
    and needs no clamping at the canvas border, else the one that covers least."""
    width, height = size
    x0, y0, x1, y1 = box
    left = min(max(0.0, x0), max(0.0, canvas[0] - width))
    candidates = [y0 - height, y0, y1, y1 - height]
    best, best_cover = None, math.inf
    for wanted in candidates:
        top = min(max(0.0, wanted), max(0.0, canvas[1] - height))
        place = (left, top, left + width, top + height)
        # a place pushed back into the canvas by more than a few pixels counts as half covered
        cover = sum(_overlap(place, other) for other in taken) + (0.5 * width * height if abs(top - wanted) > 3 else 0)
        if cover < best_cover:
            best, best_cover = place, cover
        if cover == 0:
            break
    return best


def draw_labels(draw: ImageDraw.ImageDraw, captions: Sequence[str], boxes: Sequence[Sequence[float]],
                colours: Sequence[str], font: Font, canvas: tuple[int, int]) -> None:
    """Each caption on a filled box of its colour at :func:`label_box` of its box;
    placed in the given order (best first), drawn in reverse so that the first is on top."""
    taken: list[tuple[float, float, float, float]] = []
    texts = []
    for caption, box in zip(captions, boxes):
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        pad = max(2, round((bottom - top) * 0.25))
        place = label_box((right - left + 2 * pad, bottom - top + 2 * pad), box, taken, canvas)
        taken.append(place)
        texts.append((place[0] + pad - left, place[1] + pad - top))
    for place, origin, caption, colour in reversed(list(zip(taken, texts, captions, colours))):
        draw.rectangle(place, fill=colour, outline="#000000", width=1)
        draw.text(origin, caption, fill=text_colour(colour), font=font)


def draw_detections(image: Image.Image, boxes: torch.Tensor, captions: Sequence[str], categories: Sequence[int],
                    min_side: int = MIN_SIDE, line_width: int | None = None) -> Image.Image:
    """A copy of ``image`` (enlarged to ``min_side``) with the (K, 4) xyxy ``boxes``
    (in ``image``'s pixels) in their category's colour and ``captions`` on labels.
    Give them by decreasing score: the best detection's box and label end on top."""
    canvas, scale = enlarged(image, min_side)
    font_size, default_width = _sizes(canvas)
    font, width = label_font(font_size), line_width or default_width
    draw = ImageDraw.Draw(canvas)
    limit = (canvas.width - 1, canvas.height - 1)
    colours = [colour_of(c) for c in categories]
    drawn = [[min(max(0.0, v * scale), limit[i % 2]) for i, v in enumerate(box)] for box in boxes.tolist()]
    for (x0, y0, x1, y1), colour in reversed(list(zip(drawn, colours))):
        x1, y1 = max(x0, x1), max(y0, y1)
        # a 1-pixel dark edge on both sides keeps light colours visible on light images
        draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline="#000000", width=width + 2)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    draw_labels(draw, captions, [(x0 - 1, y0 - 1, x1 + 1, y1 + 1) for x0, y0, x1, y1 in drawn], colours, font,
                canvas.size)
    return canvas


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Normalised (3, H, W) float image -> (3, H, W) uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.detach().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 RGB tensor."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def draw_boxes(image: torch.Tensor, boxes: torch.Tensor, labels: list[str], categories: list[int],
               width: int | None = None) -> torch.Tensor:
    """(3, H, W) uint8 image with (K, 4) xyxy boxes and their captions drawn, as a
    (3, H', W') uint8 tensor — enlarged when the shorter side is under 512 pixels
    (see :func:`draw_detections`); ``width``: line width (default: grows with the picture)."""
    picture = Image.fromarray(image.detach().cpu().permute(1, 2, 0).contiguous().numpy())
    return to_uint8(draw_detections(picture, boxes.float().cpu(), labels, categories, line_width=width))


def detection_labels(scores: torch.Tensor, labels: torch.Tensor, names: dict[int, str]) -> list[str]:
    """Captions "name 0.87" for detections."""
    return [f"{names.get(int(label), int(label))} {float(s):.2f}" for s, label in zip(scores, labels)]


def save_image(image: torch.Tensor | Image.Image, path: Path) -> Path:
    """Writes a (3, H, W) uint8 tensor or a PIL image as PNG or JPEG (by suffix);
    OutputError naming the file when it cannot be written."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image.permute(1, 2, 0).numpy())
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".jpg", ".jpeg"):
            picture.save(path, quality=92)
        else:
            picture.save(path)
    return path


def _colormap() -> Callable[[float], tuple[float, float, float, float]]:
    matplotlib = optional_import("matplotlib", "tools", "the attention pictures")  # only they need a colormap

    return matplotlib.colormaps["plasma"]


def _strength_colour(colormap, strength: float, alpha: int = 255) -> tuple[int, int, int, int]:
    # 0.15: the darkest end of plasma is nearly black and would vanish on dark images
    red, green, blue, _ = (int(255 * c) for c in colormap(0.15 + 0.85 * strength))
    return red, green, blue, alpha


def draw_sampling_points(image: Image.Image, points: torch.Tensor, weights: torch.Tensor,
                         box: Sequence[float] | None = None, reference: Sequence[float] | None = None,
                         box_colour: str = "#00FF00", caption: str | None = None,
                         min_side: int = MIN_SIDE) -> Image.Image:
    """Sampling points (K, 2) in ``image`` pixels as dots whose colour and size grow
    with their attention weight (K,), over ``image`` (enlarged to ``min_side``), with
    the box (x0, y0, x1, y1) and the reference point (x, y) as a white cross; a colour
    bar of the weights on the right and ``caption`` below."""
    colormap = _colormap()
    canvas, scale = enlarged(image, min_side)
    draw = ImageDraw.Draw(canvas, "RGBA")
    _, line = _sizes(canvas)
    if box is not None:
        draw.rectangle([float(v) * scale for v in box], outline=box_colour, width=line)
    top = float(weights.max()) if len(weights) else 1.0
    unit = max(1.0, min(canvas.size) / 250)  # dot size follows the picture size
    for index in weights.argsort().tolist():  # heaviest drawn last, on top
        x, y = (float(v) * scale for v in points[index])
        strength = float(weights[index]) / top if top > 0 else 0.0
        radius = unit * (1.0 + 4.0 * strength ** 0.5)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=_strength_colour(colormap, strength, 220),
                     outline=(0, 0, 0, 160), width=1)  # a dark rim keeps light dots visible on light images
    if reference is not None:
        _draw_cross(draw, [float(v) * scale for v in reference], 6 * unit + 4, line)
    return _with_caption(_with_colour_bar(canvas, colormap, top), caption)


def _draw_cross(draw: ImageDraw.ImageDraw, centre: Sequence[float], arm: float, width: int) -> None:
    x, y = centre
    for fill, extra in (("#000000", 2), ("#FFFFFF", 0)):  # a dark outline keeps it visible on light images
        draw.line([x - arm - extra / 2, y, x + arm + extra / 2, y], fill=fill, width=width + extra)
        draw.line([x, y - arm - extra / 2, x, y + arm + extra / 2], fill=fill, width=width + extra)


def _with_colour_bar(canvas: Image.Image, colormap, top: float) -> Image.Image:
    """``canvas`` with a vertical colour bar (0 at the bottom, ``top`` at the top) on its right."""
    font_size, _ = _sizes(canvas)
    font = label_font(max(11, round(font_size * 0.8)))
    measure = ImageDraw.Draw(canvas)
    ticks = [f"{top * f:.3g}" for f in (1.0, 0.5, 0.0)]
    text_width = max(measure.textlength(t, font=font) for t in ticks)
    bar_width, margin = max(12, round(canvas.width * 0.03)), max(6, font_size // 2)
    panel = Image.new("RGB", (canvas.width + bar_width + int(text_width) + 3 * margin, canvas.height), "#202020")
    panel.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(panel)
    x0, y0, y1 = canvas.width + margin, margin + font_size // 2, canvas.height - margin - font_size // 2
    for y in range(y0, y1 + 1):
        draw.line([x0, y, x0 + bar_width, y], fill=_strength_colour(colormap, (y1 - y) / max(1, y1 - y0))[:3])
    for tick, fraction in zip(ticks, (1.0, 0.5, 0.0)):
        y = y1 - fraction * (y1 - y0)
        draw.line([x0 + bar_width, y, x0 + bar_width + margin // 2, y], fill="#FFFFFF", width=1)
        draw.text((x0 + bar_width + margin, y), tick, fill="#FFFFFF", font=font, anchor="lm")
    return panel


def _wrap(text: str, font: Font, width: float, measure: ImageDraw.ImageDraw) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if line and measure.textlength(candidate, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def with_caption(picture: torch.Tensor | Image.Image, caption: str) -> Image.Image:
    """``picture`` ((3, H, W) uint8 tensor or PIL image) with ``caption`` wrapped below it."""
    if isinstance(picture, torch.Tensor):
        picture = Image.fromarray(picture.detach().cpu().permute(1, 2, 0).contiguous().numpy())
    return _with_caption(picture, caption)


def _with_caption(canvas: Image.Image, caption: str | None) -> Image.Image:
    """``canvas`` with ``caption`` wrapped below it, white on dark grey."""
    if not caption:
        return canvas
    font_size, _ = _sizes(canvas)
    font = label_font(max(11, round(font_size * 0.8)))
    measure = ImageDraw.Draw(canvas)
    margin = max(6, font_size // 2)
    lines = _wrap(caption, font, canvas.width - 2 * margin, measure)
    line_height = round(font.size * 1.3) if hasattr(font, "size") else 14
    panel = Image.new("RGB", (canvas.width, canvas.height + len(lines) * line_height + 2 * margin), "#202020")
    panel.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(panel)
    for index, text in enumerate(lines):
        draw.text((margin, canvas.height + margin + index * line_height), text, fill="#FFFFFF", font=font)
    return panel
