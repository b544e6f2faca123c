"""DAT, the Vision Transformer with Deformable Attention (Xia et al., CVPR 2022),
and its use as a Deformable DETR backbone.

``DAT(**official_config)`` takes the keyword arguments of the official
``MODEL.DAT`` configuration, names its parameters and buffers like the official
code (so ``dat_*_in1k_*.pth`` files load strictly), and computes the same
function at the construction size. Unlike the official code it runs at any
input size (docs/dat.md lists every difference). Not DAT++.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from detr_deform.io.checkpoint import CheckpointError, read_checkpoint
from detr_deform.layers.dat_blocks import DeformableAttention2d, LayerNormProxy, LocalAttention, TransformerMLP
from detr_deform.utils.nested_tensor import NestedTensor, mask_to_feature

_COMMON = dict(img_size=224, patch_size=4, expansion=4, window_sizes=[7, 7, 7, 7], use_pes=[False, False, True, True],
               strides=[-1, -1, 1, 1], offset_range_factor=[-1, -1, 2, 2], dwc_pes=[False] * 4,
               fixed_pes=[False] * 4, no_offs=[False] * 4, use_dwc_mlps=[False] * 4, use_conv_patches=False,
               drop_rate=0.0, attn_drop_rate=0.0, sr_ratios=[-1, -1, -1, -1])
DAT_PRESETS: dict[str, dict[str, Any]] = {
    "dat_tiny": dict(_COMMON, dim_stem=96, dims=[96, 192, 384, 768], depths=[2, 2, 6, 2], heads=[3, 6, 12, 24],
                     groups=[-1, -1, 3, 6], drop_path_rate=0.2,
                     stage_spec=[["L", "S"], ["L", "S"], ["L", "D"] * 3, ["L", "D"]]),
    "dat_small": dict(_COMMON, dim_stem=96, dims=[96, 192, 384, 768], depths=[2, 2, 18, 2], heads=[3, 6, 12, 24],
                      groups=[-1, -1, 3, 6], drop_path_rate=0.3,
                      stage_spec=[["L", "S"], ["L", "S"], ["L", "D"] * 9, ["L", "D"]]),
    "dat_base": dict(_COMMON, dim_stem=128, dims=[128, 256, 512, 1024], depths=[2, 2, 18, 2], heads=[4, 8, 16, 32],
                     groups=[-1, -1, 4, 8], drop_path_rate=0.5,
                     stage_spec=[["L", "S"], ["L", "S"], ["L", "D"] * 9, ["L", "D"]]),
}
STRIDE = 32  # total down-sampling; inputs are padded to a multiple of it


class DATStage(nn.Module):
    """Optional 1x1 input projection, then pre-norm residual blocks (L, S or D)."""

    def __init__(self, stage_index: int, fmap_size: tuple[int, int], window: int, dim_in: int, dim: int,
                 depth: int, spec: Sequence[str], heads: int, groups: int, use_pe: bool, stride: int,
                 offset_range_factor: float, expansion: int, drop: float, attn_drop: float,
                 drop_path_rates: Sequence[float]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim_in, dim, 1) if dim_in != dim else nn.Identity()
        self.layer_norms = nn.ModuleList(LayerNormProxy(dim) for _ in range(2 * depth))
        self.mlps = nn.ModuleList(TransformerMLP(dim, expansion, drop) for _ in range(depth))
        attns = []
        for letter in spec:
            if letter in ("L", "S"):
                attns.append(LocalAttention(dim, heads, window, attn_drop, drop, shifted=letter == "S",
                                            fmap_size=fmap_size))
            elif letter == "D":
                attns.append(DeformableAttention2d(dim, heads, groups, attn_drop, drop, stride, offset_range_factor,
                                                   use_pe, stage_index, fmap_size))
            else:
                raise ValueError(f"DAT stage_spec letters are L, S and D, got {letter!r}")
        self.attns = nn.ModuleList(attns)
        self.drop_path = nn.ModuleList(StochasticDepth(rate, "row") if rate > 0 else nn.Identity()
                                       for rate in drop_path_rates)
        self.grad_checkpointing = False

    def _block(self, x: torch.Tensor, index: int) -> torch.Tensor:
        x = x + self.drop_path[index](self.attns[index](self.layer_norms[2 * index](x)))
        return x + self.drop_path[index](self.mlps[index](self.layer_norms[2 * index + 1](x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for index in range(len(self.attns)):
            if self.grad_checkpointing and self.training and x.requires_grad:
                x = checkpoint(self._block, x, index, use_reentrant=False)
            else:
                x = self._block(x, index)
        return x


class DAT(nn.Module):
    """DAT with the official constructor arguments (see ``DAT_PRESETS`` for the
    released configurations). ``num_classes=0`` builds no classifier
    (``cls_norm``/``cls_head``), as a detection backbone needs none.

    ``forward_features(x)``: (B, 3, H, W) -> the four raw stage outputs
    [(B, dims[i], H/4/2^i, W/4/2^i)] at strides 4/8/16/32; any H, W (padded
    bottom/right with zeros to a multiple of 32 first). ``forward(x)``: logits
    (B, num_classes) (the official forward also returns sampling positions).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 4, num_classes: int = 1000, expansion: int = 4,
                 dim_stem: int = 96, dims: Sequence[int] = (96, 192, 384, 768), depths: Sequence[int] = (2, 2, 6, 2),
                 heads: Sequence[int] = (3, 6, 12, 24), window_sizes: Sequence[int] = (7, 7, 7, 7),
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 strides: Sequence[int] = (-1, -1, -1, -1), offset_range_factor: Sequence[float] = (1, 2, 3, 4),
                 stage_spec: Sequence[Sequence[str]] = (("L", "D"), ("L", "D"), ("L", "D", "L", "D", "L", "D"),
                                                        ("L", "D")),
                 groups: Sequence[int] = (-1, -1, 3, 6), use_pes: Sequence[bool] = (False,) * 4,
                 dwc_pes: Sequence[bool] = (False,) * 4, sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 fixed_pes: Sequence[bool] = (False,) * 4, no_offs: Sequence[bool] = (False,) * 4,
                 ns_per_pts: Sequence[int] = (4,) * 4, use_dwc_mlps: Sequence[bool] = (False,) * 4,
                 use_conv_patches: bool = False, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"DAT got unknown argument(s) {sorted(unknown)} (official MODEL.DAT keys only)")
        for name, flags in (("dwc_pes", dwc_pes), ("fixed_pes", fixed_pes), ("no_offs", no_offs),
                            ("use_dwc_mlps", use_dwc_mlps)):
            if any(flags):
                raise NotImplementedError(f"DAT {name}=True is not supported: no released model uses it (and the "
                                          f"official code crashes with fixed_pes/no_offs)")
        for name, values in (("dims", dims), ("depths", depths), ("heads", heads), ("window_sizes", window_sizes),
                             ("strides", strides), ("offset_range_factor", offset_range_factor),
                             ("stage_spec", stage_spec), ("groups", groups), ("use_pes", use_pes)):
            if len(values) != 4:
                raise ValueError(f"DAT {name} needs 4 entries (one per stage), got {list(values)}")
        for index, (spec, depth) in enumerate(zip(stage_spec, depths)):
            if len(spec) != depth:
                raise ValueError(f"DAT stage_spec[{index}] has {len(spec)} letters but depths[{index}] = {depth}")
        self.config = dict(img_size=img_size, patch_size=patch_size, dims=list(dims), depths=list(depths))
        self.dims = list(dims)
        if use_conv_patches:
            stem = nn.Conv2d(3, dim_stem, 7, patch_size, 3)
        else:
            stem = nn.Conv2d(3, dim_stem, patch_size, patch_size)
        self.patch_proj = nn.Sequential(stem, LayerNormProxy(dim_stem))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, start = [], 0
        fmap = img_size // patch_size
        for index in range(4):
            dim_in = dim_stem if index == 0 else dims[index - 1] * 2
            stages.append(DATStage(index, (fmap, fmap), window_sizes[index], dim_in, dims[index], depths[index],
                                   stage_spec[index], heads[index], groups[index], use_pes[index], strides[index],
                                   offset_range_factor[index], expansion, drop_rate, attn_drop_rate,
                                   rates[start:start + depths[index]]))
            start += depths[index]
            fmap //= 2
        self.stages = nn.ModuleList(stages)
        kernel, padding = (3, 1) if use_conv_patches else (2, 0)
        self.down_projs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], kernel, 2, padding, bias=False), LayerNormProxy(dims[i + 1]))
            for i in range(3))
        if num_classes > 0:
            self.cls_norm = LayerNormProxy(dims[-1])
            self.cls_head = nn.Linear(dims[-1], num_classes)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        for stage in self.stages:
            stage.grad_checkpointing = enabled

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % STRIDE, (-width) % STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_proj(x)
        outputs = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            outputs.append(x)
            if index < 3:
                x = self.down_projs[index](x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "cls_head"):
            raise RuntimeError("this DAT was built with num_classes=0 (no classifier); use forward_features")
        features = self.cls_norm(self.forward_features(x)[-1])
        return self.cls_head(features.mean(dim=(2, 3)))


