#!/usr/bin/env python
"""Check a detection dataset (COCO, Pascal VOC or YOLO) before training.

    python tools/check_dataset.py /data/VOCdevkit/VOC2012              # any layout, detected: train + val
    python tools/check_dataset.py /data/shapes --format yolo --splits train
    python tools/check_dataset.py --coco-path /data/coco              # train2017 + val2017
    python tools/check_dataset.py --images imgs/ --annotations train.json
    python tools/check_dataset.py --coco-path /data/coco --no-files   # JSON only (fast)

Prints, per split: image/annotation counts, annotations per category, images
without annotations, and every problem found (missing/unreadable/truncated
images, JSON size != file size, degenerate or out-of-image boxes, undeclared
category ids, negative or huge category ids, file names outside the image folder,
duplicate ids, an empty 'images' list, malformed JSON or entries; for VOC and YOLO also
unreadable XML, label lines that are not normalised 'class cx cy w h', images without
a match; images with more objects than --num-queries). Exit status: 0 when the
data can be trained on (warnings allowed), 1 when training would fail or be
silently wrong, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from detr_deform.data.formats import FORMAT_NAMES, SplitData, coco_layout, detect_format, open_split
from detr_deform.data.report import check_dataset
from detr_deform.data.schema import DEFAULT_MAX_CATEGORY_ID
from detr_deform.errors import EXIT_STATUS_HELP, run_tool
from detr_deform.utils.files import write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path,
                        help="a dataset folder: COCO root, Pascal VOC year folder or YOLO folder / data.yaml")
    parser.add_argument("--format", choices=("auto", "coco", "voc", "yolo"), default="auto",
                        help="layout of FOLDER (default: detected)")
    parser.add_argument("--class-names", nargs="+", help="Pascal VOC: the class list in id order (as data.class_names)")
    parser.add_argument("--coco-path", type=Path, help="root with {train,val}2017/ and annotations/")
    parser.add_argument("--splits", nargs="+", default=["train", "val"],
                        help="with FOLDER or --coco-path (VOC: ImageSets/Main/<split>.txt; YOLO: data.yaml keys)")
    parser.add_argument("--images", type=Path, help="image folder (with --annotations)")
    parser.add_argument("--annotations", type=Path, help="instances JSON (with --images)")
    parser.add_argument("--no-files", action="store_true", help="check the JSON only, do not read images")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-reading threads")
    parser.add_argument("--max-listed", type=int, default=10, help="problems listed per kind")
    parser.add_argument("--max-category-id", type=int, default=DEFAULT_MAX_CATEGORY_ID,
                        help="largest category id accepted (as data.max_category_id; the class head has max id + 1 "
                             "outputs)")
    parser.add_argument("--num-queries", type=int, default=300,
                        help="report images with more objects than this (model.num_queries)")
    parser.add_argument("--json", type=Path, help="also write the full report as JSON to this file")
    args = parser.parse_args(argv)
    if (args.images is None) != (args.annotations is None):
        parser.error("--images and --annotations go together")
    given = [name for name, value in (("FOLDER", args.folder), ("--coco-path", args.coco_path),
                                      ("--images/--annotations", args.images)) if value is not None]
    if len(given) != 1:
        parser.error("pass one of FOLDER, --coco-path, or --images and --annotations"
                     + (f" (got {', '.join(given)})" if given else ""))
    if args.max_category_id < 0:
        parser.error(f"--max-category-id={args.max_category_id} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: check(args))


def check(args: argparse.Namespace) -> int:
    """Checks every split and prints its report; 0 when all can be trained on, else 1."""
    if args.folder is not None:
        data_format = detect_format(args.folder) if args.format == "auto" else args.format
        print(f"{args.folder}: {FORMAT_NAMES[data_format]} layout" + (" (detected)" if args.format == "auto" else ""))
        splits = [open_split(args.folder, split, data_format, args.class_names) for split in args.splits]
    elif args.images is not None:
        splits = [SplitData("coco", args.images, args.annotations)]
    else:
        splits = [SplitData("coco", *coco_layout(args.coco_path, split)) for split in args.splits]
    reports = [check_dataset(split.image_folder, split.source, check_files=not args.no_files, workers=args.workers,
                             progress=sys.stderr.isatty(), max_category_id=args.max_category_id,
                             num_queries=args.num_queries, split=split)
               for split in splits]
    for report in reports:
        print(report.format(args.max_listed))
    if args.json is not None:
        content = [{**asdict(r), "annotation_file": str(r.annotation_file), "image_folder": str(r.image_folder),
                    "ok": r.ok} for r in reports]
        write_text(args.json, json.dumps(content, indent=2))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
