"""Inputs a model or a tool cannot use, as one line: two-stage inputs with fewer encoder
tokens than queries, a missing optional package, category names that do not match the
checkpoint's, an init_from file with unused tensors, an empty video file."""
import json
import re
import warnings

import pytest
import torch

from detr_deform import build_model, save_checkpoint
from detr_deform.loading.model import init_from
from detr_deform.models.proposals import TooFewTokensError, encoder_tokens, refuse_too_few_tokens, smallest_square_side

from data_helpers import write_dataset, write_image
from model_helpers import tiny_config
from pipeline_helpers import PYTHON, ROOT, run, tiny_train_args, train

WITHOUT = str(ROOT / "tests" / "scripts" / "without_module.py")


def one_line(done, status: int) -> str:
    assert done.returncode == status, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1]


@pytest.fixture(scope="module")
def two_stage_checkpoint(tmp_path_factory):
    """A tiny two-stage model (num_queries=300, the official value) saved with validation sizes 32 / 64."""
    cfg = tiny_config(with_box_refine=True, two_stage=True, num_queries=300, attn_impl="pytorch")
    path = tmp_path_factory.mktemp("two_stage") / "model.pth"
    save_checkpoint(path, build_model(cfg), {"model": cfg.to_dict(), "data": {"val_size": 32, "max_size": 64}},
                    category_names={1: "square", 2: "circle"})
    return path


@pytest.mark.parametrize("height, width", [(64, 64), (65, 97), (33, 200), (1, 250)])
def test_too_small_inputs_are_one_error_with_the_model_s_own_token_count(height, width):
    model = build_model(tiny_config(with_box_refine=True, two_stage=True, num_queries=5000, attn_impl="pytorch"))
    model.eval()
    with torch.no_grad(), pytest.raises(TooFewTokensError) as caught:
        model([torch.zeros(3, height, width)])
    message = str(caught.value)
    assert "\n" not in message and f"a {width}x{height} (width x height) network input" in message
    tokens = int(re.search(r"gives only (\d+) encoder tokens", message).group(1))
    # The count the model met equals the formula the training check uses (ceil per stride, halving).
    assert tokens == encoder_tokens(height, width, model.backbone.strides, model.num_feature_levels)
    assert f"num_queries <= {tokens}" in message


def test_the_training_check_names_the_smallest_input_and_the_fix():
    strides, levels = [8, 16, 32], 4
    with pytest.raises(TooFewTokensError) as caught:
        refuse_too_few_tokens(300, strides, levels, {"training": ([(480, 640)], 96), "validation": ([], 800)}, 1333)
    side = smallest_square_side(300, strides, levels)
    assert encoder_tokens(side, side, strides, levels) >= 300 > encoder_tokens(side - 1, side - 1, strides, levels)
    assert str(caught.value) == (
        "model.two_stage with model.num_queries=300, but the smallest training input (96x96 px at data.train_scales "
        f"96, data.max_size=1333) gives only 193 encoder tokens to take the proposals from (the top-k would fail); "
        f"set model.num_queries<=193, or data.train_scales to at least {side} (a {side}x{side} input gives 300 tokens)")
    # An extreme aspect ratio in the data is what gives the fewest tokens: its image is named by its size.
    # (10, 5000) resizes to 1500x3 px (the official rule lets the longer side pass max_size): 353 tokens.
    with pytest.raises(TooFewTokensError, match=r"smallest validation input \(1500x3 px at data.val_size 800\, "
                                                r"data.max_size=1333\) gives only 353 encoder tokens"):
        refuse_too_few_tokens(400, strides, levels, {"validation": ([(10, 5000)], 800)}, 1333)
    refuse_too_few_tokens(300, strides, levels, {"training": ([(480, 640)], 480), "validation": ([], 800)}, 1333)


