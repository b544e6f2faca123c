"""Hugging Face transformers checkpoints of ``DeformableDetrForObjectDetection``,
in and out: :func:`read_hf` turns a ``save_pretrained`` folder into our in-memory
checkpoint layout (so every consumer of :func:`detr_deform.loading.read_content`
works unchanged), :func:`save_hf` writes a folder that ``from_pretrained`` loads.

No transformers at runtime: ``config.json`` is plain JSON and the weights are
read with safetensors (``pytorch_model.bin``: our weights-only ``torch.load``).

What the conversion has to know (transformers 5.x; docs/model_zoo.md):
- Names on disk are transformers' pre-5.0 names (``model.backbone.conv_encoder.model.*``,
  ``self_attn.out_proj``, ``layers.N.fc1``), not its 5.x in-memory names (both are read).
- The decoder self-attention stores q/k/v separately; nn.MultiheadAttention one in_proj.
- Tied duplicates are not on disk; which copy is stored depends on the variant and on
  ``tie_word_embeddings`` (:func:`_tie_source` is transformers' tying table).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from detr_deform.checkpoint import FORMAT, VERSION, CheckpointError, read_checkpoint, state_dict_of
from detr_deform.data.transforms import IMAGENET_MEAN, IMAGENET_STD, OFFICIAL_MAX_SIZE, OFFICIAL_VAL_SIZE
from detr_deform.errors import EXIT_FAILED
from detr_deform.models.config import ModelConfig
from detr_deform.utils.files import OutputError, atomic_path

MODEL_TYPE = "deformable_detr"
ARCHITECTURE = "DeformableDetrForObjectDetection"
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"  # DeformableDetrImageProcessor: the validation resize
WEIGHTS_NAME = "model.safetensors"
# What a save_pretrained folder may hold, in the order transformers looks for them.
WEIGHTS_NAMES = (WEIGHTS_NAME, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
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

# Parameter names, ours <-> transformers on disk: "{i}" is a layer index; the rest of the key
# follows unchanged. Heads and the decoder's q/k/v are handled separately.
RENAMES = (
    ("backbone.0.body.", "model.backbone.conv_encoder.model."),
    ("backbone.1.row_embed.", "model.position_embedding.row_embeddings."),
    ("backbone.1.col_embed.", "model.position_embedding.column_embeddings."),
    ("input_proj.", "model.input_proj."),
    ("query_embed.", "model.query_position_embeddings."),
    ("transformer.level_embed", "model.level_embed"),
    ("transformer.reference_points.", "model.reference_points."),
    ("transformer.enc_output.", "model.enc_output."),
    ("transformer.enc_output_norm.", "model.enc_output_norm."),
    ("transformer.pos_trans.", "model.pos_trans."),
    ("transformer.pos_trans_norm.", "model.pos_trans_norm."),
    ("transformer.encoder.layers.{i}.self_attn.", "model.encoder.layers.{i}.self_attn."),
    ("transformer.encoder.layers.{i}.norm1.", "model.encoder.layers.{i}.self_attn_layer_norm."),
    ("transformer.encoder.layers.{i}.linear1.", "model.encoder.layers.{i}.fc1."),
    ("transformer.encoder.layers.{i}.linear2.", "model.encoder.layers.{i}.fc2."),
    ("transformer.encoder.layers.{i}.norm2.", "model.encoder.layers.{i}.final_layer_norm."),
    ("transformer.decoder.layers.{i}.cross_attn.", "model.decoder.layers.{i}.encoder_attn."),
    ("transformer.decoder.layers.{i}.norm1.", "model.decoder.layers.{i}.encoder_attn_layer_norm."),
    ("transformer.decoder.layers.{i}.self_attn.out_proj.", "model.decoder.layers.{i}.self_attn.out_proj."),
    ("transformer.decoder.layers.{i}.norm2.", "model.decoder.layers.{i}.self_attn_layer_norm."),
    ("transformer.decoder.layers.{i}.linear1.", "model.decoder.layers.{i}.fc1."),
    ("transformer.decoder.layers.{i}.linear2.", "model.decoder.layers.{i}.fc2."),
    ("transformer.decoder.layers.{i}.norm3.", "model.decoder.layers.{i}.final_layer_norm."),
)
# transformers 5.x in-memory names -> on-disk names (a state_dict() saved as is reads too).
IN_MEMORY_TO_DISK = (
    (re.compile(r"^model\.backbone\.model\."), "model.backbone.conv_encoder.model."),
    (re.compile(r"\.self_attn\.o_proj\."), ".self_attn.out_proj."),
    (re.compile(r"(layers\.\d+)\.mlp\.(fc[12])\."), r"\1.\2."),
)
OUR_QKV = re.compile(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$")
HF_QKV = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
OUR_HEAD = re.compile(r"^(transformer\.decoder\.)?(class_embed|bbox_embed)\.\d+\.")
HF_HEAD = re.compile(r"^(model\.decoder\.)?(class_embed|bbox_embed)\.\d+\.")
HEAD_SUFFIXES = {"class_embed": ("weight", "bias"),
                 "bbox_embed": tuple(f"layers.{j}.{p}" for j in range(3) for p in ("weight", "bias"))}


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))


_TO_HF = [(_compile(ours), theirs) for ours, theirs in RENAMES]
_FROM_HF = [(_compile(theirs), ours) for ours, theirs in RENAMES]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(key)
        if match:
            return template.replace("{i}", match.group(1) if match.groups() else "") + key[match.end():]
    return None


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------

def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """True for what only a Hugging Face checkpoint can be: a folder (``save_pretrained``
    writes folders; ours and official checkpoints are files), a ``.safetensors`` file or a
    shard index JSON, or ``pytorch_model*.bin`` with a config.json beside it. Whether it is
    a usable DeformableDetr one is :func:`read_hf`'s to say, with a message naming why."""
    path = Path(path)
    if path.is_dir():
        return True
    name = path.name
    if name.endswith(".safetensors") or name.endswith(".index.json"):
        return True
    return name.startswith("pytorch_model") and name.endswith(".bin") and (path.parent / CONFIG_NAME).is_file()


