"""Pictures of what the model and the data pipeline do.

The work of ``tools/visualize.py``, which imports this module after parsing its arguments
(``--help`` and argument errors answer before torch loads)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from detr_deform.data.errors import DatasetError


def _caption(where: str, sampling, with_box: bool) -> str:
    """What a sampling-point picture shows, for its caption."""
    return (f"{where}. {len(sampling.weights)} sampling points ({sampling.heads} heads x {sampling.num_levels} "
            f"levels x {sampling.num_points} points). Dot colour and size: attention weight (colour bar on the "
            f"right; each head's weights sum to 1). White cross: reference point."
            + (" Green: predicted box." if with_box else ""))


def attention_maps(args: argparse.Namespace) -> list[Path]:
    from detr_deform.data.images import load_rgb_image
    from detr_deform.data.visualization import draw_sampling_points, save_image
    from detr_deform.inference.detector import Detector
    from detr_deform.inference.inputs import collect_images
    from detr_deform.inference.sampling import decoder_sampling, encoder_sampling, recording_sampling
    from detr_deform.utils.device import resolve_device

    paths = collect_images(args.inputs)
    detector = Detector.from_pretrained(args.checkpoint, resolve_device(args.device, option="--device"))
    written = []
    for path in paths:
        image = load_rgb_image(path)
        with recording_sampling(detector):  # one image at a time: no padding
            found = detector(image, threshold=args.threshold, topk=100, batch_size=1)[0]
        drawn_queries: list[int] = []
        for rank, (query, score, name, box) in enumerate(zip(found.queries.tolist(), found.scores.tolist(),
                                                             found.names, found.boxes)):
            if len(drawn_queries) == args.queries:
                break
            if query in drawn_queries:  # one query can give several labels; draw it once
                continue
            drawn_queries.append(query)
            sampling = decoder_sampling(detector, found, query)
            layers = detector.cfg.dec_layers
            caption = _caption(f"Last decoder layer ({layers} of {layers}), cross-attention of query {query}: "
                               f"{name} {score:.2f}", sampling, with_box=True)
            canvas = draw_sampling_points(image, sampling.points, sampling.weights, box=box.tolist(),
                                          reference=sampling.reference, caption=caption)
            written.append(save_image(canvas, args.output_dir / f"{path.stem}_det{rank}_{name}_{score:.2f}.png"))
        for x, y in args.pixel:
            sampling = encoder_sampling(detector, found, x, y)
            layers = detector.cfg.enc_layers
            caption = _caption(f"Last encoder layer ({layers} of {layers}), self-attention of the finest-level "
                               f"feature under pixel ({x:g}, {y:g})", sampling, with_box=False)
            canvas = draw_sampling_points(image, sampling.points, sampling.weights, reference=(x, y), caption=caption)
            written.append(save_image(canvas, args.output_dir / f"{path.stem}_pixel_{int(x)}_{int(y)}.png"))
    return written


def _data_settings(args: argparse.Namespace):
    """The DataConfig to browse with: a run's config.yaml, the demo preset's, or the defaults."""
    from omegaconf import OmegaConf

    from detr_deform.config import DataConfig

    if args.run_config is not None:
        if not args.run_config.is_file():
            raise DatasetError(f"--run-config: file not found: {args.run_config}")
        saved = OmegaConf.to_container(OmegaConf.load(args.run_config))
        return DataConfig.from_saved(saved.get("data") if isinstance(saved, dict) else None,
                                     source=str(args.run_config))
    if args.demo:
        demo = Path(__file__).resolve().parent.parent / "configs" / "data" / "demo.yaml"
        return DataConfig.from_saved(OmegaConf.to_container(OmegaConf.load(demo)), source=str(demo))
    return DataConfig()


def dataset_samples(args: argparse.Namespace) -> list[Path]:
    from detr_deform.config import DataConfig
    from detr_deform.data.coco import CocoDetection
    from detr_deform.data.formats import SplitData, open_split
    from detr_deform.data.transforms import build_transforms
    from detr_deform.data.visualization import denormalize, draw_boxes, save_image, with_caption
    from detr_deform.utils.box_ops import box_cxcywh_to_xyxy

    data = _data_settings(args)
    if args.demo:
        split = SplitData("coco", *DataConfig.coco_layout(data.resolved_root(), args.split))
    elif args.coco_path is not None:
        split = SplitData("coco", *DataConfig.coco_layout(args.coco_path, args.split))
    elif args.data is not None:
        split = open_split(args.data, args.split, args.format)
    else:
        split = SplitData("coco", args.images, args.annotations)
    # the training augmentations for a training split (train, trainval), else the evaluation resize
    mode = "train" if args.split.startswith("train") else "val"
    transforms = build_transforms(mode, scales=data.train_scales, max_size=data.max_size,
                                  val_size=data.val_size, crop_resize_sizes=data.crop_resize_sizes,
                                  crop_min=data.crop_min, crop_max=data.crop_max)
    dataset = CocoDetection.from_split(split, transforms, seed=args.seed)
    written = []
    for index in range(min(args.num, len(dataset))):
        image, target = dataset[index]
        height, width = image.shape[-2:]
        boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([width, height, width, height])
        labels = target["labels"].tolist()
        captions = [dataset.category_names.get(label, str(label)) for label in labels]
        drawn = draw_boxes(denormalize(image), boxes, captions, labels)
        if not labels:  # a bare picture would look like a failure to draw
            drawn = with_caption(drawn, _no_objects_caption(dataset, int(target["image_id"])))
        written.append(save_image(drawn, args.output_dir / f"{args.split}_{int(target['image_id'])}.png"))
    return written


def _no_objects_caption(dataset, image_id: int) -> str:
    annotated = len(dataset.coco.getAnnIds(imgIds=[image_id]))
    if annotated:
        return (f"No objects drawn: image {image_id} has {annotated} annotation(s), none left after the "
                f"augmentations (cropped out, or too small or crowd).")
    return f"No objects: image {image_id} has no annotations (an image without objects)."


def visualize(args: argparse.Namespace) -> None:
    written = attention_maps(args) if args.command == "attention" else dataset_samples(args)
    print(f"wrote {len(written)} PNG file(s) to {args.output_dir}")
    print(json.dumps([str(p) for p in written]))

