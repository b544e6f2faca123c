"""Hydra configuration: presets compose, official defaults, clear one-line errors."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from detr_deform.config import Config, ConfigError, register_configs, validate

from pipeline_helpers import ROOT, train

register_configs()
PRESETS = ["deformable_detr", "single_scale", "single_scale_dc5", "box_refine", "two_stage", "demo"]


def compose_config(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_compose_and_validate(preset):
    cfg = validate(compose_config(f"experiment={preset}"))
    assert cfg.experiment == preset
    if preset == "two_stage":
        assert cfg.model.two_stage and cfg.model.with_box_refine
    if preset.startswith("single_scale"):
        assert cfg.model.num_feature_levels == 1
        assert cfg.model.dilation == preset.endswith("dc5")


def test_defaults_are_the_official_ones():
    cfg = compose_config()
    o, m = cfg.optim, cfg.model
    assert (o.lr, o.lr_backbone, o.weight_decay, o.batch_size, o.epochs, o.lr_drop, o.clip_max_norm) == (
        2e-4, 2e-5, 1e-4, 2, 50, 40, 0.1)
    assert o.lr_linear_proj_names == ["reference_points", "sampling_offsets"] and o.lr_linear_proj_mult == 0.1
    assert (m.num_queries, m.num_feature_levels, m.enc_layers, m.dec_layers, m.dim_feedforward, m.hidden_dim,
            m.dropout, m.nheads, m.enc_n_points, m.dec_n_points) == (300, 4, 6, 6, 1024, 256, 0.1, 8, 4, 4)
    assert (m.set_cost_class, m.set_cost_bbox, m.set_cost_giou, m.cls_loss_coef, m.bbox_loss_coef,
            m.giou_loss_coef, m.focal_alpha) == (2, 5, 2, 2, 5, 2, 0.25)
    assert m.backbone == "resnet50" and m.backbone_norm == "frozen_bn"
    assert cfg.data.train_scales == list(range(480, 801, 32)) and cfg.data.max_size == 1333


def test_two_stage_without_refine_rejected_up_front():
    with pytest.raises(ConfigError, match="requires model.with_box_refine=true"):
        validate(compose_config("model.two_stage=true"))


@pytest.mark.parametrize("override, message", [
    ("model.hiden_dim=128", "Key 'hiden_dim' not in 'ModelConfig'"),
    ("optim.lr=fast", "Value 'fast' of type 'str' could not be converted to Float"),
    ("experiment=nope", "Could not find 'experiment/nope'"),
])
def test_bad_keys_fail_before_any_work(override, message):
    done = train(override)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_missing_dataset_path_is_one_clear_line(tmp_path):
    done = train("data.root=/nonexistent/coco", f"runtime.output_dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: data.train_images: folder not found: /nonexistent/coco/train2017"


def test_num_classes_disagreeing_with_dataset(tiny_demo_root, tmp_path):
    done = train("experiment=demo", f"data.root={tiny_demo_root}", "model.num_classes=7",
                 f"runtime.output_dir={tmp_path}")
    assert done.returncode == 2
    assert "model.num_classes=7 but" in done.stderr and "num_classes=4 (max id + 1)" in done.stderr


DAT_EXPERIMENTS = ["deformable_detr", "single_scale", "box_refine", "two_stage", "demo", "dat_two_stage", "dat_demo"]


@pytest.mark.parametrize("experiment", DAT_EXPERIMENTS)
def test_dat_backbone_group_works_with_every_experiment(experiment):
    from detr_deform import build_model
    from detr_deform.models import DATBackbone

    cfg = validate(compose_config(f"experiment={experiment}", "backbone=dat_tiny", "model.num_classes=4"))
    model = build_model(cfg.model)
    body = model.backbone[0]
    assert isinstance(body, DATBackbone)
    assert body.strides == ([32] if cfg.model.num_feature_levels == 1 else [8, 16, 32])
    assert len(model.input_proj) == cfg.model.num_feature_levels


def test_dc5_with_dat_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="dilation.*ResNet backbones only"):
        validate(compose_config("experiment=single_scale_dc5", "backbone=dat_tiny"))
