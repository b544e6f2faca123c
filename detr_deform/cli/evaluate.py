"""Evaluating a checkpoint with pycocotools or faster-coco-eval.

The work of ``tools/eval.py``, which imports this module after parsing its arguments
(``--help`` and argument errors answer before torch loads)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from detr_deform.config import DataConfig
from detr_deform.data.coco import CocoDetection, collate_fn
from detr_deform.data.errors import DatasetError
from detr_deform.data.formats import SplitData, coco_layout, detect_format, open_split
from detr_deform.data.transforms import build_transforms
from detr_deform.engine.steps import evaluate
from detr_deform.evaluation.score_threshold import DEFAULT_SCORE_THRESHOLD, best_f1_threshold, stored_score_threshold
from detr_deform.inference.detector import category_names_of
from detr_deform.loading.model import NonFiniteWeightsWarning, model_from_content, nonfinite_tensors, read_content
from detr_deform.models.build import build_postprocessor
from detr_deform.utils import distributed
from detr_deform.utils.files import refuse_outputs_onto_inputs, write_text


def saved_batch_size(saved: dict) -> int:
    """The batch size of the run's own evaluation: padding to the largest image of a batch changes the
    predictions slightly, so the same batches are needed to reproduce the AP that training reported."""
    optim = saved.get("optim", {}) if isinstance(saved, dict) else {}
    batch_size = optim.get("batch_size") if isinstance(optim, dict) else None
    return batch_size if isinstance(batch_size, int) and batch_size > 0 else 2


def resolve_data(args, saved: dict) -> tuple[SplitData, int, int]:
    """Evaluation split and sizes: the arguments, else the run's own data settings (any layout)."""
    data = DataConfig.from_saved(saved.get("data") if isinstance(saved, dict) else None, source=args.checkpoint)
    val_size = args.val_size or data.val_size
    max_size = args.max_size or data.max_size
    if args.images or args.annotations:
        if not (args.images and args.annotations):
            raise DatasetError("--images and --annotations go together")
        return SplitData("coco", Path(args.images), Path(args.annotations)), val_size, max_size
    if args.data:
        data_format = detect_format(args.data) if args.format == "auto" else args.format
        # the run's VOC class list applies to a VOC folder only
        names = args.class_names or (data.class_names if data_format == "voc" else None)
        return open_split(args.data, args.split or data.val_split, data_format, names), val_size, max_size
    if args.coco_path:
        return SplitData("coco", *coco_layout(args.coco_path, args.split or "val")), val_size, max_size
    root = data.resolved_root()
    if root is None and not (data.val_images and data.val_annotations):
        raise DatasetError("no evaluation data: pass --data FOLDER (COCO, VOC or YOLO), --coco-path or "
                           "--images/--annotations")
    if args.split:
        data.val_split = args.split
    return data.split_data("val", root), val_size, max_size


def category_mismatches(content, num_classes: int, names: dict[int, str]) -> list[str]:
    """'id 1: 'cat' here, 'dog' in the checkpoint' for each id whose name differs from the checkpoint's
    (names stored in the checkpoint, or COCO's for official 91-class files; nothing to compare otherwise)."""
    if not (isinstance(content, dict) and content.get("category_names")) and num_classes != 91:
        return []
    stored = category_names_of(content, num_classes)
    return [f"id {i}: {names[i]!r} here, {stored[i]!r} in the checkpoint" for i in sorted(names)
            if i in stored and stored[i] != names[i]]


def default_output(checkpoint: str) -> Path:
    """<checkpoint>.eval.json beside the checkpoint, or outputs/eval/ when that folder is read-only."""
    beside = Path(checkpoint).with_suffix(".eval.json") if Path(checkpoint).is_file() else \
        Path(checkpoint) / "eval.json"
    if os.access(beside.parent, os.W_OK):
        return beside
    return Path("outputs") / "eval" / f"{Path(checkpoint).stem}.eval.json"


