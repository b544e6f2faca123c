#!/usr/bin/env python
"""Run a checkpoint (ours or an official model-zoo file) on image files.

    python tools/infer.py runs/demo/<time>/checkpoint_best.pth photos/ --draw
    python tools/infer.py r50_deformable_detr-checkpoint.pth "data/**/*.jpg" --threshold 0.5 --output-dir out/
    python tools/infer.py ckpt.pth a.jpg b.png --device cuda --batch-size 8 --topk 50 --draw --format jpg

Writes <output-dir>/detections.json: a list of COCO-results-style entries
{"image_id", "file_name", "category_id", "category_name", "bbox": [x, y, w, h], "score"}
(image ids number the inputs from 1 in the order listed in "images" of
<output-dir>/images.json), and with --draw a copy of every image with its boxes,
category names and scores. Category names come from the checkpoint (ours) or are
the COCO names (official 91-class files).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detr_deform.checkpoint import CheckpointError
from detr_deform.data.errors import DatasetError
from detr_deform.data.images import load_rgb_image
from detr_deform.detector import Detector
from detr_deform.inputs import collect_images
from detr_deform.utils.device import DeviceError, resolve_device
from detr_deform.visualization import save_image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("inputs", nargs="+", help="image files, folders or glob patterns (quote globs)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/infer"))
    parser.add_argument("--threshold", type=float, default=0.3, help="minimum score kept (JSON and drawings)")
    parser.add_argument("--topk", type=int, default=100, help="at most this many detections per image")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--val-size", type=int, help="shorter side (default: the checkpoint's, else 800)")
    parser.add_argument("--max-size", type=int, help="longer-side limit (default: the checkpoint's, else 1333)")
    parser.add_argument("--draw", action="store_true", help="also write images with the detections drawn")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="format of the drawn images")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="warn about and skip unreadable image files instead of stopping")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.topk < 1:
        parser.error("--batch-size and --topk must be >= 1")
    return args


def drawn_name(path: Path, index: int, used: set[str], suffix: str) -> str:
    name = f"{path.stem}.{suffix}"
    if name in used:  # same file name from different folders
        name = f"{path.stem}_{index}.{suffix}"
    used.add(name)
    return name


def run(args: argparse.Namespace) -> dict:
    paths = collect_images(args.inputs)
    detector = Detector.from_pretrained(args.checkpoint, resolve_device(args.device, option="--device"),
                                        args.val_size, args.max_size)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    detections, images, skipped, used = [], [], [], set()
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="img", desc="inference")
    for start in range(0, len(paths), args.batch_size):
        batch_paths, batch_images = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                batch_images.append(load_rgb_image(path))
                batch_paths.append(path)
            except DatasetError as error:
                if not args.skip_unreadable:
                    raise
                skipped.append(str(path))
                print(f"warning: skipped {error}", file=sys.stderr)
        found = detector(batch_images, threshold=args.threshold, topk=args.topk,
                         batch_size=len(batch_images)) if batch_images else []
        for path, image, detections_of_image in zip(batch_paths, batch_images, found):
            image_id = len(images) + 1
            entry = {"id": image_id, "file_name": str(path), "width": image.width, "height": image.height}
            detections.extend({"image_id": image_id, "file_name": str(path), **record}
                              for record in detections_of_image.records())
            if args.draw:
                name = drawn_name(path, image_id, used, args.format)
                save_image(detector.draw(image, detections_of_image), args.output_dir / name)
                entry["drawn"] = name
            images.append(entry)
        if bar is not None:
            bar.update(len(paths[start:start + args.batch_size]))
    if bar is not None:
        bar.close()
    (args.output_dir / "detections.json").write_text(json.dumps(detections))
    categories = [{"id": k, "name": v} for k, v in sorted(detector.category_names.items())]
    (args.output_dir / "images.json").write_text(json.dumps({"images": images, "categories": categories,
                                                             "skipped": skipped}, indent=1))
    print(f"{len(images)} images, {len(detections)} detections with score >= {args.threshold} -> "
          f"{args.output_dir / 'detections.json'}" + (f"; drawings in {args.output_dir}" if args.draw else "")
          + (f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""))
    return {"images": images, "detections": detections}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, DatasetError, DeviceError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
