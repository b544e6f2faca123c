"""DAT backbone: structure and checkpoint layout of the released models, the
official behaviours (facts sheet), any input size, padding invariance,
gradients, checkpoint loading, and Deformable DETR training with it (Hydra
composition with DAT: test_config.py; tools/train.py runs: test_train_pipeline.py)."""
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from detr_deform.io.checkpoint import CheckpointError
from detr_deform.layers.dat_blocks import DeformableAttention2d, LocalAttention, shift_window_mask
from detr_deform.models import DAT, DATBackbone, build_dat, load_dat_checkpoint
from detr_deform.utils.nested_tensor import nested_tensor_from_tensor_list

# A small DAT with every block type (L, S, D) that runs in milliseconds.
SMALL = dict(img_size=64, dim_stem=32, dims=[32, 64, 128, 256], depths=[2, 2, 2, 2], heads=[1, 2, 4, 8],
             groups=[-1, -1, 1, 2], window_sizes=[4, 4, 2, 2], stage_spec=[["L", "S"], ["L", "S"], ["L", "D"],
                                                                           ["L", "D"]], drop_path_rate=0.0,
             strides=[-1, -1, 1, 1], offset_range_factor=[-1, -1, 2, 2], use_pes=[False, False, True, True])


def official_dat_t_keys() -> dict[str, tuple]:
    """Every DAT-T state-dict entry and shape, written out from the facts sheet's
    key table (independently of our module tree)."""
    keys = {"patch_proj.0.weight": (96, 3, 4, 4), "patch_proj.0.bias": (96,), "patch_proj.1.norm.weight": (96,),
            "patch_proj.1.norm.bias": (96,), "cls_norm.norm.weight": (768,), "cls_norm.norm.bias": (768,),
            "cls_head.weight": (1000, 768), "cls_head.bias": (1000,)}
    dims, heads, specs = [96, 192, 384, 768], [3, 6, 12, 24], ["LS", "LS", "LDLDLD", "LD"]
    fmaps, kernels = [56, 28, 14, 7], [9, 7, 5, 3]
    for i, (c, h, spec) in enumerate(zip(dims, heads, specs)):
        p = f"stages.{i}."
        for d, letter in enumerate(spec):
            for n in (2 * d, 2 * d + 1):
                keys[f"{p}layer_norms.{n}.norm.weight"] = (c,)
                keys[f"{p}layer_norms.{n}.norm.bias"] = (c,)
            keys[f"{p}mlps.{d}.chunk.linear1.weight"] = (4 * c, c)
            keys[f"{p}mlps.{d}.chunk.linear1.bias"] = (4 * c,)
            keys[f"{p}mlps.{d}.chunk.linear2.weight"] = (c, 4 * c)
            keys[f"{p}mlps.{d}.chunk.linear2.bias"] = (c,)
            a = f"{p}attns.{d}."
            if letter in "LS":
                keys[a + "relative_position_bias_table"] = (169, h)
                keys[a + "relative_position_index"] = (49, 49)
                keys[a + "proj_qkv.weight"] = (3 * c, c)
                keys[a + "proj_qkv.bias"] = (3 * c,)
                keys[a + "proj_out.weight"] = (c, c)
                keys[a + "proj_out.bias"] = (c,)
                if letter == "S":
                    keys[a + "attn_mask"] = ((fmaps[i] // 7) ** 2, 49, 49)
            else:
                keys[a + "rpe_table"] = (h, 2 * fmaps[i] - 1, 2 * fmaps[i] - 1)
                keys[a + "conv_offset.0.weight"] = (128, 1, kernels[i], kernels[i])
                keys[a + "conv_offset.0.bias"] = (128,)
                keys[a + "conv_offset.1.norm.weight"] = (128,)
                keys[a + "conv_offset.1.norm.bias"] = (128,)
                keys[a + "conv_offset.3.weight"] = (2, 128, 1, 1)
                for name in ("proj_q", "proj_k", "proj_v", "proj_out"):
                    keys[f"{a}{name}.weight"] = (c, c, 1, 1)
                    keys[f"{a}{name}.bias"] = (c,)
    for j in range(3):
        keys[f"down_projs.{j}.0.weight"] = (dims[j + 1], dims[j], 2, 2)
        keys[f"down_projs.{j}.1.norm.weight"] = (dims[j + 1],)
        keys[f"down_projs.{j}.1.norm.bias"] = (dims[j + 1],)
    return keys


def test_released_configurations_match_the_official_models():
    model = build_dat("dat_tiny")
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == official_dat_t_keys()
    assert len(state) == 219 and sum(p.numel() for p in model.parameters()) == pytest.approx(28.32e6, rel=1e-3)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        logits = model.eval()(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000)
    assert counter.get_total_flops() / 2e9 == pytest.approx(4.56, abs=0.01)   # MACs measured on the official model
    small = build_dat("dat_small")
    assert len(small.state_dict()) == 435
    assert sum(p.numel() for p in small.parameters()) == pytest.approx(49.70e6, rel=1e-3)


def _fake_yacs():
    """A stand-in yacs.config.CfgNode module, only for writing a file like the official one."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__["__immutable__"] = False     # as yacs does: pickles with a BUILD state

    CfgNode.__module__ = "yacs.config"
    CfgNode.__qualname__ = "CfgNode"
    config.CfgNode = CfgNode
    yacs.config = config
    return yacs, config


def test_official_checkpoint_loads_strictly_including_buffers(tmp_path, monkeypatch):
    source = build_dat("dat_tiny")
    yacs, config = _fake_yacs()
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    node = config.CfgNode(MODEL={"TYPE": "dat"})
    path = tmp_path / "dat_tiny_in1k_224.pth"
    torch.save({"model": source.state_dict(), "optimizer": {}, "epoch": 299, "max_accuracy": 82.0,
                "config": node}, path)
    monkeypatch.delitem(sys.modules, "yacs")
    monkeypatch.delitem(sys.modules, "yacs.config")
    target = build_dat("dat_tiny")
    assert load_dat_checkpoint(target, path) == {"missing": [], "unexpected": [], "shape_mismatch": []}
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))
    # Strict: a missing buffer or a wrong preset is refused with the keys named.
    state = source.state_dict()
    del state["stages.0.attns.1.attn_mask"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"1 missing \['stages.0.attns.1.attn_mask'\]"):
        load_dat_checkpoint(build_dat("dat_tiny"), tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match="does not match this DAT configuration"):
        load_dat_checkpoint(build_dat("dat_small"), path)


def test_dat_plus_plus_checkpoint_is_refused(tmp_path):
    fake = {"patch_proj.0.weight": torch.zeros(32, 3, 3, 3), "patch_proj.1.weight": torch.zeros(32),
            "stages.0.attns.0.proj_q.weight": torch.zeros(64, 64, 1, 1)}
    torch.save({"model": fake}, tmp_path / "dat_pp_tiny_in1k_224.pth")
    with pytest.raises(CheckpointError, match="DAT\\+\\+"):
        load_dat_checkpoint(build_dat("dat_tiny"), tmp_path / "dat_pp_tiny_in1k_224.pth")


def test_shift_and_mask_follow_the_official_code():
    attn = LocalAttention(32, 2, 7, 0.0, 0.0, shifted=True, fmap_size=(14, 14))
    assert attn.shift == 4                                     # ceil(7 / 2), not Swin's 3
    mask = attn.attn_mask
    assert mask.shape == (4, 49, 49) and set(mask.unique().tolist()) == {-100.0, 0.0}
    assert (mask[0] == 0).all()                                # the top-left window is one region
    labels = torch.zeros(14, 14)
    labels[7:10] += 3
    labels[10:] += 6
    labels[:, 7:10] += 1
    labels[:, 10:] += 2                                         # bands [0, H-ws), [H-ws, H-shift), [H-shift, H)
    last = labels[7:, 7:].reshape(-1)
    assert torch.equal(mask[3], torch.where(last[None] == last[:, None], 0.0, -100.0))
    assert torch.equal(shift_window_mask(14, 14, 7, 4), mask)


def test_generic_size_code_equals_the_construction_size_path():
    """At the construction size the buffers (official path) are used; the same
    inputs through the size-generic code (computed masks) give the same result."""
    torch.manual_seed(0)
    model = DAT(**SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        official_path = model.forward_features(x)
        for module in model.modules():
            if isinstance(module, LocalAttention) and module.shift:
                module.fmap_size = (-1, -1)                    # force the run-time mask computation
        generic_path = model.forward_features(x)
    for a, b in zip(official_path, generic_path):
        assert torch.equal(a, b)


def _literal_deformable_attention(module: DeformableAttention2d, x: torch.Tensor) -> torch.Tensor:
    """The facts sheet's section 6 step by step, one image, group and head at a time."""
    batch, channels, height, width = x.shape
    cg, hc, hg, s = module.group_channels, module.head_channels, module.group_heads, module.offset_range_factor
    q = module.proj_q(x)
    query_y = ((torch.arange(height) + 0.5) / height * 2 - 1)[:, None].expand(height, width).reshape(-1)
    query_x = ((torch.arange(width) + 0.5) / width * 2 - 1)[None, :].expand(height, width).reshape(-1)
    outputs = []
    for b in range(batch):
        sampled, positions = [], []
        for g in range(module.groups):
            raw = module.conv_offset(q[b:b + 1, g * cg:(g + 1) * cg])[0]           # (2, Hk, Wk): y then x
            hk, wk = raw.shape[-2:]
            ref_y = ((torch.arange(hk) + 0.5) / hk * 2 - 1)[:, None]
            ref_x = ((torch.arange(wk) + 0.5) / wk * 2 - 1)[None, :]
            pos_y = ref_y + torch.tanh(raw[0]) / hk * s                              # not clamped
            pos_x = ref_x + torch.tanh(raw[1]) / wk * s
            grid = torch.stack([pos_x, pos_y], -1)[None]                            # grid_sample wants (x, y)
            sampled.append(F.grid_sample(x[b:b + 1, g * cg:(g + 1) * cg], grid, align_corners=True))
            positions.append((pos_y.reshape(-1), pos_x.reshape(-1)))
        sampled = torch.cat(sampled, 1)                                              # keys/values from x
        k, v = module.proj_k(sampled)[0].flatten(1), module.proj_v(sampled)[0].flatten(1)   # (C, Ns)
        heads = []
        for h in range(module.heads):
            g = h // hg                                                              # contiguous head groups
            q_h = q[b, h * hc:(h + 1) * hc].flatten(1)                               # (hc, HW)
            logits = q_h.T @ k[h * hc:(h + 1) * hc] * module.scale                  # (HW, Ns)
            pos_y, pos_x = positions[g]
            d_y = 0.5 * (query_y[:, None] - pos_y[None, :])
            d_x = 0.5 * (query_x[:, None] - pos_x[None, :])
            table = module.rpe_table[h][None, None]
            bias = F.grid_sample(table, torch.stack([d_x, d_y], -1)[None], align_corners=True)[0, 0]
            attention = (logits + bias).softmax(-1)
            heads.append(v[h * hc:(h + 1) * hc] @ attention.T)                      # (hc, HW)
        outputs.append(torch.cat(heads, 0).view(channels, height, width))
    return module.proj_out(torch.stack(outputs))


def test_batched_deformable_attention_equals_the_literal_description():
    torch.manual_seed(0)
    module = DeformableAttention2d(64, 4, 2, 0.0, 0.0, 1, 2.0, True, 2, (7, 9)).eval()
    torch.nn.init.normal_(module.conv_offset[3].weight, std=0.5)    # large offsets, some outside the map
    torch.nn.init.normal_(module.rpe_table, std=0.5)
    for size in ((7, 9), (5, 12)):                                  # construction size and another one
        x = torch.randn(2, 64, *size)
        with torch.no_grad():
            assert torch.allclose(module(x), _literal_deformable_attention(module, x), atol=2e-5)


def test_deformable_attention_quirks():
    """Zero offsets sample at (i + 0.5)(H - 1)/H (pixel-centre grid, align_corners=True);
    the bias table is read at half the query-minus-key displacement."""
    torch.manual_seed(0)
    module = DeformableAttention2d(8, 2, 1, 0.0, 0.0, 1, 2.0, True, 3, (6, 6)).eval()
    torch.nn.init.zeros_(module.conv_offset[3].weight)          # zero offsets
    x = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 8, 6, 6).contiguous()   # value = row index
    captured = {}
    original = F.grid_sample

    def spy(input, grid, **kwargs):
        result = original(input, grid, **kwargs)
        captured.setdefault("keys", result)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "grid_sample", spy)
        with torch.no_grad():
            module(x)
    rows = captured["keys"][0, 0, :, 0]
    expected = (torch.arange(6) + 0.5) * 5 / 6
    assert torch.allclose(rows, expected, atol=1e-6)            # 0.417, 1.25, 2.083, ...


