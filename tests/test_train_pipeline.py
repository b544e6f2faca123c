"""tools/train.py and tools/eval.py end to end on tiny demo data (CPU)."""
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline_helpers import PYTHON, run, tiny_train_args, train


def test_run_directory_contents(trained_run):
    out, done = trained_run
    for name in ("config.yaml", "log.jsonl", "checkpoint_last.pth", "checkpoint_best.pth", "metrics.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    kinds = [r["type"] for r in records]
    assert kinds.count("train") == 6 and kinds.count("epoch") == 2 and kinds.count("val") == 2
    train_record = next(r for r in records if r["type"] == "train")
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc", "loss_ce_0", "grad_norm",
                "lr_default", "lr_backbone", "lr_linear_proj", "class_error"):
        assert key in train_record, key
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in done.stdout


def test_tensorboard_events_have_expected_tags(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_ce", "train/loss_bbox", "train/loss_giou", "train/loss_giou_enc",
                "train/loss_bbox_0", "train/grad_norm", "train/lr_default",
                "val/AP", "val/AP50", "val/AR100"):
        assert tag in scalars, (tag, sorted(scalars))
    assert "val/predictions_0" in events.Tags()["images"]


def test_eval_reproduces_training_ap(trained_run, tmp_path):
    out, _ = trained_run
    checkpoint = out / "checkpoint_best.pth"
    reported = torch.load(checkpoint, weights_only=True)["metrics"]
    metrics_file = tmp_path / "m.json"
    dets_file = tmp_path / "dets.json"
    done = run([PYTHON, "tools/eval.py", str(checkpoint), "--output", str(metrics_file), "--num-workers", "0",
                "--dump-detections", str(dets_file)])
    assert done.returncode == 0, done.stderr[-3000:]
    evaluated = json.loads(metrics_file.read_text())["metrics"]
    assert evaluated == pytest.approx(reported, abs=1e-9)
    detections = json.loads(dets_file.read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}


def test_distributed_eval_equals_single_process(trained_run, tmp_path):
    """7 val images on 2 ranks: the sampler pads with a repeated image, which must not count twice.
    Batch size 1 keeps every image's computation identical (with larger batches, padding to the
    batch's largest image changes predictions slightly, as in the official model)."""
    out, _ = trained_run
    checkpoint = out / "checkpoint_last.pth"
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    done = run([PYTHON, "tools/eval.py", str(checkpoint), "--output", str(single), "--num-workers", "0",
                "--batch-size", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    done = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                "tools/eval.py", str(checkpoint), "--output", str(double), "--num-workers", "0", "--batch-size", "1"])
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert a["num_images"] == b["num_images"] == 7
    assert a["metrics"] == b["metrics"]


def test_resume_reproduces_uninterrupted_run(tiny_demo_root, tmp_path):
    common = ["runtime.deterministic=true", "optim.epochs=3"]
    full = tmp_path / "full"
    done = train(*tiny_train_args(tiny_demo_root, full, *common))
    assert done.returncode == 0, done.stderr[-3000:]
    part = tmp_path / "part"
    done = train(*tiny_train_args(tiny_demo_root, part, "runtime.deterministic=true", "optim.epochs=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = train(*tiny_train_args(tiny_demo_root, part, *common, "runtime.resume=auto"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout

    def losses(run_dir: Path):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
                if r["type"] == "train"]

    assert losses(part) == losses(full)
    a = torch.load(full / "checkpoint_last.pth", weights_only=True)
    b = torch.load(part / "checkpoint_last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["lr_scheduler"] == b["lr_scheduler"]


def test_two_node_run_on_localhost(tiny_demo_root, tmp_path):
    """Two torchrun invocations with --nnodes=2 rendezvous on localhost and train together."""
    import os
    import subprocess

    from pipeline_helpers import ROOT, free_port

    port = free_port()
    args = tiny_train_args(tiny_demo_root, tmp_path / "run", "optim.epochs=1", "runtime.max_steps_per_epoch=2")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "tools/train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "world size 2" in outputs[0][0]
    assert (tmp_path / "run" / "checkpoint_last.pth").is_file()


def test_dat_demo_preset_trains_with_tools_train(tiny_demo_root, tmp_path):
    args = tiny_train_args(tiny_demo_root, tmp_path / "run", "optim.epochs=1", "runtime.max_eval_images=2")
    done = train("experiment=dat_demo", *args[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "backbone: dat_tiny" in config and "stage_spec" in config
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["type"] == "val" for r in records)


def test_paper_scale_dat_two_stage_runs_with_tools_train(tiny_demo_root, tmp_path):
    """The full-size DAT-T two-stage model through tools/train.py (demo images, 2 steps)."""
    done = train("experiment=dat_two_stage", "data=demo", f"data.root={tiny_demo_root}", "data.train_scales=[128]",
                 "data.crop_resize_sizes=[128]", "data.val_size=128",  # enough encoder tokens for 300 queries
                 f"runtime.output_dir={tmp_path / 'run'}", "data.num_workers=0", "optim.batch_size=1",
                 "optim.epochs=1", "runtime.max_steps_per_epoch=2", "runtime.max_eval_images=1",
                 "runtime.vis_images=0", "runtime.log_every=1", "runtime.device=cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:  # the paper-scale two-stage losses: encoder proposals and 5 auxiliary decoder layers
        for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc", "loss_bbox_enc", "loss_ce_4"):
            assert math.isfinite(record[key]) and record[key] > 0, (key, record)
        assert "loss_ce_5" not in record and math.isfinite(record["grad_norm"])
    val = [r for r in records if r["type"] == "val"]
    assert len(val) == 1 and -1 <= val[0]["AP"] <= 1  # -1: pycocotools' "no ground truth" on 1 image
    # The checkpoint is the full-size DAT-T two-stage model, and it loads strictly.
    from detr_deform import load_model

    model, cfg = load_model(tmp_path / "run" / "checkpoint_last.pth")
    assert (cfg.backbone, cfg.two_stage, cfg.with_box_refine, cfg.num_queries, cfg.num_feature_levels) == (
        "dat_tiny", True, True, 300, 4)
    backbone_params = sum(p.numel() for name, p in model.named_parameters() if name.startswith("backbone."))
    assert 27e6 < backbone_params < 30e6  # DAT-T: 29M parameters with its classifier, 28M without
