#!/usr/bin/env python
"""Write a COCO instances JSON from a Pascal VOC or YOLO split (training reads those as they are;
this is for users who want a file).

    python tools/convert_dataset.py /data/VOCdevkit/VOC2012 voc2012_train.json --split train
    python tools/convert_dataset.py /data/shapes shapes_val.json --split val --format yolo

The JSON's ``file_name`` values are relative to the image folder printed at the end (the
VOC year folder, the YOLO dataset folder): pass it as data.train_images / --images. The
conversion is the one training uses (docs/custom_datasets.md): VOC corners are 1-based and
inclusive (COCO box = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]), difficult
objects become iscrowd=1; YOLO's normalised centres become absolute [x, y, w, h], class k
becomes category id k. A split with errors (unreadable XML, label lines that are not
normalised boxes, missing images) is not written unless --skip-bad leaves those images out.
An existing DST is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from detr_deform.errors import EXIT_STATUS_HELP, DetrDeformError, run_tool


class ConversionError(DetrDeformError, ValueError):
    """The split has problems that the written file would silently lose."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="a Pascal VOC year folder, or a YOLO folder / data.yaml")
    parser.add_argument("dst", type=Path, help="COCO instances JSON to write")
    parser.add_argument("--split", default="train", help="VOC: ImageSets/Main/<split>.txt; YOLO: the data.yaml key")
    parser.add_argument("--format", choices=("auto", "voc", "yolo"), default="auto", help="layout of SRC")
    parser.add_argument("--class-names", nargs="+", help="Pascal VOC: the class list in id order 1..N "
                                                          "(default: the sorted names of its XML files)")
    parser.add_argument("--skip-bad", action="store_true", help="write without the images that have errors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> int:
    from detr_deform.data.formats import FORMAT_NAMES, detect_format, open_split
    from detr_deform.utils.files import refuse_outputs_onto_inputs, write_text

    data_format = detect_format(args.src) if args.format == "auto" else args.format
    if data_format == "coco":
        raise ConversionError(f"{args.src} is a COCO folder already: its annotations/*.json are the files to use")
    split = open_split(args.src, args.split, data_format, args.class_names)
    refuse_outputs_onto_inputs({"DST": args.dst}, {"the split's source": split.source})
    if args.dst.exists() and not args.overwrite:
        raise ConversionError(f"{args.dst} exists; pass --overwrite to replace it (nothing was written)")
    errors = [p for p in split.problems if p.severity == "error"]
    content = split.content
    whole = [p for p in errors if p.image_id is None]  # the split itself (e.g. no label file at all)
    if whole:
        raise ConversionError(f"{split.describe()}: {whole[0]} (nothing was written)")
    if errors and not args.skip_bad:
        shown = "; ".join(str(p) for p in errors[:3])
        raise ConversionError(f"{split.describe()}: {len(errors)} problem(s): {shown}. Run tools/check_dataset.py "
                              f"{args.src} for the full report, or pass --skip-bad to leave those images out "
                              f"(nothing was written)")
    if errors:
        bad = {p.image_id for p in errors}
        content = {**content, "images": [e for e in content["images"] if e["id"] not in bad],
                   "annotations": [a for a in content["annotations"] if a["image_id"] not in bad]}
    write_text(args.dst, json.dumps(content))
    print(f"{FORMAT_NAMES[data_format]} {split.describe()} -> {args.dst}: {len(content['images'])} images, "
          f"{len(content['annotations'])} annotations, {len(content['categories'])} categories"
          + (f" ({len(bad)} image(s) with errors left out)" if errors else ""))
    print(f"file names are relative to {split.image_folder} (use it as --images / data.train_images)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
