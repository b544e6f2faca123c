"""Robustness, round three: nothing a user had is lost or silently corrupted. One live run
per run directory (an OS lock; two real processes), atomic new run directories, every byte
of a checkpoint verified, config.yaml written once (resumes.jsonl), the way forward when the
newest checkpoint is damaged, outputs never written onto inputs, log.jsonl repaired on resume."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from test_robustness import one_line_error
from test_training_faults import FAULTS, QUICK, env, records, wait_for_train_records

from detr_deform import CheckpointError, build_model, read_checkpoint, save_checkpoint
from detr_deform.engine.run import inexact_resume_note, resume_record
from detr_deform.engine.run_dir import LOCK_NAME, RunDirectoryBusy, create_run_dir, lock_run_dir
from detr_deform.engine.run_logger import repair_log
from detr_deform.io.checkpoint import write_checkpoint
from detr_deform.utils.files import OutputIsInputError, refuse_outputs_onto_inputs

from model_helpers import tiny_config
from pipeline_helpers import PYTHON, ROOT, run, tiny_train_args, train

# A process that takes a run directory's lock, optionally forks a child that keeps running
# (as a DataLoader worker does), waits until that child is running, says so, then waits for
# its standard input to close.
HOLDER = """
import os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from detr_deform.engine.run_dir import lock_run_dir
lock = lock_run_dir(Path({path!r}), "test")
ready_r, ready_w = os.pipe()
child = os.fork() if {fork} else 1
if child == 0:
    # os.fork() returns here only after the fork hooks ran (the lock's fd is closed):
    # say so, so that the test never kills the holder before the child let go.
    os.write(ready_w, b"1")
    sys.stdin.read()
    os._exit(0)
if child != 1:
    os.read(ready_r, 1)
print("locked", child, flush=True)
sys.stdin.read()
"""


def _holder(path, fork: bool = False) -> subprocess.Popen:
    process = subprocess.Popen([PYTHON, "-c", HOLDER.format(root=str(ROOT), path=str(path), fork=fork)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().split()
    assert line[0] == "locked"
    process.child = int(line[1])
    return process


# ---------------------------------------------------------------- 1, 2: one live run per directory

def test_a_locked_run_directory_names_its_live_run_and_is_free_once_that_dies(tmp_path):
    holder = _holder(tmp_path, fork=True)  # with a forked child that outlives it, as a DataLoader worker can
    with pytest.raises(RunDirectoryBusy) as busy:
        lock_run_dir(tmp_path, "runtime.output_dir=x")
    message = str(busy.value)
    assert f"PID {holder.pid} on host {socket.gethostname()}, started " in message and "\n" not in message
    assert message.startswith("runtime.output_dir=x is in use by a live run")
    holder.kill()  # SIGKILL: no clean-up of any kind; the kernel releases the lock
    holder.wait(timeout=60)
    lock = lock_run_dir(tmp_path, "runtime.output_dir=x")  # the forked child is still alive, yet the lock is free
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    os.kill(holder.child, signal.SIGKILL)


def test_temporaries_are_removed_only_by_the_lock_holder(tmp_path):
    (tmp_path / ".checkpoint_last.pth.abc.tmp").write_bytes(b"a live run's checkpoint being written")
    holder = _holder(tmp_path)
    with pytest.raises(RunDirectoryBusy):
        lock_run_dir(tmp_path, "x")
    assert (tmp_path / ".checkpoint_last.pth.abc.tmp").exists()
    holder.stdin.close()
    holder.wait(timeout=60)
    lock = lock_run_dir(tmp_path, "x")
    assert [p.name for p in lock.remove_stale_temporaries()] == [".checkpoint_last.pth.abc.tmp"]
    lock.release()


def _snapshot(folder, but=()):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
            if p.is_file() and p.name not in but}


def test_a_second_run_on_a_live_run_directory_refuses_and_touches_nothing(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([PYTHON, FAULTS, *tiny_train_args(tiny_demo_root, out, *QUICK, "optim.epochs=1")],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(FAULT_SLEEP_S=0.5))
    wait_for_train_records(first, out / "log.jsonl", 1)
    first.send_signal(signal.SIGSTOP)  # frozen while the second run tries: the directory must not change at all
    try:
        (out / ".checkpoint_last.pth.live.tmp").write_bytes(b"the first run's checkpoint being written")
        before = _snapshot(out)
        second = train(*tiny_train_args(tiny_demo_root, out, *QUICK, "runtime.resume=auto"))
        assert _snapshot(out) == before
    finally:
        first.send_signal(signal.SIGCONT)
    line = one_line_error(second)
    assert f"is in use by a live run (PID {first.pid} on host {socket.gethostname()}, started " in line
    assert str(out) in line and "nothing was touched" in line
    (out / ".checkpoint_last.pth.live.tmp").unlink()
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    steps = [r["step"] for r in records(out, "train")]
    assert steps == sorted(set(steps)) == [1, 2, 3]  # one run's records only


def test_under_torchrun_a_refusal_is_printed_once_and_no_rank_hangs(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("an earlier run\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={port}", "tools/train.py",
                *tiny_train_args(tiny_demo_root, out, "runtime.dist_timeout_s=60")], timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("already holds a run (config.yaml)") == 1, done.stderr[-3000:]
    assert (out / "config.yaml").read_text() == "an earlier run\n" and sorted(os.listdir(out)) == ["config.yaml"]


# ---------------------------------------------------------------- 7: new run directories

CREATOR = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from detr_deform.engine.run_dir import create_run_dir
print(create_run_dir(Path({base!r}), "20260101-000000"), flush=True)
"""