def _config_file(path: Path) -> Path:
    """The config.json of a folder, or the one beside a weights file."""
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.is_file():
            files = sorted(p.name for p in path.glob("*.pth"))
            hint = f"; for our or official checkpoints pass the file itself, e.g. {files[0]}" if files else ""
            raise CheckpointError(f"{path}: no {CONFIG_NAME} in this folder; a Hugging Face checkpoint is the folder "
                                  f"that save_pretrained writes ({CONFIG_NAME} + {WEIGHTS_NAME}){hint}")
        return config
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    config = path.parent / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(f"{path}: a Hugging Face weights file needs the {CONFIG_NAME} that save_pretrained "
                              f"writes beside it; there is none in {path.parent}")
    return config


def _weights_file(path: Path) -> Path:
    """The weights file (or shard index) of a folder, in transformers' order; a file itself."""
    if not path.is_dir():
        return path
    for name in WEIGHTS_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    raise CheckpointError(f"{path}: no weights file ({', '.join(WEIGHTS_NAMES)}) in this folder"
                          + (f"; pass one of {found} itself" if found else ""))


def _read_json(file: Path) -> dict[str, Any]:
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: not a readable JSON file: {error}") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(content).__name__}")
    return content


def _read_weights_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupted?): "
                                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    return state_dict_of(read_checkpoint(file), file)  # pytorch_model.bin: a torch.save'd state dict


