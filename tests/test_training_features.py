"""Experiment trackers (MLflow on a SQLite database, W&B offline), both COCO
evaluators, torch.compile against eager, and optional extras named when missing."""
import copy
import json
import sys

import pytest
import torch

from detr_deform import build_criterion, build_model
from detr_deform.cli.compose import compose_config
from detr_deform.config import ConfigError
from detr_deform.data.coco import load_coco_json
from detr_deform.engine.steps import train_step
from detr_deform.evaluation.coco_eval import evaluate_coco

from model_helpers import random_targets, tiny_config
from pipeline_helpers import ROOT, tiny_train_args, train

sys.path.insert(0, str(ROOT / "tools"))
from benchmark_coco_eval import synthetic_coco  # noqa: E402  (the benchmark's data, tested here)


def test_mlflow_sqlite_and_wandb_offline_receive_params_metrics_and_checkpoints(tiny_demo_root, tmp_path):
    import mlflow  # dev extra
    out, database = tmp_path / "run", tmp_path / "tracking.db"
    done = train(*tiny_train_args(tiny_demo_root, out, "runtime.loggers=[tensorboard,mlflow,wandb]",
                                  f"runtime.mlflow_tracking_uri=sqlite:///{database}", "runtime.wandb_mode=offline",
                                  "runtime.max_eval_images=2"))
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{database}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "demo"]
    (run,) = client.search_runs([experiment.experiment_id])
    params, tags = run.data.params, run.data.tags
    assert params["model.hidden_dim"] == "64" and params["optim.batch_size"] == "2"
    assert params["model.num_classes"] == "4"                         # resolved values, not the raw config
    assert json.loads(params["data.train_scales"]) == [96]
    loss_history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in loss_history] == [1, 2, 3, 4, 5, 6]      # every step (log_every=1)
    assert {m.key for m in client.get_metric_history(run.info.run_id, "val/AP")} == {"val/AP"}
    assert len(client.get_metric_history(run.info.run_id, "val/AP")) == 2   # one per epoch
    assert "train/lr_default" in run.data.metrics and "train/loss_giou_enc" in run.data.metrics
    assert tags["checkpoint_last"] == str(out / "checkpoint_last.pth")
    assert tags["checkpoint_best"] == str(out / "checkpoint_best.pth")
    assert run.info.status == "FINISHED"
    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    # An offline W&B run is one record log (protobuf; `wandb sync` uploads it); its keys and values are plain bytes.
    (records,) = wandb_run.glob("run-*.wandb")
    logged = records.read_bytes()
    for needle in ("train/loss", "train/loss_giou_enc", "val/AP", "hidden_dim", str(out / "checkpoint_best.pth")):
        assert needle.encode() in logged, needle
    ids = json.loads((out / "trackers.json").read_text())
    assert ids["mlflow"] == run.info.run_id and ids["wandb"] in wandb_run.name


def test_missing_tracker_or_evaluator_package_is_named_before_the_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "faster_coco_eval")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"runtime.loggers selects mlflow .* pip install 'detr_deform\[mlflow\]'"):
        compose_config(["experiment=demo", "runtime.loggers=[tensorboard,mlflow]"])
    with pytest.raises(ConfigError, match=r"pip install 'detr_deform\[faster-coco-eval\]'"):
        compose_config(["experiment=demo", "runtime.coco_eval=faster"])


def test_faster_coco_eval_gives_the_pycocotools_metrics():
    content, detections = synthetic_coco(200, detections_per_image=20)
    coco = load_coco_json("synthetic", content)
    ids = [image["id"] for image in content["images"]]
    reference, _ = evaluate_coco(coco, detections, ids, "pycocotools")
    faster, table = evaluate_coco(coco, detections, ids, "faster")
    assert 0.05 < reference["AP"] < 0.9 and reference["AR100"] > reference["AP"]   # a non-trivial case
    assert "Average Precision" in table
    # Identical up to the order of float summations (last bit).
    assert faster == pytest.approx(reference, rel=1e-12, abs=1e-15)
    subset, _ = evaluate_coco(coco, detections, ids[:50], "faster")
    assert subset == pytest.approx(evaluate_coco(coco, detections, ids[:50], "pycocotools")[0], rel=1e-12, abs=1e-15)


