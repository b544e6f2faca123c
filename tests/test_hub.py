"""Weights and models by name through the Hugging Face hub cache and the torch hub cache, offline:
models by hub id (load_model, Detector.from_pretrained, init_from, eval/infer), backbone weights
`hf-hub:<repo>` (timm and ResNet), `torchvision:<weights>`, transformers' DeformableDetr with a timm
ConvNeXt backbone in and out, and rank 0 fetching first. Nothing reaches the network: every cache is
written here, in the hub's real layout (blobs, snapshots, refs), and read by the real
huggingface_hub / timm / torchvision code."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

from detr_deform import Detector, load_model
from detr_deform.io.checkpoint import CheckpointError
from detr_deform.io.hub import is_hub_id, split_revision
from detr_deform.loading.hf import save_hf
from detr_deform.loading.model import init_from
from detr_deform.models.backbone import ResNetBackbone
from detr_deform.models.build import build_model
from detr_deform.models.timm_backbone import TimmBackbone
from detr_deform.utils.nested_tensor import nested_tensor_from_tensor_list

from data_helpers import write_image
from model_helpers import tiny_config
from pipeline_helpers import PYTHON, run

REPO = "test-org/ddetr-convnext-atto"


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """``folder``'s files as ``repo_id`` in a hub cache: blobs named by content hash, a snapshot
    of symlinks at one commit, and each of ``refs`` pointing at it (the layout hf_hub_download
    writes). Returns the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in folder.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def offline_cache(monkeypatch, tmp_path):
    """As HF_HUB_OFFLINE=1 HF_HUB_CACHE=<empty folder>: huggingface_hub reads these at call time."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    return cache


def hf_convnext_model() -> DeformableDetrForObjectDetection:
    """transformers' DeformableDetr on a timm ConvNeXt (5.x: backbone_config), small, random."""
    torch.manual_seed(0)
    config = DeformableDetrConfig(
        backbone_config={"model_type": "timm_backbone", "backbone": "convnext_atto", "out_indices": [1, 2, 3]},
        use_pretrained_backbone=False, d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, num_queries=10,
        id2label={0: "cat", 1: "dog", 2: "bird"}, disable_custom_kernels=True)
    model = DeformableDetrForObjectDetection(config).eval()
    model.config._attn_implementation = "eager"
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "ddetr"
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # transformers' config may look a backbone name up otherwise
    try:
        model = hf_convnext_model()
        model.save_pretrained(folder)
    finally:
        os.environ.pop("HF_HUB_OFFLINE") if old is None else os.environ.__setitem__("HF_HUB_OFFLINE", old)
    return folder, model


def _outputs_equal(hf_model, ours, size=(100, 121)) -> None:
    """Our outputs equal transformers' (sides not multiples of 32: a ConvNeXt runs on the batch as is)."""
    image = torch.randn(3, *size)
    with torch.no_grad():
        theirs = hf_model(pixel_values=image[None], pixel_mask=torch.ones(1, *size, dtype=torch.long))
        mine = ours(nested_tensor_from_tensor_list([image]))
    assert torch.allclose(theirs.logits, mine["pred_logits"], atol=1e-5, rtol=0)
    assert torch.allclose(theirs.pred_boxes, mine["pred_boxes"], atol=1e-5, rtol=0)


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    assert is_hub_id("SenseTime/deformable-detr") and is_hub_id("org/name@v1.0")
    assert not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("ckpt.pth")
    assert not is_hub_id("runs/best.pth") and not is_hub_id("out/x.safetensors")  # a mistyped file stays a file
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x").write_text("")
    assert not is_hub_id("runs/x")  # a local path always wins
    assert split_revision("org/name@v2") == ("org/name", "v2") and split_revision("org/name", "main") == (
        "org/name", "main")


