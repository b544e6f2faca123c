"""Bad data: tools/check_dataset.py, image modes, EXIF, empty images, degenerate
boxes, unreadable files and malformed annotations (fail clearly or skip)."""
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from detr_deform.data import CocoDetection, build_transforms, collate_fn
from detr_deform.data.coco import raise_worker_errors_cleanly
from detr_deform.data.errors import DatasetError

from data_helpers import rewrite, write_dataset, write_image
from pipeline_helpers import PYTHON, run, tiny_train_args, train


def check_tool(*args):
    return run([PYTHON, "tools/check_dataset.py", *map(str, args)], timeout=120)


def test_check_dataset_accepts_good_data_and_prints_counts(tiny_demo_root, tmp_path):
    done = check_tool("--coco-path", tiny_demo_root, "--json", tmp_path / "r.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "12 images" in done.stdout and "7 images" in done.stdout
    assert "annotations per category" in done.stdout and "triangle" in done.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["ok"] for r in report] == [True, True]
    assert report[0]["num_images"] == 12 and report[0]["files_checked"]


def test_check_dataset_finds_every_kind_of_problem(tmp_path):
    images, annotation_file, content = write_dataset(tmp_path, 7)
    (images / "2.jpg").unlink()                                   # missing file
    data = (images / "3.jpg").read_bytes()
    (images / "3.jpg").write_bytes(data[: len(data) // 2])        # truncated JPEG
    (images / "7.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))  # corrupt PNG header + garbage
    content["images"][3]["width"] = 100                           # size in JSON != real size
    content["annotations"][0]["bbox"] = [5, 5, 0, 10]             # non-positive width
    content["annotations"][5]["bbox"] = [500, 500, 10, 10]        # outside the image
    content["annotations"][1]["category_id"] = 7                  # undeclared category
    content["annotations"].append({"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 1, 3, 3]})  # dup ann id
    content["annotations"].append({"id": 99, "image_id": 5, "category_id": 1})  # missing bbox
    content["images"].append(dict(content["images"][5]))          # duplicate image id
    rewrite(annotation_file, content)
    done = check_tool("--images", images, "--annotations", annotation_file, "--json", tmp_path / "r.json")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())[0]
    kinds = {(p["kind"], p["severity"]) for p in report["problems"]}
    assert kinds == {("missing_file", "error"), ("unreadable_image", "error"), ("size_mismatch", "error"),
                     ("degenerate_box", "warning"), ("unknown_category", "error"),
                     ("duplicate_annotation_id", "error"), ("malformed_annotation", "error"),
                     ("duplicate_image_id", "error"), ("coco_default_filled", "warning")}  # the appended one

    by_kind = {p["kind"]: p for p in report["problems"]}
    assert "2.jpg" in by_kind["missing_file"]["where"]
    assert {p["image_id"] for p in report["problems"] if p["kind"] == "unreadable_image"} == {3, 7}
    assert "NOT USABLE" in done.stdout and "Traceback" not in done.stderr


MALFORMED_JSON = [
    ("{not json", "not valid JSON"),
    (json.dumps({"annotations": [], "categories": []}), "missing required top-level key 'images'"),
    (json.dumps({"images": {}, "annotations": [], "categories": []}), "'images' must be a list"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"images": [], "annotations": [], "categories": []}), "'categories' must be a non-empty list"),
]


def test_malformed_json_is_reported_by_dataset_and_tool(tmp_path):
    images, annotation_file, _ = write_dataset(tmp_path, 1)
    for text, expected in MALFORMED_JSON:
        annotation_file.write_text(text)
        with pytest.raises(DatasetError, match=expected) as error:
            CocoDetection(images, annotation_file)
        assert str(annotation_file) in str(error.value)
    annotation_file.write_text(MALFORMED_JSON[0][0])
    done = check_tool("--images", images, "--annotations", annotation_file)
    assert done.returncode == 1 and "not valid JSON" in done.stdout, done.stdout


@pytest.mark.parametrize("mode, suffix, kwargs", [
    ("L", "png", {}), ("CMYK", "jpg", {}), ("RGBA", "png", {}), ("P", "png", {"transparency": 0}),
    ("I;16", "png", {}), ("1", "png", {}),
])
def test_any_image_mode_loads_as_rgb(tmp_path, mode, suffix, kwargs):
    images, annotation_file, content = write_dataset(tmp_path, 1)
    write_image(images / f"odd.{suffix}", mode=mode if mode != "I;16" else "L", **kwargs)
    if mode == "I;16":
        wide = np.asarray(Image.open(images / f"odd.{suffix}"), dtype=np.uint16) * 257   # full 16-bit range
        Image.fromarray(wide).save(images / f"odd.{suffix}")
    content["images"][0]["file_name"] = f"odd.{suffix}"
    rewrite(annotation_file, content)
    dataset = CocoDetection(images, annotation_file, build_transforms("val", val_size=48, max_size=64))
    image, target = dataset[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    raw = dataset.load_image(1)
    assert raw.mode == "RGB"
    patch, background = raw.getpixel((20, 20)), raw.getpixel((2, 2))
    if mode in ("L", "I;16"):
        assert patch[0] == patch[1] == patch[2] and abs(patch[0] - background[0]) > 20, (patch, background)
    elif mode != "1":  # colour modes keep the red patch red
        assert patch[0] > patch[1] + 60, (mode, patch)
    assert target["boxes"].shape == (1, 4)


def _exif_rotated_jpeg(path):
    """Stored 64x48 with EXIF orientation 6 (display: rotate 90 clockwise -> 48x64)."""
    image = Image.new("RGB", (64, 48), (20, 90, 160))
    image.paste((200, 30, 30), (0, 0, 16, 16))               # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif)


def test_exif_orientation_follows_the_json_size(tmp_path):
    images, annotation_file, content = write_dataset(tmp_path, 1)
    _exif_rotated_jpeg(images / "1.jpg")
    content["images"][0].update(width=48, height=64)        # annotated on the displayed (rotated) image
    rewrite(annotation_file, content)
    shown = CocoDetection(images, annotation_file).load_image(1)
    assert shown.size == (48, 64)
    assert shown.getpixel((44, 3))[0] > 150                  # stored top-left is displayed top-right
    content["images"][0].update(width=64, height=48)        # annotated on the stored pixels
    rewrite(annotation_file, content)
    stored = CocoDetection(images, annotation_file).load_image(1)
    assert stored.size == (64, 48) and stored.getpixel((3, 3))[0] > 150
    content["images"][0].update(width=30, height=30)        # neither: clear error
    rewrite(annotation_file, content)
    with pytest.raises(DatasetError, match="the JSON says 30x30"):
        CocoDetection(images, annotation_file)[0]


def test_empty_images_are_kept_and_degenerate_boxes_counted(tmp_path):
    images, annotation_file, content = write_dataset(tmp_path, 4)
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] != 2]
    content["annotations"][0]["bbox"] = [8, 8, -3, 5]
    content["annotations"][1]["bbox"] = [400, 8, 10, 5]
    rewrite(annotation_file, content)
    with pytest.warns(UserWarning, match="2 degenerate box"):
        dataset = CocoDetection(images, annotation_file, build_transforms("val", val_size=48, max_size=64))
    assert len(dataset) == 4
    counts = {int(t["image_id"]): len(t["boxes"]) for _, t in (dataset[i] for i in range(4))}
    assert counts == {1: 0, 2: 0, 3: 0, 4: 1}


def test_unreadable_image_fails_clearly_even_in_a_worker(tmp_path):
    images, annotation_file, _ = write_dataset(tmp_path, 4)
    (images / "3.jpg").write_bytes(b"not an image at all")
    dataset = CocoDetection(images, annotation_file, build_transforms("val", val_size=48, max_size=64))
    with pytest.raises(DatasetError, match=r"image 3: cannot read image .*3\.jpg"):
        dataset[2]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=collate_fn)
    with pytest.raises(DatasetError) as error:
        list(raise_worker_errors_cleanly(loader))
    message = str(error.value)
    assert message.startswith("image 3: cannot read image") and "Traceback" not in message


