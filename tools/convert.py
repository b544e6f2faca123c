#!/usr/bin/env python
"""Convert a Deformable DETR checkpoint between our format, the official one and Hugging Face's.

    python tools/convert.py SenseTime-deformable-detr/ r50_deformable_detr.pth --to official
    python tools/convert.py r50_deformable_detr-checkpoint.pth hf_folder/ --to hf
    python tools/convert.py runs/demo/<time>/checkpoint_best.pth ours.pth --to detr_deform

SRC is any checkpoint ``detr_deform.load_model`` reads: ours, an official model-zoo
file, or a transformers ``save_pretrained`` folder (or its weights file with config.json
beside it). DST is written as
  hf           a folder for DeformableDetrForObjectDetection.from_pretrained (config.json + model.safetensors)
  official     {"model": state dict, "args": argparse.Namespace} as the official code saves and reads
  detr_deform  our checkpoint (model, full configuration, category names)
The weights are converted exactly (bitwise; the model is built and loaded strictly on the way).
Category names travel (HF id2label <-> our category_names; official files keep them in an
extra "category_names" entry the official code ignores); so does the calibrated score
threshold into our format (official and HF files have no place for it: the Detector's
default 0.3 applies to them). Fields a format has no place for fall back to their defaults
(docs/tools.md). A DST that is SRC under any name (symlink, hard link, or SRC's own folder
for --to hf) is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detr_deform.errors import EXIT_STATUS_HELP, run_tool

FORMATS = ("hf", "official", "detr_deform")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_STATUS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint to read (ours, official, or a Hugging Face folder)")
    parser.add_argument("dst", type=Path, help="file to write (official, detr_deform) or folder (hf)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="format of DST")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace):
    """The tool's work, in :mod:`detr_deform.cli.convert` (imported here, after parsing)."""
    from detr_deform.cli.convert import convert as work

    return work(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())

