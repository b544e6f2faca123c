"""detr_deform.Detector: every input kind, boxes in input pixels, threshold/topk,
one-line errors naming the input, drawing; the readable-picture helpers."""
import inspect
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from torchvision.transforms.v2 import functional as F

import detr_deform
from detr_deform.data.images import load_rgb_image
from detr_deform.data.transforms import IMAGENET_MEAN, IMAGENET_STD, official_resize_size
from detr_deform.data.visualization import (
    MIN_SIDE,
    colour_of,
    detection_labels,
    draw_boxes,
    draw_detections,
    draw_sampling_points,
    drawing_scale,
    label_box,
    label_font,
)

ALL = {"threshold": 0.0, "topk": 1000, "batch_size": 1}  # every (query, class) pair: comparable by pair


@pytest.fixture(scope="module")
def detector(trained_run):
    return detr_deform.Detector.from_pretrained(trained_run[0] / "checkpoint_best.pth", device="cpu")


@pytest.fixture(scope="module")
def image_path(tiny_demo_root):
    return tiny_demo_root / "val2017" / "val_00002.jpg"


@pytest.fixture(scope="module")
def reference(detector, image_path):
    return detector(image_path, **ALL)[0]


def by_pair(found):
    """Detections sorted by (query, label), so that two runs compare entry by entry."""
    order = sorted(range(len(found)), key=lambda i: (int(found.queries[i]), int(found.labels[i])))
    return found.boxes[order], found.scores[order], found.labels[order]


def assert_same(found, expected, box_px=0.01, score=1e-6):
    assert (found.width, found.height) == (expected.width, expected.height)
    boxes, scores, labels = by_pair(found)
    expected_boxes, expected_scores, expected_labels = by_pair(expected)
    assert torch.equal(labels, expected_labels)
    assert torch.allclose(boxes, expected_boxes, atol=box_px, rtol=0)
    assert torch.allclose(scores, expected_scores, atol=score, rtol=0)


