"""The root configuration schema (Hydra structured config).

``configs/`` holds the YAML groups that fill it; the schema makes Hydra reject
unknown keys and wrong types with a one-line error before any heavy work.
Groups: model (+ backbone, which writes into model), data, optim, runtime;
presets: ``experiment=...``.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from detr_deform.data import sizes as official
from detr_deform.data.demo import ensure_demo_dataset
from detr_deform.data.formats import SplitData, coco_layout, detect_format, open_split
from detr_deform.data.schema import DEFAULT_MAX_CATEGORY_ID
from detr_deform.errors import DetrDeformError
from detr_deform.io.hub import is_hub_id, is_named_weights
from detr_deform.models.config import ModelConfig
from detr_deform.utils.device import DeviceError, resolve_device
from detr_deform.utils.fields import bounded, check_fields, choice, did_you_mean


class ConfigError(DetrDeformError, ValueError):
    """A configuration value is unusable; the message names the key and the fix."""


@dataclass
class DataConfig:
    dataset: str = choice(("coco", "demo"), default="coco")  # coco (the data under root, any layout) | demo (built-in)
    root: str | None = None                  # COCO root, Pascal VOC year folder or YOLO folder (data.yaml)
    format: str = choice(("auto", "coco", "voc", "yolo"), default="auto")  # layout of root (auto: detected)
    train_split: str = "train"               # COCO <split>2017, VOC ImageSets/Main/<split>.txt, YOLO data.yaml key
    val_split: str = "val"
    class_names: list[str] | None = None     # VOC: the class list in id order 1..N (default: sorted names found)
    train_images: str | None = None          # override per split
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    train_scales: list[int] = bounded(list(official.OFFICIAL_TRAIN_SCALES), ge=1)
    max_size: int = bounded(official.OFFICIAL_MAX_SIZE, ge=1)
    val_size: int = bounded(official.OFFICIAL_VAL_SIZE, ge=1)
    crop_resize_sizes: list[int] = bounded(list(official.OFFICIAL_CROP_RESIZE_SIZES), ge=1)
    crop_min: int = bounded(official.OFFICIAL_CROP_MIN, ge=1)
    crop_max: int = bounded(official.OFFICIAL_CROP_MAX, ge=1)
    num_workers: int = bounded(2, ge=0)
    # A worker that delivers no batch for this long (stopped, stuck in I/O) ends the run, resumable (exit 3).
    worker_timeout_s: int = bounded(600, ge=0)  # 0: wait forever; with num_workers=0 there is no worker
    aspect_ratio_grouping: bool = False      # batch images of similar aspect ratio (less padding)
    on_bad_sample: str = choice(("error", "skip"), default="error")  # error (fail naming the file) | skip
    max_category_id: int = bounded(DEFAULT_MAX_CATEGORY_ID, ge=0)  # larger category ids are refused: remap them to 1..N

    @classmethod
    def from_saved(cls, values: Any, source: str = "the checkpoint") -> DataConfig:
        """The data section stored in a checkpoint's (or run's) config, checked like a
        configuration: keys this version does not know are ignored, a known key with a
        wrong type or value is a ConfigError naming ``source`` and the key."""
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: config 'data' is a {type(values).__name__}, not a mapping; the file was "
                              f"not written by detr_deform (or was edited)")
        known = {f.name for f in fields(cls)}
        data = cls(**{k: v for k, v in values.items() if k in known})
        try:
            check_fields(data, "data")
        except ValueError as error:
            raise ConfigError(f"{source}: stored {error}") from error
        return data

    @staticmethod
    def coco_layout(root: str | Path, split: str) -> tuple[Path, Path]:
        """(image folder, annotation file) of ``split`` in the COCO layout under ``root``."""
        return coco_layout(root, split)

    def resolved_root(self) -> str | None:
        """``root``, after generating the built-in demo data there (default: its cache
        folder) when ``dataset`` is demo."""
        if self.dataset == "demo":
            return str(ensure_demo_dataset(self.root))
        return self.root

    def split_paths(self, split: str, root: str | Path | None = None) -> tuple[Path, Path]:
        """(image folder, annotation file) of ``split`` ('train' or 'val'); ``root``
        overrides ``self.root`` (e.g. the resolved demo root)."""
        images = getattr(self, f"{split}_images")
        annotations = getattr(self, f"{split}_annotations")
        root = root if root is not None else self.root
        if root is not None:
            layout_images, layout_annotations = self.coco_layout(root, getattr(self, f"{split}_split"))
            images = images or layout_images
            annotations = annotations or layout_annotations
        if images is None or annotations is None:
            raise ConfigError(
                f"no {split} data configured: set data.root=/path/to/coco (with {split}2017/ and "
                f"annotations/instances_{split}2017.json), a Pascal VOC year folder or a YOLO folder, or "
                f"data.{split}_images and data.{split}_annotations"
            )
        images, annotations = Path(images), Path(annotations)
        if not images.is_dir():
            raise ConfigError(f"data.{split}_images: folder not found: {images}")
        if not annotations.is_file():
            raise ConfigError(f"data.{split}_annotations: file not found: {annotations}")
        return images, annotations

    def split_data(self, split: str, root: str | Path | None = None) -> SplitData:
        """Where ``split`` ('train' or 'val') is, in the layout of ``format`` (auto: detected
        from the folder); VOC and YOLO annotations are converted to COCO content here.
        ``root`` overrides ``self.root`` (e.g. the resolved demo root)."""
        root = root if root is not None else self.root
        explicit = getattr(self, f"{split}_images") or getattr(self, f"{split}_annotations")
        data_format = "coco" if explicit or root is None else self.format
        if data_format == "auto" and not Path(root).exists():
            data_format = "coco"  # the COCO paths name what is missing (data.train_images: folder not found)
        if data_format == "auto":
            data_format = detect_format(root)
        if data_format == "coco":
            if self.class_names:
                raise ConfigError("data.class_names applies to Pascal VOC folders only; COCO files name their "
                                  "categories")
            images, annotations = self.split_paths(split, root)
            return SplitData("coco", images, annotations)
        return open_split(root, getattr(self, f"{split}_split"), data_format, self.class_names)


@dataclass
class OptimConfig:
    lr: float = bounded(2e-4, gt=0)
    lr_backbone: float = bounded(2e-5, ge=0)
    lr_backbone_names: list[str] = field(default_factory=lambda: ["backbone.0"])
    lr_linear_proj_names: list[str] = field(default_factory=lambda: ["reference_points", "sampling_offsets"])
    lr_linear_proj_mult: float = bounded(0.1, ge=0)
    # Parameter groups (DINO's names): ddetr_in_mmdet = backbone / linear_proj x lr_linear_proj_mult / rest
    # (Deformable DETR's three groups); default = backbone / rest (DINO's recipe); large_wd = default, with
    # weight decay 0 on norms and biases.
    param_dict_type: str = choice(("ddetr_in_mmdet", "default", "large_wd"), default="ddetr_in_mmdet")
    weight_decay: float = bounded(1e-4, ge=0)
    batch_size: int = bounded(2, ge=1)       # per process (GPU)
    accumulate_steps: int = bounded(1, ge=1)  # micro-batches per optimizer step (effective batch x K)
    epochs: int = bounded(50, ge=1)
    clip_max_norm: float = bounded(0.1, ge=0)  # 0: no clipping
    # Learning-rate schedule (official: step, x0.1 after lr_drop epochs, stepped per epoch).
    scheduler: str = choice(("step", "multistep", "cosine"), default="step")
    lr_drop: int = bounded(40, ge=1)         # step: epochs before the x gamma drop
    milestones: list[int] = bounded([], ge=1)  # multistep: epochs at which the lr is multiplied by gamma
    gamma: float = bounded(0.1, gt=0, le=1)
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)  # cosine: final lr / initial lr
    warmup_steps: int = bounded(0, ge=0)     # linear warm-up over this many optimizer steps (0: none)
    warmup_factor: float = bounded(0.001, gt=0, le=1)  # lr multiplier at the first warm-up step
    auto_scale_lr: bool = False              # ours: lr x effective batch / 32 (the official total batch)


@dataclass
class RuntimeConfig:
    device: str = "auto"                     # auto | cpu | cuda | cuda:N
    seed: int = bounded(42, ge=0)            # + rank
    output_dir: str | None = None            # default: runs/<experiment>/<time>
    resume: str | None = None                # auto (latest in the run dir) | path to a checkpoint
    init_from: str | None = None             # fine-tuning: weights that fit are loaded, mismatches reported
    allow_nonfinite_weights: bool = False    # resume/init_from even when the file holds NaN/inf weights
    eval_every: int = bounded(1, ge=1)       # epochs
    amp: str = choice(("off", "fp16", "bf16"), default="off")
    compile: bool = False                    # torch.compile the model (training and evaluation)
    compile_backend: str = choice(("inductor", "aot_eager", "eager"), default="inductor")  # torch.compile backend
    ema: bool = False
    ema_decay: float = bounded(0.9998, gt=0, lt=1)
    deterministic: bool = False              # deterministic kernels (+ seeded samplers/augmentations, always on)
    on_nonfinite: str = choice(("stop", "skip"), default="stop")  # stop (report + exit) | skip (drop the step)
    max_nonfinite_skips: int = bounded(10, ge=0)  # with on_nonfinite=skip: stop after this many skipped steps
    log_every: int = bounded(20, ge=1)       # optimizer steps between log lines / scalars
    max_steps_per_epoch: int | None = bounded(None, ge=1)  # cut epochs short (smoke tests), in optimizer steps
    max_eval_images: int | None = bounded(None, ge=1)  # evaluate on the first N images only
    vis_images: int = bounded(4, ge=0)       # val images with predictions written to TensorBoard
    coco_eval: str = choice(("pycocotools", "faster"), default="pycocotools")  # faster: faster-coco-eval
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # any of tensorboard, mlflow, wandb
    mlflow_tracking_uri: str | None = None   # default: sqlite:///<run dir>/mlflow.db
    mlflow_experiment: str | None = None     # default: the experiment name
    wandb_project: str = "detr_deform"
    wandb_mode: str = choice(("auto", "online", "offline"), default="auto")  # auto: offline without an API key
    dist_timeout_s: int = bounded(1800, ge=1)
    progress: str = choice(("auto", "bar", "log"), default="auto")  # auto: bar on a TTY, log lines otherwise


LOGGERS = ("tensorboard", "mlflow", "wandb")
# Choices served by an optional extra: (key, value) -> (module, extra of `pip install "detr_deform[extra]"`).
OPTIONAL_EXTRAS = {("runtime.loggers", "mlflow"): ("mlflow", "mlflow"),
                   ("runtime.loggers", "wandb"): ("wandb", "wandb"),
                   ("runtime.coco_eval", "faster"): ("faster_coco_eval", "faster-coco-eval")}


@dataclass
class Config:
    experiment: str = "deformable_detr"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def validate(cfg: Config) -> Config:
    """Every value of every section (types, choices, ranges) and the rules between
    them, before anything is created; raises ConfigError with one line naming the key."""
    try:
        cfg.model.validate()
        for name in ("data", "optim", "runtime"):
            check_fields(getattr(cfg, name), name)
        resolve_device(cfg.runtime.device)
    except (ValueError, DeviceError) as error:
        raise ConfigError(str(error)) from error
    d, o, r = cfg.data, cfg.optim, cfg.runtime
    if d.crop_min > d.crop_max:
        raise ConfigError(f"data.crop_min={d.crop_min} is larger than data.crop_max={d.crop_max}")
    if not d.train_scales or not d.crop_resize_sizes:
        raise ConfigError("data.train_scales and data.crop_resize_sizes need at least one size each")
    if o.scheduler == "multistep" and (not o.milestones or o.milestones != sorted(set(o.milestones))):
        raise ConfigError(f"optim.milestones={o.milestones} must be increasing epochs, at least one, with "
                          f"optim.scheduler=multistep")
    unknown = [name for name in r.loggers if name not in LOGGERS]
    if unknown or len(set(r.loggers)) != len(r.loggers):
        raise ConfigError(f"runtime.loggers={r.loggers}: each of {', '.join(LOGGERS)} at most once"
                          + (f" ({unknown[0]!r} is not one{did_you_mean(unknown[0], LOGGERS)})" if unknown else ""))
    for (key, value), (module, extra) in OPTIONAL_EXTRAS.items():
        chosen = value in r.loggers if key == "runtime.loggers" else r.coco_eval == value
        if chosen and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key} selects {value} but the {module} package is not installed: "
                              f"pip install 'detr_deform[{extra}]'")
    for key, path in (("runtime.init_from", r.init_from), ("runtime.resume", r.resume)):
        hub_id = key == "runtime.init_from" and path and is_hub_id(path)  # fetched when the model is built
        if path and path != "auto" and not hub_id and not Path(path).exists():
            raise ConfigError(f"{key}: checkpoint not found: {path}" + (
                " (nor a Hugging Face hub id org/name)" if key == "runtime.init_from" else ""))
    backbone_weights = cfg.model.pretrained_backbone
    if backbone_weights and not is_named_weights(backbone_weights) and not Path(backbone_weights).is_file():
        # also checked where the weights load; here so that the run stops before reading the data
        raise ConfigError(f"model.pretrained_backbone: backbone weights file not found: {backbone_weights} "
                          f"(a local .pth / .safetensors, or a name: torchvision, torchvision:<weights>, timm, "
                          f"hf-hub:<repo>; docs/backbones.md)")
    return cfg


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
