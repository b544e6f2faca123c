"""tools/convert.py: official -> HF -> ours -> official, bitwise on every weight, and the
same outputs from every file; exit statuses and one-line errors."""
import json
import math
from pathlib import Path

import pytest
import torch

from detr_deform import build_model, load_model, save_checkpoint
from detr_deform.cli.convert import OFFICIAL_FIELDS
from detr_deform.io.checkpoint import read_checkpoint
from detr_deform.loading.hf import read_hf

from model_helpers import TINY, VARIANTS, perturb, tiny_config
from test_checkpoint import official_args
from test_tools import tool_module

ROOT = Path(__file__).resolve().parent.parent
convert = tool_module("convert")


# Tiny models: extra threads only add synchronisation (and stall on a loaded machine).
pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed_official_file(path: Path, variant: str) -> Path:
    """An official-format file (model + official args) of a tiny model whose every weight,
    zero bias and BatchNorm statistic is perturbed (independent heads stay independent)."""
    torch.manual_seed(5)
    model = build_model(tiny_config(**VARIANTS[variant]))
    perturb(model, seed=6)
    args = official_args(**{k: v for k, v in TINY.items() if k != "num_classes"}, **VARIANTS[variant])
    torch.save({"model": model.state_dict(), "args": args, "epoch": 49}, path)
    return path


def outputs(path: Path) -> dict:
    model, _ = load_model(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model([torch.randn(3, 64, 80, generator=g), torch.randn(3, 48, 96, generator=g)])
    return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_hf_ours_official_round_trip_is_bitwise(tmp_path, variant):
    official = perturbed_official_file(tmp_path / "official.pth", variant)
    assert convert.main([str(official), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "ours.pth"), "--to", "detr_deform"]) == 0
    assert convert.main([str(tmp_path / "ours.pth"), str(tmp_path / "back.pth"), "--to", "official"]) == 0
    assert convert.main([str(tmp_path / "back.pth"), str(tmp_path / "hf2"), "--to", "hf"]) == 0

    source, back = read_checkpoint(official), read_checkpoint(tmp_path / "back.pth")
    assert source["model"].keys() == back["model"].keys()
    assert all(torch.equal(source["model"][k], back["model"][k]) for k in source["model"]), "weights changed"
    ours = read_checkpoint(tmp_path / "ours.pth")["model"]
    assert all(torch.equal(source["model"][k], ours[k]) for k in source["model"])
    for name in OFFICIAL_FIELDS + ("lr_backbone", "masks", "dataset_file"):
        assert getattr(back["args"], name) == getattr(source["args"], name), name
    first, second = read_hf(tmp_path / "hf")["model"], read_hf(tmp_path / "hf2")["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)

    expected = outputs(official)
    for path in (tmp_path / "hf", tmp_path / "ours.pth", tmp_path / "back.pth", tmp_path / "hf2"):
        got = outputs(path)
        for key in expected:
            assert torch.equal(got[key], expected[key]), (path.name, key)


def test_category_names_travel_and_config_fields(tmp_path, capsys):
    cfg = tiny_config(with_box_refine=True, num_select=30, set_cost_class=1.0)
    names = {"1": "square", "2": "circle", "4": "triangle"}
    save_checkpoint(tmp_path / "ours.pth", build_model(cfg), cfg, category_names=names)
    assert convert.main([str(tmp_path / "ours.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert read_hf(tmp_path / "hf")["category_names"] == names  # id 0 and 3 were "N/A" in id2label
    assert load_model(tmp_path / "hf")[1] == cfg
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "official.pth"), "--to", "official"]) == 0
    official = read_checkpoint(tmp_path / "official.pth")
    assert official["category_names"] == names and official["args"].set_cost_class == 1.0
    assert math.isclose(official["args"].position_embedding_scale, 2 * math.pi)
    assert load_model(tmp_path / "official.pth")[1].num_select == 100  # no place for it in official args


def test_validation_sizes_travel_through_hugging_face(tmp_path):
    cfg = tiny_config()
    config = {"model": cfg.to_dict(), "data": {"val_size": 96, "max_size": 128, "num_workers": 0}}
    save_checkpoint(tmp_path / "ours.pth", build_model(cfg), config)
    assert convert.main([str(tmp_path / "ours.pth"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    size = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())["size"]
    assert size == {"shortest_edge": 96, "longest_edge": 128}
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "back.pth"), "--to", "detr_deform"]) == 0
    assert read_checkpoint(tmp_path / "back.pth")["config"]["data"] == {"val_size": 96, "max_size": 128}


def test_exit_statuses_and_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as bad_format:
        convert.main(["a.pth", "b.pth", "--to", "onnx"])
    assert bad_format.value.code == 2
    assert convert.main([str(tmp_path / "missing.pth"), str(tmp_path / "x.pth"), "--to", "hf"]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err
    cfg = tiny_config(activation="gelu")
    save_checkpoint(tmp_path / "gelu.pth", build_model(cfg), cfg)
    assert convert.main([str(tmp_path / "gelu.pth"), str(tmp_path / "official.pth"), "--to", "official"]) == 1
    err = capsys.readouterr().err
    assert "model.activation='gelu'" in err and err.count("\n") == 1
    assert not (tmp_path / "official.pth").exists()
    (tmp_path / "taken.pth").write_bytes(b"x")
    assert convert.main([str(tmp_path / "gelu.pth"), str(tmp_path / "taken.pth"), "--to", "detr_deform"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "gelu.pth"), str(tmp_path / "taken.pth"), "--to", "detr_deform",
                         "--overwrite"]) == 0


def test_the_calibrated_threshold_travels_into_our_format_only(tmp_path, capsys):
    from detr_deform.evaluation.score_threshold import stored_score_threshold

    cfg = tiny_config()
    save_checkpoint(tmp_path / "ours.pth", build_model(cfg), cfg, step=40,
                    score_threshold={"threshold": 0.27, "f1": 0.8, "step": 40})
    assert convert.main([str(tmp_path / "ours.pth"), str(tmp_path / "copy.pth"), "--to", "detr_deform"]) == 0
    assert stored_score_threshold(read_checkpoint(tmp_path / "copy.pth")) == 0.27
    assert convert.main([str(tmp_path / "ours.pth"), str(tmp_path / "official.pth"), "--to", "official"]) == 0
    assert stored_score_threshold(read_checkpoint(tmp_path / "official.pth")) is None  # no place for it
    capsys.readouterr()
