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


def write_voc(root: Path, images_dir: Path, content: dict, split: str = "train", difficult: set[int] = frozenset(),
              extension: str = ".jpg") -> Path:
    """A Pascal VOC year folder holding the COCO ``content``'s images (copied, renamed by VOC id
    with ``extension``) and boxes in the VOC convention: 1-based inclusive corners
    (xmin = x + 1, xmax = x + w). Annotation ids in ``difficult`` get <difficult>1."""
    import shutil
    names = {c["id"]: c["name"] for c in content["categories"]}
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids = []
    for image in content["images"]:
        voc_id = f"{split}_{image['id']:06d}"  # VOC ids are unique across the splits of a folder
        ids.append(voc_id)
        source = images_dir / image["file_name"]
        if extension == source.suffix:
            shutil.copy(source, root / "JPEGImages" / f"{voc_id}{extension}")
        else:
            Image.open(source).save(root / "JPEGImages" / f"{voc_id}{extension}")
        objects = []
        for a in content["annotations"]:
            if a["image_id"] != image["id"]:
                continue
            x, y, w, h = a["bbox"]
            objects.append(f"<object><name>{names[a['category_id']]}</name><difficult>{int(a['id'] in difficult)}"
                           f"</difficult><bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax>"
                           f"<ymax>{y + h}</ymax></bndbox></object>")
        (root / "Annotations" / f"{voc_id}.xml").write_text(
            f"<annotation><filename>{voc_id}{extension}</filename><size><width>{image['width']}</width>"
            f"<height>{image['height']}</height><depth>3</depth></size>{''.join(objects)}</annotation>")
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    list_file.write_text("".join(f"{i}\n" for i in ids))
    return root


def write_yolo(root: Path, images_dir: Path, content: dict, split: str = "train") -> Path:
    """A YOLO folder (data.yaml, images/<split>/, labels/<split>/) holding the COCO ``content``;
    class index k = the k-th category in ``content['categories']``."""
    import shutil
    index = {c["id"]: k for k, c in enumerate(content["categories"])}
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for image in content["images"]:
        name = Path(image["file_name"]).name
        shutil.copy(images_dir / image["file_name"], root / "images" / split / name)
        lines = []
        for a in content["annotations"]:
            if a["image_id"] != image["id"]:
                continue
            x, y, w, h = a["bbox"]
            W, H = image["width"], image["height"]
            lines.append(f"{index[a['category_id']]} {(x + w / 2) / W!r} {(y + h / 2) / H!r} {w / W!r} {h / H!r}\n")
        (root / "labels" / split / f"{Path(name).stem}.txt").write_text("".join(lines))
    yaml_path = root / "data.yaml"
    existing = yaml_path.read_text() if yaml_path.is_file() else ""
    if "names:" not in existing:
        existing += "names:\n" + "".join(f"  {k}: {c['name']}\n" for k, c in enumerate(content["categories"]))
    yaml_path.write_text(existing + f"{split}: images/{split}\n")
    return root
