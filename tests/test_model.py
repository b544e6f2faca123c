"""Deformable DETR model family: outputs, official layout and initialisation,
padding invariance, criterion keys, variants."""
import math

import pytest
import torch

from detr_deform import ModelConfig, build_criterion, build_model, build_postprocessor
from detr_deform.layers import MSDeformAttn
from detr_deform.models.deformable_transformer import DeformableTransformer

from model_helpers import VARIANTS, random_targets, tiny_config


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_output_shapes_and_keys(variant):
    cfg = tiny_config(**VARIANTS[variant])
    model = build_model(cfg).eval()
    images = [torch.randn(3, 64, 80), torch.randn(3, 47, 71)]
    with torch.no_grad():
        out = model(images)
    assert out["pred_logits"].shape == (2, cfg.num_queries, cfg.num_classes)
    assert out["pred_boxes"].shape == (2, cfg.num_queries, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_boxes"].shape == out["pred_boxes"].shape
    if cfg.two_stage:
        num_tokens = out["enc_outputs"]["pred_logits"].shape[1]
        assert out["enc_outputs"]["pred_logits"].shape == (2, num_tokens, cfg.num_classes)
        assert out["enc_outputs"]["pred_boxes"].shape == (2, num_tokens, 4)
    else:
        assert "enc_outputs" not in out

    criterion = build_criterion(cfg)
    losses = criterion(out, random_targets([3, 0]))
    weighted = {k for k in losses if k.startswith("loss")}
    assert weighted == set(criterion.weight_dict)
    expected = {"loss_ce", "loss_bbox", "loss_giou"}
    expected |= {f"{k}_{i}" for k in ("loss_ce", "loss_bbox", "loss_giou") for i in range(cfg.dec_layers - 1)}
    if cfg.two_stage:
        expected |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert weighted == expected
    assert all(torch.isfinite(v) for v in losses.values())
    assert {"class_error", "cardinality_error"} <= set(losses)

    detections = build_postprocessor(cfg)(out, torch.tensor([[64, 80], [47, 71]]))
    assert len(detections) == 2
    assert detections[0]["boxes"].shape == (min(100, cfg.num_queries * cfg.num_classes), 4)
    assert (detections[1]["boxes"][:, 2] <= 71 + 1e-4).all()


def test_images_as_batched_tensor():
    model = build_model(tiny_config()).eval()
    batch = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        a = model(batch)["pred_boxes"]
        b = model(list(batch))["pred_boxes"]
    torch.testing.assert_close(a, b)


def test_two_stage_without_box_refine_is_rejected():
    with pytest.raises(ValueError, match="requires model.with_box_refine=true"):
        ModelConfig(two_stage=True).validate()
    with pytest.raises(ValueError, match="requires with_box_refine=True"):
        cfg = tiny_config()
        cfg.two_stage = True
        from detr_deform.models.build import build_backbone
        from detr_deform.models.deformable_detr import DeformableDETR
        DeformableDETR(build_backbone(cfg), DeformableTransformer(d_model=64, nhead=4, two_stage=True),
                       num_classes=5, num_queries=5, num_feature_levels=4, two_stage=True)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['hidden_dims'\]"):
        ModelConfig.from_dict({"hidden_dims": 256})


# --- official state-dict layout -------------------------------------------------------------------

OFFICIAL_KEYS = {
    # present in every official Deformable DETR state dict (R50)
    "all": ["backbone.0.body.conv1.weight", "backbone.0.body.bn1.running_var", "backbone.0.body.layer1.0.conv1.weight",
            "backbone.0.body.layer4.2.bn3.bias", "transformer.level_embed",
            "transformer.encoder.layers.5.self_attn.sampling_offsets.weight",
            "transformer.encoder.layers.0.self_attn.attention_weights.bias",
            "transformer.encoder.layers.0.self_attn.value_proj.weight",
            "transformer.encoder.layers.0.self_attn.output_proj.bias", "transformer.encoder.layers.0.norm2.weight",
            "transformer.decoder.layers.5.cross_attn.sampling_offsets.bias",
            "transformer.decoder.layers.0.self_attn.in_proj_weight",
            "transformer.decoder.layers.0.self_attn.out_proj.weight", "transformer.decoder.layers.0.norm3.bias",
            "class_embed.5.weight", "bbox_embed.5.layers.2.bias", "input_proj.0.0.weight", "input_proj.0.1.weight"],
    "multi_scale": ["query_embed.weight", "transformer.reference_points.weight", "input_proj.3.0.weight",
                    "backbone.0.body.layer2.0.conv1.weight"],
    "box_refine": ["query_embed.weight", "transformer.decoder.bbox_embed.5.layers.2.weight"],
    "two_stage": ["class_embed.6.bias", "bbox_embed.6.layers.0.weight", "transformer.decoder.class_embed.6.weight",
                  "transformer.decoder.bbox_embed.6.layers.2.bias", "transformer.enc_output.weight",
                  "transformer.enc_output_norm.bias", "transformer.pos_trans.weight",
                  "transformer.pos_trans_norm.weight"],
}
ABSENT_KEYS = {
    "multi_scale": ["transformer.decoder.bbox_embed.0.layers.0.weight", "class_embed.6.weight",
                    "transformer.enc_output.weight"],
    "single_scale": ["input_proj.1.0.weight"],
    "box_refine": ["class_embed.6.weight", "transformer.decoder.class_embed.0.weight"],
    "two_stage": ["query_embed.weight", "transformer.reference_points.weight"],
}


@pytest.fixture(scope="module")
def r50_models():
    configs = {name: ModelConfig(num_classes=91, **extra) for name, extra in VARIANTS.items()}
    torch.manual_seed(0)
    return {name: build_model(cfg) for name, cfg in configs.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_state_dict_layout(r50_models, variant):
    keys = set(r50_models[variant].state_dict())
    for key in OFFICIAL_KEYS["all"] + OFFICIAL_KEYS.get(variant, []):
        assert key in keys, key
    for key in ABSENT_KEYS.get(variant, []):
        assert key not in keys, key
    assert not any("num_batches_tracked" in k for k in keys)  # FrozenBatchNorm2d buffers only


def test_official_parameter_counts(r50_models):
    """Official table: 40M (multi-scale), 41M (+refine, ++two-stage), 34M single-scale (+DC5 same)."""
    def millions(model):
        return sum(p.numel() for p in model.parameters()) / 1e6

    assert round(millions(r50_models["multi_scale"])) == 40
    assert round(millions(r50_models["box_refine"])) == 41
    assert round(millions(r50_models["two_stage"])) == 41
    assert round(millions(r50_models["single_scale"])) == 34


# --- initialisation ------------------------------------------------------------------------------

def _xavier_bound(weight):
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_initialisation_follows_official_rules(r50_models, variant):
    model = r50_models[variant]
    prior = -math.log((1 - 0.01) / 0.01)
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior))
    for index, head in enumerate(model.bbox_embed):
        last = head.layers[-1]
        assert torch.count_nonzero(last.weight) == 0
        assert torch.count_nonzero(last.bias[:2]) == 0
        if model.two_stage:
            expected = 0.0
        elif model.with_box_refine:
            expected = -2.0 if index == 0 else 0.0
        else:
            expected = -2.0
        assert torch.all(last.bias[2:] == expected), (index, last.bias)
    if not model.with_box_refine:
        assert all(h is model.bbox_embed[0] for h in model.bbox_embed)  # one shared head
    else:
        assert model.transformer.decoder.bbox_embed is model.bbox_embed

    n_heads, n_levels, n_points = 8, model.num_feature_levels, 4
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    ring = torch.stack([thetas.cos(), thetas.sin()], -1)
    ring = ring / ring.abs().max(-1, keepdim=True)[0]
    expected_bias = torch.stack([ring * (k + 1) for k in range(n_points)], 1)  # (M, P, 2)
    expected_bias = expected_bias[:, None].expand(n_heads, n_levels, n_points, 2).reshape(-1)
    attentions = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    assert len(attentions) == 12
    for attn in attentions:
        assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
        torch.testing.assert_close(attn.sampling_offsets.bias, expected_bias)
        assert torch.count_nonzero(attn.attention_weights.weight) == 0
        assert torch.count_nonzero(attn.attention_weights.bias) == 0
        for proj in (attn.value_proj, attn.output_proj):
            assert torch.count_nonzero(proj.bias) == 0
            assert proj.weight.abs().max() <= _xavier_bound(proj.weight)
            assert abs(proj.weight.std().item() - _xavier_bound(proj.weight) / math.sqrt(3)) < 0.01
    for proj in model.input_proj:
        assert torch.count_nonzero(proj[0].bias) == 0
        assert proj[0].weight.abs().max() <= _xavier_bound(proj[0].weight)
    level_embed = model.transformer.level_embed
    assert abs(level_embed.mean().item()) < 0.15 and abs(level_embed.std().item() - 1) < 0.15
    if not model.two_stage:
        assert torch.count_nonzero(model.transformer.reference_points.bias) == 0
    # Backbone: stem and layer1 frozen, layer2-4 trainable.
    for name, p in model.backbone.named_parameters():
        assert p.requires_grad == any(f"layer{i}" in name for i in (2, 3, 4)), name