def test_loads_the_checkpoint_settings(detector, reference, image_path):
    assert detector.val_size == 96 and detector.max_size == 128  # the tiny run's data settings
    assert detector.category_names == {1: "square", 2: "circle", 3: "triangle"}
    assert reference.source == str(image_path) and (reference.width, reference.height) == (144, 192)
    assert len(reference) == 10 * 4  # all (query, class) pairs of the tiny model
    assert reference.names == [detector.category_names.get(int(label), str(int(label))) for label in reference.labels]
    record = reference.to_dict()["detections"][0]
    x0, y0, x1, y1 = reference.boxes[0].tolist()
    assert record["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0]) and record["score"] == reference.scores[0]


def test_official_preprocessing_and_input_pixels(detector, reference, image_path):
    """Same detections as the model on the official validation pipeline (PIL resize,
    normalise, PostProcess with the original size); the same image twice as large
    gives boxes twice as large."""
    image = load_rgb_image(image_path)
    height, width = official_resize_size(image.height, image.width, detector.val_size, detector.max_size)
    tensor = F.normalize(F.to_dtype(F.to_image(F.resize(image, [height, width])), torch.float32, scale=True),
                         IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        outputs = detector.model([tensor])
    detector.postprocessor.num_select = 1000
    official = detector.postprocessor(outputs, torch.tensor([[image.height, image.width]]))[0]
    assert torch.allclose(official["boxes"], reference.boxes, atol=1e-3)
    assert torch.allclose(official["scores"], reference.scores, atol=1e-5)
    double = detector(image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC), **ALL)[0]
    assert (double.width, double.height) == (2 * image.width, 2 * image.height)
    boxes, _, labels = by_pair(double)
    expected_boxes, _, expected_labels = by_pair(reference)
    assert torch.equal(labels, expected_labels) and torch.allclose(boxes / 2, expected_boxes, atol=0.5)


def test_every_in_memory_input_kind(detector, reference, image_path):
    image = load_rgb_image(image_path)
    array = np.asarray(image)
    alpha = np.concatenate([array, np.full(array.shape[:2] + (1,), 77, np.uint8)], axis=2)
    kinds = {
        "PIL RGB": image, "PIL RGBA": image.convert("RGBA"), "numpy HWC": array, "numpy HWC RGBA": alpha,
        "tensor uint8": torch.from_numpy(array.copy()).permute(2, 0, 1),
        "str": str(image_path), "Path": image_path,
    }
    for kind, value in kinds.items():
        found = detector(value, **ALL)
        assert len(found) == 1, kind
        assert_same(found[0], reference)
    as_float = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
    assert_same(detector(as_float, **ALL)[0], reference, box_px=0.1, score=1e-3)  # resized as floats
    assert_same(detector(array.astype(np.float32) / 255, **ALL)[0], reference, box_px=0.1, score=1e-3)
    batch = detector([image_path, image, array, torch.stack([kinds["tensor uint8"]] * 2)], **ALL)
    assert [f.source for f in batch] == [str(image_path), "inputs[1]", "inputs[2]", "inputs[3][0]", "inputs[3][1]"]
    for found in batch:
        assert_same(found, reference)


def test_grayscale_palette_cmyk_and_16_bit_images(detector, image_path):
    image = load_rgb_image(image_path)
    gray = image.convert("L")
    expected = detector(np.asarray(gray.convert("RGB")), **ALL)[0]
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    for value in (gray, np.asarray(gray), np.asarray(gray)[:, :, None], torch.from_numpy(np.asarray(gray).copy())[None],
                  gray.convert("LA"), sixteen):
        assert_same(detector(value, **ALL)[0], expected)
    palette, cmyk = image.quantize(64), image.convert("CMYK")
    for value in (palette, cmyk):
        assert_same(detector(value, **ALL)[0], detector(np.asarray(value.convert("RGB")), **ALL)[0])


def test_exif_orientation_is_applied(detector, image_path, tmp_path):
    """A JPEG stored sideways with orientation 6 ("rotate 90 clockwise to view"):
    detections are in the pixels of the image as viewed, from a path or a PIL image."""
    image = load_rgb_image(image_path)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "sideways.jpg"
    image.transpose(Image.Transpose.ROTATE_90).save(rotated, quality=98, exif=exif)
    upright = tmp_path / "upright.jpg"
    image.save(upright, quality=98)
    expected = detector(upright, **ALL)[0]
    with Image.open(rotated) as opened:
        assert opened.size == (image.height, image.width)  # stored sideways
        from_pil = detector(opened, **ALL)[0]
    from_path = detector(rotated, **ALL)[0]
    for found in (from_path, from_pil):
        assert (found.width, found.height) == (image.width, image.height)
        assert_same(found, expected, box_px=2.0, score=0.02)  # re-encoded JPEG: not the same pixels


def test_folder_batches_threshold_and_topk(detector, tiny_demo_root, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for source in sorted((tiny_demo_root / "val2017").glob("*.jpg"))[:3]:  # of different sizes
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "notes.txt").write_text("not an image: left out")
    files = sorted(folder.glob("*.jpg"))
    alone = [detector(p, **ALL)[0] for p in files]
    together = detector(folder, **{**ALL, "batch_size": 1})
    assert [f.source for f in together] == [str(p) for p in files]
    for found, expected in zip(together, alone):
        assert_same(found, expected)
    grouped = detector(folder, **{**ALL, "batch_size": 3})  # batched by size: no image is padded
    for found, expected in zip(grouped, alone):
        assert_same(found, expected)
    top = detector(folder, threshold=0.0, topk=3)
    assert all(len(f) == 3 and torch.equal(f.scores, f.scores.sort(descending=True).values) for f in top)
    cut = float(alone[0].scores.median())
    kept = detector(files[0], threshold=cut, topk=1000)[0]
    assert len(kept) == int((alone[0].scores >= cut).sum()) and bool((kept.scores >= cut).all())
    assert detector(files[0], threshold=1.01)[0].boxes.shape == (0, 4)


@pytest.mark.parametrize("value, message", [
    ("missing.jpg", "no such image file or folder: missing.jpg"),
    (np.zeros((10, 10, 3), np.uint16), "input: numpy array of shape (10, 10, 3) and dtype uint16: expected uint8"),
    (np.zeros((3, 10, 12), np.uint8), "channels first? use array.transpose(1, 2, 0)"),
    (np.zeros((10, 10, 2), np.uint8), "expected (H, W) or (H, W, C) with C = 1, 3 (RGB) or 4"),
    (np.full((10, 10, 3), 2.0), "floating-point images take values in [0, 1], these range over [2, 2]"),
    (torch.zeros(10, 12, 3, dtype=torch.uint8),
     "tensor of shape (10, 12, 3) and dtype torch.uint8: expected (C, H, W)"),
    (torch.zeros(3, 10, 10, dtype=torch.int32), "dtype torch.int32: expected uint8 (0-255) or floating point"),
    (torch.full((3, 10, 10), -1.5), "(already normalised? pass the image before normalisation)"),
    ({"image": 1}, "input: unsupported input of type dict"),
    ([], "no images: the input list is empty"),
    ([np.zeros((8, 8, 3), np.uint8), [np.zeros((8, 8, 3), np.uint8)]], "inputs[1]: a nested list"),
])
def test_bad_inputs_fail_in_one_line_naming_them(detector, value, message):
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as error:
        detector(value)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_paths_and_options(detector, tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"no image files in folder {tmp_path}"):
        detector(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="is a video, not an image: use detr_deform.detect_video"):
        detector(tmp_path / "clip.mp4")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot read image {broken}"):  # DatasetError
        detector([np.zeros((8, 8, 3), np.uint8), broken])
    for options, message in [({"topk": 0}, "topk must be an integer >= 1"),
                             ({"batch_size": 1.5}, "batch_size must be an integer >= 1"),
                             ({"threshold": "high"}, "threshold must be a number")]:
        with pytest.raises(ValueError, match=message):
            detector(np.zeros((8, 8, 3), np.uint8), **options)
    with pytest.raises(detr_deform.CheckpointError, match="checkpoint not found"):
        detr_deform.Detector.from_pretrained(tmp_path / "none.pth", device="cpu")


def test_draw_enlarges_small_images_and_keeps_large_ones(detector, reference, image_path):
    picture = detector.draw(image_path, reference)
    scale = drawing_scale(reference.width, reference.height)
    assert picture.mode == "RGB" and min(picture.size) == MIN_SIDE
    assert picture.size == (round(reference.width * scale), round(reference.height * scale))
    large = np.full((800, 1333, 3), 120, np.uint8)
    found = detector(large, threshold=0.0, topk=5)[0]
    drawn = detector.draw(large, found)
    assert drawn.size == (1333, 800) and np.asarray(drawn).std() > 0
    assert detector.draw(large, found, min_side=0).size == (1333, 800)
    with pytest.raises(ValueError, match="the image is 144x192 but the detections are for a 1333x800 image"):
        detector.draw(image_path, found)


def test_labels_stay_inside_and_colours_are_per_class():
    canvas = (400, 300)
    for box in [(0, 0, 50, 50), (350, 250, 400, 300), (-20, -20, 500, 400), (390, 0, 399, 10)]:
        x0, y0, x1, y1 = label_box((120, 24), box, [], canvas)
        assert 0 <= x0 and x1 <= canvas[0] and 0 <= y0 and y1 <= canvas[1]
    assert label_box((120, 24), (100, 100, 200, 200), [], canvas)[1] == 76  # above the box
    assert label_box((120, 24), (100, 0, 200, 200), [], canvas)[1] == 0  # inside at the top border
    first = label_box((120, 24), (100, 100, 200, 200), [], canvas)
    second = label_box((120, 24), (100, 100, 200, 200), [first], canvas)
    assert second != first  # a second label of the same box goes elsewhere
    assert len({colour_of(i) for i in range(91)}) == 91
    font = label_font(20)
    assert isinstance(font, ImageFont.FreeTypeFont) and font.size == 20
    if __import__("importlib").util.find_spec("matplotlib"):
        assert "DejaVuSans" in font.path


def test_drawing_helpers_used_by_training_and_the_dataset_browser():
    """engine/run_logger.py: draw_boxes(image, boxes, labels, categories) on (3, H, W) uint8."""
    image = torch.full((3, 96, 128), 200, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 128.0, 96.0]])
    captions = detection_labels(torch.tensor([0.9, 0.4]), torch.tensor([1, 2]), {1: "square"})
    assert captions == ["square 0.90", "2 0.40"]
    drawn = draw_boxes(image, boxes, captions, [1, 2])
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, MIN_SIDE, round(128 * MIN_SIDE / 96))
    assert draw_boxes(image, boxes[:0], [], []).shape == drawn.shape  # nothing to draw: enlarged all the same
    picture = draw_detections(Image.new("RGB", (1333, 800), "#808080"), boxes * 8, captions, [1, 2])
    assert picture.size == (1333, 800)