def read_weights(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, or of every shard a ``*.index.json`` names (its
    ``weight_map``), under the names in the file."""
    file = Path(file)
    if not file.name.endswith(".index.json"):
        return _read_weights_file(file)
    weight_map = _read_json(file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{file}: no 'weight_map' in this shard index")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(map(str, weight_map.values()))):
        state.update(_read_weights_file(file.parent / shard))
    absent = sorted(k for k in weight_map if k not in state)
    if absent:
        raise CheckpointError(f"{file}: {len(absent)} weight(s) of the index are in none of its shards, "
                              f"e.g. {absent[:3]}")
    return state


def read_hf(path: str | os.PathLike) -> dict[str, Any]:
    """A Hugging Face checkpoint (folder, or weights file with config.json beside it) as a
    checkpoint content in our layout: ``{"format": "detr_deform", "version", "model": state
    dict in our (= official) names, "config": {"model": ModelConfig dict}, "category_names":
    {str(id): name} from id2label, "source": {"format": "hf", "path"}}``."""
    path = Path(path)
    config_file = _config_file(path)
    config = _read_json(config_file)
    cfg = config_from_hf(config, source=str(config_file))
    names = class_names_from_hf(config, str(config_file))
    weights_file = _weights_file(path)
    state = state_dict_from_hf(read_weights(weights_file), cfg, source=str(weights_file))
    rows = state["class_embed.0.weight"].shape[0]
    if rows != cfg.num_classes:
        raise CheckpointError(f"{config_file}: id2label has {cfg.num_classes} labels but the class head in "
                              f"{weights_file.name} has {rows} rows; fix id2label (one entry per class logit)")
    saved = {"model": cfg.to_dict()}
    processor = config_file.parent / PREPROCESSOR_NAME
    sizes = sizes_from_image_processor(_read_json(processor), str(processor)) if processor.is_file() else {}
    if sizes:
        saved["data"] = sizes
    return {"format": FORMAT, "version": VERSION, "model": state, "config": saved,
            "category_names": names, "source": {"format": "hf", "path": str(path)}}


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


def _backbone_from_hf(config: Mapping[str, Any], source: str) -> tuple[str, bool]:
    """(our backbone name, dilation) from the timm backbone settings: ``backbone_config``
    (transformers 5.x) or ``backbone`` / ``backbone_kwargs`` / ``dilation`` (4.x)."""
    sub = config.get("backbone_config")
    if sub:
        if not isinstance(sub, dict) or sub.get("model_type") != "timm_backbone":
            kind = sub.get("model_type") if isinstance(sub, dict) else sub
            raise _refuse(source, "backbone_config.model_type", kind,
                          "only timm ResNet backbones (timm_backbone) are supported, not transformers' own backbones")
        prefix, field, name = "backbone_config.", "backbone_config.backbone", sub.get("backbone")
        out_indices, stride, channels = sub.get("out_indices"), sub.get("output_stride"), sub.get("num_channels", 3)
        dilation = stride == 16  # 5.x builds the backbone from backbone_config alone
    else:
        if config.get("use_timm_backbone", True) is not True:
            raise _refuse(source, "use_timm_backbone", config.get("use_timm_backbone"),
                          "only timm ResNet backbones are supported (and no backbone_config is given)")
        kwargs = config.get("backbone_kwargs") or {}
        prefix, field, name = "backbone_kwargs.", "backbone", config.get("backbone", "resnet50")
        out_indices, stride = kwargs.get("out_indices"), kwargs.get("output_stride")
        channels = config.get("num_channels", 3)
        dilation = bool(config.get("dilation") or False) or stride == 16
    # "resnet50.a1_in1k": the tag after the dot only selects pretrained weights, not the network.
    arch = name.split(".")[0] if isinstance(name, str) else name
    if arch not in TIMM_RESNETS:
        raise _refuse(source, field, name, f"the backbones are timm {', '.join(TIMM_RESNETS)}")
    if stride not in (None, 32, 16):
        raise _refuse(source, prefix + "output_stride", stride, "only 32 (default) or 16 (dilation, DC5)")
    levels = _field(config, "num_feature_levels", int, source)
    expected = [2, 3, 4] if levels > 1 else [4]
    if out_indices is not None and list(out_indices) != expected:
        raise _refuse(source, prefix + "out_indices", out_indices,
                      f"with num_feature_levels={levels} the backbone must return stages {expected}")
    if channels != 3:
        raise _refuse(source, "backbone_config.num_channels" if prefix == "backbone_config." else "num_channels",
                      channels, "RGB images (3 channels) only")
    return arch, bool(dilation)


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
    values["backbone"], values["dilation"] = _backbone_from_hf(config, source)
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
    if cfg.backbone not in TIMM_RESNETS:
        raise CheckpointError(f"model.backbone={cfg.backbone!r}: transformers' DeformableDetr has the timm "
                              f"{', '.join(TIMM_RESNETS)} backbones only; this model cannot be written as HF")
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
        "use_timm_backbone": True, "backbone": cfg.backbone, "backbone_config": None,
        "use_pretrained_backbone": False, "num_channels": 3, "return_intermediate": True,
        "disable_custom_kernels": False, "tie_word_embeddings": tie_weights,
        "id2label": id2label, "label2id": {name: int(i) for i, name in id2label.items()},
        OUR_KEY: {"version": VERSION, "model": cfg.to_dict()},
    }
    recipe = {"class_cost": cfg.set_cost_class, "bbox_cost": cfg.set_cost_bbox, "giou_cost": cfg.set_cost_giou,
              "bbox_loss_coefficient": cfg.bbox_loss_coef, "giou_loss_coefficient": cfg.giou_loss_coef}
    config.update({k: int(v) for k, v in recipe.items() if float(v).is_integer()})
    return config


# ------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------

def _hf_head_slots(cfg: ModelConfig, kind: str, index: int) -> list[str]:
    """transformers' module prefixes holding (a copy of) our head ``kind.index``: the
    top-level head, plus the decoder's copy where transformers has one (bbox heads with
    box refinement, class heads with two-stage). Without box refinement our one shared
    head is every top-level head of the decoder layers."""
    if not cfg.with_box_refine:
        return [f"{kind}.{j}." for j in range(cfg.dec_layers)]
    decoder_copy = cfg.two_stage if kind == "class_embed" else True
    return [f"{kind}.{index}."] + ([f"model.decoder.{kind}.{index}."] if decoder_copy else [])


def _tie_source(cfg: ModelConfig, slot: str) -> str | None:
    """The slot transformers ties ``slot`` to (with tie_word_embeddings): decoder copies
    are sources; top-level heads take the decoder copy where one exists, else head 0."""
    if slot.startswith("model.decoder."):
        return None
    kind, index = slot.split(".")[:2]
    if (kind == "bbox_embed" and cfg.with_box_refine) or (kind == "class_embed" and cfg.two_stage):
        return f"model.decoder.{slot}"
    return None if index == "0" else f"{kind}.0."


def _used_by_forward(cfg: ModelConfig, slot: str) -> bool:
    """Whether transformers' forward computes with this slot: top-level heads for the
    decoder layers' outputs, decoder bbox copies for refinement and the last decoder copy
    for the two-stage encoder proposals. (Two-stage: top-level head D and decoder class
    copies 0..D-1 are unused.)"""
    index = int(slot.rstrip(".").split(".")[-1])
    if slot.startswith("model.decoder.bbox_embed."):
        return True
    if slot.startswith("model.decoder.class_embed."):
        return index == cfg.dec_layers
    return index < cfg.dec_layers


def _our_head_names(cfg: ModelConfig, kind: str, index: int) -> list[str]:
    """Our state-dict prefixes of head ``kind.index`` (the decoder registers the same modules)."""
    on_decoder = (kind == "bbox_embed" and cfg.with_box_refine) or (kind == "class_embed" and cfg.two_stage)
    return [f"{kind}.{index}."] + ([f"transformer.decoder.{kind}.{index}."] if on_decoder else [])


def _head_from_hf(file_state: Mapping[str, torch.Tensor], cfg: ModelConfig, kind: str, index: int,
                  consumed: set[str], source: str) -> dict[str, torch.Tensor]:
    slots = _hf_head_slots(cfg, kind, index)
    candidates = list(dict.fromkeys(slots + [t for t in (_tie_source(cfg, s) for s in slots) if t]))
    used = [s for s in slots if _used_by_forward(cfg, s)]
    out: dict[str, torch.Tensor] = {}
    for suffix in HEAD_SUFFIXES[kind]:
        present = [s for s in candidates if s + suffix in file_state]
        if not present:
            raise CheckpointError(f"{source}: no weights for {kind}.{index}.{suffix} (looked for "
                                  f"{[s + suffix for s in candidates]})")
        consumed.update(s + suffix for s in present)
        in_use = [s for s in present if s in used]
        for other in in_use[1:]:
            if not torch.equal(file_state[in_use[0] + suffix], file_state[other + suffix]):
                raise CheckpointError(
                    f"{source}: {in_use[0] + suffix} and {other + suffix} differ (tie_word_embeddings=false?), but "
                    f"Deformable DETR computes both with one tensor ({_why_one(cfg)}); this checkpoint cannot "
                    f"be represented exactly")
        tensor = file_state[(in_use or present)[0] + suffix]
        out.update({name + suffix: tensor for name in _our_head_names(cfg, kind, index)})
    return out


def _why_one(cfg: ModelConfig) -> str:
    if not cfg.with_box_refine:
        return "without box refinement one head is shared by all decoder layers"
    return "the refining decoder uses the output box heads for its reference points"


def _normalise_hf_names(file_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.x in-memory names -> on-disk names; BatchNorm counters dropped
    (transformers' frozen BatchNorm, like ours, has none)."""
    out = {}
    for key, tensor in file_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, replacement in IN_MEMORY_TO_DISK:
            key = pattern.sub(replacement, key)
        out[key] = tensor
    return out