def test_any_size_and_batch_padding_invariance():
    torch.manual_seed(0)
    backbone = DATBackbone("dat_tiny", dat_kwargs={k: v for k, v in SMALL.items() if k != "img_size"}).eval()
    a, b = torch.randn(3, 333, 517), torch.randn(3, 200, 180)
    with torch.no_grad():
        alone = backbone(nested_tensor_from_tensor_list([a]))
        batched = backbone(nested_tensor_from_tensor_list([a, b]))
        b_alone = backbone(nested_tensor_from_tensor_list([b]))
    assert [tuple(f.tensors.shape) for f in alone] == [(1, 64, 44, 68), (1, 128, 22, 34), (1, 256, 11, 17)]
    assert backbone.strides == [8, 16, 32] and backbone.num_channels == [64, 128, 256]
    for single, pair, other in zip(alone, batched, b_alone):
        assert torch.equal(pair.tensors[0], single.tensors[0])
        h, w = other.tensors.shape[-2:]
        assert torch.equal(pair.tensors[1, :, :h, :w], other.tensors[0])
        assert torch.equal(pair.mask[0], single.mask[0])          # padding to 352 x 544 is marked
        assert not single.mask[0, 0, 0] and pair.mask[1, -1, -1]
    assert alone[0].mask[0, -1].all()                               # rows 333..351 at stride 8


