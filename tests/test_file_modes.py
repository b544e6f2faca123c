"""Every output of train / eval / infer / convert / export / save_hf is readable by the group and
others under the usual umask 022 (the tests run under it, see conftest.py): files 0644, folders
0755 — a colleague or a web server in the same group can read the results. All of them are
written by the one atomic writer (utils/files.py: atomic_path), which also fsyncs."""
import os
import stat

from detr_deform import build_model, save_checkpoint, save_hf
from detr_deform.utils.files import current_umask

from model_helpers import tiny_config
from test_tools import tool_module


def unreadable(folder) -> list[str]:
    """Files under ``folder`` that the group or others cannot read (folders: cannot enter)."""
    bad = []
    for root, dirs, files in os.walk(folder):
        for name in files:
            mode = os.stat(os.path.join(root, name)).st_mode
            if stat.S_IMODE(mode) & 0o044 != 0o044:
                bad.append(f"{os.path.join(root, name)} {oct(stat.S_IMODE(mode))}")
        for name in dirs:
            mode = os.stat(os.path.join(root, name)).st_mode
            if stat.S_IMODE(mode) & 0o055 != 0o055:
                bad.append(f"{os.path.join(root, name)}/ {oct(stat.S_IMODE(mode))}")
    return bad


def test_every_tool_output_is_readable_by_group_and_others(trained_run, tiny_demo_root, tmp_path):
    assert current_umask() == 0o022
    run_dir = trained_run[0]
    assert unreadable(run_dir) == []  # config.yaml, log.jsonl, checkpoints, metrics, TensorBoard events
    checkpoint = run_dir / "checkpoint_last.pth"

    evaluation = tmp_path / "eval"
    assert tool_module("eval").main([str(checkpoint), "--output", str(evaluation / "metrics.json"),
                                     "--dump-detections", str(evaluation / "detections.json"),
                                     "--num-workers", "0"]) == 0
    infer = tmp_path / "infer"
    assert tool_module("infer").main([str(checkpoint), str(tiny_demo_root / "val2017" / "val_00001.jpg"),
                                      "--draw", "--output-dir", str(infer)]) == 0
    # The demo model has a GroupNorm backbone, which the official and HF formats cannot hold: a tiny
    # official-style model (frozen BatchNorm) for those.
    model = build_model(tiny_config())
    official_style = save_checkpoint(tmp_path / "tiny.pth", model, tiny_config())
    convert = tool_module("convert")
    for source, target in ((official_style, "hf"), (official_style, "official"), (checkpoint, "detr_deform")):
        destination = tmp_path / "convert" / (target if target == "hf" else f"{target}.pth")
        assert convert.main([str(source), str(destination), "--to", target]) == 0
    export = tmp_path / "export"
    assert tool_module("export").main([str(checkpoint), "--output", str(export / "model.onnx"), "--height", "64",
                                       "--width", "96", "--max-check-images", "1"]) == 0
    save_hf(model, tiny_config(), tmp_path / "save_hf")

    for folder, expected in ((evaluation, {"metrics.json", "detections.json"}),
                             (infer, {"detections.json", "images.json", "detections.jsonl", "val_00001.png"}),
                             (tmp_path / "convert",
                              {"config.json", "model.safetensors", "official.pth", "detr_deform.pth"}),
                             (export, {"model.onnx", "model.check.json"}),
                             (tmp_path / "save_hf", {"config.json", "model.safetensors"})):
        written = {name for _, _, files in os.walk(folder) for name in files}
        assert expected <= written, (folder, written)
        assert unreadable(folder) == [], folder
