"""timm backbones (model.backbone=timm): strides and channels from feature_info, any input
size (Swin included), the freezing rules, local weights, errors in one line, and a training
step of Deformable DETR and DINO on one. Tiny timm models, built here (no download)."""
import sys

import pytest
import timm  # a dev dependency (the README's set-up); users get it with the [timm] extra
import torch

from detr_deform import build_criterion, build_model
from detr_deform.engine.steps import train_step
from detr_deform.io.checkpoint import CheckpointError
from detr_deform.models.timm_backbone import TimmBackbone, TimmMissingError
from detr_deform.utils.nested_tensor import nested_tensor_from_tensor_list

from model_helpers import random_targets, tiny_config


def _batch():
    return nested_tensor_from_tensor_list([torch.randn(3, 90, 121), torch.randn(3, 100, 70)])


@pytest.mark.parametrize("name, channels, sizes", [
    # a ConvNet sees the batch (100 x 121) as it is, as in transformers' DeformableDetr: floor at each stride
    ("convnext_atto", [80, 160, 320], [(12, 15), (6, 7), (3, 3)]),
    # a transformer gets it padded to a multiple of 32 (128 x 128), its mask with it, so that windows tile it
    ("swin_tiny_patch4_window7_224", [192, 384, 768], [(16, 16), (8, 8), (4, 4)])])
def test_stages_of_strides_8_16_32_at_any_input_size(name, channels, sizes):
    backbone = TimmBackbone(name)
    assert backbone.strides == [8, 16, 32] and backbone.num_channels == channels
    batch = _batch()
    features = backbone(batch)
    for channel, size, feature in zip(channels, sizes, features):
        assert feature.tensors.shape == (2, channel, *size)
        assert feature.mask.shape == (2, *size)
        assert feature.mask[1, :, -1].all() and not feature.mask[0, 0, 0]  # image 1 is 70 wide: padding


def test_the_freezing_rules():
    backbone = TimmBackbone("resnet18d", freeze_stem_and_layer1=True, frozen_bn=True)
    frozen = {n.split(".")[0] for n, p in backbone.body.named_parameters() if not p.requires_grad}
    trained = {n.split(".")[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}  # the official ResNet rule
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())  # FrozenBatchNorm2d instead
    assert not any(p.requires_grad for p in TimmBackbone("convnext_atto", train_backbone=False).parameters())
    assert TimmBackbone("convnext_atto", multi_scale=False).strides == [32]


def test_bad_stages_and_names_are_one_line():
    with pytest.raises(ValueError, match=r"it has 4 feature stages with strides \[4, 8, 16, 32\]; give increasing"):
        TimmBackbone("convnext_atto", out_indices=[2, 7])
    with pytest.raises(ValueError, match="model.timm_name='convnext_nano_typo' is not a timm model"):
        TimmBackbone("convnext_nano_typo")
    with pytest.raises(ValueError, match="model.backbone=timm needs model.timm_name"):
        tiny_config(backbone="timm")
    with pytest.raises(ValueError, match="set model.backbone_norm=frozen_bn"):
        tiny_config(backbone="timm", timm_name="convnext_atto", backbone_norm="gn")


def test_missing_timm_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(TimmMissingError, match=r"needs timm: pip install 'detr_deform\[timm\]'"):
        TimmBackbone("convnext_atto")


def test_local_weights_of_the_full_timm_model_load(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("convnext_atto", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "atto.pth")
    backbone = TimmBackbone("convnext_atto", pretrained=str(tmp_path / "atto.pth"))
    assert torch.equal(backbone.body.state_dict()["stages_1.blocks.0.conv_dw.weight"],
                       full.state_dict()["stages.1.blocks.0.conv_dw.weight"])
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="backbone tensor.s. missing"):
        TimmBackbone("convnext_atto", pretrained=str(tmp_path / "other.pth"))


@pytest.mark.parametrize("arch", ["deformable_detr", "dino"])
def test_a_training_step_on_a_timm_backbone(arch):
    torch.manual_seed(0)
    extra = {"with_box_refine": True, "two_stage": True} if arch == "deformable_detr" else {"arch": "dino"}
    cfg = tiny_config(backbone="timm", timm_name="convnext_atto", backbone_norm="bn", **extra)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = model.backbone[0].body.stages_3.blocks[0].conv_dw.weight.clone()
    values, total, norm = train_step(model, criterion, [torch.randn(3, 96, 128), torch.randn(3, 80, 96)],
                                     random_targets([2, 1]), optimizer, 0.1)
    assert torch.isfinite(torch.tensor(total)) and torch.isfinite(norm)
    assert not torch.equal(before, model.backbone[0].body.stages_3.blocks[0].conv_dw.weight)  # trained


def test_timm_weights_missing_offline_are_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1: no network
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(CheckpointError, match=r"model.pretrained_backbone=timm: timm could not get the weights of "
                                              r"convnext_atto .*fill the Hugging Face hub cache with"):
        TimmBackbone("convnext_atto", pretrained="timm")
