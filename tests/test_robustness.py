"""Robustness, round two: every input and fault from the probe gives one line (or a
clear warning) and exit status 1 or 2, with nothing lost and nothing silently wrong."""
import errno
import io
import json
import os
import random
import signal
import subprocess

import pytest
import torch
from PIL import Image

from detr_deform import CheckpointError, build_model, load_model, read_checkpoint, save_checkpoint
from detr_deform.cli.compose import compose_config
from detr_deform.config import ConfigError
from detr_deform.io.checkpoint import write_checkpoint
from detr_deform.loading.model import NonFiniteWeightsWarning

from model_helpers import tiny_config
from pipeline_helpers import PYTHON, ROOT, run, tiny_train_args, train
from test_checkpoint import official_args


def one_line_error(done: subprocess.CompletedProcess, status: int = 2) -> str:
    assert done.returncode == status, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved in our format, and its config."""
    cfg = tiny_config()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth", build_model(cfg), cfg)
    return path, cfg


# ---------------------------------------------------------------- checkpoint contents

def _rewrite_config(path, target, **changes):
    content = torch.load(path, weights_only=True)
    content["config"]["model"].update(changes)
    write_checkpoint(target, content)  # edited and sealed again (new checksums): the values are what is checked
    return target


@pytest.mark.parametrize("changes, message", [
    ({"num_feature_levels": "two"}, r"model.num_feature_levels='two' has type str; expected int"),
    ({"hiden_dim": 64}, r"unknown model config key\(s\) \['hiden_dim'\]"),
    ({"nheads": 0}, r"model.nheads=0 is out of range: must be >= 1"),
    ({"enc_n_points": 0}, r"model.enc_n_points=0 is out of range"),
])
def test_stored_config_is_validated_like_a_config(saved, tmp_path, changes, message):
    path = _rewrite_config(saved[0], tmp_path / "bad.pth", **changes)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_model(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def _rewrite(path, target, edit):
    content = torch.load(path, weights_only=True)
    edit(content)
    write_checkpoint(target, content)  # edited and sealed again (new checksums): the values are what is checked
    return target


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["config"].update(data={"val_size": "x"}), "stored data.val_size='x' has type str; expected int"),
    (lambda c: c["config"].update(data={"max_size": 0}), "stored data.max_size=0 is out of range"),
    (lambda c: c["config"].update(data="coco"), "config 'data' is a str, not a mapping"),
    (lambda c: c.update(config="model: x"), "the stored model configuration is a str, not a mapping"),
    (lambda c: c.update(category_names=["cat", "dog"]), "'category_names' must map class ids to names"),
    (lambda c: c.update(category_names={"one": "cat"}), "'category_names' must map class ids to names"),
])
def test_every_stored_section_is_checked_when_a_detector_loads(saved, tmp_path, edit, message):
    from detr_deform.inference.detector import Detector

    path = _rewrite(saved[0], tmp_path / "bad.pth", edit)
    with pytest.raises(CheckpointError) as caught:
        Detector.from_pretrained(path, device="cpu")
    assert message in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_infer_with_a_bad_stored_value_is_one_line(saved, tmp_path):
    path = _rewrite(saved[0], tmp_path / "bad.pth", lambda c: c["config"].update(data={"val_size": "x"}))
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30)).save(image)
    line = one_line_error(run([PYTHON, "tools/infer.py", str(path), str(image), "--device", "cpu",
                               "--output-dir", str(tmp_path / "out")]))
    assert "stored data.val_size='x'" in line


def test_official_args_with_a_wrong_type_is_a_checkpoint_error(saved, tmp_path):
    path = tmp_path / "official.pth"
    args = official_args()
    args.lr_backbone = "x"
    torch.save({"model": build_model(saved[1]).state_dict(), "args": args}, path)
    with pytest.raises(CheckpointError, match=r"official 'args': args.lr_backbone='x' is not a number"):
        load_model(path)


def test_official_file_with_empty_args_names_a_tensor_and_both_shapes(saved, tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": build_model(saved[1]).state_dict(), "args": official_args().__class__()}, path)
    with pytest.raises(CheckpointError, match=r"tensor\(s\) of another shape.*is \(\d.*\) in the file but \(\d.*\) "
                                              r"in the model.*runtime.init_from") as caught:
        load_model(path)
    assert len(str(caught.value)) < 1200


@pytest.mark.parametrize("content, message", [
    (b"model: resnet50\nweights: none\n", "a text file"),
    (bytes(range(256)) * 4, "not a PyTorch checkpoint"),
    (b"", "an empty file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}      ", "a safetensors file"),
])
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "file.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_files_that_exist_but_cannot_be_read_are_one_line(saved, tmp_path, monkeypatch):
    import detr_deform.io.checkpoint as checkpoint_module
    from detr_deform.data import schema
    from detr_deform.data.errors import DatasetError

    def denied(path, *args, **kwargs):  # as for a file without read permission (tests run as root)
        raise PermissionError(13, "Permission denied", str(path))

    annotations = tmp_path / "instances.json"
    annotations.write_text("{}")
    monkeypatch.setattr(checkpoint_module, "open", denied, raising=False)
    monkeypatch.setattr(schema, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match=r"cannot be read \(Permission denied\); check the file's permissions"):
        read_checkpoint(saved[0])
    with pytest.raises(DatasetError, match=r"instances.json: cannot be read \(Permission denied\)"):
        schema.read_instances_json(annotations)


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        read_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):   # load_model also tries a Hugging Face folder
        load_model(tmp_path)


def test_fuzzed_files_only_ever_raise_checkpoint_error(saved, tmp_path):
    real = saved[0].read_bytes()
    rng = random.Random(0)
    for trial in range(40):
        kind = trial % 4
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000)))
        elif kind == 1:
            data = b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 4000)))
        elif kind == 2:
            data = b"\x80\x02" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 4000)))
        else:
            data = real[:rng.randrange(len(real))]
        path = tmp_path / f"fuzz{trial}.pth"
        path.write_bytes(data)
        with pytest.raises(CheckpointError):
            read_checkpoint(path)


def test_weights_checksum_catches_a_flipped_byte_and_old_files_still_load(saved, tmp_path):
    content = torch.load(saved[0], weights_only=True)
    weights = content["model"]["transformer.level_embed"]
    data = bytearray(saved[0].read_bytes())
    needle = weights.reshape(-1)[:4].numpy().tobytes()
    where = bytes(data).index(needle)                      # inside the tensor's bytes in the zip
    data[where + 1] ^= 0x10
    flipped = tmp_path / "flipped.pth"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the checksum stored when the file was written"):
        load_model(flipped)
    del content["checksums"]                               # as written before checksums existed
    old = tmp_path / "old.pth"
    torch.save(content, old)
    model, _ = load_model(old)
    assert torch.equal(model.transformer.level_embed, weights)
    # ... and as written when only the weights were checksummed: still verified
    from detr_deform.io.checkpoint import weights_checksum

    torch.save({**content, "weights_sha256": weights_checksum(content["model"])}, old)
    assert torch.equal(load_model(old)[0].transformer.level_embed, weights)
    torch.save({**content, "weights_sha256": "0" * 64}, old)
    with pytest.raises(CheckpointError, match="the weights do not match the checksum"):
        load_model(old)


def test_checkpoints_get_the_umask_mode_not_a_temporary_files(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.pth", torch.nn.Linear(2, 2), tiny_config())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


class _FullDisk(io.RawIOBase):
    """A file that accepts ``room`` bytes, then fails like a full disk (ENOSPC)."""

    def __init__(self, room: int) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return len(data)

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "no descriptor")


class _InterruptedFile(_FullDisk):
    """A file whose write is interrupted by a (second) Ctrl-C once ``room`` bytes are in."""

    def write(self, data) -> int:
        if len(data) > self.room:
            raise KeyboardInterrupt
        return super().write(data)


@pytest.mark.parametrize("broken_file, raised, message", [
    (_FullDisk, CheckpointError, r"\[Errno 28\] No space left on device \(disk full.*previous checkpoint"),
    # a second Ctrl-C inside torch.save: train.py turns it into its one line and exit status 130
    (_InterruptedFile, KeyboardInterrupt, None),
])
def test_a_write_failing_inside_torch_save_is_reported_as_what_it_was(tmp_path, monkeypatch, broken_file, raised,
                                                                      message):
    import detr_deform.io.checkpoint as checkpoint

    path = save_checkpoint(tmp_path / "checkpoint_last.pth", torch.nn.Linear(4, 4), tiny_config(), note="first")
    real_open = open

    def failing_open(file, *args, **kwargs):  # the checkpoint writer opens its temporary file
        real_open(file, *args, **kwargs).close()
        return broken_file(room=3000)

    monkeypatch.setattr(checkpoint, "open", failing_open, raising=False)
    with pytest.raises(raised, match=message) as caught:
        save_checkpoint(path, torch.nn.Linear(256, 256), tiny_config(), note="second")
    assert "enforce fail" not in str(caught.value)  # not torch's zip-writer message
    monkeypatch.undo()
    assert read_checkpoint(path)["note"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pth"]


# ---------------------------------------------------------------- non-finite weights

@pytest.fixture(scope="module")
def nan_checkpoint(trained_run, tmp_path_factory):
    content = torch.load(trained_run[0] / "checkpoint_last.pth", weights_only=True)
    content["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in content["model"].items()}
    del content["checksums"]
    path = tmp_path_factory.mktemp("nan") / "nan.pth"
    torch.save(content, path)
    return path


def test_nan_weights_warn_on_load_and_evaluate_to_zero_not_to_a_fake_ap(nan_checkpoint, tmp_path):
    with pytest.warns(NonFiniteWeightsWarning, match=r"\d+ weight tensor\(s\) hold NaN or inf"):
        load_model(nan_checkpoint)
    output = tmp_path / "m.json"
    done = run([PYTHON, "tools/eval.py", str(nan_checkpoint), "--output", str(output), "--num-workers", "0"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING:" in done.stderr and "hold NaN/inf" in done.stderr and "not meaningful" in done.stderr
    result = json.loads(output.read_text())
    assert result["nonfinite_weight_tensors"] and result["metrics"]["AP"] <= 0 and result["metrics"]["AR100"] <= 0


def test_nan_weights_are_refused_for_resume_and_init_from_unless_asked(nan_checkpoint, tiny_demo_root, tmp_path):
    for key in ("runtime.resume", "runtime.init_from"):
        done = train(*tiny_train_args(tiny_demo_root, tmp_path / key, f"{key}={nan_checkpoint}"))
        line = one_line_error(done)
        assert "hold NaN/inf" in line and "runtime.allow_nonfinite_weights=true" in line
    done = train(*tiny_train_args(tiny_demo_root, tmp_path / "allowed", f"runtime.init_from={nan_checkpoint}",
                                  "runtime.allow_nonfinite_weights=true", "optim.epochs=1",
                                  "runtime.max_steps_per_epoch=1", "runtime.on_nonfinite=skip",
                                  "runtime.max_eval_images=1"))
    assert done.returncode == 0, done.stderr[-3000:]


# ---------------------------------------------------------------- native crashes

def test_model_builder_rejects_every_size_that_used_to_crash_natively():
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from model_helpers import tiny_config\n"
        "from detr_deform import build_model, ModelConfig\n"
        "cases = [dict(enc_n_points=0), dict(dec_n_points=0), dict(nheads=0), dict(num_feature_levels=0),\n"
        "         dict(num_feature_levels=-1), dict(hidden_dim=0), dict(enc_layers=0), dict(dec_layers=0),\n"
        "         dict(num_queries=0), dict(hidden_dim=96, nheads=5), dict(enc_n_points=-2), dict(dim_feedforward=0)]\n"
        "for case in cases:\n"
        "    try:\n"
        "        build_model({**tiny_config().to_dict(), **case})\n"
        "        print('BUILT', case)\n"
        "    except ValueError as error:\n"
        "        print('REFUSED', case, str(error).splitlines()[0])\n")
    done = subprocess.run([PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])   # a signal would be negative
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 12 and all(line.startswith("REFUSED") for line in lines), lines


# ---------------------------------------------------------------- configuration values

@pytest.mark.parametrize("override, message", [
    ("runtime.seed=-1", "runtime.seed=-1 is out of range: must be >= 0"),
    ("model.nheads=0", "model.nheads=0 is out of range"),
    ("model.dropout=2", "model.dropout=2.0 is out of range: must be >= 0 and < 1"),
    ("model.dec_layers=0", "model.dec_layers=0 is out of range"),
    ("data.num_workers=-1", "data.num_workers=-1 is out of range"),
    ("model.activation=foo", "model.activation='foo' is not allowed; choose one of relu, gelu"),
    ("optim.lr_drop=0", "optim.lr_drop=0 is out of range"),
    ("data.val_size=0", "data.val_size=0 is out of range"),
    ("model.enc_n_points=0", "model.enc_n_points=0 is out of range"),
    ("optim.lr=0", "optim.lr=0.0 is out of range: must be > 0"),
    ("optim.batch_size=0", "optim.batch_size=0 is out of range"),
    ("optim.accumulate_steps=0", "optim.accumulate_steps=0 is out of range"),
    ("model.num_queries=0", "model.num_queries=0 is out of range"),
    ("model.hidden_dim=100", "model.hidden_dim=100 must be divisible by model.nheads=8"),
    ("model.num_feature_levels=2", "model.num_feature_levels=2 is fewer than the 3 feature maps"),
    ("model.backbone=resnet51", "model.backbone='resnet51' is not allowed"),
    ("model.backbone_norm=batchnorm", "model.backbone_norm='batchnorm' is not allowed"),
    ("model.position_embedding=rope", "model.position_embedding='rope' is not allowed"),
    ("model.attn_impl=cuda", "model.attn_impl='cuda' is not allowed"),
    ("runtime.amp=fp8", "runtime.amp='fp8' is not allowed"),
    ("optim.scheduler=poly", "optim.scheduler='poly' is not allowed"),
    ("runtime.device=tpu", "runtime.device='tpu' is not a device"),
    ("runtime.on_nonfinite=ignore", "runtime.on_nonfinite='ignore' is not allowed"),
    ("runtime.coco_eval=fast", "runtime.coco_eval='fast' is not allowed"),
    ("runtime.loggers=[tensorbord]", "'tensorbord' is not one (did you mean tensorboard?)"),
    ("+model.hiden_dim=128", "model.hiden_dim: unknown key (added with +?) (did you mean hidden_dim?)"),
    ("+optim.momentum=0.9", "optim.momentum: unknown key"),
    ("optim.scheduler=multistep", "optim.milestones=[] must be increasing epochs"),
])
def test_every_configuration_value_is_checked_at_composition(override, message):
    with pytest.raises(ConfigError) as caught:
        compose_config(["experiment=demo", override])
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("override, message", [   # through tools/train.py; every value: the test above
    ("runtime.resume=/missing.pth", "runtime.resume: checkpoint not found: /missing.pth"),
    ("runtime.device=cuda", "runtime.device=cuda but no GPU is visible"),
    ("runtime.init_from=/missing.pth", "runtime.init_from: checkpoint not found: /missing.pth"),
    ("model.pretrained_backbone=/missing.pth", "model.pretrained_backbone: backbone weights file not found"),
])
def test_bad_values_stop_before_the_run_directory_exists(tmp_path, override, message):
    out = tmp_path / "run"
    line = one_line_error(train("experiment=demo", f"runtime.output_dir={out}", override))
    assert message in line
    assert not out.exists()


# ---------------------------------------------------------------- lost work

def test_resume_with_another_model_is_one_line_and_keeps_the_run_files(trained_run, tiny_demo_root, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run[0], out)
    before = (out / "config.yaml").read_text()
    line = one_line_error(train(*tiny_train_args(tiny_demo_root, out, "runtime.resume=auto", "model.hidden_dim=128")))
    assert "does not fit the configured model" in line and "runtime.init_from" in line
    assert "(3, 64) in the file but (3, 128) in the model" in line
    assert (out / "config.yaml").read_text() == before


@pytest.mark.parametrize("override, message", [
    ("optim.scheduler=cosine", "the run used the per-epoch StepLR but optim.scheduler/optim.warmup_steps now ask"),
    ("optim.warmup_steps=5", "the learning-rate curve cannot continue"),
    ("model.train_backbone=true", "but the configured model trains"),
])
def test_resume_with_another_optimizer_or_schedule_is_one_line(trained_run, tiny_demo_root, tmp_path, override,
                                                               message):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run[0], out)
    # run.lock aside: the refused resume owned the directory (and wrote its PID there) while it checked
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    line = one_line_error(train(*tiny_train_args(tiny_demo_root, out, "runtime.resume=auto", override)))
    assert message in line and "runtime.init_from" in line, line
    assert all(p.read_bytes() == data for p, data in files.items())  # nothing of the run was touched


def test_annotations_without_area_and_iscrowd_train_and_evaluate(tiny_demo_root, tmp_path):
    import shutil

    from detr_deform.data.report import check_dataset

    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    for split in ("train", "val"):
        file = root / "annotations" / f"instances_{split}2017.json"
        content = json.loads(file.read_text())
        for annotation in content["annotations"]:
            annotation.pop("area", None), annotation.pop("iscrowd", None)
        file.write_text(json.dumps(content))
    report = check_dataset(root / "val2017", root / "annotations" / "instances_val2017.json", check_files=False)
    assert report.ok and {p.kind for p in report.warnings} == {"coco_default_filled"}
    out = tmp_path / "run"
    done = train(*tiny_train_args(root, out, "optim.epochs=1", "runtime.max_eval_images=3"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "checkpoint_last.pth").is_file() and json.loads((out / "metrics.json").read_text())["AP"] >= 0


def test_a_failing_evaluation_keeps_the_epochs_checkpoint(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([PYTHON, str(ROOT / "tests" / "scripts" / "train_with_faults.py"),
                           *tiny_train_args(tiny_demo_root, out, "optim.epochs=1")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, FAULT_EVAL_FAIL="1", OMP_NUM_THREADS="1"))
    assert done.returncode != 0 and "injected evaluation failure" in done.stderr
    state = read_checkpoint(out / "checkpoint_last.pth")
    assert state["epoch"] == 0 and state["step"] == 3 and state["batches_done"] == 0


def test_skipped_validation_images_are_left_out_not_evaluated_twice(tiny_demo_root, tmp_path):
    import shutil

    from detr_deform.config import DataConfig
    from detr_deform.data.coco import collate_fn
    from detr_deform.engine.loaders import build_datasets
    from detr_deform.engine.steps import evaluate

    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    content = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    broken = content["images"][2]
    (root / "val2017" / broken["file_name"]).write_bytes(b"not a jpeg")
    data = DataConfig(dataset="coco", root=str(root), val_size=96, max_size=128, on_bad_sample="skip")
    _, val = build_datasets(data, str(root), seed=0)
    loader = torch.utils.data.DataLoader(val, batch_size=2, collate_fn=collate_fn)
    model = build_model(tiny_config(num_classes=4)).eval()
    from detr_deform import build_postprocessor

    with pytest.warns(RuntimeWarning, match=r"left out 1 unreadable image"):
        _, detections, _ = evaluate(model, build_postprocessor(tiny_config(num_classes=4)), loader, val.coco,
                                    torch.device("cpu"))
    from collections import Counter

    per_image = Counter(d["image_id"] for d in detections)
    assert broken["id"] not in per_image and len(per_image) == len(content["images"]) - 1
    assert set(per_image.values()) == {12 * 4}   # the top-k of every image once: none evaluated twice


# ---------------------------------------------------------------- images, disks, signals

def _bomb_png(path, side: int = 20000) -> None:
    """A tiny PNG whose header claims side x side pixels (PIL refuses it from the header)."""
    import struct
    import zlib

    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(path, format="PNG")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def test_decompression_bomb_header_is_a_clear_problem_everywhere(tiny_demo_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    content = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    _bomb_png(root / "train2017" / content["images"][0]["file_name"])
    done = run([PYTHON, "tools/check_dataset.py", "--coco-path", str(root), "--splits", "train"])
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "unreadable_image" in done.stdout and "refusing to decode" in done.stdout
    line = one_line_error(train(*tiny_train_args(root, tmp_path / "error")))
    assert "refusing to decode" in line and content["images"][0]["file_name"] in line
    from detr_deform.data.coco import CocoDetection  # data.on_bad_sample=skip leaves it out like any unreadable image

    skipping = CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json",
                             on_bad_sample="skip")
    _, target = skipping[0]
    assert target["skipped"][0][0] == content["images"][0]["id"] and "refusing to decode" in target["skipped"][0][1]
    # ... and through tools/train.py: one epoch over every batch, the bomb reported and left out.
    done = train(*tiny_train_args(root, tmp_path / "skip", "data.on_bad_sample=skip", "optim.epochs=1",
                                  "runtime.max_steps_per_epoch=null"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: skipped unreadable image (data.on_bad_sample=skip)" in done.stdout
    assert "refusing to decode" in done.stdout and (tmp_path / "skip" / "checkpoint_last.pth").is_file()


def test_disk_full_while_logging_is_one_line_naming_the_file(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([PYTHON, str(ROOT / "tests" / "scripts" / "train_with_faults.py"),
                           *tiny_train_args(tiny_demo_root, out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, FAULT_LOG_FULL_AT_RECORD="5", OMP_NUM_THREADS="1"))
    line = one_line_error(done, status=1)
    assert f"could not write {out / 'log.jsonl'}: [Errno 28] No space left on device" in line
    assert (out / "config.yaml").is_file()


def test_disk_full_when_the_run_starts_is_one_line(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([PYTHON, str(ROOT / "tests" / "scripts" / "train_with_faults.py"),
                           *tiny_train_args(tiny_demo_root, out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, FAULT_DISK_FULL_AT_START="1", OMP_NUM_THREADS="1"))
    line = one_line_error(done, status=1)
    assert "No space left on device" in line and str(out) in line


def test_disk_full_while_writing_evaluation_results_is_one_line(trained_run, tiny_demo_root, tmp_path, monkeypatch,
                                                                capsys):
    from detr_deform.utils import files

    from test_tools import tool_module

    eval_tool = tool_module("eval")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    output = tmp_path / "metrics.json"
    monkeypatch.setattr(files.tempfile, "mkstemp", full)
    status = eval_tool.main([str(trained_run[0] / "checkpoint_best.pth"), "--coco-path", str(tiny_demo_root),
                             "--device", "cpu", "--num-workers", "0", "--output", str(output)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert status == 1 and lines == [f"error: could not write {output}: [Errno 28] No space left on device"]
    assert not output.exists()


def test_a_second_ctrl_c_ends_without_a_traceback(tiny_demo_root, tmp_path):
    """Driven by events, not sleeps: the first Ctrl-C is sent while a step is sleeping (announced on
    stdout), the second once the run has said it received the first; the sleep (600 s) outlasts any
    machine load, and the second Ctrl-C interrupts it."""
    out = tmp_path / "run"
    stderr_file = tmp_path / "stderr.txt"
    with stderr_file.open("w") as stderr_handle:
        process = subprocess.Popen([PYTHON, str(ROOT / "tests" / "scripts" / "train_with_faults.py"),
                                    *tiny_train_args(tiny_demo_root, out, "optim.epochs=3")], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=stderr_handle, text=True,
                                   env=dict(os.environ, FAULT_SLEEP_S="600", FAULT_ANNOUNCE_SLEEP="1",
                                            OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        try:
            seen = _read_until(process, "fault: sleeping after step 1")
            process.send_signal(signal.SIGINT)
            seen += _read_until(process, "SIGINT received")
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=300)
        finally:
            process.kill()
    stderr = stderr_file.read_text()
    assert process.returncode == 130, seen[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "second Ctrl-C" in stderr


def _read_until(process: subprocess.Popen, marker: str) -> str:
    """Stdout lines up to and including the first one containing ``marker`` (the test's timeout ends
    a run that never prints it)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"the run ended without printing {marker!r}:\n" + "".join(seen)[-3000:])


