"""ResNet backbone returning C3-C5 (or C5) with per-level padding masks, and the
Joiner that pairs it with the position embedding (official module layout:
``backbone.0.body.*`` for ResNet weights, ``backbone.1`` for the embedding).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from detr_deform.io.checkpoint import CheckpointError, read_checkpoint, state_dict_of
from detr_deform.io.hub import hub_file, torchvision_state_dict, torchvision_weights
from detr_deform.models.config import BACKBONE_NORMS, RESNET_BACKBONES
from detr_deform.utils.nested_tensor import NestedTensor, mask_to_feature


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm in ("bn", "sync_bn"):
        # SyncBatchNorm conversion happens in the training engine when distributed.
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"backbone norm must be one of {BACKBONE_NORMS}, got {norm!r}")


def _out_channels(layer: nn.Module) -> int:
    return [m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class ResNetBackbone(nn.Module):
    """torchvision ResNet as a multi-scale feature extractor.

    Args:
        name: resnet18 | resnet34 | resnet50 | resnet101.
        train_backbone: False freezes every parameter (official: lr_backbone <= 0).
        return_interm_layers: True returns layer2-4 (strides 8/16/32), else layer4 only.
        out_indices: the layers returned instead (0 = layer1 … 3 = layer4), e.g. [0, 1, 2, 3]
            for DINO-5scale (layer1, stride 4, stays frozen with the stem).
        dilation: DC5, dilation instead of stride in layer4 (Bottleneck ResNets only).
        norm: frozen_bn (official) | bn | sync_bn | gn (trainable, for training from scratch).
        freeze_stem_and_layer1: official behaviour; disable when training from scratch.
        pretrained: None; a local torchvision-format ResNet state dict (.pth / .safetensors);
            "torchvision" (IMAGENET1K_V1, the weights of the official code's
            ``pretrained=True``) or "torchvision:<weights>" (e.g. IMAGENET1K_V2), through the
            torch hub cache; "hf-hub:<repo>" (a timm ResNet's weights, e.g.
            hf-hub:timm/resnet50.a1_in1k: timm's ResNets use torchvision's names), through
            the Hugging Face hub cache.
    """

    def __init__(self, name: str = "resnet50", train_backbone: bool = True, return_interm_layers: bool = True,
                 dilation: bool = False, norm: str = "frozen_bn", freeze_stem_and_layer1: bool = True,
                 pretrained: str | None = None, out_indices: list[int] | None = None) -> None:
        super().__init__()
        if name not in RESNET_BACKBONES:
            raise ValueError(f"ResNetBackbone: name must be one of {RESNET_BACKBONES}, got {name!r}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a Bottleneck ResNet (resnet50/101); {name} uses BasicBlock")
        from_torchvision = pretrained is not None and (pretrained == "torchvision" or
                                                       pretrained.startswith("torchvision:"))
        if from_torchvision and norm != "frozen_bn":
            raise ValueError(f"pretrained={pretrained!r} requires norm='frozen_bn'")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=_norm_layer(norm)
        )
        if from_torchvision:
            choice = "IMAGENET1K_V1" if pretrained == "torchvision" else pretrained[len("torchvision:"):]
            weights = torchvision_weights(choice, name)
            resnet.load_state_dict(torchvision_state_dict(weights, f"model.pretrained_backbone={pretrained}"))
        elif pretrained is not None and pretrained.startswith("hf-hub:"):
            load_resnet_weights(resnet, str(hub_file(pretrained[len("hf-hub:"):])), pretrained)
        elif pretrained is not None:
            load_resnet_weights(resnet, pretrained)
        for param_name, parameter in resnet.named_parameters():
            trainable_layer = any(f"layer{i}" in param_name for i in (2, 3, 4)) or not freeze_stem_and_layer1
            if not train_backbone or not trainable_layer:
                parameter.requires_grad_(False)
        if out_indices is None:
            out_indices = [1, 2, 3] if return_interm_layers else [3]
        return_layers = {f"layer{index + 1}": str(k) for k, index in enumerate(out_indices)}
        self.strides = [4 * 2 ** index for index in out_indices]
        self.num_channels = [_out_channels(getattr(resnet, f"layer{index + 1}")) for index in out_indices]
        if dilation:
            self.strides[-1] = self.strides[-1] // 2
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        features = self.body(tensor_list.tensors)
        return [NestedTensor(x, mask_to_feature(tensor_list.mask, x.shape[-2:])) for _, x in sorted(features.items())]


def load_resnet_weights(resnet: nn.Module, path: str, source: str | None = None) -> None:
    """Loads a torchvision-format ResNet state dict (.pth, or .safetensors; fc weights
    ignored), read safely like every checkpoint; CheckpointError naming the file (or
    ``source``, the name it was fetched by) otherwise."""
    if not Path(path).is_file():
        raise CheckpointError(f"model.pretrained_backbone: backbone weights file not found: {path} "
                              f"(set it to a local torchvision-format ResNet .pth)")
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = state_dict_of(read_checkpoint(path), path)
    path = source or path
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = resnet.state_dict()
    wrong_shape = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                   for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    # FrozenBatchNorm2d has no num_batches_tracked; torchvision's files do (dropped on load).
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"model.pretrained_backbone={path}: does not fit the {type(resnet).__name__} "
            f"({len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong_shape)} of another shape {wrong_shape[:2]}); is it the weights of another ResNet depth?")
    resnet.load_state_dict(state, strict=False)


class Joiner(nn.Sequential):
    """(backbone, position_embedding) -> (features, position embeddings) per level."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[torch.Tensor]]:
        features = self[0](tensor_list)
        pos = [self[1](x).to(x.tensors.dtype) for x in features]
        return features, pos