def test_sampling_point_pictures_have_a_colour_bar_and_a_caption():
    pytest.importorskip("matplotlib")
    image = Image.new("RGB", (160, 144), "#405060")
    points = torch.tensor([[20.0, 30.0], [80.0, 70.0], [150.0, 140.0]])
    weights = torch.tensor([0.1, 0.6, 0.3])
    plain = draw_sampling_points(image, points, weights, box=(10, 10, 100, 100), reference=(50, 50))
    captioned = draw_sampling_points(image, points, weights, reference=(50, 50), caption="Last decoder layer " * 12)
    enlarged = (round(160 * MIN_SIDE / 144), MIN_SIDE)
    assert plain.width > enlarged[0] and plain.height == enlarged[1]  # the colour bar on the right
    assert captioned.width == plain.width and captioned.height > enlarged[1] + 40  # a wrapped caption below
    buffer = io.BytesIO()
    captioned.save(buffer, format="PNG")
    assert buffer.tell() > 0


def test_same_size_images_are_batched_together_in_input_order(detector, tiny_demo_root, monkeypatch):
    files = sorted((tiny_demo_root / "val2017").glob("*.jpg"))
    sizes = [Image.open(p).size for p in files]
    alone = [detector(p, **ALL)[0] for p in files]
    batches = []
    forward = detector.model.forward
    monkeypatch.setattr(detector.model, "forward", lambda inputs: batches.append(
        {tuple(t.shape[-2:]) for t in inputs}) or forward(inputs))
    together = detector(files, **{**ALL, "batch_size": 8})
    assert all(len(shapes) == 1 for shapes in batches)  # never two sizes (padding) in one forward pass
    assert len(batches) == len(set(sizes))               # one batch per size (7 images < 8 x GROUP_WINDOW)
    assert [f.source for f in together] == [str(p) for p in files]
    for found, expected in zip(together, alone):
        # the same images, the same sizes; batching changes only the float rounding of batched kernels
        assert_same(found, expected, box_px=1e-3, score=1e-5)


