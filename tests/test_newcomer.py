"""What a newcomer meets first: the runs/<experiment>/latest link, the demo-data and
training progress lines, `python -m detr_deform.ops info`, a flag given instead of
key=value, the dataset browser on an image without objects, plot_logs with few points."""
import os

import pytest

from detr_deform.utils.files import OutputError, update_latest_link


def test_latest_link_names_the_newest_run_and_is_replaced_atomically(tmp_path):
    base = tmp_path / "runs" / "demo"
    first, second = base / "20261203-100000", base / "20261203-110000"
    first.mkdir(parents=True)
    link = update_latest_link(first)
    assert link == base / "latest" and link.is_symlink() and os.readlink(link) == first.name  # relative
    (first / "log.jsonl").write_text("{}\n")
    assert (link / "log.jsonl").read_text() == "{}\n"
    second.mkdir()
    update_latest_link(second)
    assert link.resolve() == second.resolve()
    assert sorted(p.name for p in base.iterdir()) == [first.name, second.name, "latest"]  # no temporary left
    moved = tmp_path / "elsewhere"
    base.rename(moved)  # relative: the link survives moving the runs folder
    assert (moved / "latest").resolve() == (moved / second.name).resolve()


def test_latest_link_that_cannot_be_made_is_one_output_error(tmp_path):
    run_dir = tmp_path / "demo" / "20261203-100000"
    run_dir.mkdir(parents=True)
    (tmp_path / "demo" / "latest").mkdir()
    (tmp_path / "demo" / "latest" / "mine.txt").write_text("a folder the user made")
    with pytest.raises(OutputError, match="could not write .*latest"):
        update_latest_link(run_dir)
    assert (tmp_path / "demo" / "latest" / "mine.txt").read_text() == "a folder the user made"  # untouched
    assert not list((tmp_path / "demo").glob(".latest*"))


@pytest.mark.parametrize("argv, meant", [(["--experiment", "demo"], "experiment=demo"),
                                         (["--experiment=demo"], "experiment=demo"),
                                         (["experiment=demo", "--optim.lr", "1e-4"], "optim.lr=1e-4")])
def test_a_flag_instead_of_an_override_names_the_override_meant(argv, meant):
    from detr_deform.cli.compose import compose_config
    from detr_deform.config import ConfigError

    with pytest.raises(ConfigError) as error:
        compose_config(argv)
    message = str(error.value)
    assert f"e.g. {meant}" in message and "key=value" in message and "\n" not in message
    assert "Exception" not in message and "Lexer" not in message


def test_override_syntax_errors_carry_no_parser_class_name():
    from detr_deform.cli.compose import compose_config
    from detr_deform.config import ConfigError

    with pytest.raises(ConfigError) as error:
        compose_config(["optim.lr=[1,"])
    assert "Exception" not in str(error.value) and "key=value" in str(error.value)


