"""Small COCO-format datasets written on the fly, good or deliberately broken."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}]


def write_image(path: Path, size=(64, 48), colour=(230, 40, 40), mode="RGB", **save_kwargs) -> None:
    image = Image.new("RGB", size, (20, 60, 140))
    image.paste(colour, (8, 8, 40, 32))
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)


def write_dataset(root: Path, count: int = 4, size=(64, 48)) -> tuple[Path, Path, dict]:
    """``count`` JPEGs with one box each; returns (image folder, JSON path, content)."""
    images_dir = root / "images"
    images, annotations = [], []
    for i in range(1, count + 1):
        write_image(images_dir / f"{i}.jpg", size)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": size[0], "height": size[1]})
        annotations.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [8, 8, 32, 24],
                            "area": 768, "iscrowd": 0})
    content = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps(content))
    return images_dir, annotation_file, content


def rewrite(annotation_file: Path, content: dict) -> None:
    annotation_file.write_text(json.dumps(content))