def state_dict_from_hf(file_state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                       source: str = "weights") -> dict[str, torch.Tensor]:
    """transformers' weights (as on disk) -> our state dict (official names), every key our
    model has: renamed parameters, q/k/v concatenated into in_proj, heads taken from the
    copy transformers computes with and listed under each of our names. Tensors are shared,
    not copied. Weights our model does not have are refused."""
    file_state = _normalise_hf_names(file_state)
    consumed: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in file_state.items():
        if HF_HEAD.match(key):
            continue
        match = HF_QKV.match(key)
        if match:
            qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = tensor
            consumed.add(key)
            continue
        ours = _rename(key, _FROM_HF)
        if ours is not None:
            state[ours] = tensor
            consumed.add(key)
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: decoder layer {layer} self_attn has only {sorted(parts)}_proj.{param}")
        state[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])
    for kind in HEAD_SUFFIXES:
        for index in range(cfg.dec_layers + int(cfg.two_stage)):
            state.update(_head_from_hf(file_state, cfg, kind, index, consumed, source))
    unknown = sorted(set(file_state) - consumed)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} weight(s) that a {ARCHITECTURE} with this config.json does "
                              f"not have (with_box_refine={cfg.with_box_refine}, two_stage={cfg.two_stage}), "
                              f"e.g. {unknown[:4]}")
    return state