def test_a_transformers_model_with_a_timm_convnext_loads_by_hub_id_offline(hf_folder, offline_cache):
    folder, hf_model = hf_folder
    fill_hub_cache(offline_cache, REPO, folder, refs=("main", "v1"))
    model, cfg = load_model(REPO)
    assert (cfg.backbone, cfg.timm_name, cfg.backbone_out_indices) == ("timm", "convnext_atto", [1, 2, 3])
    _outputs_equal(hf_model, model)
    detector = Detector.from_pretrained(REPO, device="cpu", revision="v1")
    assert detector.category_names == {0: "cat", 1: "dog", 2: "bird"}
    _outputs_equal(hf_model, detector.model, size=(96, 128))
    # fine-tuning from a hub id: a model with another class count takes everything else
    target = build_model(tiny_config(backbone="timm", timm_name="convnext_atto", backbone_out_indices=[1, 2, 3],
                                     hidden_dim=64, enc_layers=1, dec_layers=2, num_queries=10, num_classes=7))
    with pytest.warns(UserWarning, match="of another shape"):
        report = init_from(target, f"{REPO}@v1")
    assert report["loaded"] and all("class_embed" in k for k in report["shape_mismatch"])


def test_a_missing_hub_id_is_one_line(offline_cache):
    with pytest.raises(CheckpointError, match=r"model test-org/absent is not in the Hugging Face cache \(.*hub\) and "
                                              r"HF_HUB_OFFLINE=1 forbids downloading: where there is internet run "
                                              r"`hf download test-org/absent`"):
        Detector.from_pretrained("test-org/absent", device="cpu")
    with pytest.raises(CheckpointError, match=r"test-org/absent \(revision v9\) is not in the Hugging Face cache"):
        load_model("test-org/absent", revision="v9")
    with pytest.raises(CheckpointError, match=r"revision='v1' applies to Hugging Face hub ids"):
        load_model(Path(offline_cache) / "nothing.pth", revision="v1")


def test_save_hf_writes_a_timm_backbone_transformers_loads(hf_folder, tmp_path):
    folder, hf_model = hf_folder
    ours, cfg = load_model(folder)
    save_hf(ours, cfg, tmp_path / "back", class_names=["cat", "dog", "bird"])
    again = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "back").eval()
    again.config._attn_implementation = "eager"
    _outputs_equal(again, ours)
    # our timm backbone with its default stages (strides 8/16/32 = convnext's 1, 2, 3) writes them out
    default = build_model(tiny_config(backbone="timm", timm_name="convnext_atto", num_classes=3))
    save_hf(default, tiny_config(backbone="timm", timm_name="convnext_atto", num_classes=3), tmp_path / "default")
    assert load_model(tmp_path / "default")[1].backbone_out_indices == [1, 2, 3]


def test_timm_backbone_weights_from_an_hf_hub_repo_offline(offline_cache, tmp_path):
    """hf-hub:<repo>: timm's own loading (pretrained_cfg_overlay hf_hub_id) reads the cached file."""
    full = timm.create_model("convnext_atto", pretrained=False)
    weights = tmp_path / "repo"
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, weights / "model.safetensors")
    fill_hub_cache(offline_cache, "test-org/convnext-atto-weights", weights)
    backbone = TimmBackbone("convnext_atto", pretrained="hf-hub:test-org/convnext-atto-weights")
    assert torch.equal(backbone.body.stages_2.blocks[0].conv_dw.weight, full.stages[2].blocks[0].conv_dw.weight)
    with pytest.raises(CheckpointError, match=r"model.pretrained_backbone=hf-hub:test-org/none: timm could not get "
                                              r"the weights of convnext_atto .*`hf download test-org/none`"):
        TimmBackbone("convnext_atto", pretrained="hf-hub:test-org/none")