def test_run_directories_started_in_the_same_second_are_distinct(tmp_path):
    processes = [subprocess.Popen([PYTHON, "-c", CREATOR.format(root=str(ROOT), base=str(tmp_path))],
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
    made = sorted(p.communicate(timeout=120)[0].strip() for p in processes)
    assert made == [str(tmp_path / "20260101-000000"), str(tmp_path / "20260101-000000-2")]
    assert create_run_dir(tmp_path, "20260101-000000") == tmp_path / "20260101-000000-3"


@pytest.mark.parametrize("name", ["checkpoint_best.pth", "log.jsonl", "config.yaml"])
def test_a_folder_with_any_run_file_is_refused_for_a_new_run(tiny_demo_root, tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"precious")
    line = one_line_error(train(*tiny_train_args(tiny_demo_root, out)))
    assert f"already holds a run ({name})" in line and "runtime.resume=auto" in line
    assert sorted(os.listdir(out)) == [name] and (out / name).read_bytes() == b"precious"


def test_an_output_dir_that_is_a_file_is_named_as_one(tiny_demo_root, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    line = one_line_error(train(*tiny_train_args(tiny_demo_root, out)))
    assert f"runtime.output_dir={out} is a file, not a folder" in line and out.read_text() == "mine"


def test_a_new_run_that_fails_before_starting_leaves_no_directory(tiny_demo_root, tmp_path):
    out = tmp_path / "run"
    one_line_error(train(*tiny_train_args(tiny_demo_root, out, "runtime.init_from=" + str(tmp_path / "no.pth"))))
    assert not out.exists()


# ---------------------------------------------------------------- 3: every byte of a checkpoint

@pytest.fixture(scope="module")
def training_file(tmp_path_factory):
    """A checkpoint of ours with optimizer (AdamW moments), schedule, scaler, EMA, RNG and progress."""
    from detr_deform.engine.state import rng_state

    torch.manual_seed(0)  # the same file in every run: the flips below land on the same bytes
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 16)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)
    ema = torch.optim.swa_utils.AveragedModel(model)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_last.pth"
    write_checkpoint(path, {"format": "detr_deform", "version": 1, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                            "scaler": torch.amp.GradScaler("cpu").state_dict(), "ema": ema.state_dict(),
                            "rng": {"0": rng_state()}, "epoch": 0, "step": 3, "batches_done": 2,
                            "config": {"optim": {"batch_size": 2}}})
    return path, optimizer.state_dict()["state"][0]["exp_avg"]


def test_flipped_bytes_in_the_optimizer_state_are_caught(training_file, tmp_path):
    path, exp_avg = training_file
    data = bytearray(path.read_bytes())
    where = bytes(data).index(exp_avg.reshape(-1)[:4].numpy().tobytes())  # the moment's bytes inside the zip
    for offset in range(16):  # 16 flipped bytes, as in the report (values 1e-7 -> 8e8)
        data[where + offset] ^= 0x40
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"1 section\(s\) \(optimizer\) do not match the checksum"):
        read_checkpoint(damaged)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):  # bytes compared (NaN == NaN here), whatever the strides
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def _flip_outcome(data: bytes, where: int, bit: int, target: Path, original) -> str:
    flipped = bytearray(data)
    flipped[where] ^= 1 << bit
    target.write_bytes(bytes(flipped))
    try:
        content = read_checkpoint(target)
    except CheckpointError:
        return "refused"
    return "harmless" if _equal(content, original) else f"byte {where} bit {bit}: read changed, without complaint"