def test_ops_info_says_which_builds_exist_and_work(tmp_path, monkeypatch):
    from detr_deform.ops import _build
    from detr_deform.ops.status import build_statuses, format_statuses

    cpu = build_statuses()[0]  # the cache the operator tests use (nothing is compiled here)
    if not cpu.state.startswith(("not built", "built, but older")):  # a build to load: it works
        assert cpu.name == "cpu" and cpu.state.startswith("works (loads; a forward pass on cpu matches"), cpu
    monkeypatch.setenv("DETR_DEFORM_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("DETR_DEFORM_WITH_CUDA", "0")
    assert all(s.state.startswith(("not built", "not possible")) for s in build_statuses())
    broken = _build.build_dir(False) / "detr_deform_ops_cpu.so"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a shared library")
    os.utime(broken, (0, 0))  # older than every source: ninja would rebuild it
    assert build_statuses()[0].state == "built, but older than the sources: rebuilt on next use"
    os.utime(broken, None)
    state = build_statuses()[0].state
    assert state.startswith("fails: does not load (") and state.endswith("rebuild it") and "\n" not in state
    text = format_statuses(build_statuses())
    assert str(broken) in text and "cuda-emulation" in text


def test_demo_generation_reports_progress(tmp_path):
    from detr_deform.data import demo

    lines = []
    demo.ensure_demo_dataset(tmp_path / "demo", sizes={"train": demo.PROGRESS_EVERY + 1, "val": 2},
                             progress=lines.append)
    assert lines[0].startswith(f"demo dataset: generating {demo.PROGRESS_EVERY + 1} train + 2 val images in "
                               f"{tmp_path / 'demo'}") and "DETR_DEFORM_DATA" in lines[0]
    assert lines[1] == f"demo dataset: train {demo.PROGRESS_EVERY}/{demo.PROGRESS_EVERY + 1} images"
    assert lines[-1].startswith("demo dataset: ready in ") and len(lines) == 3
    again = []
    demo.ensure_demo_dataset(tmp_path / "demo", progress=again.append)
    assert again == []  # already there: nothing generated, nothing said


def test_a_run_prints_its_first_steps_and_links_latest(tiny_demo_root, tmp_path):
    import subprocess
    import sys

    from pipeline_helpers import ROOT, tiny_train_args

    args = [a for a in tiny_train_args(tiny_demo_root, tmp_path) if not a.startswith("runtime.output_dir")]
    args = [a for a in args if not a.startswith(("runtime.log_every", "optim.epochs", "runtime.max_steps"))]
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), *args, "runtime.log_every=50",
                           "optim.epochs=1", "runtime.max_steps_per_epoch=3", "runtime.progress=log"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    early = [line for line in done.stdout.splitlines() if line.startswith("epoch 0 step ")]
    # steps 1 and 2 before the first log_every line; step 3 is the epoch's last (a regular log line)
    assert [line.split()[3] for line in early] == ["1/3", "2/3", "3/3"], done.stdout[-3000:]
    assert "s/step; then a line every runtime.log_every=50 steps" in early[0]
    runs = tmp_path / "runs" / "demo"
    (run_dir,) = [p for p in runs.iterdir() if p.name != "latest"]
    assert (runs / "latest").is_symlink() and (runs / "latest").resolve() == run_dir.resolve()
    assert (runs / "latest" / "checkpoint_last.pth").is_file()


def test_dataset_browser_captions_an_image_without_objects(tiny_demo_root, tmp_path, capsys):
    import json

    from PIL import Image

    from detr_deform.data.transforms import official_resize_size

    from test_tools import tool_module

    status = tool_module("visualize").main(["dataset", "--images", str(tiny_demo_root / "val2017"), "--annotations",
                                            str(tiny_demo_root / "annotations" / "instances_val2017.json"),
                                            "--split", "val", "--num", "2", "--output-dir", str(tmp_path)])
    assert status == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sizes = []
    for name in ("val_00001.jpg", "val_00002.jpg"):
        with Image.open(tiny_demo_root / "val2017" / name) as source:
            sizes.append(official_resize_size(source.height, source.width, 800, 1333))  # (h, w) at val size
    with Image.open(written[0]) as empty, Image.open(written[1]) as full:
        # image 1 (every 25th demo image is empty): the picture, then a caption panel below it
        assert empty.width == sizes[0][1] and empty.height > sizes[0][0]
        assert empty.convert("RGB").getpixel((1, empty.height - 2)) == (0x20, 0x20, 0x20)
        assert full.size == (sizes[1][1], sizes[1][0])  # objects drawn: no caption


