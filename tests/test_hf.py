"""Hugging Face checkpoints in and out, against the real transformers library (offline,
random weights, timm ResNets without pretrained downloads).

HF -> ours: a randomly initialised DeformableDetrForObjectDetection with every weight,
zero-initialised bias and frozen BatchNorm statistic perturbed -> save_pretrained ->
load_model gives transformers' eval outputs. Ours -> HF: save_hf -> from_pretrained
(no missing/unexpected keys, no tying warnings) gives ours. Both sides use the
grid_sample attention (ours attn_impl="pytorch", HF disable_custom_kernels and eager
self-attention); HF pads with its image processor, ours pads a list of tensors.
"""
import dataclasses
import io
import json
import logging
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection
from transformers.models.deformable_detr.image_processing_deformable_detr import DeformableDetrImageProcessor
from transformers.utils import logging as hf_logging

from detr_deform import CheckpointError, Detector, build_model, init_from, load_model, save_hf
from detr_deform.layers import MSDeformAttn
from detr_deform.loading.hf import read_hf
from detr_deform.loading.hf_config import config_from_hf
from detr_deform.loading.hf_weights import state_dict_to_hf
from detr_deform.loading.model import read_content

from model_helpers import perturb, tiny_config

# Measured: <= 2.4e-7 (fp32 rounding: HF scales q.k^T after the product, runs heads on strided slices).
ATOL = 1e-5
# The compiled operator sums in another order than grid_sample (docs/model.md: ~3e-6 at COCO scale).
ATOL_CPP = 5e-5

HF_SMALL = dict(d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                encoder_attention_heads=4, decoder_attention_heads=4, num_queries=10, two_stage_num_proposals=10,
                backbone="resnet18", use_timm_backbone=True, use_pretrained_backbone=False,
                disable_custom_kernels=True)
HF_VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale_learned_position": {"num_feature_levels": 1, "position_embedding_type": "learned"},
    "single_scale_dc5_resnet50": {"num_feature_levels": 1, "dilation": True, "backbone": "resnet50"},
}
OUR_VARIANTS = {
    "plain": {},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale_gelu": {"num_feature_levels": 1, "activation": "gelu"},
}
LABELS = {0: "cat", 1: "dog", 2: "bird", 3: "car", 4: "tree"}


# Tiny models: extra threads only add synchronisation (and stall on a loaded machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(3, 96, 80, generator=g), torch.randn(3, 64, 112, generator=g)]


def hf_model(**overrides) -> DeformableDetrForObjectDetection:
    config = DeformableDetrConfig(**{**HF_SMALL, "id2label": dict(LABELS), **overrides})
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config)
    model.config._attn_implementation = "eager"
    perturb(model)
    return model.eval()


def hf_outputs(model) -> dict[str, torch.Tensor]:
    """HF's eval forward on images() padded by HF's image processor (pixel_values + pixel_mask)."""
    batch = images()
    size = (max(i.shape[1] for i in batch), max(i.shape[2] for i in batch))
    processor = DeformableDetrImageProcessor()
    padded = [processor.pad(image, size) for image in batch]
    with torch.no_grad():
        out = model(pixel_values=torch.stack([p[0] for p in padded]), pixel_mask=torch.stack([p[1] for p in padded]))
    result = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
    if out.enc_outputs_class is not None:
        result["enc_logits"], result["enc_boxes"] = out.enc_outputs_class, out.enc_outputs_coord_logits.sigmoid()
    return result


def our_outputs(model, impl: str = "pytorch") -> dict[str, torch.Tensor]:
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.impl = impl
    with torch.no_grad():
        out = model(images())
    result = {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}
    if "enc_outputs" in out:
        result["enc_logits"], result["enc_boxes"] = out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]
    return result


def assert_outputs_close(got: dict, expected: dict, atol: float = ATOL) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol, msg=key)


