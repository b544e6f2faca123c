"""Videos: tools/infer.py annotates a video the test writes itself (PyAV), frame
batches give the per-frame detections, the writer's sizes and codecs."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from detr_deform.data.visualization import drawing_scale

from pipeline_helpers import PYTHON, run

av = pytest.importorskip("av")

FRAMES, WIDTH, HEIGHT = 12, 160, 144


@pytest.fixture(scope="module")
def clip(tiny_demo_root, tmp_path_factory):
    """12 frames of the demo validation images at 160 x 144, 12 frames/s, H.264 (MPEG-4 part 2 without it)."""
    from detr_deform.inference.video import VideoWriter

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    sources = sorted((tiny_demo_root / "val2017").glob("*.jpg"))
    with VideoWriter(path, fps=12) as writer:
        for index in range(FRAMES):
            with Image.open(sources[index % len(sources)]) as image:
                writer.write(image.convert("RGB").resize((WIDTH, HEIGHT)))
    return path


@pytest.fixture(scope="module")
def detector(trained_run):
    from detr_deform import Detector

    return Detector.from_pretrained(trained_run[0] / "checkpoint_best.pth", device="cpu")


def decoded(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(container.streams.video[0])]


def test_infer_annotates_a_video(trained_run, clip, tmp_path):
    done = run([PYTHON, "tools/infer.py", str(trained_run[0] / "checkpoint_best.pth"), str(clip), "--draw",
                "--threshold", "0", "--topk", "3", "--batch-size", "5", "--device", "cpu",
                "--output-dir", str(tmp_path)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{clip}: {FRAMES} frames in " in done.stdout and " frames/s (decoding, detection, drawing" in done.stdout
    lines = [json.loads(line) for line in (tmp_path / "clip.detections.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(FRAMES))
    assert lines[1]["time"] == pytest.approx(1 / 12)
    for line in lines:
        assert (line["width"], line["height"]) == (WIDTH, HEIGHT) and len(line["detections"]) == 3
        assert set(line["detections"][0]) == {"category_id", "category_name", "bbox", "score"}
    frames = decoded(tmp_path / "clip.drawn.mp4")
    scale = drawing_scale(WIDTH, HEIGHT)  # small videos are enlarged so that the labels can be read
    width, height = round(WIDTH * scale), round(HEIGHT * scale)
    assert len(frames) == FRAMES and frames[0].shape == (height + height % 2, width + width % 2, 3)


def test_detect_video_batches_give_the_per_frame_results(detector, clip):
    from detr_deform.inference.video import VideoReader, detect_video

    with VideoReader(clip) as video:
        assert (video.width, video.height, video.fps, video.frame_count) == (WIDTH, HEIGHT, 12, FRAMES)
        found = list(detect_video(detector, video, threshold=0.0, topk=5, batch_size=5))
    assert [f.frame.index for f in found] == list(range(FRAMES))
    assert found[3].detections.source == f"{clip} frame 3"
    for item in found[::4]:
        alone = detector(item.frame.image, threshold=0.0, topk=5, batch_size=1)[0]
        # same-size frames are not padded: a batch gives each frame its own result (to rounding)
        assert torch.allclose(item.detections.scores, alone.scores, atol=1e-5)
        assert torch.allclose(item.detections.boxes, alone.boxes, atol=1e-3)
    record = found[0].to_dict()
    assert record["frame"] == 0 and record["time"] == 0.0 and len(record["detections"]) == 5


def test_writer_sizes_codecs_and_errors(tmp_path, monkeypatch):
    from detr_deform.inference.video import VideoError, VideoReader, VideoWriter, require_av

    with VideoWriter(tmp_path / "odd.mp4", fps=5) as writer:
        for value in (0, 128, 255):
            writer.write(np.full((101, 161, 3), value, np.uint8))
    assert writer.codec in ("libx264", "h264", "mpeg4") and writer.frames == 3
    frames = decoded(tmp_path / "odd.mp4")
    assert len(frames) == 3 and frames[0].shape == (102, 162, 3)  # 4:2:0 needs even sides
    with VideoWriter(tmp_path / "small.webm", fps=5) as writer:
        writer.write(Image.new("RGB", (64, 48), "#336699"))
    assert writer.codec.startswith("libvpx") and len(decoded(tmp_path / "small.webm")) == 1
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(VideoError, match="notes.txt is neither an image nor a video: PIL cannot identify") as error:
        VideoReader(tmp_path / "notes.txt")
    assert "Errno" not in str(error.value) and "1094995529" not in str(error.value)
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(ModuleNotFoundError, match=r'pip install "detr_deform\[video\]"'):
        require_av()
