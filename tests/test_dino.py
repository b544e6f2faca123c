"""DINO: the denoising layout and mask against the original's rules, look forward twice,
the interm and denoising losses, the original's key names, and a few training steps."""
import argparse
import json
import math

import pytest
import torch

from detr_deform import CheckpointError, build_criterion, build_model, load_model, save_checkpoint, save_hf
from detr_deform.cli.convert import write_official
from detr_deform.models.criterion import SetCriterion
from detr_deform.models.denoising import (
    DINO_EPS,
    contrastive_denoising_queries,
    denoising_attn_mask,
    denoising_groups,
    denoising_pairs,
)
from detr_deform.models.dino_criterion import build_dino_weight_dict
from detr_deform.utils.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid

from model_helpers import perturb, random_targets, tiny_config
from pipeline_helpers import PYTHON, run, tiny_train_args


def _dino(**overrides):
    return tiny_config(arch="dino", **overrides)


def _targets(counts, num_classes=5, seed=0):
    return random_targets(counts, num_classes, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the denoising queries

@pytest.mark.parametrize(("max_boxes", "groups"), [(0, 1), (1, 100), (7, 14), (101, 1)])
def test_group_count_follows_the_original_rule(max_boxes, groups):
    # floor(2 * dn_number / (2M)) = floor(100 / M) for dn_number 100, at least 1; M = 0 gives 1.
    assert denoising_groups(max_boxes, 100) == groups
    queries = contrastive_denoising_queries(_targets([max_boxes, max(max_boxes - 1, 0)]), torch.nn.Embedding(6, 8),
                                            num_queries=12, num_classes=5, dn_number=100, label_noise_ratio=0.5,
                                            box_noise_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert queries.num_groups == groups and queries.pad_size == 2 * max_boxes * groups
    assert queries.labels.shape == (2, queries.pad_size, 8) and queries.boxes.shape == (2, queries.pad_size, 4)
    assert queries.attn_mask.shape == (queries.pad_size + 12,) * 2


def test_small_dn_number_keeps_the_original_quirk():
    # Below 50 the adaptive rule is skipped: 2 * dn_number groups whatever the box count.
    assert denoising_groups(7, 20) == 40 and denoising_groups(0, 20) == 1


def test_layout_places_every_copy_and_pads_the_rest():
    targets = [{"labels": torch.tensor([1, 3, 4]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.6, 0.5, 0.3, 0.3],
                                                                        [0.5, 0.5, 0.1, 0.2]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.7, 0.2, 0.1, 0.1]])}]
    label_enc = torch.nn.Embedding(6, 8)
    q = contrastive_denoising_queries(targets, label_enc, 10, 5, dn_number=100, label_noise_ratio=0.0,
                                      box_noise_scale=0.0, generator=torch.Generator().manual_seed(0))
    m, groups = 3, 100 // 3
    assert (q.num_groups, q.pad_size, q.group_size) == (groups, 2 * m * groups, 2 * m)
    for i, t in enumerate(targets):
        for copy in range(2 * groups):
            for slot in range(m):
                index = copy * m + slot
                if slot < len(t["labels"]):  # copy c, box t: slot c*M + t, without noise the box itself
                    torch.testing.assert_close(q.boxes[i, index], inverse_sigmoid(t["boxes"][slot], eps=DINO_EPS),
                                               rtol=0, atol=0)
                    torch.testing.assert_close(q.labels[i, index], label_enc.weight[t["labels"][slot]], rtol=0, atol=0)
                else:  # padding: zero content, zero logit = box (0.5, 0.5, 0.5, 0.5)
                    assert not q.labels[i, index].any() and not q.boxes[i, index].any()


def test_attention_mask_follows_who_may_see_whom():
    pad, groups, queries = 12, 3, 5
    mask = denoising_attn_mask(pad, groups, queries)
    group = pad // groups
    for i in range(pad + queries):
        for j in range(pad + queries):
            if i >= pad:       # matching queries: no denoising slot
                blocked = j < pad
            elif j >= pad:     # denoising slots see every matching query
                blocked = False
            else:              # their own group only (positives, negatives and padding alike)
                blocked = i // group != j // group
            assert bool(mask[i, j]) == blocked, (i, j)