def test_training_refuses_before_the_first_step(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    done = train(*tiny_train_args(tiny_demo_root, out, "model.num_queries=500"))
    message = one_line(done, 2)
    tokens = encoder_tokens(96, 96, [8, 16, 32], 3)   # the demo: ResNet-18, 3 feature levels
    assert message.startswith("error: model.two_stage with model.num_queries=500, but the smallest training input "
                              f"(96x96 px at data.train_scales 96, data.max_size=128) gives only {tokens} encoder "
                              "tokens")
    assert f"set model.num_queries<={tokens}, or data.train_scales to at least" in message
    assert not (out / "checkpoint_last.pth").exists() and "step 1" not in done.stdout


def test_inference_and_evaluation_of_too_small_inputs_are_one_line(two_stage_checkpoint, tmp_path):
    write_image(tmp_path / "a.jpg", (64, 48))
    done = run([PYTHON, "tools/infer.py", str(two_stage_checkpoint), str(tmp_path / "a.jpg"), "--output-dir",
                str(tmp_path / "out"), "--device", "cpu"])
    tokens = encoder_tokens(32, 42, [8, 16, 32], 4)     # 64x48 at val_size 32 -> 42x32
    assert one_line(done, 2).startswith("error: two-stage model with num_queries=300, but a 42x32 (width x height) "
                                        f"network input gives only {tokens} encoder tokens")
    images, annotations, _ = write_dataset(tmp_path / "data", 2)
    done = run([PYTHON, "tools/eval.py", str(two_stage_checkpoint), "--images", str(images), "--annotations",
                str(annotations), "--num-workers", "0", "--device", "cpu", "--output", str(tmp_path / "m.json")])
    assert "two-stage model with num_queries=300" in one_line(done, 2)
    assert not (tmp_path / "m.json").exists()


def test_export_without_onnx_is_one_line_naming_the_extra(two_stage_checkpoint, tmp_path):
    output = tmp_path / "model.onnx"
    done = run([PYTHON, WITHOUT, "onnx", "tools/export.py", str(two_stage_checkpoint), "--output", str(output)])
    assert one_line(done, 1) == "error: exporting and checking need onnx: pip install 'detr_deform[tools]'"
    assert not output.exists()


def test_eval_warns_when_category_names_are_permuted_against_the_checkpoint(tmp_path):
    cfg = tiny_config(num_classes=3, attn_impl="pytorch", num_queries=5)
    checkpoint = tmp_path / "model.pth"
    save_checkpoint(checkpoint, build_model(cfg), {"model": cfg.to_dict(), "data": {"val_size": 64}},
                    category_names={1: "circle", 2: "square"})      # the dataset has 1: square, 2: circle
    images, annotations, _ = write_dataset(tmp_path / "data", 2)
    done = run([PYTHON, "tools/eval.py", str(checkpoint), "--images", str(images), "--annotations", str(annotations),
                "--num-workers", "0", "--device", "cpu", "--output", str(tmp_path / "m.json")])
    assert done.returncode == 0, done.stderr[-3000:]
    warning = next(line for line in done.stderr.splitlines() if "category name" in line)
    assert warning.startswith(f"WARNING: 2 category name(s) of {annotations} differ from the checkpoint's for the "
                              "same id (id 1: 'square' here, 'circle' in the checkpoint; id 2: 'circle' here, "
                              "'square' in the checkpoint)")
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["AP"] >= 0
    same = tmp_path / "same.pth"
    save_checkpoint(same, build_model(cfg), {"model": cfg.to_dict(), "data": {"val_size": 64}},
                    category_names={1: "square", 2: "circle"})
    done = run([PYTHON, "tools/eval.py", str(same), "--images", str(images), "--annotations", str(annotations),
                "--num-workers", "0", "--device", "cpu", "--output", str(tmp_path / "m2.json")])
    assert done.returncode == 0 and "category name" not in done.stderr


def test_init_from_reports_the_files_tensors_it_left_unused(tmp_path):
    source = build_model(tiny_config(attn_impl="pytorch"))                        # 4 feature levels
    path = tmp_path / "four_levels.pth"
    save_checkpoint(path, source, tiny_config(attn_impl="pytorch"))
    target = build_model(tiny_config(num_feature_levels=3, attn_impl="pytorch"))  # no input_proj.3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = init_from(target, path)
    unused = sorted(k for k in source.state_dict() if k not in target.state_dict())
    assert unused and report["unexpected"] == unused
    message = next(str(w.message) for w in caught if "init_from" in str(w.message))
    assert f"left unused {len(unused)} tensor(s) of the file that the model does not have" in message
    assert unused[0] in message


def test_an_empty_video_file_says_it_is_empty(tmp_path):
    from detr_deform.inference.video import VideoError, VideoReader

    empty = tmp_path / "clip.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError) as caught:
        VideoReader(empty)
    assert str(caught.value) == f"{empty} is empty (0 bytes): an interrupted copy or recording? Nothing to read"
    assert "Invalid data" not in str(caught.value)


def test_the_official_resize_of_an_extreme_image_runs_through_the_detector():
    """5000x2: the official rounding gives a 0-pixel side (the resize failed); now 1 px, and one-stage
    models detect on it (two-stage ones get the token error above when the input is too small)."""
    from detr_deform import Detector

    cfg = tiny_config(attn_impl="pytorch")
    model = build_model(cfg)
    detector = Detector(model, cfg, val_size=96, max_size=128)
    found = detector(torch.zeros(3, 2, 5000, dtype=torch.uint8), threshold=0.0)
    assert found[0].height == 2 and found[0].width == 5000
