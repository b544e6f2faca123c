"""Parameter names and layouts, ours (= official) <-> transformers' ``DeformableDetrForObjectDetection``
on disk (transformers 5.x; docs/model_zoo.md):

- Names on disk are transformers' pre-5.0 names (``model.backbone.conv_encoder.model.*``,
  ``self_attn.out_proj``, ``layers.N.fc1``), not its 5.x in-memory names (both are read).
- The decoder self-attention stores q/k/v separately; nn.MultiheadAttention one in_proj.
- Tied duplicates are not on disk; which copy is stored depends on the variant and on
  ``tie_word_embeddings`` (:func:`_tie_source` is transformers' tying table).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from detr_deform.io.checkpoint import CheckpointError
from detr_deform.loading.hf_config import ARCHITECTURE
from detr_deform.models.config import ModelConfig

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