def test_eval_with_a_missing_gpu_names_its_own_option(saved, tmp_path):
    line = one_line_error(run([PYTHON, "tools/eval.py", str(saved[0]), "--device", "cuda"]))
    assert "--device=cuda but no GPU is visible" in line and "runtime.device" not in line


def test_eval_output_goes_beside_the_checkpoint_or_to_outputs_when_that_folder_is_read_only(tmp_path, monkeypatch):
    from detr_deform.cli import evaluate as eval_tool  # the tool's work, where default_output lives
    checkpoint = tmp_path / "models" / "model.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"")
    assert eval_tool.default_output(str(checkpoint)) == tmp_path / "models" / "model.eval.json"
    # Root can write into read-only folders, so the permission answer is what the test controls.
    monkeypatch.setattr(eval_tool.os, "access", lambda path, mode: False)
    assert eval_tool.default_output(str(checkpoint)) == eval_tool.Path("outputs/eval/model.eval.json")


def test_check_dataset_with_a_missing_annotation_file_says_why(tmp_path):
    (tmp_path / "images").mkdir()
    done = run([PYTHON, "tools/check_dataset.py", "--images", str(tmp_path / "images"), "--annotations",
                str(tmp_path / "missing.json")])
    assert done.returncode == 1
    assert "--no-files" not in done.stdout and "the annotation file could not be read" in done.stdout
    assert "1 error:" in done.stdout and "1 errors" not in done.stdout
