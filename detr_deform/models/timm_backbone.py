"""Any timm model with ``features_only`` support as the detection backbone
(``model.backbone=timm model.timm_name=<name>``; docs/backbones.md).

Channels and strides come from timm's ``feature_info``. Transformer backbones that
support it (Swin, ViT-style ``dynamic_img_size``) are built for any input size; their
batch is padded (and its mask with it) to a multiple of the largest stride so that
every stage's patches and windows tile it. Convolutional backbones see the batch as it
is (as in transformers' DeformableDetr with a timm backbone: the same outputs).
Channels-last outputs (NHWC) are permuted to NCHW.

``pretrained``: timm's own pretrained weights (``timm``), those of a Hugging Face hub
repository (``hf-hub:<repo>``, loaded by timm for this architecture), or a local file.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from detr_deform.utils.nested_tensor import NestedTensor, mask_to_feature


class TimmMissingError(ImportError):
    pass


def _timm():
    try:
        import timm
    except ImportError as error:
        raise TimmMissingError("model.backbone=timm needs timm: pip install 'detr_deform[timm]' (or pip install "
                               "timm)") from error
    return timm


def _create(name: str, **kwargs) -> tuple[nn.Module, bool]:
    """The features_only model, and whether it was built for any input size by padding
    (a transformer: its patches and windows must tile the input)."""
    timm = _timm()
    if not timm.is_model(name):
        raise ValueError(f"model.timm_name={name!r} is not a timm model (timm.list_models('*{name[:6]}*') lists "
                         f"similar names)")
    try:  # any input size for transformers that can take it (Swin, ViT-style dynamic_img_size)
        return timm.create_model(name, features_only=True, strict_img_size=False, dynamic_img_size=True,
                                 **kwargs), True
    except TypeError:
        pass
    try:
        return timm.create_model(name, features_only=True, **kwargs), False
    except RuntimeError as error:  # "features_only not implemented for ..."
        raise ValueError(f"model.timm_name={name}: timm cannot build it with features_only ({error})") from None


def _pretrained_kwargs(pretrained: str | None) -> dict:
    """timm.create_model arguments for ``pretrained``: timm's weights, a hub repository's, or none
    (a local file is loaded after building)."""
    if pretrained == "timm":
        return {"pretrained": True}
    if pretrained is not None and pretrained.startswith("hf-hub:"):
        return {"pretrained": True, "pretrained_cfg_overlay": {"hf_hub_id": pretrained[len("hf-hub:"):]}}
    return {"pretrained": False}


def default_out_indices(reductions: Sequence[int], multi_scale: bool) -> list[int]:
    """The stages with strides 8, 16, 32 (multi-scale) or the last one."""
    if not multi_scale:
        return [len(reductions) - 1]
    return [reductions.index(s) for s in (8, 16, 32) if s in reductions]


class TimmBackbone(nn.Module):
    """
    Args:
        name: a timm model name (e.g. convnext_tiny, swin_tiny_patch4_window7_224, resnet50d).
        out_indices: feature_info indices to return; None: strides 8/16/32 (or the last).
        multi_scale: the default's choice (model.num_feature_levels > 1).
        pretrained: None, "timm" (timm's pretrained weights: downloads, or the HF hub cache
            offline), or a local .pth / .safetensors state dict of the timm model.
        train_backbone: False freezes every parameter.
        freeze_stem_and_layer1: freeze everything up to the first stride-4 stage (the
            official ResNet rule, applied to any timm model).
        frozen_bn: BatchNorm layers as FrozenBatchNorm2d (BN models; the official choice).
        grad_checkpointing: timm's set_grad_checkpointing (memory for recomputation).
        kwargs: more timm.create_model arguments (e.g. drop_path_rate).
    """

    def __init__(self, name: str, out_indices: Sequence[int] | None = None, multi_scale: bool = True,
                 pretrained: str | None = None, train_backbone: bool = True, freeze_stem_and_layer1: bool = False,
                 frozen_bn: bool = False, grad_checkpointing: bool = False, kwargs: dict | None = None) -> None:
        super().__init__()
        kwargs = dict(kwargs or {})
        probe, padded = _create(name, pretrained=False, **kwargs)
        reductions, channels = probe.feature_info.reduction(), probe.feature_info.channels()
        indices = list(out_indices) if out_indices is not None else default_out_indices(reductions, multi_scale)
        if not indices or any(i not in range(len(reductions)) for i in indices) or indices != sorted(set(indices)):
            raise ValueError(f"model.backbone_out_indices={indices} for timm model {name}: it has {len(reductions)} "
                             f"feature stages with strides {reductions}; give increasing indices in "
                             f"0..{len(reductions) - 1} (the default takes strides 8/16/32)")
        if out_indices is None and multi_scale and len(indices) < 3:
            raise ValueError(f"timm model {name} has strides {reductions}, not 8, 16 and 32; choose its stages with "
                             f"model.backbone_out_indices")
        del probe
        remote = _pretrained_kwargs(pretrained)
        try:
            self.body, _ = _create(name, out_indices=tuple(indices), **remote, **kwargs)
        except (OSError, ValueError, RuntimeError) as error:  # offline without the weights in the hub cache, ...
            if not remote["pretrained"]:
                raise
            raise _weights_error(name, pretrained, error) from None
        if not remote["pretrained"] and pretrained is not None:
            _load_local(self.body, pretrained)
        self.out_indices = indices
        self.strides = [reductions[i] for i in indices]
        self.num_channels = [channels[i] for i in indices]
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self.pad_multiple = max(self.strides) if padded else 1
        if frozen_bn:
            from timm.layers import freeze_batch_norm_2d
            self.body = freeze_batch_norm_2d(self.body)
        if grad_checkpointing:
            if not hasattr(self.body, "set_grad_checkpointing"):
                raise ValueError(f"model.backbone_grad_checkpointing=true: timm model {name} has no gradient "
                                 f"checkpointing")
            self.body.set_grad_checkpointing(True)
        if freeze_stem_and_layer1:
            self._freeze_to_stride_4(reductions)
        if not train_backbone:
            for parameter in self.body.parameters():
                parameter.requires_grad_(False)

    def _freeze_to_stride_4(self, reductions: Sequence[int]) -> None:
        """Freezes the body's modules up to and including the first stage of stride >= 4
        (timm's feature_info lists every stage with its module; features_only bodies name
        their children with "_" for ".")."""
        modules = [info["module"] for info in self.body.feature_info.info]
        last = next((m for m, r in zip(modules, reductions) if r >= 4), modules[0]).replace(".", "_")
        for child_name, child in self.body.named_children():
            child.requires_grad_(False)
            if child_name == last:
                break

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        x, mask = tensor_list.tensors, tensor_list.mask
        pad_h, pad_w = (-x.shape[-2]) % self.pad_multiple, (-x.shape[-1]) % self.pad_multiple
        if pad_h or pad_w:  # padding, masked like the batch's own
            x = F.pad(x, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=True)
        features = self.body(x)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return [NestedTensor(f, mask_to_feature(mask, f.shape[-2:])) for f in features]


def _weights_error(name: str, pretrained: str, error: Exception) -> Exception:
    """One line: the weights timm could not get, and how to put them in the hub cache."""
    from detr_deform.io.checkpoint import CheckpointError
    from detr_deform.io.hub import prefetch_hint

    if pretrained == "timm":
        fetch = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    else:
        fetch = prefetch_hint(pretrained[len("hf-hub:"):])
    return CheckpointError(
        f"model.pretrained_backbone={pretrained}: timm could not get the weights of {name} ({type(error).__name__}: "
        f"{str(error).splitlines()[0][:160]}); where there is internet, fill the Hugging Face hub cache with `{fetch}` "
        f"(offline runs read it, HF_HUB_OFFLINE=1), or give a local weights file")


def _load_local(model: nn.Module, path: str) -> None:
    """A local state dict of the timm model (its classifier keys ignored), strictly for the rest."""
    from detr_deform.io.checkpoint import CheckpointError, read_checkpoint

    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"model.pretrained_backbone: backbone weights file not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(file))
    else:
        state = read_checkpoint(file)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    # features_only models name modules with "_" where the full model has "."
    renamed = {}
    for key, value in state.items():
        candidates = [key] + [key.replace(".", "_", i) for i in range(1, 3)]
        match = next((c for c in candidates if c in own), None)
        if match is not None:
            renamed[match] = value
    missing = [k for k in own if k not in renamed and not k.endswith("num_batches_tracked")]
    wrong = [k for k in renamed if tuple(renamed[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        raise CheckpointError(f"model.pretrained_backbone={file}: {len(missing)} backbone tensor(s) missing (e.g. "
                              f"{missing[:3]}) and {len(wrong)} of another shape (e.g. {wrong[:2]}); is it a "
                              f"state dict of the same timm model?")
    model.load_state_dict(renamed, strict=False)