def test_the_calibrated_threshold_is_the_default(detector, trained_run, image_path, tmp_path):
    from detr_deform.inference.detector import DEFAULT_BATCH_SIZE, DEFAULT_SCORE_THRESHOLD
    from detr_deform.io.checkpoint import read_checkpoint, write_checkpoint

    content = read_checkpoint(trained_run[0] / "checkpoint_best.pth")
    stored = content["score_threshold"]  # written by every evaluation: None when nothing was found right
    assert stored is None or stored["step"] == content["step"]
    every = detector(image_path, **ALL)[0]
    cut = float(every.scores[3])
    write_checkpoint(tmp_path / "calibrated.pth", {**content, "score_threshold": {"threshold": cut,
                                                                                   "step": content["step"]}})
    calibrated = detr_deform.Detector.from_pretrained(tmp_path / "calibrated.pth", device="cpu")
    assert calibrated.score_threshold == cut and calibrated.score_threshold_source.startswith("calibrated")
    found = calibrated(image_path, topk=1000)[0]
    assert len(found) == int((every.scores >= cut).sum()) >= 4
    assert len(calibrated(image_path, threshold=0.0, topk=1000)[0]) == len(every)  # an explicit threshold wins
    write_checkpoint(tmp_path / "other_step.pth", {**content, "score_threshold": {"threshold": cut,
                                                                                   "step": content["step"] + 1}})
    other = detr_deform.Detector.from_pretrained(tmp_path / "other_step.pth", device="cpu")
    assert (other.score_threshold, other.score_threshold_source) == (DEFAULT_SCORE_THRESHOLD, "default")
    if stored is None:
        assert detector.score_threshold == DEFAULT_SCORE_THRESHOLD
    assert inspect.signature(detr_deform.Detector.__call__).parameters["batch_size"].default == DEFAULT_BATCH_SIZE