def run(args: argparse.Namespace, dist_info: distributed.DistInfo) -> None:
    content = read_content(args.checkpoint, getattr(args, "revision", None))
    stored_threshold = stored_score_threshold(content, args.checkpoint)  # a malformed entry: refused before the work
    saved_config = content.get("config", {}) if isinstance(content, dict) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWeightsWarning)  # reported below, next to the metrics
        model, cfg = model_from_content(content, args.checkpoint, device=dist_info.device)
    broken = nonfinite_tensors(model.state_dict())
    if args.topk:
        cfg.num_select = args.topk
    split, val_size, max_size = resolve_data(args, saved_config)
    annotations = split.source
    output = Path(args.output) if args.output else default_output(args.checkpoint)
    refuse_outputs_onto_inputs({"--output": output, "--dump-detections": args.dump_detections},
                               {"the checkpoint": args.checkpoint, "the annotation file": annotations})
    dataset = CocoDetection.from_split(split, build_transforms("val", val_size=val_size, max_size=max_size))
    if dataset.num_classes > cfg.num_classes:
        raise DatasetError(f"{annotations} has category ids up to {dataset.num_classes - 1} but the model "
                           f"predicts {cfg.num_classes} classes")
    mismatches = category_mismatches(content, cfg.num_classes, dataset.category_names)
    if mismatches and dist_info.is_main:
        print(f"WARNING: {len(mismatches)} category name(s) of {annotations} differ from the checkpoint's for the same "
              f"id ({'; '.join(mismatches[:3])}): the model's class k is scored as the dataset's category k, so the "
              f"metrics may be meaningless; remap the dataset's category ids to the checkpoint's", file=sys.stderr)
    batch_size = args.batch_size or saved_batch_size(saved_config)
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                        num_workers=args.num_workers)
    bar = tqdm(total=len(sampler), desc="evaluating") if dist_info.is_main and sys.stderr.isatty() else None
    metrics, detections, table = evaluate(model, build_postprocessor(cfg), loader, dataset.coco, dist_info.device,
                                      progress=bar.update if bar is not None else None, coco_eval=args.coco_eval)
    if not dist_info.is_main:
        return
    print(f"{args.checkpoint} on {annotations} ({len(dataset)} images, top-{cfg.num_select}):")
    print(table)
    calibration = best_f1_threshold(dataset.coco.dataset.get("annotations", []), detections, dataset.coco.getImgIds())
    print(threshold_report(calibration, stored_threshold))
    if broken:
        print(f"WARNING: {len(broken)} weight tensor(s) of this checkpoint hold NaN/inf (e.g. {broken[:3]}): these "
              f"metrics are not meaningful", file=sys.stderr)
    write_text(output, json.dumps({"checkpoint": str(args.checkpoint), "annotations": str(annotations),
                                   "num_images": len(dataset), "metrics": metrics,
                                   "score_threshold": calibration.to_dict() if calibration else None,
                                   "nonfinite_weight_tensors": broken}, indent=2))
    print(f"metrics written to {output}")
    if args.dump_detections:
        write_text(args.dump_detections, json.dumps(detections))
        print(f"{len(detections)} detections written to {args.dump_detections}")


def threshold_report(calibration, stored: float | None) -> str:
    """The F1-maximising score threshold of this evaluation, and the one Detector/infer.py use for the file."""
    found = (f"score threshold with the best F1 on this set: {calibration.describe()}" if calibration else
             "score threshold: no detection matches an object (F1 = 0 at every threshold)")
    used = (f"the checkpoint's calibrated threshold, used by Detector and infer.py: {stored:.3f}" if stored is not None
            else f"the checkpoint stores no calibrated threshold: Detector and infer.py use {DEFAULT_SCORE_THRESHOLD}")
    return f"{found}\n{used}"


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    dist_info = distributed.init_distributed(args.device, option="--device")
    try:
        run(args, dist_info)
    finally:
        distributed.cleanup()