def test_one_flipped_byte_anywhere_is_caught_or_changes_nothing(training_file, tmp_path):
    """Every section (weights, optimizer, schedule, scaler, EMA, RNG, progress, config) is checksummed:
    a flipped byte either makes the file refused or fell where nothing is read (zip padding, headers).
    Every 12th byte of the pickle (the section names, the checksum record, the tensors' shapes and
    strides) and 60 random bytes anywhere (the tensors' data). When this was written, every one of
    the pickle's 11 136 bytes was flipped once (a random bit each): 10 807 refused, 329 harmless,
    none changed unseen (docs/when_things_go_wrong.md)."""
    path, _ = training_file
    original = read_checkpoint(path)
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        member = next(info for info in archive.infolist() if info.filename.endswith("data.pkl"))
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)  # local header: 30 bytes
    rng = random.Random(0)
    places = [(where, rng.randrange(8)) for where in range(start, start + member.file_size, 12)]
    places += [(rng.randrange(len(data)), rng.randrange(8)) for _ in range(60)]
    outcomes = [_flip_outcome(data, where, bit, tmp_path / "flipped.pth", original) for where, bit in places]
    unseen = [outcome for outcome in outcomes if outcome not in ("refused", "harmless")]
    assert not unseen, unseen[:5]
    assert outcomes.count("refused") > member.file_size // 24


# ---------------------------------------------------------------- 4, 5, 8: resuming

def test_resume_record_lists_changes_and_says_when_exactness_is_lost():
    old = {"optim": {"batch_size": 4, "epochs": 2}, "runtime": {"resume": None, "output_dir": "/r"}}
    new = {"optim": {"batch_size": 96, "epochs": 3}, "runtime": {"resume": "auto", "output_dir": "/r"}}
    record = resume_record(old, new, 2, 1, None, 6)
    assert record["changed"] == {"optim.batch_size": [4, 96], "optim.epochs": [2, 3], "world_size": [2, 1]}
    note = inexact_resume_note(record)
    assert note.startswith("note: resuming with optim.batch_size 4->96, world_size 2->1:") and "\n" not in note
    assert inexact_resume_note(resume_record(old, {**old, "optim": {"batch_size": 4, "epochs": 3}}, 1, 1,
                                             None, 6)) is None


def test_repair_log_cuts_a_truncated_line_and_moves_superseded_records(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"type": "train", "step": s}) for s in (1, 2, 3, 4, 5)]
    log.write_text("\n".join(lines) + '\n{"type": "train", "st')
    messages = repair_log(log, resume_step=3)
    assert log.read_text() == "\n".join(lines[:3]) + "\n"
    assert (tmp_path / "log.jsonl.partial").read_text() == '{"type": "train", "st\n'
    assert (tmp_path / "log.superseded.jsonl").read_text() == "\n".join(lines[3:]) + "\n"
    assert len(messages) == 2
    assert repair_log(log, resume_step=3) == [] and log.read_text() == "\n".join(lines[:3]) + "\n"


@pytest.fixture
def copied_run(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run[0], out)
    return out