def test_gradients_reach_offsets_and_bias_tables():
    torch.manual_seed(0)
    model = DAT(**SMALL, num_classes=5)
    loss = model(torch.randn(2, 3, 70, 90)).logsumexp(-1).sum()
    loss.backward()
    named = dict(model.named_parameters())
    for key in ("stages.2.attns.1.conv_offset.0.weight", "stages.2.attns.1.conv_offset.3.weight",
                "stages.3.attns.1.rpe_table", "stages.0.attns.1.relative_position_bias_table"):
        assert named[key].grad is not None and named[key].grad.abs().sum() > 0, key


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DAT(**SMALL, num_classes=5)
    x = torch.randn(1, 3, 64, 64)
    model(x).sum().backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for key, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, plain[key], atol=1e-6), key


def test_deformable_detr_with_dat_trains():
    from detr_deform import ModelConfig, build_criterion, build_model
    from detr_deform.config import OptimConfig
    from detr_deform.engine.optim import build_optimizer
    from detr_deform.engine.steps import train_step

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="dat_tiny", dat_kwargs={k: v for k, v in SMALL.items() if k != "img_size"},
                      num_classes=3, hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                      num_queries=10, num_feature_levels=4, with_box_refine=True, two_stage=True)
    model, criterion = build_model(cfg), build_criterion(cfg)
    assert model.backbone[0].strides == [8, 16, 32]
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, lr_backbone=1e-3))
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 112)]
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.3]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])}]
    losses = [train_step(model, criterion, images, targets, optimizer, 0.1)[1] for _ in range(12)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_pretrained_weights_from_a_local_file(tmp_path):
    small = dict(SMALL)                       # img_size too: it sizes the shift masks and bias tables
    source = DAT(**SMALL, num_classes=10)
    path = tmp_path / "dat_small_config_in1k.pth"
    torch.save({"model": source.state_dict()}, path)
    backbone = DATBackbone("dat_tiny", pretrained=str(path), dat_kwargs=small)
    assert backbone.load_report == {"missing": [], "unexpected": [], "shape_mismatch": []}   # classifier dropped
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    state = source.state_dict()
    state["stages.0.extra.weight"] = torch.zeros(3)
    del state["stages.3.attns.1.rpe_table"]
    torch.save({"model": state}, path)
    with pytest.warns(UserWarning, match=r"1 missing keys \['stages.3.attns.1.rpe_table'\].*1 unexpected"):
        DATBackbone("dat_tiny", pretrained=str(path), dat_kwargs=small)
    with pytest.raises(CheckpointError, match="model.pretrained_backbone: backbone weights file not found"):
        DATBackbone("dat_tiny", pretrained=str(tmp_path / "missing.pth"), dat_kwargs=small)