def build_dat(preset: str, **overrides: Any) -> DAT:
    """A released configuration (dat_tiny | dat_small | dat_base), optionally changed."""
    if preset not in DAT_PRESETS:
        raise ValueError(f"unknown DAT preset {preset!r}; choose one of {sorted(DAT_PRESETS)}")
    return DAT(**{**DAT_PRESETS[preset], **overrides})


def dat_state_dict_of(content: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a DAT checkpoint (official: under 'model'), with a clear
    refusal of DAT++ files, which reuse the same key names for another model."""
    state = content.get("model", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no DAT state dict found (expected the official dict with a 'model' entry)")
    stem = state.get("patch_proj.0.weight")
    dat_pp = (stem is not None and (stem.shape[0] == 64 or stem.shape[-1] != 4)) or \
        any(".local_perception" in k or "layer_scale" in k or k.startswith("patch_proj.1.weight") for k in state)
    if dat_pp or "dat_pp" in Path(path).name:
        raise CheckpointError(
            f"{path}: this looks like a DAT++ checkpoint (dat_pp_*: conv stem, widths 64/128/256/512, neighbourhood-"
            f"attention blocks). DAT++ is a different model that reuses DAT's file and key names; only the CVPR 2022 "
            f"DAT checkpoints (dat_tiny/small/base_in1k_*.pth) are supported")
    return state


def load_dat_checkpoint(model: DAT, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Loads an official DAT checkpoint. ``strict``: every key, buffers included,
    must match (the classifier too, unless the model has none, in which case
    ``cls_norm``/``cls_head`` are dropped). Returns the missing/unexpected keys."""
    state = dict(dat_state_dict_of(read_checkpoint(path), path))
    if not hasattr(model, "cls_head"):
        state = {k: v for k, v in state.items() if not k.startswith(("cls_head.", "cls_norm."))}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                         for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if strict and (missing or unexpected or wrong_shape):
        raise CheckpointError(
            f"{path}: does not match this DAT configuration (dims {model.dims}, depths {model.config['depths']}): "
            f"{len(missing)} missing {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}, "
            f"{len(wrong_shape)} of another shape {wrong_shape[:3]}. Pick the preset of the file "
            f"(dat_tiny/dat_small/dat_base) and its img_size")
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": wrong_shape}


class DATBackbone(nn.Module):
    """DAT as a Deformable DETR backbone: the stages ``out_indices`` (default
    2-4: strides 8/16/32), each followed by a new LayerNorm (``out_norms``),
    with padding masks per level.

    Each image of a batch runs at its own size (rounded up to a multiple of 32)
    and its features are then zero-padded to the batch size, so an image's
    features do not depend on what it is batched with (window shifts, reference
    grids and deformable sampling all depend on the map size).
    """

    def __init__(self, preset: str = "dat_tiny", out_indices: Sequence[int] = (1, 2, 3),
                 drop_path_rate: float | None = None, grad_checkpointing: bool = False,
                 pretrained: str | None = None, train_backbone: bool = True,
                 dat_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        overrides = dict(dat_kwargs or {})
        if drop_path_rate is not None:
            overrides["drop_path_rate"] = drop_path_rate
        self.body = build_dat(preset, num_classes=0, **overrides)
        self.load_report: dict[str, list[str]] | None = None
        if pretrained:
            if not Path(pretrained).is_file():
                raise CheckpointError(f"model.pretrained_backbone: backbone weights file not found: {pretrained} "
                                      f"(set it to a local dat_*_in1k_*.pth)")
            self.load_report = load_dat_checkpoint(self.body, pretrained, strict=False)
            report = self.load_report
            if report["missing"] or report["unexpected"] or report["shape_mismatch"]:
                warnings.warn(f"DAT weights {pretrained}: kept the model's own values for {len(report['missing'])} "
                              f"missing keys {report['missing'][:4]} and {len(report['shape_mismatch'])} of another "
                              f"shape {report['shape_mismatch'][:2]}; ignored {len(report['unexpected'])} unexpected "
                              f"keys {report['unexpected'][:4]}", stacklevel=2)
        if any(i not in range(4) for i in out_indices) or list(out_indices) != sorted(set(out_indices)):
            raise ValueError(f"DAT out_indices must be increasing stage indices in 0..3, got {list(out_indices)}")
        self.out_indices = list(out_indices)
        self.strides = [4 * 2 ** i for i in self.out_indices]
        self.num_channels = [self.body.dims[i] for i in self.out_indices]
        self.out_norms = nn.ModuleList(LayerNormProxy(c) for c in self.num_channels)
        self.body.set_grad_checkpointing(grad_checkpointing)
        if not train_backbone:
            for parameter in self.body.parameters():
                parameter.requires_grad_(False)

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        images, mask = tensor_list.tensors, tensor_list.mask
        batch, _, height, width = images.shape
        padded_h, padded_w = math.ceil(height / STRIDE) * STRIDE, math.ceil(width / STRIDE) * STRIDE
        valid_h = (~mask[:, :, 0]).sum(1).tolist()
        valid_w = (~mask[:, 0, :]).sum(1).tolist()
        own = [(math.ceil(h / STRIDE) * STRIDE, math.ceil(w / STRIDE) * STRIDE) for h, w in zip(valid_h, valid_w)]
        outputs = [images.new_zeros(batch, self.body.dims[i], padded_h // s, padded_w // s)
                   for i, s in zip(self.out_indices, self.strides)]
        for size in sorted(set(own)):
            members = [b for b in range(batch) if own[b] == size]
            crop = images[members, :, :size[0], :size[1]]
            features = self.body.forward_features(crop)
            for slot, index in enumerate(self.out_indices):
                level = features[index]
                outputs[slot][members, :, :level.shape[-2], :level.shape[-1]] = level
        full_mask = F.pad(mask, (0, padded_w - width, 0, padded_h - height), value=True)
        return [NestedTensor(norm(x), mask_to_feature(full_mask, x.shape[-2:]))
                for norm, x in zip(self.out_norms, outputs)]