def test_skip_mode_leaves_bad_samples_out_and_counts_them(tmp_path):
    images, annotation_file, content = write_dataset(tmp_path, 5)
    (images / "3.jpg").write_bytes(b"broken")
    del content["annotations"][3]["bbox"]                    # malformed annotation of image 4
    rewrite(annotation_file, content)
    with pytest.raises(DatasetError, match="missing required key.*on_bad_sample=skip"):
        CocoDetection(images, annotation_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetection(images, annotation_file, build_transforms("val", val_size=48, max_size=64),
                                on_bad_sample="skip")
    assert any("leaving out the 1 image" in str(w.message) for w in caught)
    assert dataset.ids == [1, 2, 3, 5]
    _, target = dataset[2]                                   # image 3 is unreadable: image 5 instead
    assert int(target["image_id"]) == 5
    assert [image_id for image_id, _ in target["skipped"]] == [3]
    assert "3.jpg" in target["skipped"][0][1]


def test_training_fails_fast_or_skips_on_a_corrupt_image(tiny_demo_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_demo_root, root)
    content = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    broken = root / "train2017" / content["images"][0]["file_name"]
    broken.write_bytes(broken.read_bytes()[:100])
    args = tiny_train_args(root, tmp_path / "out", "optim.epochs=1", "runtime.max_steps_per_epoch=6",
                           "data.num_workers=1", "runtime.max_eval_images=2", "runtime.vis_images=0")
    failed = train(*args)
    assert failed.returncode == 2
    last_line = failed.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: image ") and broken.name in last_line, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    done = train(*[a.replace("/out", "/out2") for a in args], "data.on_bad_sample=skip")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped unreadable image" in done.stdout and broken.name in done.stdout
    epochs = [json.loads(line) for line in (tmp_path / "out2" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in epochs if r["type"] == "epoch"] == [1]


# ---------------------------------------------------------------- category ids, file names, empty files

@pytest.mark.parametrize("bad_id, message", [
    (-1, "category id -1 is negative; category ids must be >= 0"),
    (10**9, "category id 1000000000 is above the limit data.max_category_id=10000 (the class head would get "
            "1000000001 outputs); remap the category ids to 1..N"),
])
def test_negative_and_huge_category_ids_are_errors_in_the_tool_and_the_loader(tmp_path, bad_id, message):
    images, annotation_file, content = write_dataset(tmp_path, 2)
    content["categories"] = [*content["categories"], {"id": bad_id, "name": "odd"}]   # a copy: the list is shared
    content["annotations"][1]["category_id"] = bad_id
    rewrite(annotation_file, content)
    done = check_tool("--images", images, "--annotations", annotation_file, "--no-files", "--json", tmp_path / "r.json")
    assert done.returncode == 1 and "NOT USABLE" in done.stdout, done.stdout
    problems = [p for p in json.loads((tmp_path / "r.json").read_text())[0]["problems"]
                if p["kind"] == "bad_category_id"]
    assert {p["where"] for p in problems} == {str(annotation_file), "annotation 2"}   # the declaration and the use
    assert all(message in p["message"] for p in problems)
    assert "(image 2)" in next(p["message"] for p in problems if p["where"] == "annotation 2")
    for policy in ("error", "skip"):   # skip cannot help: the class head is sized from the ids
        with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
            CocoDetection(images, annotation_file, on_bad_sample=policy)


def test_the_category_id_ceiling_is_configurable(tmp_path):
    images, annotation_file, content = write_dataset(tmp_path, 2)
    content["categories"] = [*content["categories"], {"id": 20000, "name": "big"}]
    rewrite(annotation_file, content)
    assert check_tool("--images", images, "--annotations", annotation_file, "--no-files").returncode == 1
    done = check_tool("--images", images, "--annotations", annotation_file, "--no-files", "--max-category-id", 20000)
    assert done.returncode == 0, done.stdout
    assert CocoDetection(images, annotation_file, max_category_id=20000).num_classes == 20001
    bad = check_tool("--images", images, "--annotations", annotation_file, "--max-category-id", -1)
    assert bad.returncode == 2 and "--max-category-id=-1 must be >= 0" in bad.stderr


@pytest.mark.parametrize("file_name, message", [
    ("../outside.jpg", "goes up with '..', outside the image folder"),
    ("sub/../../outside.jpg", "goes up with '..'"),
    ("..\\outside.jpg", "goes up with '..'"),
    ("/etc/passwd", "is an absolute path"),
    ("C:\\data\\1.jpg", "is an absolute path"),
    ("", "'file_name' must be a non-empty string"),
    (12, "'file_name' must be a non-empty string"),
])
def test_file_names_outside_the_image_folder_are_refused(tmp_path, file_name, message):
    images, annotation_file, content = write_dataset(tmp_path / "data", 2)
    write_image(tmp_path / "data" / "outside.jpg")           # exists, so only the guard can stop it
    content["images"][0]["file_name"] = file_name
    rewrite(annotation_file, content)
    done = check_tool("--images", images, "--annotations", annotation_file, "--json", tmp_path / "r.json")
    assert done.returncode == 1, done.stdout
    problem = next(p for p in json.loads((tmp_path / "r.json").read_text())[0]["problems"]
                   if p["kind"] == "unsafe_file_name")
    assert message in problem["message"] and problem["where"] == "image 1"
    with pytest.raises(DatasetError, match=re.escape(message)):
        CocoDetection(images, annotation_file)
    with pytest.warns(UserWarning, match="leaving out the 1 image"):   # skip leaves that image out
        skipping = CocoDetection(images, annotation_file, on_bad_sample="skip")
    assert skipping.ids == [2]


def test_an_empty_images_list_is_an_error_not_ok(tmp_path):
    images, annotation_file, content = write_dataset(tmp_path, 1)
    rewrite(annotation_file, {**content, "images": [], "annotations": []})
    done = check_tool("--images", images, "--annotations", annotation_file)
    assert done.returncode == 1 and "'images' is an empty list" in done.stdout and "  OK" not in done.stdout
    with pytest.raises(DatasetError, match="'images' is an empty list"):
        CocoDetection(images, annotation_file)


def test_an_empty_json_file_is_named_once(tmp_path):
    images, annotation_file, _ = write_dataset(tmp_path, 1)
    annotation_file.write_bytes(b"")
    done = check_tool("--images", images, "--annotations", annotation_file)
    assert done.returncode == 1
    problem_line = next(line for line in done.stdout.splitlines() if "is empty (0 bytes)" in line)
    assert problem_line.count(str(annotation_file)) == 1, problem_line
    with pytest.raises(DatasetError, match=r"is empty \(0 bytes\)") as error:
        CocoDetection(images, annotation_file)
    assert str(error.value).count(str(annotation_file)) == 1


# ---------------------------------------------------------------- extreme aspect ratios

def _official_get_size(image_size, size, max_size=None):
    """The official get_size_with_aspect_ratio (datasets/transforms.py), as the reference."""
    w, h = image_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


def test_resize_equals_the_official_rule_wherever_that_gives_pixels_and_never_reaches_zero():
    from detr_deform.data.transforms import official_resize_size

    sides = [1, 2, 3, 17, 100, 333, 480, 640, 799, 800, 801, 1333, 2000, 5000]
    for height in sides:
        for width in sides:
            for size, max_size in ((800, 1333), (96, 128), (480, 1333), (800, None)):
                official = _official_get_size((width, height), size, max_size)
                ours = official_resize_size(height, width, size, max_size)
                if min(official) > 0:
                    assert ours == official, (height, width, size, max_size)
                else:   # the official rule gives 0 px (and the resize fails): the shorter side becomes 1 px
                    assert min(ours) == 1 and max(ours) == max(official) or max(official) == 0, (height, width)
                assert min(ours) >= 1


@pytest.mark.parametrize("size", [(5000, 2), (2, 5000), (5000, 1)])
def test_extreme_aspect_ratios_load_for_training_and_evaluation(tmp_path, size):
    images, annotation_file, content = write_dataset(tmp_path, 1, size=size)
    content["annotations"][0]["bbox"] = [0, 0, 1, 1]
    rewrite(annotation_file, content)
    for split in ("train", "val"):
        dataset = CocoDetection(images, annotation_file, build_transforms(split, scales=[96], max_size=128,
                                                                          val_size=96, crop_resize_sizes=[96]))
        image, target = dataset[0]
        assert min(image.shape[-2:]) >= 1 and torch.isfinite(image).all()