def state_dict_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig,
                     tie_weights: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict -> what transformers writes to disk: on-disk names, q/k/v split, and
    with ``tie_weights`` only the heads transformers stores (tied duplicates omitted);
    without, every head copy transformers' model has. Tensors are shared, not copied."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked") or OUR_HEAD.match(key):
            continue  # BatchNorm2d counters (backbone_norm=bn): transformers' frozen BatchNorm has none
        match = OUR_QKV.match(key)
        if match:
            for name, part in zip("qkv", tensor.chunk(3)):
                out[f"model.decoder.layers.{match.group(1)}.self_attn.{name}_proj.{match.group(2)}"] = part
            continue
        theirs = _rename(key, _TO_HF)
        if theirs is None:
            raise CheckpointError(f"model weight {key!r} has no counterpart in transformers' {ARCHITECTURE}")
        out[theirs] = tensor
    for kind in HEAD_SUFFIXES:
        for index in range(cfg.dec_layers + int(cfg.two_stage)):
            slots = _hf_head_slots(cfg, kind, index) if cfg.with_box_refine else [f"{kind}.{index}."]
            for slot in slots:
                if tie_weights and _tie_source(cfg, slot) is not None:
                    continue
                for suffix in HEAD_SUFFIXES[kind]:
                    out[slot + suffix] = state[f"{kind}.{index}.{suffix}"]
    return out