def test_compiled_model_trains_and_predicts_like_eager():
    """runtime.compile wraps the model in torch.compile (here the aot_eager backend, which traces
    forward and backward through the registered operator the way inductor does, without the C++
    code generation that takes minutes on 2 cores; inductor speed: docs/benchmarks.md)."""
    torch.manual_seed(0)
    # One encoder and one decoder layer: every kind of module once, half the graph to trace.
    cfg = tiny_config(with_box_refine=True, two_stage=True, attn_impl="cpp", enc_layers=1, dec_layers=1)
    eager = build_model(cfg)
    compiled_source = copy.deepcopy(eager)
    compiled = torch.compile(compiled_source, backend="aot_eager")
    criterion = build_criterion(cfg)
    g = torch.Generator().manual_seed(1)
    # One padded size for every batch: one graph to trace (a new size retraces with dynamic shapes, which
    # the train.py test below covers with the eager backend).
    batches = [([torch.randn(3, 64, 80, generator=g), torch.randn(3, 72, 64, generator=g)], random_targets([2, 3]))
               for _ in range(3)]
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.01)
    compiled_opt = torch.optim.SGD(compiled_source.parameters(), lr=0.01)
    for images, targets in batches:
        a = train_step(eager, criterion, images, targets, eager_opt, 0.1)
        b = train_step(compiled, criterion, images, targets, compiled_opt, 0.1)
        assert b[1] == pytest.approx(a[1], rel=1e-5)
        assert b[0]["loss_giou"] == pytest.approx(a[0]["loss_giou"], rel=1e-5)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        expected, got = eager(batches[0][0]), compiled(batches[0][0])
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=1e-4, atol=1e-5)


def test_a_failing_tracker_is_switched_off_with_a_warning_and_the_run_goes_on(tmp_path, capsys):
    from detr_deform.engine.run_logger import RunLogger

    class Broken:
        def scalars(self, prefix, values, step):
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full")

        def close(self):
            raise AssertionError("a switched-off tracker is not called again")

    logger = RunLogger(tmp_path, enabled=True)
    logger.log_file = open(tmp_path / "log.jsonl", "a", encoding="utf-8")
    logger.trackers = [Broken()]
    logger.record("train", 1, {"loss": 1.0}, tb_prefix="train")
    logger.record("train", 2, {"loss": 0.5}, tb_prefix="train")
    logger.close()
    err = capsys.readouterr().err
    assert err.count("warning: Broken failed and is switched off") == 1 and "database or disk is full" in err
    assert [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1.0, 0.5]


def test_damaged_trackers_file_starts_new_tracker_runs_with_a_warning(tmp_path, capsys):
    from detr_deform.config import RuntimeConfig
    from detr_deform.engine.trackers import build_trackers

    (tmp_path / "trackers.json").write_text('{"mlflow": ')  # cut short by a crash of an older version
    assert build_trackers(RuntimeConfig(loggers=[]), tmp_path, {}, "demo") == []
    assert "trackers.json is unreadable or damaged" in capsys.readouterr().err


def test_runtime_compile_trains_and_evaluates_like_eager_through_train_py(trained_run, tiny_demo_root, tmp_path):
    """runtime.compile=true through tools/train.py (build_training wraps the train and eval models):
    the same losses step by step and the same AP as the eager run of the same seed. Backend eager
    (Dynamo's graph capture, the part that decides what gets compiled): aot_eager, which also traces
    the backward, took over 300 s for 6 steps and 2 evaluations on 2 cores (eager: ~105 s; now one
    epoch, 3 steps and 1 evaluation: ~88 s); the test above checks aot_eager's forward and backward
    against eager in-process."""
    out = tmp_path / "compiled"
    # The first epoch of the shared run (same seed: same data order, same steps; the lr drop is later).
    done = train(*tiny_train_args(tiny_demo_root, out, "runtime.compile=true", "runtime.compile_backend=eager",
                                  "optim.epochs=1", batch_size=3))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def entries(run_dir):
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        return [e for e in log if e["type"] == "train"], [e for e in log if e["type"] == "val"]

    (eager_train, eager_val), (compiled_train, compiled_val) = entries(trained_run[0]), entries(out)
    eager_train, eager_val = eager_train[:3], eager_val[:1]
    assert [e["step"] for e in compiled_train] == [e["step"] for e in eager_train] and len(eager_train) == 3
    for a, b in zip(eager_train, compiled_train):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    assert len(compiled_val) == len(eager_val) == 1
    for a, b in zip(eager_val, compiled_val):
        assert b["AP"] == pytest.approx(a["AP"], abs=1e-3), (a, b)
