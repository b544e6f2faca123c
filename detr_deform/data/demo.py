"""Built-in demo data: a deterministic synthetic COCO-format detection dataset
(real JPEG files + instances JSON) of coloured shapes, generated on first use.

Three categories (square, circle, triangle; ids 1-3, so num_classes = 4 by the
official max-id+1 convention), 1-3 objects per image (every 25th image empty),
sides of 28 px to 60% of the image, random colours that contrast with the
background under them, partial overlaps (no object more than 30% covered), on
gradient backgrounds with distractor strokes, some blurred. Generation is fast (~1 s per 500 images) and the result is
cached; concurrent processes (several ranks) are safe: each builds in a private
temporary folder and the first to finish renames it into place.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

DEMO_VERSION = 2
CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "triangle"}]
SPLITS = {"train": (1200, 0), "val": (150, 1)}  # (number of images, seed offset)


def default_demo_root() -> Path:
    base = os.environ.get("DETR_DEFORM_DATA", Path.home() / ".cache" / "detr_deform")
    return Path(base) / f"demo_v{DEMO_VERSION}"


def _covered_fraction(a, b) -> float:
    """Overlap of two boxes as a fraction of the smaller one (so no object hides another)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    base = [rng.randint(40, 215) for _ in range(3)]
    other = [min(255, max(0, c + rng.randint(-60, 60))) for c in base]
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizontal = rng.random() < 0.5
    steps = width if horizontal else height
    for i in range(steps):
        t = i / max(1, steps - 1)
        colour = tuple(int(a + (b - a) * t) for a, b in zip(base, other))
        if horizontal:
            draw.line([(i, 0), (i, height)], fill=colour)
        else:
            draw.line([(0, i), (width, i)], fill=colour)
    for _ in range(rng.randint(0, 6)):  # distractor strokes
        x0, y0 = rng.randint(0, width), rng.randint(0, height)
        draw.line([(x0, y0), (x0 + rng.randint(-40, 40), y0 + rng.randint(-40, 40))],
                  fill=tuple(rng.randint(0, 255) for _ in range(3)), width=rng.randint(1, 2))
    return image


def _contrasting_colour(rng: random.Random, background) -> tuple[int, int, int]:
    """A random colour clearly different from the background under the shape."""
    best, best_distance = None, -1
    for _ in range(30):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        distance = sum(abs(a - b) for a, b in zip(colour, background))
        if distance >= 220:
            return colour
        if distance > best_distance:
            best, best_distance = colour, distance
    return best


def _draw_shape(draw: ImageDraw.ImageDraw, rng: random.Random, category: int, box, background) -> None:
    colour = _contrasting_colour(rng, background)
    x0, y0, x1, y1 = box
    if category == 1:
        draw.rectangle(box, fill=colour)
    elif category == 2:
        draw.ellipse(box, fill=colour)
    else:
        apex = rng.choice(["up", "down"])
        if apex == "up":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
        else:
            draw.polygon([(x0, y0), (x1, y0), ((x0 + x1) / 2, y1)], fill=colour)


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


PROGRESS_EVERY = 300  # images between progress lines (~1 s of work on a free core)


def _make_split(folder: Path, split: str, count: int, seed: int,
                progress: Callable[[str], None] | None = None) -> dict:
    rng = random.Random(seed)
    images, annotations = [], []
    for index in range(count):
        if progress is not None and index and index % PROGRESS_EVERY == 0:
            progress(f"demo dataset: {split} {index}/{count} images")
        width, height = rng.choice([(160, 160), (192, 144), (144, 192), (176, 160)])
        image = _background(rng, width, height)
        draw = ImageDraw.Draw(image)
        boxes = []
        for _ in range(rng.choice([1, 1, 2, 2, 3]) if index % 25 else 0):
            for _attempt in range(20):
                size = rng.uniform(28, 0.6 * min(width, height))
                aspect = rng.uniform(0.75, 1.33)
                w, h = size * aspect ** 0.5, size / aspect ** 0.5
                x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
                box = (round(x0), round(y0), round(x0 + w), round(y0 + h))
                if all(_covered_fraction(box, other) < 0.3 for other, _ in boxes):
                    boxes.append((box, rng.choice([1, 2, 3])))
                    break
        for box, category in boxes:
            centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
            _draw_shape(draw, rng, category, box, image.getpixel(centre))
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.0)))
        image_id = index + 1
        file_name = f"{split}_{image_id:05d}.jpg"
        image.save(folder / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for box, category in boxes:
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                                "iscrowd": 0})
    return {"info": {"description": f"detr_deform demo dataset v{DEMO_VERSION} ({split})"},
            "images": images, "annotations": annotations, "categories": CATEGORIES}


def ensure_demo_dataset(root: str | Path | None = None, sizes: dict[str, int] | None = None,
                        progress: Callable[[str], None] | None = _print_progress) -> Path:
    """Creates the demo dataset under ``root`` (default ~/.cache/detr_deform/demo_vN,
    or $DETR_DEFORM_DATA/demo_vN) unless it is already there; returns the root,
    laid out like COCO: train2017/, val2017/, annotations/instances_{train,val}2017.json.
    ``sizes`` overrides the number of images per split (e.g. tiny sets for tests).
    ``progress`` gets a line when generation starts, every few hundred images and at
    the end (default: printed on stderr; None: silent)."""
    root = Path(root) if root is not None else default_demo_root()
    if (root / "annotations" / "instances_val2017.json").is_file():
        return root
    counts = {split: (sizes or {}).get(split, count) for split, (count, _) in SPLITS.items()}
    started = time.perf_counter()
    if progress is not None:
        progress(f"demo dataset: generating {' + '.join(f'{n} {split}' for split, n in counts.items())} images "
                 f"in {root} (once; set DETR_DEFORM_DATA to put it elsewhere)")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (staging / "annotations").mkdir()
        for split, (_, seed_offset) in SPLITS.items():
            folder = staging / f"{split}2017"
            folder.mkdir()
            content = _make_split(folder, split, counts[split], seed=DEMO_VERSION * 1000 + seed_offset,
                                  progress=progress)
            with open(staging / "annotations" / f"instances_{split}2017.json", "w", encoding="utf-8") as handle:
                json.dump(content, handle)
        try:
            staging.rename(root)
        except OSError:  # another process finished first
            if not (root / "annotations" / "instances_val2017.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if progress is not None:
        progress(f"demo dataset: ready in {time.perf_counter() - started:.1f} s")
    return root