def test_resume_keeps_config_yaml_records_changes_and_repairs_the_log(copied_run, tiny_demo_root):
    out = copied_run
    config = (out / "config.yaml").read_text()
    last_step = read_checkpoint(out / "checkpoint_last.pth")["step"]
    with open(out / "log.jsonl", "a") as log:  # an attempt killed during its evaluation, then mid-write
        log.write(json.dumps({"type": "train", "step": last_step + 1, "loss": -1.0}) + "\n")
        log.write('{"type": "val", "step": 9')
    done = train(*tiny_train_args(tiny_demo_root, out, "runtime.resume=auto", "optim.epochs=3", batch_size=2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "note: resuming with optim.batch_size 3->2:" in done.stdout
    assert (out / "config.yaml").read_text() == config  # written once, when the run was created
    resume = json.loads((out / "resumes.jsonl").read_text())
    assert resume["changed"]["optim.batch_size"] == [3, 2] and resume["changed"]["optim.epochs"] == [2, 3]
    assert resume["step"] == last_step and "runtime.resume" not in resume["changed"]
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # every line complete
    steps = [e["step"] for e in entries if e["type"] == "train"]
    assert len(steps) == len(set(steps)) and all(e.get("loss") != -1.0 for e in entries)
    assert (out / "log.jsonl.partial").read_text() == '{"type": "val", "step": 9\n'
    assert json.loads((out / "log.superseded.jsonl").read_text())["loss"] == -1.0


def test_unreadable_newest_checkpoint_names_the_ones_that_verify(copied_run, tiny_demo_root):
    out = copied_run
    best = read_checkpoint(out / "checkpoint_best.pth")
    data = bytearray((out / "checkpoint_last.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "checkpoint_last.pth").write_bytes(bytes(data))
    files = _snapshot(out, but=(LOCK_NAME,))  # the refused resume did own the directory while it checked
    line = one_line_error(train(*tiny_train_args(tiny_demo_root, out, "runtime.resume=auto", batch_size=3)))
    assert "runtime.resume=auto: the newest checkpoint cannot be used" in line
    assert f"checkpoint_best.pth (epoch {best['epoch']}, step {best['step']})" in line
    assert f"runtime.output_dir={out} runtime.resume={out / 'checkpoint_best.pth'}" in line
    assert _snapshot(out, but=(LOCK_NAME,)) == files  # nothing deleted, nothing chosen silently


# ---------------------------------------------------------------- 6: outputs never overwrite inputs

def test_the_guard_sees_through_links_and_aliases(tmp_path):
    source = tmp_path / "ck.pth"
    source.write_bytes(b"weights")
    os.link(source, tmp_path / "hard.pth")
    (tmp_path / "soft.pth").symlink_to(source)
    (tmp_path / "x").mkdir()
    for alias in (source, tmp_path / "hard.pth", tmp_path / "soft.pth", tmp_path / "." / "x" / ".." / "ck.pth"):
        with pytest.raises(OutputIsInputError, match="is the checkpoint") as caught:
            refuse_outputs_onto_inputs({"--output": alias}, {"the checkpoint": source})
        assert "\n" not in str(caught.value)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"w")
    with pytest.raises(OutputIsInputError, match="a file of the checkpoint"):
        refuse_outputs_onto_inputs({"--output": folder / "model.safetensors"}, {"the checkpoint": folder})
    refuse_outputs_onto_inputs({"--output": tmp_path / "new.json", "--dump-detections": None},
                               {"the checkpoint": source})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = tiny_config()
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ck.pth", build_model(cfg), cfg)


def test_eval_and_export_refuse_to_write_onto_their_inputs(tiny_checkpoint, tiny_demo_root, tmp_path):
    checkpoint = tmp_path / "ck.pth"
    shutil.copy(tiny_checkpoint, checkpoint)
    annotations = tmp_path / "gt.json"
    shutil.copy(tiny_demo_root / "annotations" / "instances_val2017.json", annotations)
    os.link(annotations, tmp_path / "gt_link.json")
    before = _snapshot(tmp_path)
    data = ["--images", str(tiny_demo_root / "val2017"), "--annotations", str(annotations), "--device", "cpu",
            "--num-workers", "0"]
    for option, target, what in (("--output", checkpoint, "the checkpoint"),
                                 ("--dump-detections", annotations, "the annotation file"),
                                 ("--dump-detections", tmp_path / "gt_link.json", "the annotation file")):
        line = one_line_error(run([PYTHON, "tools/eval.py", str(checkpoint), *data, option, str(target)]))
        assert f"{option} {target} is {what}" in line
    line = one_line_error(run([PYTHON, "tools/export.py", str(checkpoint), "--output", str(checkpoint)]))
    assert f"--output {checkpoint} is the checkpoint" in line
    assert _snapshot(tmp_path) == before


def test_infer_never_draws_over_the_photos_and_keeps_earlier_results(tiny_checkpoint, tiny_demo_root, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("val_00001.jpg", "val_00002.jpg"):
        shutil.copy(tiny_demo_root / "val2017" / name, photos / name)
    originals = _snapshot(photos)
    args = [PYTHON, "tools/infer.py", str(tiny_checkpoint), str(photos / "val_00001.jpg"),
            str(photos / "val_00002.jpg"), "--draw", "--format", "jpg", "--device", "cpu", "--output-dir", str(photos)]
    done = run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(_snapshot(photos)[name] == value for name, value in originals.items())  # the photos are untouched
    index = json.loads((photos / "images.json").read_text())
    assert [entry["drawn"] for entry in index["images"]] == ["val_00001.drawn.jpg", "val_00002.drawn.jpg"]
    results = (photos / "detections.json").read_bytes()
    line = one_line_error(run(args))  # a second run into the same folder
    assert "already holds results (detections.json" in line and "--overwrite" in line
    assert (photos / "detections.json").read_bytes() == results
    done = run([*args, "--overwrite"])
    assert done.returncode == 0, done.stderr[-3000:]


def test_convert_refuses_dst_onto_src_under_any_name(tiny_checkpoint, tmp_path, capsys):
    from test_convert import convert

    os.link(tiny_checkpoint, tmp_path / "linked.pth")
    assert convert.main([str(tiny_checkpoint), str(tmp_path / "linked.pth"), "--to", "detr_deform",
                         "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"DST {tmp_path / 'linked.pth'} is SRC" in err and err.count("\n") == 1
    assert (tmp_path / "linked.pth").read_bytes() == tiny_checkpoint.read_bytes()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-n", "0"]))