def test_negatives_move_further_than_positives():
    # Small central boxes: no clamping, so every corner's displacement is visible.
    count = 50
    boxes = torch.tensor([[0.5, 0.5, 0.1, 0.08]]).repeat(count, 1)
    targets = [{"labels": torch.zeros(count, dtype=torch.int64), "boxes": boxes}]
    q = contrastive_denoising_queries(targets, torch.nn.Embedding(6, 8), 10, 5, dn_number=100, label_noise_ratio=0.0,
                                      box_noise_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert q.num_groups == 2  # 100 // 50
    noisy = box_cxcywh_to_xyxy(q.boxes[0].sigmoid())
    clean = box_cxcywh_to_xyxy(boxes)
    half = torch.tensor([0.05, 0.04, 0.05, 0.04])
    moved = ((noisy.view(4, count, 4) - clean) / half).abs()  # copies: positive, negative, positive, negative
    # A negative whose corners cross has w or h <= 0, clamped to the logit of 1e-3 (the original's quirk):
    # its corners are lost, so only the others are measured.
    flipped = (q.boxes[0].view(4, count, 4)[..., 2:] <= inverse_sigmoid(torch.tensor(0.0), eps=DINO_EPS)).any(-1)
    assert not flipped[0::2].any() and flipped[1::2].any()
    tolerance = 1e-3  # the sigmoid of the logit round trip
    assert moved[0::2].max() < 1 + tolerance          # positives: u in [0, 1) half sides
    negatives = moved[1::2][~flipped[1::2]]
    assert negatives.min() > 1 - tolerance and negatives.max() < 2 + tolerance  # negatives: [1, 2)


def test_label_noise_draws_from_the_generator_only():
    targets = [{"labels": torch.full((100,), 2), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(100, 1)}]
    label_enc = torch.nn.Embedding(6, 8)
    state = torch.random.get_rng_state()
    a = contrastive_denoising_queries(targets, label_enc, 10, 5, 100, 1.0, 1.0, torch.Generator().manual_seed(3))
    b = contrastive_denoising_queries(targets, label_enc, 10, 5, 100, 1.0, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)  # no global RNG
    assert torch.equal(a.labels, b.labels) and torch.equal(a.boxes, b.boxes)
    # Ratio 1.0: half of the labels are redrawn uniformly from 5 classes (a fifth of them to the same 2).
    changed = (a.labels[0] != label_enc.weight[2]).any(-1).float().mean().item()
    assert 0.3 < changed < 0.5


def test_denoising_pairs_pair_each_positive_with_its_box():
    targets = _targets([3, 1])
    pairs = denoising_pairs(targets, pad_size=2 * 3 * 2, num_groups=2, device=torch.device("cpu"))
    assert pairs[0][0].tolist() == [0, 1, 2, 6, 7, 8] and pairs[0][1].tolist() == [0, 1, 2, 0, 1, 2]
    assert pairs[1][0].tolist() == [0, 6] and pairs[1][1].tolist() == [0, 0]


# ---------------------------------------------------------------- the model

def test_state_dict_has_the_original_key_names():
    cfg = tiny_config(arch="dino", backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6,
                      dim_feedforward=2048, num_queries=900, num_classes=91)
    keys = set(build_model(cfg).state_dict())
    for key in ("transformer.level_embed", "transformer.tgt_embed.weight", "label_enc.weight",
                "transformer.decoder.norm.weight", "transformer.decoder.ref_point_head.layers.1.weight",
                "transformer.enc_output.weight", "transformer.enc_output_norm.weight",
                "transformer.enc_out_class_embed.weight", "transformer.enc_out_bbox_embed.layers.2.weight",
                "transformer.decoder.bbox_embed.5.layers.2.bias", "transformer.decoder.class_embed.5.weight",
                "bbox_embed.5.layers.0.weight", "class_embed.0.bias", "input_proj.3.1.weight",
                "transformer.decoder.layers.5.self_attn.in_proj_weight", "transformer.decoder.layers.0.cross_attn."
                "sampling_offsets.weight", "transformer.encoder.layers.5.linear2.weight",
                "backbone.0.body.layer4.2.bn3.running_var"):
        assert key in keys, key
    for absent in ("query_embed.weight", "transformer.reference_points.weight", "transformer.pos_trans.weight",
                   "class_embed.6.weight"):
        assert absent not in keys
    sd = build_model(cfg).state_dict()
    assert sd["label_enc.weight"].shape == (92, 256) and sd["transformer.tgt_embed.weight"].shape == (900, 256)
    assert sd["transformer.decoder.ref_point_head.layers.0.weight"].shape == (256, 512)


def test_five_scale_adds_layer1_at_stride_4_frozen():
    torch.manual_seed(0)
    model = build_model(_dino(num_feature_levels=5, backbone_out_indices=[0, 1, 2, 3], backbone_norm="frozen_bn"))
    assert model.backbone.strides == [4, 8, 16, 32] and len(model.input_proj) == 5
    assert model.transformer.level_embed.shape == (5, 64)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layer1." in n)  # as the stem
    out = model.eval()([torch.randn(3, 64, 64)])
    assert out["pred_boxes"].shape == (1, 12, 4)


def test_weight_dict_has_the_original_39_terms():
    weights = build_dino_weight_dict(1.0, 5.0, 2.0, dec_layers=6, aux_loss=True, use_dn=True)
    assert len(weights) == 39
    assert weights["loss_ce_dn_4"] == 1.0 and weights["loss_bbox_interm"] == 5.0 and weights["loss_giou_dn"] == 2.0
    assert build_criterion(_dino(dec_layers=6)).weight_dict.keys() == build_dino_weight_dict(
        2.0, 5.0, 2.0, 6, True, True).keys()


def test_dn_labelbook_smaller_than_the_classes_is_refused():
    with pytest.raises(ValueError, match=r"model.dn_labelbook_size=3 is smaller than model.num_classes=5"):
        _dino(dn_labelbook_size=3)
    with pytest.raises(ValueError, match="set both to false"):
        _dino(two_stage=True, with_box_refine=True)


def test_training_refuses_a_labelbook_smaller_than_the_datasets_classes():
    # The class count of a training run comes from the annotations; the check runs before the run directory.
    from types import SimpleNamespace

    from detr_deform.config import ConfigError
    from detr_deform.engine.run import _num_classes

    dataset = SimpleNamespace(num_classes=7, annotation_file="ann/instances_train.json")
    cfg = tiny_config(arch="dino", num_classes=None, dn_labelbook_size=5)
    with pytest.raises(ConfigError, match=r"model.dn_labelbook_size=5 is smaller than the num_classes=7 of "
                                          r"ann/instances_train.json"):
        _num_classes(cfg, dataset)
    assert _num_classes(tiny_config(arch="dino", num_classes=None), dataset) == 7


def _forward_capturing_references(model, images, targets):
    captured = {}
    handle = model.transformer.decoder.register_forward_hook(lambda m, i, o: captured.update(references=o[1]))
    out = model(images, targets)
    handle.remove()
    return out, captured["references"]


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_gradient_path(look_forward_twice):
    torch.manual_seed(0)
    model = build_model(_dino(dec_layers=3, use_detached_boxes_dec_out=not look_forward_twice)).train()
    images, targets = [torch.randn(3, 64, 64), torch.randn(3, 56, 72)], _targets([2, 1])
    out, references = _forward_capturing_references(model, images, targets)
    boxes = out["pred_boxes"]  # the last layer (l = 2): refines references[2], refined by layer 1
    assert references[0].grad_fn is None  # the start references are constants / detached selections
    if look_forward_twice:
        # Layer 2's loss reaches layer 1 through the undetached reference it refines ...
        through_reference = torch.autograd.grad(boxes.sum(), references[2], retain_graph=True)[0]
        assert through_reference.abs().sum() > 0
        # ... and stops there: the reference fed into layer 1 was detached (zeros: the stack of all layers'
        # boxes that pred_boxes is sliced from reaches references[1] only through layer 1's own box).
        earlier = torch.autograd.grad(boxes.sum(), references[1], retain_graph=True, allow_unused=True)[0]
        assert earlier is None or not earlier.any()
    else:
        assert not references[2].requires_grad and not references[1].requires_grad


def test_eval_has_no_denoising_and_keeps_the_top_k():
    torch.manual_seed(0)
    model = build_model(_dino()).eval()
    with torch.no_grad():
        out = model([torch.randn(3, 64, 64)], _targets([2]))
    assert "dn_outputs" not in out and out["pred_logits"].shape == (1, 12, 5)
    assert out["interm_outputs"]["pred_boxes"].shape == (1, 12, 4)


def test_given_denoising_queries_give_the_same_outputs():
    torch.manual_seed(0)
    model = build_model(_dino()).train()
    images, targets = [torch.randn(3, 64, 64)], _targets([3])
    queries = model.denoising_queries(targets, torch.Generator().manual_seed(5))
    a = model(images, denoising=queries)
    b = model(images, targets, denoising=queries)
    assert torch.equal(a["dn_outputs"]["pred_boxes"], b["dn_outputs"]["pred_boxes"])
    assert a["dn_meta"] == {"pad_size": queries.pad_size, "num_dn_group": queries.num_groups}


# ---------------------------------------------------------------- the losses

def _trained_outputs(counts):
    """A training forward and the losses of a tiny DINO on random images with ``counts`` boxes each."""
    torch.manual_seed(0)
    cfg = _dino()
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    targets = _targets(counts)
    out = model([torch.randn(3, 64, 64) for _ in counts], targets)
    return model, criterion, targets, out, criterion(out, targets)


def test_interm_loss_uses_the_real_labels():
    _, criterion, targets, out, losses = _trained_outputs([3, 2])
    plain = SetCriterion(5, criterion.matcher, {})
    expected = plain({k: v for k, v in out["interm_outputs"].items()}, targets, num_boxes=5.0)
    agnostic = plain(out["interm_outputs"], [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets], 5.0)
    torch.testing.assert_close(losses["loss_ce_interm"], expected["loss_ce"], rtol=0, atol=0)
    assert not torch.equal(losses["loss_ce_interm"], agnostic["loss_ce"])


def test_denoising_losses_are_normalised_by_boxes_times_groups():
    _, _, targets, out, losses = _trained_outputs([3, 2])
    groups = out["dn_meta"]["num_dn_group"]
    pairs = denoising_pairs(targets, out["dn_meta"]["pad_size"], groups, torch.device("cpu"))
    dn = out["dn_outputs"]
    boxes = torch.cat([dn["pred_boxes"][i, slots] for i, (slots, _) in enumerate(pairs)])
    target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, pairs)])
    l1 = (boxes - target_boxes).abs().sum() / (5.0 * groups)
    torch.testing.assert_close(losses["loss_bbox_dn"], l1, rtol=1e-6, atol=0)
    assert {f"loss_ce_dn_{i}" for i in range(len(out["aux_outputs"]))} <= losses.keys()


