"""The root configuration schema (Hydra structured config).

``configs/`` holds the YAML groups that fill it; the schema makes Hydra reject
unknown keys and wrong types with a one-line error before any heavy work.
Groups: model (+ backbone, which writes into model), data, optim, runtime;
presets: ``experiment=...``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from hydra.core.config_store import ConfigStore

from detr_deform.data.demo import ensure_demo_dataset
from detr_deform.models.config import ModelConfig

OFFICIAL_TRAIN_SCALES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the key and the fix."""


@dataclass
class DataConfig:
    dataset: str = "coco"                    # coco (any COCO-format data) | demo (built-in synthetic)
    root: str | None = None                  # COCO layout: <root>/{train2017,val2017,annotations/}
    train_images: str | None = None          # override per split
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    train_scales: list[int] = field(default_factory=lambda: list(OFFICIAL_TRAIN_SCALES))
    max_size: int = 1333
    val_size: int = 800
    crop_resize_sizes: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    num_workers: int = 2
    aspect_ratio_grouping: bool = False      # batch images of similar aspect ratio (less padding)
    on_bad_sample: str = "error"             # error (fail naming the file) | skip (leave out, count, warn)

    @classmethod
    def from_saved(cls, values: dict) -> "DataConfig":
        """The data section stored in a checkpoint's config (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    @staticmethod
    def coco_layout(root: str | Path, split: str) -> tuple[Path, Path]:
        """(image folder, annotation file) of ``split`` in the COCO layout under ``root``."""
        root = Path(root)
        return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"

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
            layout_images, layout_annotations = self.coco_layout(root, split)
            images = images or layout_images
            annotations = annotations or layout_annotations
        if images is None or annotations is None:
            raise ConfigError(
                f"no {split} data configured: set data.root=/path/to/coco (with {split}2017/ and "
                f"annotations/instances_{split}2017.json) or data.{split}_images and data.{split}_annotations"
            )
        images, annotations = Path(images), Path(annotations)
        if not images.is_dir():
            raise ConfigError(f"data.{split}_images: folder not found: {images}")
        if not annotations.is_file():
            raise ConfigError(f"data.{split}_annotations: file not found: {annotations}")
        return images, annotations


@dataclass
class OptimConfig:
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_backbone_names: list[str] = field(default_factory=lambda: ["backbone.0"])
    lr_linear_proj_names: list[str] = field(default_factory=lambda: ["reference_points", "sampling_offsets"])
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 2                      # per process (GPU)
    epochs: int = 50
    lr_drop: int = 40
    clip_max_norm: float = 0.1


@dataclass
class RuntimeConfig:
    device: str = "auto"                     # auto | cpu | cuda
    seed: int = 42                           # + rank
    output_dir: str | None = None            # default: runs/<experiment>/<time>
    resume: str | None = None                # auto (latest in the run dir) | path to a checkpoint
    init_from: str | None = None             # fine-tuning: weights that fit are loaded, mismatches reported
    eval_every: int = 1                      # epochs
    amp: str = "off"                         # off | fp16 | bf16
    ema: bool = False
    ema_decay: float = 0.9998
    deterministic: bool = False              # deterministic kernels (+ seeded samplers/augmentations, always on)
    on_nonfinite: str = "stop"               # stop (report + exit) | skip (drop the step; see max_nonfinite_skips)
    max_nonfinite_skips: int = 10            # with on_nonfinite=skip: stop after this many skipped steps
    log_every: int = 20                      # steps between log lines / scalars
    max_steps_per_epoch: int | None = None   # cut epochs short (smoke tests)
    max_eval_images: int | None = None       # evaluate on the first N images only
    vis_images: int = 4                      # val images with predictions written to TensorBoard
    dist_timeout_s: int = 1800
    progress: str = "auto"                   # auto (bar on a TTY, log lines otherwise) | bar | log


@dataclass
class Config:
    experiment: str = "deformable_detr"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def validate(cfg: Config) -> Config:
    """Checks beyond types; raises ConfigError naming the key."""
    try:
        cfg.model.validate()
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.data.dataset not in ("coco", "demo"):
        raise ConfigError(f"data.dataset must be 'coco' or 'demo', got {cfg.data.dataset!r}")
    if cfg.runtime.amp not in ("off", "fp16", "bf16"):
        raise ConfigError(f"runtime.amp must be off, fp16 or bf16, got {cfg.runtime.amp!r}")
    if cfg.runtime.progress not in ("auto", "bar", "log"):
        raise ConfigError(f"runtime.progress must be auto, bar or log, got {cfg.runtime.progress!r}")
    if cfg.data.on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_sample must be error or skip, got {cfg.data.on_bad_sample!r}")
    if cfg.runtime.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"runtime.on_nonfinite must be stop or skip, got {cfg.runtime.on_nonfinite!r}")
    if cfg.optim.batch_size < 1 or cfg.optim.epochs < 1:
        raise ConfigError("optim.batch_size and optim.epochs must be >= 1")
    if cfg.runtime.eval_every < 1:
        raise ConfigError("runtime.eval_every must be >= 1")
    return cfg


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
