"""Pascal VOC and YOLO folders read as they are (data.format=voc|yolo, detected by default):
the same targets as their COCO conversion, the corner conventions (VOC 1-based inclusive,
YOLO normalised centres), difficult objects ignored, every check check_dataset does,
many objects per image, tools/convert_dataset.py, and training + evaluation through the tools.
Every folder is written by the test from the tiny demo data."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from detr_deform import build_criterion, build_model
from detr_deform.data.coco import CocoDetection
from detr_deform.data.errors import DatasetError
from detr_deform.data.formats import detect_format, open_split
from detr_deform.data.report import check_dataset
from detr_deform.engine.steps import train_step
from detr_deform.evaluation.coco_eval import evaluate_coco

from data_helpers import write_image, write_voc, write_yolo
from model_helpers import tiny_config
from pipeline_helpers import PYTHON, TINY_RUN, run, train
from test_tools import tool_module

SPLITS = {"train": "train2017", "val": "val2017"}
NAMES = ["square", "circle", "triangle"]  # the demo's categories 1, 2, 3


def _demo_content(demo_root: Path, split: str) -> dict:
    return json.loads((demo_root / "annotations" / f"instances_{SPLITS[split]}.json").read_text())


@pytest.fixture(scope="module")
def folders(tiny_demo_root, tmp_path_factory):
    """The tiny demo data written as a VOC folder and as a YOLO folder (train and val)."""
    root = tmp_path_factory.mktemp("layouts")
    for split in SPLITS:
        content = _demo_content(tiny_demo_root, split)
        write_voc(root / "voc", tiny_demo_root / SPLITS[split], content, split)
        write_yolo(root / "yolo", tiny_demo_root / SPLITS[split], content, split)
    return root


def _targets(dataset: CocoDetection) -> list[tuple[list, list, tuple]]:
    out = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        out.append((target["boxes"].tolist(), target["labels"].tolist(), image.size))
    return out


@pytest.mark.parametrize("layout", ["voc", "yolo"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_the_same_targets_as_the_coco_data(layout, split, folders, tiny_demo_root):
    coco = CocoDetection(tiny_demo_root / SPLITS[split], tiny_demo_root / "annotations" /
                         f"instances_{SPLITS[split]}.json")
    data = open_split(folders / layout, split, class_names=NAMES if layout == "voc" else None)
    assert data.format == layout and not data.problems
    converted = CocoDetection.from_split(data)
    shift = 1 if layout == "yolo" else 0  # YOLO class k is category id k: the demo's ids 1..3 are classes 0..2
    assert converted.category_names == {i - shift: name for i, name in coco.category_names.items()}
    ours, reference = _targets(converted), _targets(coco)
    assert len(ours) == len(reference) == len(coco.ids)
    for (boxes, labels, size), (ref_boxes, ref_labels, ref_size) in zip(ours, reference):
        assert size == ref_size and labels == [label - shift for label in ref_labels]
        assert torch.allclose(torch.tensor(boxes).reshape(-1, 4), torch.tensor(ref_boxes).reshape(-1, 4),
                              atol=1e-4, rtol=0)


def _voc_one_image(root: Path, objects: str, size=(64, 48), extension=".jpg", filename: str | None = None) -> Path:
    write_image(root / "JPEGImages" / f"a{extension}", size)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    named = f"<filename>{filename}</filename>" if filename else ""
    (root / "Annotations" / "a.xml").write_text(
        f"<annotation>{named}<size><width>{size[0]}</width><height>{size[1]}</height></size>{objects}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    return root


def _voc_object(name: str, xmin, ymin, xmax, ymax, difficult: int = 0) -> str:
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def test_voc_corners_are_1_based_and_inclusive(tmp_path):
    # An object over every pixel of a 64 x 48 image: xmin=1 .. xmax=64 in VOC, [0, 0, 64, 48] in COCO.
    root = _voc_one_image(tmp_path / "voc", _voc_object("cat", 1, 1, 64, 48) + _voc_object("cat", 10, 20, 10, 20))
    content, problems = open_split(root, "train").content, open_split(root, "train").problems
    assert not problems
    assert [a["bbox"] for a in content["annotations"]] == [[0, 0, 64, 48], [9, 19, 1, 1]]  # a 1-pixel object
    _, target = CocoDetection.from_split(open_split(root, "train"))[0]
    assert target["boxes"].tolist() == [[0, 0, 64, 48], [9, 19, 10, 20]]


def test_voc_difficult_objects_are_not_targets_and_ignored_in_evaluation(tmp_path):
    root = _voc_one_image(tmp_path / "voc", _voc_object("cat", 5, 5, 20, 20) + _voc_object("cat", 31, 11, 60, 40, 1))
    dataset = CocoDetection.from_split(open_split(root, "train"))
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[4, 4, 20, 20]]  # the difficult one is left out of training
    # The best-scored detection lies on the difficult object: counted as a false positive it would halve
    # the AP; ignored (VOC's rule), the AP is perfect.
    detections = [{"image_id": 1, "category_id": 1, "bbox": [30, 10, 30, 30], "score": 0.9},
                  {"image_id": 1, "category_id": 1, "bbox": [4, 4, 16, 16], "score": 0.8}]
    metrics, _ = evaluate_coco(dataset.coco, detections, [1])
    assert metrics["AP50"] == pytest.approx(1.0)


def test_voc_images_by_id_with_any_extension_and_the_class_list(tmp_path):
    root = _voc_one_image(tmp_path / "voc", _voc_object("dog", 2, 2, 30, 30) + _voc_object("cat", 5, 5, 9, 9),
                          extension=".png")
    data = open_split(root, "train")
    assert data.content["images"][0]["file_name"] == "JPEGImages/a.png"
    assert data.content["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]  # sorted names
    chosen = open_split(root, "train", class_names=["dog", "cat", "bird"])
    assert [a["category_id"] for a in chosen.content["annotations"]] == [1, 2]
    unknown = open_split(root, "train", class_names=["dog"])
    assert [p.kind for p in unknown.problems] == ["unknown_category"] and "'cat'" in str(unknown.problems[0])
    with pytest.raises(DatasetError, match=r"a.xml object 1: class 'cat' is not in the class list"):
        CocoDetection.from_split(unknown)
    skipped = CocoDetection.from_split(unknown, on_bad_sample="skip")  # the image is left out
    assert len(skipped) == 0


def test_voc_without_a_size_reads_it_from_the_image(tmp_path):
    root = _voc_one_image(tmp_path / "voc", _voc_object("cat", 5, 5, 20, 20), size=(70, 40))
    xml = root / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<size><width>70</width><height>40</height></size>", ""))
    entry = open_split(root, "train").content["images"][0]
    assert (entry["width"], entry["height"]) == (70, 40)


def test_voc_missing_pieces_are_one_line(tmp_path):
    root = _voc_one_image(tmp_path / "voc", _voc_object("cat", 5, 5, 20, 20))
    with pytest.raises(DatasetError, match=r"split list not found: .*val.txt; the split lists there: \['train'\]"):
        open_split(root, "val")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "Annotations" / "b.xml").write_text("<annotation><object>")  # cut short
    data = open_split(root, "train")
    assert [p.kind for p in data.problems] == ["malformed_annotation"] and "b.xml" in str(data.problems[0])
    (root / "Annotations" / "b.xml").write_text("<annotation></annotation>")  # no image b.*
    assert "no image for id 'b'" in str(open_split(root, "train").problems[0])


def _yolo_one_image(root: Path, lines: str, size=(100, 50), yaml_text: str | None = None) -> Path:
    write_image(root / "images" / "train" / "a.jpg", size)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "train" / "a.txt").write_text(lines)
    (root / "data.yaml").write_text(yaml_text or "train: images/train\nval: images/train\nnames: [cat, dog]\n")
    return root


def test_yolo_normalised_centres_polygons_and_the_yaml_forms(tmp_path):
    root = _yolo_one_image(tmp_path / "yolo", "1 0.5 0.5 1.0 1.0\n0 0.25 0.5 0.1 0.2\n\n1 0.1 0.2 0.3 0.2 0.3 0.6\n")
    data = open_split(root, "train")
    assert not data.problems and data.format == "yolo"
    boxes = [[round(v, 6) for v in a["bbox"]] for a in data.content["annotations"]]
    # 100 x 50 image: the whole image; centre (25, 25) size 10 x 10; the box around the polygon's points
    assert boxes == [[0, 0, 100, 50], [20, 20, 10, 10], [10, 10, 20, 20]]
    assert [a["category_id"] for a in data.content["annotations"]] == [1, 0, 1]
    for yaml_text in ("path: .\ntrain: images/train\nnames: {0: cat, 1: dog}\nnc: 2\n",
                      "train: [images/train]\nnames: [cat, dog]\n"):
        (root / "data.yaml").write_text(yaml_text)
        assert open_split(root, "train").content["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    (root / "train.txt").write_text("./images/train/a.jpg\n")  # a list of image paths, relative to the list
    (root / "data.yaml").write_text("train: train.txt\nnames: [cat, dog]\n")
    assert open_split(root / "data.yaml", "train").content["images"][0]["file_name"] == "images/train/a.jpg"


def test_yolo_relative_roots_symlinked_images_and_roboflow_paths(tmp_path, monkeypatch):
    root = _yolo_one_image(tmp_path / "yolo", "0 0.5 0.5 0.2 0.2\n")
    monkeypatch.chdir(root)
    for relative in (".", "data.yaml"):  # the label rule works on relative paths too
        assert len(open_split(relative, "train").content["annotations"]) == 1
    shared = tmp_path / "shared"  # images/ on shared storage, linked into the dataset folder
    shutil.move(root / "images", shared)
    (root / "images").symlink_to(shared)
    data = open_split(root, "train")
    assert data.content["images"][0]["file_name"] == "images/train/a.jpg" and not data.problems
    # Roboflow's export: data.yaml beside train/images, naming it ../train/images (Ultralytics strips the ../)
    export = tmp_path / "export"
    write_image(export / "train" / "images" / "a.jpg", (100, 50))
    (export / "train" / "labels").mkdir()
    (export / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (export / "data.yaml").write_text("train: ../train/images\nval: ../train/images\nnames: [cat]\n")
    assert len(open_split(export, "val").content["annotations"]) == 1


def test_yolo_sizes_follow_the_exif_orientation(tmp_path):
    root = _yolo_one_image(tmp_path / "yolo", "0 0.5 0.25 1.0 0.5\n")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 100 x 50, shown rotated: 50 x 100
    Image.open(root / "images" / "train" / "a.jpg").save(root / "images" / "train" / "a.jpg", exif=exif)
    data = open_split(root, "train")
    assert (data.content["images"][0]["width"], data.content["images"][0]["height"]) == (50, 100)
    assert data.content["annotations"][0]["bbox"] == [0, 0, 50, 50]
    image, target = CocoDetection.from_split(data)[0]
    assert image.size == (50, 100) and target["boxes"].tolist() == [[0, 0, 50, 50]]


@pytest.mark.parametrize("line, message", [
    ("2 0.5 0.5 0.2 0.2", r"class 2 is not in 0..1"),
    ("0 320 240 50 50", r"not normalised to 0..1 .*pixel coordinates"),
    ("0 0.5 0.5 0.2", r"expected 'class cx cy w h'"),
    ("cat 0.5 0.5 0.2 0.2", r"not numbers"),
])
def test_yolo_bad_label_lines_name_the_file_and_line(tmp_path, line, message):
    root = _yolo_one_image(tmp_path / "yolo", f"0 0.5 0.5 0.2 0.2\n{line}\n")
    data = open_split(root, "train")
    assert len(data.problems) == 1 and str(data.problems[0]).startswith("a.txt line 2: ")
    with pytest.raises(DatasetError, match=message):
        CocoDetection.from_split(data)


def test_yolo_label_files_missing(tmp_path):
    root = _yolo_one_image(tmp_path / "yolo", "0 0.5 0.5 0.2 0.2\n")
    write_image(root / "images" / "train" / "b.jpg")  # no label file: a negative
    data = open_split(root, "train")
    assert not data.problems and len(data.content["images"]) == 2 and len(data.content["annotations"]) == 1
    shutil.rmtree(root / "labels")
    problems = open_split(root, "train").problems
    assert [p.kind for p in problems] == ["missing_file"] and "labels/ beside images/" in str(problems[0])
    (root / "data.yaml").write_text("train: images/train\nnames: [cat]\nnc: 2\n")
    with pytest.raises(DatasetError, match=r"nc=2 but 'names' has 1 entries"):
        open_split(root, "train")


def test_layouts_are_detected_and_named(folders, tmp_path):
    assert detect_format(folders / "voc") == "voc" and detect_format(folders / "yolo") == "yolo"
    assert detect_format(folders / "yolo" / "data.yaml") == "yolo"
    (tmp_path / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"not a dataset folder of a known layout. It holds \['VOC2012'\]"):
        detect_format(tmp_path / "VOCdevkit")
    # a COCO root with some unrelated YAML in it stays a COCO root
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "notes.yaml").write_text("lr: 0.1\n")
    assert detect_format(tmp_path / "coco") == "coco"
    shutil.copytree(folders / "voc", tmp_path / "both")
    (tmp_path / "both" / "data.yaml").write_text("train: JPEGImages\nnames: [a]\n")
    with pytest.raises(DatasetError, match=r"several dataset layouts \(voc, yolo\); choose one with data.format="):
        detect_format(tmp_path / "both")


def test_check_dataset_reads_any_layout_and_reports_crowded_images(folders, tmp_path, capsys):
    tool = tool_module("check_dataset")
    assert tool.main([str(folders / "voc"), "--class-names", *NAMES]) == 0
    out = capsys.readouterr().out
    assert "Pascal VOC layout (detected)" in out and "ImageSets/Main/val.txt" in out and out.count("  OK") == 2
    lines = "".join(f"0 {0.05 + 0.9 * i / 400} 0.5 0.01 0.01\n" for i in range(400))
    root = _yolo_one_image(tmp_path / "yolo", lines, size=(800, 100))
    assert tool.main([str(root), "--splits", "train", "--num-queries", "300"]) == 0  # a warning, not an error
    out = capsys.readouterr().out
    assert "data.yaml [train]" in out and "more_objects_than_queries (1)" in out
    assert "400 objects, more than num_queries=300" in out
    report = check_dataset(root, root / "data.yaml", split=open_split(root, "train"), num_queries=300)
    assert report.ok and report.num_annotations == 400


@pytest.mark.parametrize("arch", ["deformable_detr", "dino"])
def test_more_objects_than_queries_train(arch):
    """Hundreds of objects with 12 queries: every target reaches the loss (matched or not), no
    truncation, no error (DINO: one denoising group of 2 x 300 queries)."""
    torch.manual_seed(0)
    extra = {"with_box_refine": True, "two_stage": True} if arch == "deformable_detr" else {"arch": "dino"}
    cfg = tiny_config(**extra)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    centres = torch.rand(300, 2) * 0.8 + 0.1
    targets = [{"labels": torch.randint(0, 5, (300,)), "boxes": torch.cat([centres, torch.full((300, 2), 0.02)], 1)}]
    _, total, norm = train_step(model, criterion, [torch.randn(3, 96, 128)], targets, optimizer, 0.1)
    assert torch.isfinite(torch.tensor(total)) and torch.isfinite(norm)


def test_convert_dataset_writes_the_conversion(folders, tmp_path, tiny_demo_root, capsys):
    tool = tool_module("convert_dataset")
    out = tmp_path / "val.json"
    assert tool.main([str(folders / "voc"), str(out), "--split", "val", "--class-names", *NAMES]) == 0
    written = json.loads(out.read_text())
    assert written == open_split(folders / "voc", "val", class_names=NAMES).content
    assert "file names are relative to" in capsys.readouterr().out
    # The written file is an ordinary COCO split: the same targets as the original data.
    from_file = CocoDetection(folders / "voc", out)
    reference = CocoDetection(tiny_demo_root / "val2017", tiny_demo_root / "annotations" / "instances_val2017.json")
    assert [t[0] for t in _targets(from_file)] == [t[0] for t in _targets(reference)]  # integer boxes: exact
    assert tool.main([str(folders / "voc"), str(out), "--split", "val"]) == 2  # exists: --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    broken = shutil.copytree(folders / "yolo", tmp_path / "yolo")
    first = sorted((broken / "labels" / "train").glob("*.txt"))[0]
    first.write_text("0 1 2 3\n")
    assert tool.main([str(broken), str(tmp_path / "t.json")]) == 2 and not (tmp_path / "t.json").exists()
    assert "--skip-bad" in capsys.readouterr().err
    assert tool.main([str(broken), str(tmp_path / "t.json"), "--skip-bad"]) == 0
    no_labels = shutil.copytree(folders / "yolo", tmp_path / "no_labels")
    shutil.rmtree(no_labels / "labels")  # a problem of the whole split: --skip-bad does not hide it
    assert tool.main([str(no_labels), str(tmp_path / "n.json"), "--skip-bad"]) == 2
    assert "has a label file" in capsys.readouterr().err and not (tmp_path / "n.json").exists()
    assert len(json.loads((tmp_path / "t.json").read_text())["images"]) == len(list(
        (broken / "images" / "train").iterdir())) - 1


@pytest.mark.parametrize("layout, backbone", [("voc", []), ("yolo", ["model.backbone=timm",
                                                                     "model.timm_name=convnext_atto",
                                                                     "model.backbone_norm=bn"])])
def test_train_and_evaluate_on_a_folder_as_it_is(layout, backbone, folders, tmp_path):
    """tools/train.py with data.root at the folder (layout detected), then tools/eval.py --data; the
    YOLO run also trains a timm backbone (convnext_atto) on the demo data."""
    out = tmp_path / "run"
    done = train("experiment=demo", "data.dataset=coco", f"data.root={folders / layout}", f"runtime.output_dir={out}",
                 "data.num_workers=0", "data.train_scales=[96]", "data.val_size=96", "data.max_size=128",
                 "data.crop_resize_sizes=[96]", "data.crop_min=64", "data.crop_max=96", "optim.batch_size=2",
                 "optim.epochs=1", "runtime.max_steps_per_epoch=2", "runtime.vis_images=0", *TINY_RUN, *backbone)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    name = {"voc": "Pascal VOC", "yolo": "YOLO"}[layout]
    assert f"data: {name} (detected; data.format= to choose)" in done.stdout
    assert (out / "metrics.json").is_file()
    evaluated = run([PYTHON, "tools/eval.py", str(out / "checkpoint_last.pth"), "--data", str(folders / layout),
                     "--num-workers", "0", "--output", str(tmp_path / "eval.json")])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["num_images"] == 7 and set(metrics["metrics"]) >= {"AP", "AP50"}