def test_a_batch_without_objects_keeps_every_key_and_label_enc_in_the_graph():
    model, criterion, _, out, losses = _trained_outputs([0, 0])
    assert set(criterion.weight_dict) <= set(losses) and float(losses["loss_ce_dn"]) == 0.0
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    assert model.label_enc.weight.grad is not None  # DDP without find_unused_parameters needs it


def test_a_few_steps_on_one_batch_lower_every_loss_group():
    torch.manual_seed(0)
    cfg = _dino(dec_layers=2, num_queries=10)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = [torch.randn(3, 64, 64), torch.randn(3, 64, 64)], _targets([2, 3])
    history = []
    for _ in range(12):
        torch.manual_seed(1)  # the same denoising noise every step: a fixed problem
        losses = criterion(model(images, targets), targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in losses.items()} | {"total": float(total.detach())})
    # loss_bbox_dn starts near its floor (the noised boxes lie within half a side) and moves little here.
    for key in ("total", "loss_ce", "loss_bbox", "loss_ce_dn", "loss_ce_interm", "loss_bbox_interm"):
        assert history[-1][key] < history[0][key], key


def test_the_training_steps_run_dino_with_amp_accumulation_and_ema():
    """engine/steps.py passes the targets to DINO (takes_targets): bf16 autocast, two micro-batches, and
    the EMA copy (AveragedModel) all work on it; the losses stay float32 and finite."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from detr_deform.engine.steps import accumulated_step, train_step

    torch.manual_seed(0)
    cfg = _dino()
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9997), use_buffers=True)
    images, targets = [torch.randn(3, 64, 64), torch.randn(3, 64, 72)], _targets([3, 1])
    values, total, norm = train_step(model, criterion, images, targets, optimizer, 0.1, amp="bf16")
    assert set(criterion.weight_dict) <= set(values) and all(math.isfinite(v) for v in values.values())
    values, total, norm = accumulated_step(model, criterion, [(images[:1], targets[:1]), (images[1:], targets[1:])],
                                           optimizer, 0.1)
    assert math.isfinite(total) and torch.isfinite(norm)
    ema.update_parameters(model)
    with torch.no_grad():
        out = ema.module.eval()(images)
    assert torch.isfinite(out["pred_boxes"]).all()


@pytest.mark.parametrize("kind", ["ddetr_in_mmdet", "default", "large_wd"])
def test_parameter_groups_of_the_original(kind):
    from detr_deform.engine.optim import build_param_groups

    model = build_model(_dino())
    groups = {g["name"]: g for g in build_param_groups(model, 1e-4, 1e-5, ["backbone.0"],
                                                         ["reference_points", "sampling_offsets"], 0.1, kind)}
    names = {id(p): n for n, p in model.named_parameters()}
    offsets = [n for n, p in model.named_parameters() if "sampling_offsets" in n]
    grouped = {names[id(p)]: name for name, g in groups.items() for p in g["params"]}
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())  # every trained parameter once
    if kind == "ddetr_in_mmdet":  # Deformable DETR's: offsets at lr x 0.1
        assert {grouped[n] for n in offsets} == {"linear_proj"} and groups["linear_proj"]["lr"] == pytest.approx(1e-5)
    else:  # DINO's default: backbone vs the rest, offsets at the full lr
        assert {grouped[n] for n in offsets} <= {"default", "default_no_wd"}
    if kind == "large_wd":
        assert groups["default_no_wd"]["weight_decay"] == 0.0
        assert all("norm" in n or "bias" in n for n, g in grouped.items() if g.endswith("_no_wd"))
    assert all(g == "backbone" or g == "backbone_no_wd" for n, g in grouped.items() if n.startswith("backbone.0"))


def test_the_dino_presets_compose_with_the_original_defaults():
    from detr_deform.cli.compose import compose_config

    cfg = compose_config(["experiment=dino"])
    m, o = cfg.model, cfg.optim
    assert (m.arch, m.backbone, m.num_feature_levels, m.enc_layers, m.dec_layers, m.hidden_dim, m.nheads) == \
        ("dino", "resnet50", 4, 6, 6, 256, 8)
    assert (m.dim_feedforward, m.dropout, m.num_queries, m.enc_n_points, m.dec_n_points) == (2048, 0.0, 900, 4, 4)
    assert (m.cls_loss_coef, m.bbox_loss_coef, m.giou_loss_coef, m.interm_loss_coef, m.focal_alpha) == \
        (1.0, 5.0, 2.0, 1.0, 0.25)
    assert (m.set_cost_class, m.set_cost_bbox, m.set_cost_giou) == (2.0, 5.0, 2.0)
    assert (m.use_dn, m.dn_number, m.dn_label_noise_ratio, m.dn_box_noise_scale) == (True, 100, 0.5, 1.0)
    assert m.pe_temperature == (20, 20) and m.num_select == 300 and not m.use_detached_boxes_dec_out
    assert (o.lr, o.lr_backbone, o.param_dict_type, o.weight_decay, o.batch_size) == (1e-4, 1e-5, "default", 1e-4, 2)
    assert (o.epochs, o.scheduler, o.lr_drop, o.gamma, o.clip_max_norm) == (12, "step", 11, 0.1, 0.1)
    five = compose_config(["experiment=dino_5scale"])
    assert (five.model.num_feature_levels, five.model.backbone_out_indices, five.optim.batch_size) == \
        (5, [0, 1, 2, 3], 1)
    demo = compose_config(["experiment=dino_demo"])
    assert demo.model.arch == "dino" and demo.data.dataset == "demo" and demo.model.backbone_norm == "gn"


# ---------------------------------------------------------------- through the tools

@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.distributed
def test_train_py_trains_dino_under_ddp_and_logs_denoising_and_interm_losses(tiny_demo_root, tmp_path):
    """Two ranks (gloo): their images hold different numbers of boxes, so their denoising group
    counts differ; DDP's gradient all-reduce must not care (no hang, every loss finite)."""
    out = tmp_path / "run"
    args = tiny_train_args(tiny_demo_root, out, "model.arch=dino", "model.with_box_refine=false",
                           "model.two_stage=false", "model.dn_number=50", "optim.epochs=1",
                           "optim.param_dict_type=default")
    done = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "tools/train.py",
                *args])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "world size 2" in done.stdout and " dn " in done.stdout and " interm " in done.stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("type") == "train"]
    assert train_records and all(k in train_records[-1] for k in ("loss_ce_dn", "loss_bbox_interm", "loss_giou_dn_0"))
    assert all(math.isfinite(v) for r in train_records for k, v in r.items() if k.startswith("loss"))
    from PIL import Image

    from detr_deform import Detector, load_model
    model, cfg = load_model(out / "checkpoint_last.pth")
    assert type(model).__name__ == "DINO" and cfg.arch == "dino"
    image = Image.open(next((tiny_demo_root / "val2017").iterdir()))
    detections = Detector.from_pretrained(out / "checkpoint_last.pth", device="cpu")(image, threshold=0.0)
    assert len(detections) > 0