# --- padding invariance --------------------------------------------------------------------------

def test_transformer_is_exactly_padding_invariant():
    """The deformable transformer must not see padding: an image's features alone
    and the same features padded (with garbage) inside a batch give the same
    decoder states and references (valid ratios, masks and reference points)."""
    torch.manual_seed(0)
    transformer = DeformableTransformer(d_model=64, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                                        dim_feedforward=64, dropout=0.0, num_feature_levels=2,
                                        attn_impl="cpp").eval()
    query_embed = torch.randn(7, 128)
    sizes = [(8, 10), (4, 5)]
    padded_sizes = [(12, 14), (6, 7)]
    srcs = [torch.randn(1, 64, h, w) for h, w in sizes]
    pos = [torch.randn(1, 64, h, w) for h, w in sizes]
    masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in sizes]
    srcs_p, pos_p, masks_p = [], [], []
    for src, p, (h, w), (hp, wp) in zip(srcs, pos, sizes, padded_sizes):
        big = torch.randn(2, 64, hp, wp) * 5  # garbage everywhere, image 0 copied top-left
        big[0, :, :h, :w] = src[0]
        big_pos = torch.randn(2, 64, hp, wp)
        big_pos[0, :, :h, :w] = p[0]
        mask = torch.ones(2, hp, wp, dtype=torch.bool)
        mask[0, :h, :w] = False
        mask[1] = False
        srcs_p.append(big)
        pos_p.append(big_pos)
        masks_p.append(mask)
    with torch.no_grad():
        hs, init_ref, inter_ref, _, _ = transformer(srcs, masks, pos, query_embed)
        hs_p, init_ref_p, inter_ref_p, _, _ = transformer(srcs_p, masks_p, pos_p, query_embed)
    torch.testing.assert_close(hs_p[:, :1], hs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inter_ref_p[:, :1], inter_ref, rtol=1e-4, atol=1e-5)


