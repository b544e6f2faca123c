"""The user tools end to end on the tiny demo data and a tiny trained checkpoint:
infer, visualize (attention and dataset), plot_logs, export (ONNX), benchmark."""
import importlib.util
import json
import struct
import sys
import zlib

import pytest
import torch
from PIL import Image

from detr_deform.data.visualization import drawing_scale

from pipeline_helpers import PYTHON, ROOT, TINY_MODEL, run


def tool(name: str, *args, timeout: int = 300):
    return run([PYTHON, f"tools/{name}.py", *map(str, args)], timeout=timeout)


def tool_module(name: str):
    """A tool imported in this process (its main() without a new interpreter: faster for error paths)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drawn_size(size: tuple[int, int]) -> tuple[int, int]:
    scale = drawing_scale(*size)
    return round(size[0] * scale), round(size[1] * scale)


def bomb_png(path, width: int = 20000, height: int = 20000):
    """A tiny PNG whose header claims width x height pixels (PIL refuses it from the header alone)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 7))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run[0] / "checkpoint_last.pth"


def test_infer_writes_coco_results_and_drawn_images(checkpoint, tiny_demo_root, tmp_path):
    val = tiny_demo_root / "val2017"
    done = tool("infer", checkpoint, val, "--draw", "--format", "jpg", "--threshold", "0", "--topk", "5",
                "--batch-size", "3", "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    detections = json.loads((tmp_path / "detections.json").read_text())
    index = json.loads((tmp_path / "images.json").read_text())
    sources = sorted(val.glob("*.jpg"))
    assert [entry["file_name"] for entry in index["images"]] == [str(p) for p in sources]
    assert {c["name"] for c in index["categories"]} >= {"square", "circle", "triangle"}
    assert len(detections) == 5 * len(sources)
    for entry in detections:
        assert set(entry) == {"image_id", "file_name", "category_id", "category_name", "bbox", "score"}
        assert 1 <= entry["image_id"] <= len(sources) and 0 <= entry["score"] <= 1
        x, y, w, h = entry["bbox"]
        assert w >= 0 and h >= 0
        assert entry["category_name"] == {c["id"]: c["name"] for c in index["categories"]}[entry["category_id"]]
    for entry in index["images"]:
        with Image.open(tmp_path / entry["drawn"]) as drawn, Image.open(entry["file_name"]) as source:
            # small images are enlarged before drawing so that the labels can be read
            assert drawn.format == "JPEG" and drawn.size == drawn_size(source.size) and min(drawn.size) >= 512
    scores = [d["score"] for d in detections if d["image_id"] == 1]
    assert scores == sorted(scores, reverse=True)
    # results were streamed as JSON lines; the JSON files were written from them at the end
    lines = [json.loads(line) for line in (tmp_path / "detections.jsonl").read_text().splitlines()]
    assert lines == detections and index["finished"] is True and index["skipped"] == []


def test_infer_threshold_and_bad_input(checkpoint, tiny_demo_root, tmp_path):
    done = tool("infer", checkpoint, tiny_demo_root / "val2017" / "val_00001.jpg", "--threshold", "1.01",
                "--output-dir", tmp_path)
    assert done.returncode == 0 and json.loads((tmp_path / "detections.json").read_text()) == []
    missing = tool("infer", checkpoint, tmp_path / "nothing_here", "--output-dir", tmp_path)
    assert missing.returncode == 2 and "no image files found" in missing.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    failed = tool("infer", checkpoint, broken, "--output-dir", tmp_path, "--overwrite")  # the results above
    assert failed.returncode == 2 and "cannot read image" in failed.stderr and "Traceback" not in failed.stderr


def test_infer_keeps_results_when_a_decompression_bomb_stops_it(checkpoint, tiny_demo_root, tmp_path, capsys):
    """An image whose header claims 20000 x 20000 pixels stops the run naming it (exit 2)
    with the results so far written, or is skipped with --skip-unreadable."""
    infer = tool_module("infer")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.open(tiny_demo_root / "val2017" / "val_00001.jpg").save(folder / "a.png")
    bomb = bomb_png(folder / "b.png")
    Image.open(tiny_demo_root / "val2017" / "val_00002.jpg").save(folder / "c.png")
    out = tmp_path / "stopped"
    assert infer.main([str(checkpoint), str(folder), "--threshold", "0", "--topk", "3", "--device", "cpu",
                       "--output-dir", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: refusing to decode image") and str(bomb) in error and "\n" not in error
    detections = json.loads((out / "detections.json").read_text())
    index = json.loads((out / "images.json").read_text())
    assert index["finished"] is False and [i["file_name"] for i in index["images"]] == [str(folder / "a.png")]
    assert len(detections) == 3 and {d["image_id"] for d in detections} == {1}
    out = tmp_path / "skipped"
    assert infer.main([str(checkpoint), str(folder), "--threshold", "0", "--topk", "3", "--device", "cpu",
                       "--skip-unreadable", "--output-dir", str(out)]) == 0
    assert "warning: skipped refusing to decode image" in capsys.readouterr().err
    index = json.loads((out / "images.json").read_text())
    assert index["skipped"] == [str(bomb)] and len(index["images"]) == 2 and index["finished"] is True
    assert len(json.loads((out / "detections.json").read_text())) == 6


def test_infer_full_disk_and_missing_gpu_give_one_line(checkpoint, tiny_demo_root, tmp_path, capsys):
    infer = tool_module("infer")
    out = tmp_path / "out"
    out.mkdir()
    (out / "val_00002.png").symlink_to("/dev/full")  # writing the second drawing fails: no space left
    assert infer.main([str(checkpoint), str(tiny_demo_root / "val2017"), "--draw", "--threshold", "0", "--topk",
                       "2", "--device", "cpu", "--output-dir", str(out), "--overwrite"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == f"error: could not write {out / 'val_00002.png'}: [Errno 28] No space left on device"
    index = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == [1] and index["finished"] is False
    assert len(json.loads((out / "detections.json").read_text())) == 2  # the first image's results are kept
    if torch.cuda.is_available():
        return
    assert infer.main([str(checkpoint), str(tiny_demo_root / "val2017"), "--device", "cuda",
                       "--output-dir", str(tmp_path / "gpu")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --device=cuda but no GPU is visible") and "use --device=cpu" in error


def test_visualize_attention_points_and_encoder_pixel(checkpoint, tiny_demo_root, tmp_path):
    image = tiny_demo_root / "val2017" / "val_00002.jpg"
    done = tool("visualize", "attention", checkpoint, image, "--queries", "2", "--pixel", "30,40",
                "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    written = [p for p in json.loads(done.stdout.strip().splitlines()[-1])]
    assert len(written) == 3 and sum("_pixel_30_40" in p for p in written) == 1
    with Image.open(image) as source:
        width, height = drawn_size(source.size)
        original = source.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    for path in written:
        with Image.open(path) as drawn:
            # enlarged image, a colour bar on the right and a caption below
            assert drawn.format == "PNG" and drawn.width > width and drawn.height > height
            picture = drawn.convert("RGB").crop((0, 0, width, height))
            assert picture.tobytes() != original.tobytes()  # something was drawn
    outside = tool("visualize", "attention", checkpoint, image, "--pixel", "5000,5", "--output-dir", tmp_path)
    assert outside.returncode == 2 and "outside the" in outside.stderr


def test_sampling_points_match_the_model(checkpoint, tiny_demo_root):
    """The drawn points are the last decoder layer's sampling locations, in pixels."""
    from detr_deform import Detector
    from detr_deform.data.images import load_rgb_image
    from detr_deform.inference.inputs import pil_to_tensor
    from detr_deform.inference.sampling import decoder_sampling, encoder_sampling, recording_sampling

    detector = Detector.from_pretrained(checkpoint, device="cpu")
    image = load_rgb_image(tiny_demo_root / "val2017" / "val_00003.jpg")
    with recording_sampling(detector):
        found = detector(image, threshold=0.0, batch_size=1)[0]
    layer = detector.model.transformer.decoder.layers[-1].cross_attn
    assert not layer.keep_sampling  # switched off again after the block
    query = int(found.queries[0])
    sampling = decoder_sampling(detector, found, query)
    heads, levels, points = layer.n_heads, layer.n_levels, layer.n_points
    assert sampling.points.shape == (heads * levels * points, 2)
    assert (sampling.heads, sampling.num_levels, sampling.num_points) == (heads, levels, points)
    expected = layer.last_sampling_locations[0, query].reshape(-1, 2) * torch.tensor([image.width, image.height])
    assert torch.allclose(sampling.points, expected)
    assert torch.allclose(sampling.weights.view(heads, -1).sum(-1), torch.ones(heads), atol=1e-5)
    # The top detection is the query with the highest class probability.
    logits = detector.model([detector.preprocess(pil_to_tensor(image))])["pred_logits"][0]
    assert int(logits.sigmoid().max(-1).values.argmax()) == query
    encoder = encoder_sampling(detector, found, 0, 0)
    assert encoder.points.shape[0] == heads * levels * points
    assert (encoder.reference < torch.tensor([image.width, image.height]) / 4).all()


def test_visualize_dataset_draws_augmented_ground_truth(tiny_demo_root, tmp_path):
    done = tool("visualize", "dataset", "--images", tiny_demo_root / "train2017", "--annotations",
                tiny_demo_root / "annotations" / "instances_train2017.json", "--num", "3", "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(written) == 3
    assert written[0].endswith("train_1.png")  # the demo's image 1 has no objects: a caption below it
    for path in written[1:]:  # (tests/test_newcomer.py checks the captioned picture)
        with Image.open(path) as drawn:
            assert drawn.format == "PNG" and 480 <= min(drawn.size) <= 800  # official train scales
    usage = tool("visualize", "dataset", "--num", "1")
    assert usage.returncode == 2 and "pass exactly one of" in usage.stderr


def test_plot_logs_compares_runs(trained_run, tmp_path):
    run_dir = trained_run[0]
    out = tmp_path / "curves.png"
    done = tool("plot_logs", run_dir, run_dir / "log.jsonl", "--labels", "a", "b", "--output", out)
    assert done.returncode == 0, done.stderr[-3000:]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1560, 720)
    missing = tool("plot_logs", tmp_path / "nope")
    assert missing.returncode == 2 and "no log found" in missing.stderr


def test_export_onnx_matches_pytorch(checkpoint, tiny_demo_root, tmp_path):
    import onnx

    out = tmp_path / "model.onnx"
    done = tool("export", checkpoint, "--output", out, "--height", "96", "--width", "128",
                "--check-images", tiny_demo_root / "val2017", "--max-check-images", "2")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    onnx.checker.check_model(str(out))
    report = json.loads(out.with_suffix(".check.json").read_text())
    assert report["ok"] and report["images_checked"] == 2
    assert report["max_abs_diff"]["pred_logits"] < 1e-4 and report["max_abs_diff"]["pred_boxes"] < 1e-4
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["images"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, 96, 128]
    assert [o.name for o in graph.output] == ["pred_logits", "pred_boxes"]


def test_export_checks_random_images_by_default_and_names_a_missing_onnxruntime(checkpoint, tmp_path, capsys,
                                                                                   monkeypatch):
    export = tool_module("export")
    out = tmp_path / "model.onnx"
    args = [str(checkpoint), "--output", str(out), "--height", "64", "--width", "96", "--max-check-images", "1"]
    assert export.main(args) == 0
    report = json.loads(out.with_suffix(".check.json").read_text())
    assert report["ok"] and report["images_checked"] == 1  # random images, as many as asked for
    capsys.readouterr()  # the first run's output (the attention path's one-time note among it) is not asked about
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the tools extra were not installed
    assert export.main(args) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: exporting and checking need onnxruntime: pip install 'detr_deform[tools]'")
    assert "\n" not in error


def test_benchmark_reports_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    # One inference batch size (each measurement is a fresh interpreter: the loop over sizes is the same code).
    done = tool("benchmark", "experiment=demo", *TINY_MODEL, "--height", "64", "--width", "96", "--batch-sizes",
                "2", "--warmup", "0", "--repeat", "1", "--train-batch-size", "2", "--json", out, "--markdown",
                timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["input"] == [64, 96] and results["parameters"] > 1e6 and results["gflops"] > 0
    assert [e["batch"] for e in results["inference"]] == [2]
    assert all(e["latency_ms"] > 0 and e["peak_memory_mib"] > 0 for e in results["inference"])
    assert results["train"]["step_s"] > 0 and results["train"]["batch"] == 2
    assert "| demo | cpu | 64x96 |" in done.stdout


def test_operator_benchmark_compares_both_implementations():
    done = tool("benchmark_ms_deform_attn", "--scales", "decoder", "--repeat", "1", "--markdown")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| decoder")]
    assert sorted(cells[2].strip() for cells in rows) == ["cpp", "pytorch"]
    for cells in rows:
        assert cells[1].strip() == "300"
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and cells[6].strip().endswith("x")