def from_pretrained_clean(folder):
    """from_pretrained, asserting no missing/unexpected/mismatched keys and no tying or
    loading warnings in transformers' log."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    hf_logging.get_logger().addHandler(handler)
    try:
        model, info = DeformableDetrForObjectDetection.from_pretrained(
            folder, output_loading_info=True, disable_custom_kernels=True)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert not any(info.values()), info
    log = stream.getvalue().lower()
    for word in ("tie", "missing", "unexpected", "newly initialized", "mismatch", "corrupt"):
        assert word not in log, stream.getvalue()
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_hf_save_pretrained_loads_with_hf_outputs_and_writes_back_bitwise(tmp_path, variant):
    source = hf_model(**HF_VARIANTS[variant])
    source.save_pretrained(tmp_path / "hf")
    expected = hf_outputs(source)

    model, cfg = load_model(tmp_path / "hf")
    assert not model.training and cfg.num_classes == 5
    assert (cfg.with_box_refine, cfg.two_stage, cfg.num_feature_levels, cfg.dilation, cfg.backbone) == (
        source.config.with_box_refine, source.config.two_stage, source.config.num_feature_levels,
        bool(HF_VARIANTS[variant].get("dilation")), HF_VARIANTS[variant].get("backbone", "resnet18"))
    assert_outputs_close(our_outputs(model), expected)

    # Back to HF: the same file transformers wrote (names, omitted tied copies, every tensor bitwise).
    save_hf(model, cfg, tmp_path / "back", class_names=read_content(tmp_path / "hf")["category_names"])
    theirs, ours = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["id2label"] == {str(k): v for k, v in LABELS.items()} and config["tie_word_embeddings"] is True
    assert_outputs_close(hf_outputs(from_pretrained_clean(tmp_path / "back")), expected)


@pytest.mark.parametrize("variant", sorted(OUR_VARIANTS))
def test_save_hf_loads_in_transformers_with_our_outputs(tmp_path, variant):
    cfg = tiny_config(**OUR_VARIANTS[variant])
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    perturb(model, seed=1)
    save_hf(model, cfg, tmp_path / "hf", class_names=LABELS)
    hf = from_pretrained_clean(tmp_path / "hf")
    assert hf.config.id2label == LABELS
    expected = our_outputs(model)
    assert_outputs_close(hf_outputs(hf), expected)

    stored = load_file(tmp_path / "hf" / "model.safetensors")
    if variant == "box_refine":
        # Official (independent) class heads: transformers would tie them, so all copies are stored, untied.
        assert not hf.config.tie_word_embeddings
        assert not torch.equal(stored["class_embed.1.weight"], stored["class_embed.0.weight"])
        assert not torch.equal(hf.class_embed[1].weight, hf.class_embed[0].weight)
    else:
        assert hf.config.tie_word_embeddings

    loaded, loaded_cfg = load_model(tmp_path / "hf")
    assert loaded_cfg == cfg  # every field, also those transformers has no counterpart for
    original, back = model.state_dict(), loaded.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_hub_style_file_with_every_head_copy(tmp_path, variant):
    """The hub's SenseTime files come from transformers' conversion script, which stored every
    head copy of the official model (independent class heads with box refinement) under the
    default tie_word_embeddings=true: transformers then keeps the differing copies (with a
    warning) and so do we."""
    cfg = tiny_config(**OUR_VARIANTS[variant])
    torch.manual_seed(4)
    model = build_model(cfg).eval()
    perturb(model, seed=2)
    save_hf(model, cfg, tmp_path, class_names=LABELS)
    every_copy = state_dict_to_hf(model.state_dict(), cfg, tie_weights=False)
    save_file({k: v.clone() for k, v in every_copy.items()}, tmp_path / "model.safetensors")
    edit_config(tmp_path, tie_word_embeddings=True)
    hf = DeformableDetrForObjectDetection.from_pretrained(tmp_path, disable_custom_kernels=True).eval()
    hf.config._attn_implementation = "eager"
    loaded, _ = load_model(tmp_path)
    assert_outputs_close(our_outputs(loaded), hf_outputs(hf))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_compiled_operator_matches_hf(tmp_path):
    source = hf_model(with_box_refine=True, two_stage=True)
    source.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert_outputs_close(our_outputs(model, impl="cpp"), hf_outputs(source), atol=ATOL_CPP)


def test_weight_file_forms_read_the_same(tmp_path):
    """The folder; its model.safetensors alone; a sharded save (index + shards); a 4.x-style
    pytorch_model.bin with the tied copies present, whole and sharded; transformers 5.x
    in-memory names."""
    source = hf_model(with_box_refine=True)
    source.save_pretrained(tmp_path / "folder")
    source.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    on_disk = load_file(tmp_path / "folder" / "model.safetensors")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "folder" / "config.json").read_text())
    with_copies = {**on_disk, **{f"class_embed.1.{p}": on_disk[f"class_embed.0.{p}"] for p in ("weight", "bias")}}
    torch.save(with_copies, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin_shards").mkdir()
    (tmp_path / "bin_shards" / "config.json").write_text((tmp_path / "folder" / "config.json").read_text())
    names = sorted(on_disk)
    weight_map = {k: f"pytorch_model-0000{1 + (i % 2)}-of-00002.bin" for i, k in enumerate(names)}
    for shard in set(weight_map.values()):
        torch.save({k: on_disk[k] for k in names if weight_map[k] == shard}, tmp_path / "bin_shards" / shard)
    (tmp_path / "bin_shards" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "config.json").write_text((tmp_path / "folder" / "config.json").read_text())
    save_file({k: v.clone() for k, v in source.state_dict().items()}, tmp_path / "memory" / "model.safetensors")

    reference = read_hf(tmp_path / "folder")["model"]
    for path in (tmp_path / "folder" / "model.safetensors", tmp_path / "sharded", tmp_path / "bin",
                 tmp_path / "bin" / "pytorch_model.bin", tmp_path / "bin_shards", tmp_path / "memory"):
        state = read_content(path)["model"]
        assert state.keys() == reference.keys(), path
        assert all(torch.equal(state[k], reference[k]) for k in reference), path
    model, _ = load_model(tmp_path / "sharded")
    assert_outputs_close(our_outputs(model), hf_outputs(source))


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            config[outer][inner] = value
        elif value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    hf_model().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("changes, message", [
    # any timm model is our timm backbone (tests/test_hub.py): these two are not
    ({"backbone_config.backbone": "no_such_net"}, r"backbone_config\.backbone='no_such_net' is not supported: not a "
                                                  r"timm model"),
    ({"backbone_config.backbone": "convnext_atto", "backbone_config.output_stride": 16},
     r"backbone_config\.output_stride=16 is not supported: dilation applies to the ResNets only"),
    ({"backbone_config": {"model_type": "resnet"}}, r"backbone_config\.model_type='resnet' is not supported"),
    ({"activation_function": "silu"}, r"activation_function='silu' is not supported"),
    ({"decoder_ffn_dim": 128}, r"decoder_ffn_dim=128 is not supported: .*encoder_ffn_dim=64"),
    ({"position_embedding_type": "rope"}, r"position_embedding_type='rope'"),
    ({"model_type": "detr"}, r"model_type='detr'; only deformable_detr"),
    ({"architectures": ["DeformableDetrModel"]}, r"architectures=\['DeformableDetrModel'\]"),
    ({"two_stage": True}, r"two_stage=true requires model.with_box_refine=true"),
    ({"id2label": {"0": "a", "1": "b"}}, r"id2label has 2 labels but the class head"),
])
def test_unsupported_configs_are_refused_in_one_line(tmp_path, plain_folder, changes, message):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(plain_folder / "model.safetensors")
    (folder / "config.json").write_text((plain_folder / "config.json").read_text())
    edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message) as error:
        load_model(folder)
    assert "\n" not in str(error.value) and "config.json" in str(error.value)


def test_unusable_files_are_refused_in_one_line(tmp_path, plain_folder):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((plain_folder / "model.safetensors").read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((plain_folder / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((plain_folder / "model.safetensors").read_bytes()[:5000])
    untied = tmp_path / "untied"  # plain model, tie_word_embeddings=false, heads that differ: one head in ours
    untied.mkdir()
    (untied / "config.json").write_text((plain_folder / "config.json").read_text())
    edit_config(untied, tie_word_embeddings=False)
    weights = load_file(plain_folder / "model.safetensors")
    weights.update({f"class_embed.1.{p}": weights[f"class_embed.0.{p}"] + 1 for p in ("weight", "bias")})
    weights.update({k.replace("bbox_embed.0", "bbox_embed.1"): v.clone() for k, v in weights.items()
                    if k.startswith("bbox_embed.0")})
    save_file(weights, untied / "model.safetensors")
    cases = [
        (lone / "model.safetensors", r"needs the config.json that save_pretrained writes beside it"),
        (lone, r"no config.json in this folder"),
        (other, r"model_type='bert'"),
        (tmp_path / "missing_folder" / "model.safetensors", r"checkpoint not found"),
        (broken, r"not a readable safetensors file \(truncated or corrupted\?\)"),
        (untied, r"class_embed.0.weight and class_embed.1.weight differ .*shared by all decoder layers"),
    ]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message) as error:
            load_model(path)
        assert "\n" not in str(error.value), path


def test_init_from_hf_folder_reports_class_head_mismatch(plain_folder):
    target = build_model(tiny_config(num_classes=3, enc_layers=1, num_queries=10))
    with pytest.warns(UserWarning, match="another shape"):
        report = init_from(target, plain_folder)
    assert any(item.startswith("class_embed.0.weight") for item in report["shape_mismatch"])
    assert "transformer.level_embed" in report["loaded"] and not report["unexpected"]
    expected = read_hf(plain_folder)["model"]["transformer.level_embed"]
    torch.testing.assert_close(target.transformer.level_embed, expected, rtol=0, atol=0)


def test_training_recipe_mapping():
    """HF fields with our meaning map; HF defaults that depart from the official recipe
    (class_cost 1, auxiliary_loss false) keep the official values; no cls_loss_coef in HF."""
    base = {"model_type": "deformable_detr", "backbone": "resnet50", "id2label": {str(i): str(i) for i in range(91)}}
    cfg = config_from_hf(base)
    assert (cfg.set_cost_class, cfg.aux_loss, cfg.cls_loss_coef, cfg.dropout, cfg.num_classes) == (2, True, 2, 0.1, 91)
    assert (cfg.hidden_dim, cfg.num_queries, cfg.enc_layers, cfg.backbone, cfg.freeze_stem_and_layer1) == (
        256, 300, 6, "resnet50", True)
    chosen = config_from_hf({**base, "class_cost": 3, "auxiliary_loss": True, "dropout": 0.0, "bbox_cost": 4,
                             "giou_loss_coefficient": 1, "focal_alpha": 0.5, "attention_dropout": 0.3})
    assert (chosen.set_cost_class, chosen.aux_loss, chosen.dropout, chosen.set_cost_bbox, chosen.giou_loss_coef,
            chosen.focal_alpha) == (3, True, 0.0, 4, 1, 0.5)
    two_stage = config_from_hf({**base, "with_box_refine": True, "two_stage": True, "num_queries": 7,
                                "two_stage_num_proposals": 20, "dilation": True})
    assert (two_stage.num_queries, two_stage.dilation) == (20, True)


def test_save_hf_config_round_trip_and_refusals(tmp_path):
    cfg = dataclasses.replace(tiny_config(), set_cost_class=1.5, cls_loss_coef=3.0, num_select=50, nms_iou=0.7,
                              aux_loss=False, freeze_stem_and_layer1=False, dropout=0.2, attn_impl="pytorch")
    model = build_model(cfg)
    save_hf(model, cfg, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "class_cost" not in config  # transformers declares it int; 1.5 lives in our block only
    assert (config["attention_dropout"], config["activation_dropout"], config["use_pretrained_backbone"]) == (
        0.2, 0.2, False)
    assert config["id2label"] == {str(i): str(i) for i in range(5)}
    assert load_model(tmp_path / "hf")[1] == dataclasses.replace(cfg, pretrained_backbone=None)
    with pytest.raises(CheckpointError, match="already holds other weights"):
        (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")
        save_hf(model, cfg, tmp_path / "hf")
    for change, message in [({"backbone": "dat_tiny"}, r"model.backbone='dat_tiny'"),
                            ({"activation": "glu"}, r"model.activation='glu'"),
                            ({"position_embedding_scale": 1.0}, r"position_embedding_scale=1.0")]:
        with pytest.raises(CheckpointError, match=message):
            save_hf(model, dataclasses.replace(cfg, **change), tmp_path / "refused")


def test_coco_names_by_default(tmp_path):
    cfg = tiny_config(num_classes=91)
    save_hf(build_model(cfg), cfg, tmp_path)
    id2label = json.loads((tmp_path / "config.json").read_text())["id2label"]
    assert (id2label["1"], id2label["90"], id2label["0"], id2label["12"], len(id2label)) == (
        "person", "toothbrush", "N/A", "N/A", 91)
    assert read_hf(tmp_path)["category_names"]["18"] == "dog"
    assert math.isclose(load_model(tmp_path)[1].position_embedding_scale, 2 * math.pi)


def test_preprocessor_config_carries_the_validation_resize_both_ways(tmp_path):
    from transformers import AutoImageProcessor

    cfg = tiny_config()
    save_hf(build_model(cfg), cfg, tmp_path / "hf", val_size=96, max_size=128)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert type(processor).__name__ in ("DeformableDetrImageProcessor", "DeformableDetrImageProcessorFast")
    assert (processor.size["shortest_edge"], processor.size["longest_edge"]) == (96, 128)
    assert read_hf(tmp_path / "hf")["config"]["data"] == {"val_size": 96, "max_size": 128}
    detector = Detector.from_pretrained(tmp_path / "hf", device="cpu")
    assert (detector.val_size, detector.max_size) == (96, 128)
    # transformers' processor and ours resize to the same size and normalise alike (a smooth picture:
    # the two resize kernels differ a little at sharp edges) ...
    ramp = np.linspace(0, 255, 250, dtype=np.float32)[None, :, None] * np.ones((200, 1, 3), np.float32)
    picture = Image.fromarray(ramp.astype(np.uint8))
    theirs = processor(images=picture, return_tensors="pt")["pixel_values"][0]
    ours = detector.preprocess(torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)).cpu()
    assert theirs.shape == ours.shape == (3, 96, 120)
    torch.testing.assert_close(theirs, ours, atol=0.03, rtol=0)
    # ... except where the longer-side limit binds: the official rounding (ours) can be 1 pixel narrower.
    wide = Image.new("RGB", (300, 200))
    assert processor(images=wide, return_tensors="pt")["pixel_values"].shape[-2:] == (85, 128)
    assert detector.preprocess(torch.zeros(3, 200, 300, dtype=torch.uint8)).shape[-2:] == (85, 127)


@pytest.mark.parametrize("change, sizes", [
    ({}, {"val_size": 800, "max_size": 1333}),
    ({"size": 640, "max_size": 1000}, {"val_size": 640, "max_size": 1000}),  # the older form, still on the hub
    ({"size": {"shortest_edge": 512, "longest_edge": 900}}, {"val_size": 512, "max_size": 900}),
])
def test_processor_sizes_in_both_forms(tmp_path, plain_folder, change, sizes):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(plain_folder, folder)
    DeformableDetrImageProcessor().save_pretrained(folder)  # what a hub folder holds beside the model
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, **change}))
    assert read_hf(folder)["config"]["data"] == sizes


@pytest.mark.parametrize("change, message", [
    ({"size": {"height": 800, "width": 800}}, "only the shortest_edge/longest_edge resize"),
    ({"size": {"shortest_edge": 0, "longest_edge": 1333}}, "size.shortest_edge=0 is not a positive integer"),
    ({"image_mean": [0.5, 0.5, 0.5]}, "image_mean=[0.5, 0.5, 0.5]: our models normalise with the ImageNet"),
    ({"do_normalize": False}, "do_normalize=false"),
])
def test_a_preprocessing_we_cannot_reproduce_is_named_and_the_weights_still_load(tmp_path, plain_folder, change,
                                                                                 message):
    import shutil

    from detr_deform.loading.hf_config import ImageProcessorWarning

    folder = tmp_path / "hf"
    shutil.copytree(plain_folder, folder)
    DeformableDetrImageProcessor().save_pretrained(folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, **change}))
    with pytest.warns(ImageProcessorWarning, match=re.escape(message)):
        content = read_hf(folder)
        model, cfg = load_model(folder)  # the weights load all the same
    assert "data" not in content["config"] and cfg.num_classes == content["config"]["model"]["num_classes"]


def test_tools_and_detector_read_a_hugging_face_folder(tmp_path, plain_folder):
    """eval.py / infer.py and Detector.from_pretrained take the folder where they take our files."""
    from pipeline_helpers import PYTHON, run

    image = tmp_path / "a.png"
    Image.new("RGB", (120, 90), "white").save(image)
    detector = Detector.from_pretrained(plain_folder, device="cpu")
    assert len(detector([image])) == 1
    done = run([PYTHON, "tools/infer.py", str(plain_folder), str(image), "--device", "cpu", "--output-dir",
                str(tmp_path / "out"), "--threshold", "0"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "images.json").read_text())["images"][0]["file_name"] == str(image)
