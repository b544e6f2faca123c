"""config.json of transformers' ``DeformableDetrConfig`` <-> our :class:`ModelConfig`,
and preprocessor_config.json <-> our validation resize (docs/model_zoo.md).
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from detr_deform.data.transforms import IMAGENET_MEAN, IMAGENET_STD, OFFICIAL_MAX_SIZE, OFFICIAL_VAL_SIZE
from detr_deform.io.checkpoint import VERSION, CheckpointError
from detr_deform.io.hf_folder import CONFIG_NAME
from detr_deform.models.config import ModelConfig

MODEL_TYPE = "deformable_detr"
ARCHITECTURE = "DeformableDetrForObjectDetection"
# save_hf stores our full ModelConfig under this config.json key (transformers keeps unknown
# keys), so that fields transformers has no counterpart for survive a round trip.
OUR_KEY = "detr_deform"
TIMM_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
ACTIVATIONS = ("relu", "gelu")  # transformers' "gelu" is torch's exact (erf) gelu, as ours

# transformers' DeformableDetrConfig defaults, for fields that config.json omits.
HF_DEFAULTS: dict[str, Any] = dict(
    d_model=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
    encoder_attention_heads=8, decoder_attention_heads=8, num_queries=300, two_stage_num_proposals=300,
    num_feature_levels=4, encoder_n_points=4, decoder_n_points=4, with_box_refine=False, two_stage=False,
    dilation=False, position_embedding_type="sine", activation_function="relu", num_channels=3,
)
# (ours, transformers) with the same meaning in the eval forward.
ARCHITECTURE_FIELDS = (
    ("hidden_dim", "d_model"), ("enc_layers", "encoder_layers"), ("dec_layers", "decoder_layers"),
    ("num_feature_levels", "num_feature_levels"), ("enc_n_points", "encoder_n_points"),
    ("dec_n_points", "decoder_n_points"),
)
# Ours is one field where transformers has an encoder and a decoder one: they must agree.
PAIRED_FIELDS = (
    ("dim_feedforward", "encoder_ffn_dim", "decoder_ffn_dim"),
    ("nheads", "encoder_attention_heads", "decoder_attention_heads"),
)
# Training-recipe fields with the same meaning (they do not change the eval forward).
RECIPE_FIELDS = (
    ("dropout", "dropout"), ("set_cost_bbox", "bbox_cost"), ("set_cost_giou", "giou_cost"),
    ("bbox_loss_coef", "bbox_loss_coefficient"), ("giou_loss_coef", "giou_loss_coefficient"),
    ("focal_alpha", "focal_alpha"),
)
# Same meaning, but transformers' default departs from the official one (class cost 1 vs 2,
# auxiliary losses off vs on): a value equal to transformers' default is its recipe, not a
# choice, so the official default (or the value save_hf stored) is kept instead.
RECIPE_FIELDS_HF_DEFAULT_UNSET = (("set_cost_class", "class_cost", 1), ("aux_loss", "auxiliary_loss", False))
# transformers declares these as int: non-integral values live only in config.json[OUR_KEY].
HF_INT_FIELDS = ("class_cost", "bbox_cost", "giou_cost", "bbox_loss_coefficient", "giou_loss_coefficient")
# Ours only (no transformers counterpart): read back from config.json[OUR_KEY] when present.
OUR_ONLY_FIELDS = ("cls_loss_coef", "train_backbone", "freeze_stem_and_layer1", "num_select", "nms_iou",
                   "attn_impl")



def image_processor_config(val_size: int = OFFICIAL_VAL_SIZE, max_size: int = OFFICIAL_MAX_SIZE) -> dict[str, Any]:
    """The preprocessor_config.json of transformers' DeformableDetrImageProcessor doing our
    validation preprocessing: shorter side ``val_size``, longer side at most ``max_size``,
    bilinear, [0, 1] scaling, ImageNet normalisation, padding for batches."""
    return {"image_processor_type": "DeformableDetrImageProcessor", "format": "coco_detection",
            "do_resize": True, "size": {"shortest_edge": val_size, "longest_edge": max_size}, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "do_pad": True,
            "do_convert_annotations": True}


def sizes_from_image_processor(config: Mapping[str, Any], source: str) -> dict[str, int]:
    """{"val_size", "max_size"} from a preprocessor_config.json: ``size`` as
    {"shortest_edge", "longest_edge"} or the older ``"size": 800, "max_size": 1333`` (as
    transformers reads both). A preprocessing we do not reproduce (a fixed height/width, no
    resize, another normalisation) cannot change how the weights load, so it is a warning
    naming the field, and {} (the Detector then uses 800/1333)."""
    size = config.get("size", {"shortest_edge": OFFICIAL_VAL_SIZE, "longest_edge": OFFICIAL_MAX_SIZE})
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"shortest_edge": size, "longest_edge": config.get("max_size", OFFICIAL_MAX_SIZE)}
    problems = []
    if not config.get("do_resize", True) or not isinstance(size, Mapping) or set(size) != {"shortest_edge",
                                                                                         "longest_edge"}:
        problems.append(f"size={size!r:.80} (do_resize={config.get('do_resize', True)}): only the "
                        f"shortest_edge/longest_edge resize of DETR models maps onto our val_size/max_size")
    else:
        problems += [f"size.{key}={size[key]!r} is not a positive integer" for key in ("shortest_edge", "longest_edge")
                     if isinstance(size[key], bool) or not isinstance(size[key], int) or size[key] < 1]
    for key, ours in (("image_mean", IMAGENET_MEAN), ("image_std", IMAGENET_STD)):
        theirs = config.get(key, list(ours))
        if not (isinstance(theirs, list) and len(theirs) == 3
                and all(isinstance(v, (int, float)) and abs(v - o) < 1e-6 for v, o in zip(theirs, ours))):
            problems.append(f"{key}={theirs!r:.80}: our models normalise with the ImageNet statistics {list(ours)}")
    problems += [f"{key}=false: our models take images scaled to [0, 1] and normalised"
                 for key in ("do_rescale", "do_normalize") if config.get(key, True) is False]
    if problems:
        warnings.warn(f"{source}: {problems[0]}; the weights load, but our preprocessing (shorter side 800, "
                      f"longer at most 1333, ImageNet normalisation) differs from this processor's"
                      + (f" ({len(problems) - 1} more difference(s))" if len(problems) > 1 else ""),
                      ImageProcessorWarning, stacklevel=3)
        return {}
    return {"val_size": size["shortest_edge"], "max_size": size["longest_edge"]}


class ImageProcessorWarning(UserWarning):
    """A Hugging Face folder's preprocessor_config.json asks for a preprocessing we do not reproduce."""