def test_model_predictions_nearly_padding_invariant():
    """End to end, only the backbone's convolutions and the GroupNorm statistics
    of the input projections see the padded area (as in the official model), so
    predictions change only slightly; an inverted mask convention changes them a lot."""
    torch.manual_seed(0)
    model = build_model(tiny_config(backbone_norm="frozen_bn")).eval()
    image = torch.randn(3, 64, 64)
    other = torch.randn(3, 128, 128)
    with torch.no_grad():
        alone = model([image])
        batched = model([image, other])
    diff = (alone["pred_boxes"][0] - batched["pred_boxes"][0]).abs().max()
    assert diff < 0.05, diff
    # The sine position embedding and valid ratios depend on the mask: the image's
    # boxes are in its own normalised coordinates, not the padded batch's.
    assert (batched["pred_boxes"][0, :, :2] <= 1).all()


def test_postprocess_queries_and_optional_nms():
    from detr_deform.models.postprocess import PostProcess

    logits = torch.full((1, 4, 3), -6.0)
    logits[0, 0, 1], logits[0, 1, 1], logits[0, 2, 2], logits[0, 3, 1] = 3.0, 2.0, 1.0, 0.5
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2],    # query 1 duplicates query 0
                           [0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]])   # query 2: same box, other class
    outputs, size = {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]])
    plain = PostProcess(num_select=5)(outputs, size)[0]
    assert plain["queries"][:4].tolist() == [0, 1, 2, 3] and plain["labels"][:4].tolist() == [1, 1, 2, 1]
    nms = PostProcess(num_select=5, nms_iou=0.7)(outputs, size)[0]
    kept = list(zip(nms["queries"].tolist(), nms["labels"].tolist()))
    assert kept[:3] == [(0, 1), (2, 2), (3, 1)] and (1, 1) not in kept   # the duplicate is gone
    assert torch.all(nms["scores"][:-1] >= nms["scores"][1:])
    with pytest.raises(ValueError, match="nms_iou"):
        ModelConfig(num_classes=3, nms_iou=1.5).validate()