def independent_class_heads(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> bool:
    """True for box refinement without two-stage when the per-layer class heads differ
    (official training): transformers ties them into head 0 unless tie_word_embeddings is off."""
    if not cfg.with_box_refine or cfg.two_stage:
        return False
    return any(not torch.equal(state[f"class_embed.{i}.{p}"], state[f"class_embed.0.{p}"])
               for i in range(1, cfg.dec_layers) for p in ("weight", "bias"))


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------

def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    try:
        with atomic_path(path) as tmp:
            write(str(tmp))
    except OutputError as error:
        raise CheckpointError(f"{error} (disk full or quota exceeded?)", exit_code=EXIT_FAILED) from error


def _prepare_folder(folder: Path) -> None:
    """Creates ``folder``; refuses one holding other weights that transformers would load
    instead of (or together with) ours."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {folder}: {error}") from error
    others = sorted(p.name for p in folder.iterdir() if p.name != WEIGHTS_NAME and (
        p.name in WEIGHTS_NAMES or p.suffix in (".safetensors", ".bin")))
    if others:
        raise CheckpointError(f"{folder}: already holds other weights {others[:4]} that transformers could load "
                              f"instead of these; write to an empty folder or remove them")


def save_hf(model: nn.Module, cfg: ModelConfig | Mapping[str, Any], folder: str | os.PathLike,
            class_names: Mapping[Any, str] | Sequence[str] | None = None, val_size: int = OFFICIAL_VAL_SIZE,
            max_size: int = OFFICIAL_MAX_SIZE) -> Path:
    """Writes ``model`` as a transformers ``save_pretrained`` folder (config.json +
    model.safetensors + preprocessor_config.json, each written atomically) that
    ``DeformableDetrForObjectDetection.from_pretrained(folder)`` loads with no missing or
    unexpected keys and no tying warnings, and that computes our outputs;
    ``AutoImageProcessor.from_pretrained(folder)`` gets our validation resize
    (``val_size``/``max_size``) and normalisation.

    ``class_names`` ({id: name} or a list) become id2label; default: the COCO names for 91
    classes ("N/A" for unused ids), else the ids as text.

    Box refinement without two-stage, with per-layer class heads that differ (as official
    training gives): transformers would tie them into one, so the folder stores every head
    copy and sets ``tie_word_embeddings=false`` (docs/model_zoo.md: what this means for
    training in transformers). Otherwise the file is what transformers writes (tied copies
    omitted, ``tie_word_embeddings=true``)."""
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict(dict(cfg.get("model", cfg)), validate=False)
    state = model.state_dict()
    tie = not independent_class_heads(state, cfg)
    config = hf_config_from(cfg, class_names, tie_weights=tie)
    # safetensors refuses tensors that share memory (our tied heads, q/k/v views): one copy each.
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict_to_hf(state, cfg, tie).items()}
    folder = Path(folder)
    _prepare_folder(folder)
    _write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _write_atomically(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    processor = json.dumps(image_processor_config(val_size, max_size), indent=2, sort_keys=True) + "\n"
    _write_atomically(folder / PREPROCESSOR_NAME, lambda tmp: Path(tmp).write_text(processor, encoding="utf-8"))
    return folder