# ------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ------------------------------------------------------------------------------------------

def _field(config: Mapping[str, Any], name: str, kind: type | tuple[type, ...], source: str) -> Any:
    """config[name] (transformers' default when absent), checked to be of ``kind``."""
    value = config.get(name, HF_DEFAULTS.get(name))
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a JSON true where a count belongs is an error, not 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CheckpointError(f"{source}: field {name}={value!r} is not a {' or '.join(k.__name__ for k in kinds)}")
    return value


def _refuse(source: str, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: {field}={value!r} is not supported: {why}")


def _backbone_from_hf(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Our backbone fields from the timm backbone settings: ``backbone_config`` (transformers
    5.x) or ``backbone`` / ``backbone_kwargs`` / ``dilation`` (4.x). A timm ResNet is our
    ResNet backbone (same names, official freezing); any other timm model is our timm
    backbone with the same ``out_indices`` (the same features_only model transformers builds)."""
    sub = config.get("backbone_config")
    if sub:
        if not isinstance(sub, dict) or sub.get("model_type") != "timm_backbone":
            kind = sub.get("model_type") if isinstance(sub, dict) else sub
            raise _refuse(source, "backbone_config.model_type", kind,
                          "only timm backbones (timm_backbone) are supported, not transformers' own backbones")
        prefix, field, name = "backbone_config.", "backbone_config.backbone", sub.get("backbone")
        out_indices, stride, channels = sub.get("out_indices"), sub.get("output_stride"), sub.get("num_channels", 3)
        dilation = stride == 16  # 5.x builds the backbone from backbone_config alone
    else:
        if config.get("use_timm_backbone", True) is not True:
            raise _refuse(source, "use_timm_backbone", config.get("use_timm_backbone"),
                          "only timm backbones are supported (and no backbone_config is given)")
        kwargs = config.get("backbone_kwargs") or {}
        prefix, field, name = "backbone_kwargs.", "backbone", config.get("backbone", "resnet50")
        out_indices, stride = kwargs.get("out_indices"), kwargs.get("output_stride")
        channels = config.get("num_channels", 3)
        dilation = bool(config.get("dilation") or False) or stride == 16
    if not isinstance(name, str) or not name:
        raise _refuse(source, field, name, "a timm model name")
    if channels != 3:
        raise _refuse(source, "backbone_config.num_channels" if prefix == "backbone_config." else "num_channels",
                      channels, "RGB images (3 channels) only")
    levels = _field(config, "num_feature_levels", int, source)
    expected = [2, 3, 4] if levels > 1 else [4]  # transformers' default out_indices
    # "resnet50.a1_in1k": the tag after the dot only selects pretrained weights, not the network.
    arch = name.split(".")[0]
    if arch not in TIMM_RESNETS:
        if importlib.util.find_spec("timm") is not None:
            import timm
            if not timm.is_model(arch):
                raise _refuse(source, field, name, "not a timm model (our timm backbone builds any timm model "
                                                   "with features_only)")
        if stride is not None or dilation:
            raise _refuse(source, prefix + "output_stride", stride, f"dilation applies to the ResNets only ({arch})")
        return {"backbone": "timm", "timm_name": arch, "backbone_norm": "frozen_bn",
                "backbone_out_indices": list(out_indices) if out_indices is not None else expected}
    if stride not in (None, 32, 16):
        raise _refuse(source, prefix + "output_stride", stride, "only 32 (default) or 16 (dilation, DC5)")
    if out_indices is not None and list(out_indices) != expected:
        raise _refuse(source, prefix + "out_indices", out_indices,
                      f"with num_feature_levels={levels} the backbone must return stages {expected}")
    return {"backbone": arch, "dilation": bool(dilation)}


def _architecture_from_hf(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    values = {ours: _field(config, theirs, int, source) for ours, theirs in ARCHITECTURE_FIELDS}
    for ours, encoder, decoder in PAIRED_FIELDS:
        a, b = _field(config, encoder, int, source), _field(config, decoder, int, source)
        if a != b:
            raise _refuse(source, decoder, b, f"Deformable DETR has one {ours} for encoder and decoder; "
                                              f"{encoder}={a} differs")
        values[ours] = a
    values["with_box_refine"] = _field(config, "with_box_refine", bool, source)
    values["two_stage"] = _field(config, "two_stage", bool, source)
    # Two-stage: the decoder queries are the top two_stage_num_proposals encoder proposals.
    values["num_queries"] = _field(config, "two_stage_num_proposals" if values["two_stage"] else "num_queries",
                                   int, source)
    position = _field(config, "position_embedding_type", str, source)
    if position not in ("sine", "learned"):
        raise _refuse(source, "position_embedding_type", position, "sine or learned")
    activation = _field(config, "activation_function", str, source)
    if activation not in ACTIVATIONS:
        raise _refuse(source, "activation_function", activation, f"one of {', '.join(ACTIVATIONS)}")
    values.update(position_embedding=position, activation=activation)
    values.update(_backbone_from_hf(config, source))
    return values


def _recipe_from_hf(config: Mapping[str, Any], ours_stored: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Training-recipe fields: transformers' value where it has the field (and, for the
    fields whose default departs from the official one, a non-default value), else the
    value save_hf stored in config.json[OUR_KEY], else the official default."""
    values: dict[str, Any] = {}
    for ours, theirs in RECIPE_FIELDS:
        if theirs in config:
            values[ours] = float(_field(config, theirs, (int, float), source))
        elif ours in ours_stored:
            values[ours] = ours_stored[ours]
    for ours, theirs, hf_default in RECIPE_FIELDS_HF_DEFAULT_UNSET:
        if theirs in config and config[theirs] != hf_default:
            values[ours] = config[theirs]
        elif ours in ours_stored:
            values[ours] = ours_stored[ours]
    values.update({name: ours_stored[name] for name in OUR_ONLY_FIELDS if name in ours_stored})
    return values


def config_from_hf(config: Mapping[str, Any], source: str = CONFIG_NAME) -> ModelConfig:
    """Maps a DeformableDetr config.json onto a (validated) ModelConfig: dims, layers, heads,
    points, levels, queries, box refinement, two-stage, dilation, position embedding,
    activation, the timm ResNet backbone and num_labels; the training-recipe fields as
    :func:`_recipe_from_hf` says. What our model cannot compute is refused naming the field."""
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type={config.get('model_type')!r}; only {MODEL_TYPE} checkpoints "
                              f"({ARCHITECTURE}) can be read")
    architectures = config.get("architectures")
    if architectures and ARCHITECTURE not in architectures:
        raise CheckpointError(f"{source}: architectures={architectures}: only {ARCHITECTURE} checkpoints carry the "
                              f"detection heads; this one cannot be loaded as a detector")
    block = config.get(OUR_KEY)
    stored = block.get("model") if isinstance(block, dict) else None
    values = {**_recipe_from_hf(config, stored if isinstance(stored, dict) else {}, source),
              **_architecture_from_hf(config, source)}
    values["num_classes"] = _num_labels(config, source)
    try:
        return ModelConfig(**values).validate()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from error


def _num_labels(config: Mapping[str, Any], source: str) -> int:
    """transformers' num_labels: one class logit per id2label entry (default 2)."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    return _field(config, "num_labels", int, source) if "num_labels" in config else 2


def class_names_from_hf(config: Mapping[str, Any], source: str = CONFIG_NAME) -> dict[str, str]:
    """``id2label`` as our category names {str(id): name} (ids named "N/A" left out);
    without it, transformers' defaults (``num_labels``, else 2 labels, named LABEL_<i>)."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        try:
            ids = sorted((int(k), str(v)) for k, v in id2label.items())
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: id2label keys must be class ids (integers as text): {error}") from error
        # "N/A" is the hub's placeholder for unused ids (COCO's gaps): no category, as in our datasets.
        return {str(i): name for i, name in ids if name != "N/A"}
    count = _field(config, "num_labels", int, source) if "num_labels" in config else 2
    return {str(i): f"LABEL_{i}" for i in range(count)}


def _exportable(cfg: ModelConfig) -> None:
    """Refuses what transformers' DeformableDetr cannot compute as ours does."""
    if cfg.backbone not in TIMM_RESNETS and cfg.backbone != "timm":
        raise CheckpointError(f"model.backbone={cfg.backbone!r}: transformers' DeformableDetr takes timm backbones "
                              f"only (our ResNets are timm's, and model.backbone=timm); this model cannot be written "
                              f"as HF")
    if cfg.backbone == "timm" and (cfg.timm_kwargs or cfg.backbone_out_indices is None):
        raise CheckpointError(f"model.timm_kwargs={cfg.timm_kwargs} / backbone_out_indices="
                              f"{cfg.backbone_out_indices}: transformers' timm backbone takes the stages "
                              f"(out_indices) and no other timm arguments")
    if cfg.backbone_norm == "gn":
        raise CheckpointError("model.backbone_norm='gn': transformers' DeformableDetr uses frozen BatchNorm in the "
                              "backbone; a GroupNorm backbone cannot be written as HF")
    if cfg.activation not in ACTIVATIONS:
        raise CheckpointError(f"model.activation={cfg.activation!r}: only {', '.join(ACTIVATIONS)} can be written "
                              f"as HF")
    if cfg.position_embedding in ("sine", "v2") and not math.isclose(cfg.position_embedding_scale, 2 * math.pi):
        raise CheckpointError(f"model.position_embedding_scale={cfg.position_embedding_scale}: transformers' sine "
                              f"embedding has the fixed scale 2*pi")
    if cfg.num_classes is None:
        raise CheckpointError("model.num_classes is not set; it is transformers' num_labels")


def _id2label(num_classes: int, class_names: Mapping[Any, str] | Sequence[str] | None) -> dict[str, str]:
    if class_names is None:
        if num_classes == 91:
            # Deferred: detr_deform.data imports pycocotools; only this default needs it.
            from detr_deform.data.coco_names import COCO_CATEGORY_NAMES
            class_names = COCO_CATEGORY_NAMES
        else:
            class_names = {i: str(i) for i in range(num_classes)}
    if not isinstance(class_names, Mapping):
        class_names = dict(enumerate(class_names))
    names = {int(k): str(v) for k, v in class_names.items()}
    outside = sorted(k for k in names if not 0 <= k < num_classes)
    if outside:
        raise CheckpointError(f"class names for ids {outside[:5]} outside 0..{num_classes - 1} "
                              f"(num_classes={num_classes})")
    # Ids without a class (e.g. COCO's unused ids) are "N/A", as in the hub's COCO models.
    return {str(i): names.get(i, "N/A") for i in range(num_classes)}


def _backbone_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Our ResNets in the 4.x form (``backbone``: transformers' defaults build them offline);
    a timm backbone as 5.x's ``backbone_config`` (the 4.x form with out_indices would make
    transformers 5.x look the name up on the hub)."""
    if cfg.backbone != "timm":
        return {"use_timm_backbone": True, "backbone": cfg.backbone, "backbone_config": None}
    return {"backbone": None, "backbone_config": {"model_type": "timm_backbone", "backbone": cfg.timm_name,
                                                  "out_indices": list(cfg.backbone_out_indices), "num_channels": 3,
                                                  "features_only": True}}


def hf_config_from(cfg: ModelConfig, class_names: Mapping[Any, str] | Sequence[str] | None = None,
                   tie_weights: bool = True) -> dict[str, Any]:
    """The config.json of ``cfg`` for transformers (4.x and 5.x read it): the timm
    backbone in the 4.x form, never a pretrained download; dropout also as transformers'
    attention/activation dropout (where the official code applies it); ``id2label`` from
    ``class_names``; our full ModelConfig under ``OUR_KEY``. ``tie_weights``:
    ``tie_word_embeddings`` (see :func:`save_hf`)."""
    _exportable(cfg)
    id2label = _id2label(cfg.num_classes, class_names)
    config: dict[str, Any] = {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE],
        "d_model": cfg.hidden_dim, "encoder_layers": cfg.enc_layers, "decoder_layers": cfg.dec_layers,
        "encoder_ffn_dim": cfg.dim_feedforward, "decoder_ffn_dim": cfg.dim_feedforward,
        "encoder_attention_heads": cfg.nheads, "decoder_attention_heads": cfg.nheads,
        "num_queries": cfg.num_queries, "two_stage_num_proposals": cfg.num_queries,
        "num_feature_levels": cfg.num_feature_levels, "encoder_n_points": cfg.enc_n_points,
        "decoder_n_points": cfg.dec_n_points, "with_box_refine": cfg.with_box_refine, "two_stage": cfg.two_stage,
        "dilation": cfg.dilation, "position_embedding_type": {"v2": "sine", "v3": "learned"}.get(
            cfg.position_embedding, cfg.position_embedding),
        "activation_function": cfg.activation,
        "dropout": cfg.dropout, "attention_dropout": cfg.dropout, "activation_dropout": cfg.dropout,
        "auxiliary_loss": cfg.aux_loss, "focal_alpha": cfg.focal_alpha,
        **_backbone_to_hf(cfg),
        "use_pretrained_backbone": False, "num_channels": 3, "return_intermediate": True,
        "disable_custom_kernels": False, "tie_word_embeddings": tie_weights,
        "id2label": id2label, "label2id": {name: int(i) for i, name in id2label.items()},
        OUR_KEY: {"version": VERSION, "model": cfg.to_dict()},
    }
    recipe = {"class_cost": cfg.set_cost_class, "bbox_cost": cfg.set_cost_bbox, "giou_cost": cfg.set_cost_giou,
              "bbox_loss_coefficient": cfg.bbox_loss_coef, "giou_loss_coefficient": cfg.giou_loss_coef}
    config.update({k: int(v) for k, v in recipe.items() if float(v).is_integer()})
    return config