def test_resnet_weights_from_an_hf_hub_repo_and_the_torch_hub_cache(offline_cache, tmp_path, monkeypatch):
    reference = torchvision.models.resnet18()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    repo = tmp_path / "repo"
    repo.mkdir()
    save_file(state, repo / "model.safetensors")  # a timm ResNet's file: torchvision's names
    fill_hub_cache(offline_cache, "test-org/resnet18-weights", repo)
    backbone = ResNetBackbone("resnet18", pretrained="hf-hub:test-org/resnet18-weights")
    assert torch.equal(backbone.body.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    with pytest.raises(CheckpointError, match=r"hf-hub:test-org/none: none of \['model.safetensors', "
                                              r"'pytorch_model.bin'\] is in the Hugging Face cache"):
        ResNetBackbone("resnet18", pretrained="hf-hub:test-org/none")
    # torchvision:<weights>: torchvision's own loader, from the torch hub cache (TORCH_HOME)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(CheckpointError, match=r"model.pretrained_backbone=torchvision: https://.*resnet18-.*\.pth is "
                                              r"not in the torch hub cache .* HF_HUB_OFFLINE=1 forbids downloading"):
        ResNetBackbone("resnet18", pretrained="torchvision")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    for name in ("torchvision", "torchvision:IMAGENET1K_V1", "torchvision:ResNet18_Weights.IMAGENET1K_V1"):
        loaded = ResNetBackbone("resnet18", pretrained=name)
        assert torch.equal(loaded.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(CheckpointError, match=r"ResNet18_Weights has no IMAGENET1K_V9; one of IMAGENET1K_V1"):
        ResNetBackbone("resnet18", pretrained="torchvision:IMAGENET1K_V9")
    with pytest.raises(CheckpointError, match=r"these are not resnet18's weights \(ResNet18_Weights"):
        ResNetBackbone("resnet18", pretrained="torchvision:ResNet50_Weights.IMAGENET1K_V2")


def test_named_weights_are_checked_with_the_configuration():
    with pytest.raises(ValueError, match=r"pretrained_backbone=timm is for model.backbone=timm"):
        tiny_config(pretrained_backbone="timm")
    with pytest.raises(ValueError, match=r"DAT backbones take a local file"):
        tiny_config(backbone="dat_tiny", pretrained_backbone="hf-hub:org/x")
    with pytest.raises(ValueError, match=r"torchvision:IMAGENET1K_V2 is for ResNets"):
        tiny_config(backbone="timm", timm_name="convnext_atto", backbone_norm="frozen_bn",
                    pretrained_backbone="torchvision:IMAGENET1K_V2")


def test_eval_and_infer_take_a_hub_id_offline_from_the_environment(hf_folder, tmp_path):
    """The real environment variables, in new interpreters: HF_HUB_OFFLINE=1 and HF_HUB_CACHE."""
    folder, _ = hf_folder
    cache = tmp_path / "hub"
    fill_hub_cache(cache, REPO, folder)
    write_image(tmp_path / "photo.jpg", (96, 64))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = run([PYTHON, "tools/infer.py", REPO, str(tmp_path / "photo.jpg"), "--output-dir", str(tmp_path / "out")],
               env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "detections.json").is_file()
    missing = run([PYTHON, "tools/infer.py", "test-org/absent", str(tmp_path / "photo.jpg"), "--output-dir",
                   str(tmp_path / "out2")], env=env)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "test-org/absent is not in the Hugging Face cache" in missing.stderr


def test_rank_zero_fetches_first(tmp_path):
    """Two gloo ranks: rank 1's call starts only after rank 0's has ended (rank 0 fills the cache)."""
    done = run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(Path(__file__).parent / "scripts" / "rank_zero_first.py"), str(tmp_path / "order.txt")])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "order.txt").read_text().split() == ["0-start", "0-end", "1-start", "1-end"]


def test_without_huggingface_hub_a_hub_id_names_the_extra(monkeypatch):
    import sys

    from detr_deform.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r'loading by Hugging Face hub id needs huggingface_hub, which is not '
                                                r'installed: pip install "detr_deform\[hub\]"'):
        load_model("test-org/anything")