# ---------------------------------------------------------------- checkpoints

def _perturbed_dino(**overrides):
    torch.manual_seed(0)
    cfg = _dino(**overrides)
    model = build_model(cfg).eval()
    perturb(model)
    return model, cfg


def _same_outputs(a, b):
    images = [torch.randn(3, 64, 80, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        x, y = a(images), b(images)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(x[key], y[key]), key


def test_our_dino_checkpoint_round_trips_strictly(tmp_path):
    model, cfg = _perturbed_dino()
    save_checkpoint(tmp_path / "dino.pth", model, cfg)
    loaded, loaded_cfg = load_model(tmp_path / "dino.pth")
    assert loaded_cfg == cfg and type(loaded).__name__ == "DINO"
    _same_outputs(model, loaded)


def test_a_checkpoint_of_the_original_code_loads_strictly_with_the_same_outputs(tmp_path):
    # The original's layout: {'model': state_dict (its key names), 'args': Namespace}, with its argument names.
    model, cfg = _perturbed_dino(backbone_norm="frozen_bn")
    args = argparse.Namespace(
        modelname="dino", backbone="resnet18", dilation=False, position_embedding="sine", hidden_dim=64, nheads=4,
        enc_layers=2, dec_layers=2, dim_feedforward=64, dropout=0.0, num_queries=12, num_feature_levels=4,
        enc_n_points=4, dec_n_points=4, return_interm_indices=[1, 2, 3], two_stage_type="standard",
        embed_init_tgt=True, dec_pred_bbox_embed_share=True, dec_pred_class_embed_share=True,
        two_stage_bbox_embed_share=False, two_stage_class_embed_share=False, use_dn=True, dn_number=100,
        dn_label_noise_ratio=0.5, dn_box_noise_scale=1.0, dn_labelbook_size=5, pe_temperatureH=20,
        pe_temperatureW=20, num_select=300, lr_backbone=1e-5, masks=False, dataset_file="coco", num_classes=91,
        cls_loss_coef=1.0, interm_loss_coef=1.0, use_detached_boxes_dec_out=False, aux_loss=True)
    torch.save({"model": model.state_dict(), "args": args, "epoch": 11, "optimizer": {}}, tmp_path / "orig.pth")
    loaded, loaded_cfg = load_model(tmp_path / "orig.pth")
    assert (loaded_cfg.arch, loaded_cfg.num_classes, loaded_cfg.num_select, loaded_cfg.dn_labelbook_size) == \
        ("dino", 5, 300, 5)
    _same_outputs(model, loaded)
    # ... and ours written in that layout reads back the same way (tools/convert.py --to official).
    write_official(tmp_path / "ours_as_original.pth", loaded, loaded_cfg, None)
    again, again_cfg = load_model(tmp_path / "ours_as_original.pth")
    assert again_cfg.arch == "dino" and again_cfg.num_select == 300
    _same_outputs(model, again)
    # A switch the released models do not use is refused in one line.
    args.two_stage_type = "no"
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"args.two_stage_type='no': only 'standard'"):
        load_model(tmp_path / "other.pth")


def test_hugging_face_export_refuses_dino(tmp_path):
    model, cfg = _perturbed_dino()
    with pytest.raises(CheckpointError, match="transformers has no DINO model class"):
        save_hf(model, cfg, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