def test_plot_logs_shows_one_evaluation_with_markers_colours_and_the_training_axis():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from test_tools import tool_module

    plot_logs = tool_module("plot_logs")
    records = [{"type": "train", "step": s, "loss": 10.0 / s} for s in range(50, 1501, 50)]
    records.append({"type": "val", "step": 1500, "AP": 0.463, "AP50": 0.801, "AP75": 0.484})
    figure, axis = plt.subplots()
    plot_logs.plot_metrics(axis, [("demo", records)])
    lines = axis.get_lines()
    assert [line.get_label() for line in lines] == ["AP", "AP50", "AP75"]
    assert len({line.get_marker() for line in lines}) == 3 and len({line.get_color() for line in lines}) == 3
    low, high = axis.get_xlim()
    assert low == 0 and 1500 < high <= 1600  # the training steps, not a +-80-step axis around one point
    assert sorted(text.get_text() for text in axis.texts) == ["0.463", "0.484", "0.801"]
    plt.close(figure)
    figure, axis = plt.subplots()
    plot_logs.plot_metrics(axis, [("a", records), ("b", records)])
    colours = [line.get_color() for line in axis.get_lines()]
    assert colours[:3] == [colours[0]] * 3 and colours[3] != colours[0] and not axis.texts  # colour per run
    plt.close(figure)


def test_every_resnet_the_docs_list_has_a_preset():
    import torch

    from detr_deform.cli.compose import compose_config
    from detr_deform.models.backbone import ResNetBackbone
    from detr_deform.models.config import RESNET_BACKBONES

    from pipeline_helpers import ROOT

    presets = {p.stem.removesuffix("_scratch") for p in (ROOT / "configs" / "backbone").glob("resnet*.yaml")}
    assert set(RESNET_BACKBONES) <= presets
    cfg = compose_config(["experiment=deformable_detr", "backbone=resnet34"])
    assert (cfg.model.backbone, cfg.model.backbone_norm, cfg.model.freeze_stem_and_layer1) == \
        ("resnet34", "frozen_bn", True)
    backbone = ResNetBackbone("resnet34", norm=cfg.model.backbone_norm,
                              freeze_stem_and_layer1=cfg.model.freeze_stem_and_layer1)
    assert backbone.num_channels == [128, 256, 512]
    features = backbone.body(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(8, 8), (4, 4), (2, 2)]  # strides 8/16/32


def test_eval_reports_the_threshold_training_stored(trained_run, tmp_path):
    import json

    import torch

    from test_tools import tool

    checkpoint = trained_run[0] / "checkpoint_best.pth"
    stored = torch.load(checkpoint, weights_only=True)["score_threshold"]  # every evaluation writes the key
    done = tool("eval", checkpoint, "--output", tmp_path / "m.json", "--num-workers", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "m.json").read_text())["score_threshold"]
    # the same images in the same batches as the run's evaluation: the same detections, the same calibration
    if stored is None:
        assert report is None and "no detection matches an object" in done.stdout
        assert "the checkpoint stores no calibrated threshold: Detector and infer.py use 0.3" in done.stdout
    else:
        assert report == {**stored, "step": None}
        assert f"the checkpoint's calibrated threshold, used by Detector and infer.py: {stored['threshold']:.3f}" \
            in done.stdout


def test_infer_lists_non_images_as_skipped_and_refuses_a_non_image_named_directly(trained_run, tiny_demo_root,
                                                                                    tmp_path, capsys):
    import json
    import shutil

    from test_tools import tool_module

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(tiny_demo_root / "val2017" / "val_00002.jpg", folder)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")
    infer = tool_module("infer")
    checkpoint = str(trained_run[0] / "checkpoint_last.pth")
    assert infer.main([checkpoint, str(folder), "--output-dir", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    index = json.loads((tmp_path / "out" / "images.json").read_text())
    assert index["skipped"] == [str(folder / "notes.txt")] and len(index["images"]) == 1
    assert "skipped 1 file(s) that are neither images nor videos: notes.txt" in captured.err
    assert "with score >= " in captured.out and ("(default)" in captured.out or "(calibrated" in captured.out)
    assert infer.main([checkpoint, str(folder / "notes.txt"), "--output-dir", str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {folder / 'notes.txt'} is neither an image nor a video") and "\n" not in error
    assert "Errno" not in error and "1094995529" not in error
