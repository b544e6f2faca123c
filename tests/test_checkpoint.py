"""Checkpoints: official model-zoo format, ours, fine-tuning init, unsafe files."""
import argparse
import math
import os
import pickle

import pytest
import torch

import detr_deform
from detr_deform import CheckpointError, build_model, init_from, load_model, save_checkpoint

from model_helpers import TINY, VARIANTS, tiny_config


def official_args(**overrides) -> argparse.Namespace:
    """The argparse.Namespace stored in official checkpoints (official defaults)."""
    values = dict(lr=2e-4, lr_backbone_names=["backbone.0"], lr_backbone=2e-5,
                  lr_linear_proj_names=["reference_points", "sampling_offsets"], lr_linear_proj_mult=0.1,
                  batch_size=2, weight_decay=1e-4, epochs=50, lr_drop=40, lr_drop_epochs=None, clip_max_norm=0.1,
                  sgd=False, with_box_refine=False, two_stage=False, frozen_weights=None, backbone="resnet50",
                  dilation=False, position_embedding="sine", position_embedding_scale=2 * math.pi,
                  num_feature_levels=4, enc_layers=6, dec_layers=6, dim_feedforward=1024, hidden_dim=256,
                  dropout=0.1, nheads=8, num_queries=300, dec_n_points=4, enc_n_points=4, masks=False,
                  aux_loss=True, set_cost_class=2, set_cost_bbox=5, set_cost_giou=2, mask_loss_coef=1,
                  dice_loss_coef=1, cls_loss_coef=2, bbox_loss_coef=5, giou_loss_coef=2, focal_alpha=0.25,
                  dataset_file="coco", coco_path="./data/coco", coco_panoptic_path=None, remove_difficult=False,
                  output_dir="exps/r50_deformable_detr", device="cuda", seed=42, resume="", start_epoch=0,
                  eval=False, num_workers=2, cache_mode=False, world_size=8, dist_url="env://", distributed=True)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_checkpoint_round_trip(tmp_path, variant):
    """A file in the official layout (model + args Namespace + optimizer, ...) loads
    strictly into the variant its args describe and reproduces the outputs."""
    cfg = tiny_config(**VARIANTS[variant])
    torch.manual_seed(1)
    source = build_model(cfg).eval()
    official_fields = {k: v for k, v in TINY.items() if k != "num_classes"}
    args = official_args(**official_fields, **{k: v for k, v in VARIANTS[variant].items()})
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 3}, "epoch": 3, "args": args}, path)

    model, loaded_cfg = load_model(path)
    assert not model.training
    assert loaded_cfg.num_classes == cfg.num_classes  # read from the class head, not dataset_file
    assert (loaded_cfg.with_box_refine, loaded_cfg.two_stage, loaded_cfg.num_feature_levels) == (
        cfg.with_box_refine, cfg.two_stage, cfg.num_feature_levels)
    images = [torch.randn(3, 64, 64), torch.randn(3, 40, 56)]
    with torch.no_grad():
        expected, got = source(images), model(images)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)


def test_our_checkpoint_round_trip(tmp_path):
    cfg = tiny_config(with_box_refine=True)
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "run" / "last.pth", model, cfg, epoch=2)
    loaded, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_variant_mismatch_is_reported(tmp_path):
    cfg = tiny_config(with_box_refine=True)
    path = save_checkpoint(tmp_path / "c.pth", build_model(cfg), cfg)
    with pytest.raises(CheckpointError, match="do not match the model .*with_box_refine=False"):
        load_model(path, cfg=tiny_config())


# torch notes that the crafted file uses a newer pickle protocol than its own writer; expected here.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"model": {}, "args": Exploit()}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    cfg = tiny_config()
    path = save_checkpoint(tmp_path / "c.pth", build_model(cfg), cfg)
    data = path.read_bytes()
    broken = tmp_path / "broken.pth"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(broken)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")
    bare = tmp_path / "bare.pth"
    torch.save(build_model(cfg).state_dict(), bare)
    with pytest.raises(CheckpointError, match="pass the configuration explicitly"):
        load_model(bare)
    model, _ = load_model(bare, cfg=cfg)  # works with an explicit config
    assert model is not None


def test_init_from_reports_class_head_mismatch(tmp_path):
    source_cfg = tiny_config(num_classes=7)
    source = build_model(source_cfg)
    path = save_checkpoint(tmp_path / "c.pth", source, source_cfg)
    target = build_model(tiny_config(num_classes=3))
    with pytest.warns(UserWarning, match="another shape"):
        report = init_from(target, path)
    assert any(item.startswith("class_embed.0.weight") for item in report["shape_mismatch"])
    assert "transformer.level_embed" in report["loaded"]
    torch.testing.assert_close(target.transformer.level_embed, source.transformer.level_embed)
    assert target.class_embed[0].weight.shape == (3, 64)


def test_public_api_surface():
    for name in ("load_model", "build_criterion", "build_postprocessor", "build_model", "ModelConfig"):
        assert hasattr(detr_deform, name)


def test_resnet_backbone_weights_are_read_safely_with_clear_errors(tmp_path):
    import torchvision

    from detr_deform.models.backbone import ResNetBackbone

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    backbone = ResNetBackbone("resnet18", pretrained=str(path), norm="frozen_bn")
    assert torch.equal(backbone.body.conv1.weight, torch.load(path, weights_only=True)["conv1.weight"])
    with pytest.raises(CheckpointError, match="model.pretrained_backbone: backbone weights file not found"):
        ResNetBackbone("resnet18", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match=r"does not fit the ResNet .*another ResNet depth"):
        ResNetBackbone("resnet34", pretrained=str(path))
