"""Files by name, from the Hugging Face hub cache (models by hub id ``org/name``, backbone
weights ``hf-hub:<repo>``) and the torch hub cache (``torchvision:<weights name>``).

The caches work as they do for transformers, timm and torchvision: a cached entry is read
without the network, ``HF_HUB_OFFLINE=1`` never downloads, and what is missing offline is
one line naming the repository (or URL) and how to pre-fetch it (docs/backbones.md, "Offline").
In a distributed run, rank 0 fetches first and the other ranks then read its cache
(:func:`detr_deform.utils.distributed.rank_zero_first`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from detr_deform.errors import optional_import

# io.checkpoint imports torch: CheckpointError is imported where a message is raised, so that the
# configuration (which checks names with is_hub_id / is_named_weights) loads without torch.

# org/name, as the hub spells repositories, with an optional @revision (a branch, tag or commit); no
# path of this machine may shadow it (see is_hub_id).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".pkl", ".json", ".onnx")
# model.pretrained_backbone values that name weights instead of a local file.
NAMED_WEIGHTS = ("torchvision", "timm")
NAMED_PREFIXES = ("torchvision:", "hf-hub:")
# What a detection model folder needs (the rest of a repository is not fetched).
MODEL_FILES = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def is_hub_id(value: str | os.PathLike) -> bool:
    """``org/name`` that is not a path on this machine (a local file or folder always wins) and
    does not end like a checkpoint file (``runs/best.pth`` mistyped stays a missing local file)."""
    text = str(value)
    return (bool(HUB_ID.match(text)) and not text.lower().endswith(FILE_SUFFIXES)
            and not Path(text).expanduser().exists())


def split_revision(hub_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """(repository, revision) of ``org/name@revision``; an explicit ``revision`` wins."""
    repo, _, tag = str(hub_id).partition("@")
    return repo, revision or tag or None


def is_named_weights(value: str | None) -> bool:
    """Whether a ``model.pretrained_backbone`` value names weights to fetch (not a local file)."""
    return bool(value) and (value in NAMED_WEIGHTS or value.startswith(NAMED_PREFIXES))


def needs_fetch(pretrained_backbone: str | None, init_from: str | None = None) -> bool:
    """Whether building the model (or its init_from) may download: then rank 0 goes first."""
    return is_named_weights(pretrained_backbone) or (bool(init_from) and is_hub_id(init_from))


def resolve_checkpoint(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local path as it is; a hub id (``org/name``, ``org/name@revision``) as its cached
    (or downloaded) snapshot folder."""
    from detr_deform.io.checkpoint import CheckpointError

    if is_hub_id(path):
        repo, revision = split_revision(str(path), revision)
        return hub_snapshot(repo, revision)
    if revision is not None:
        raise CheckpointError(f"revision={revision!r} applies to Hugging Face hub ids (org/name); {path} is a local "
                              f"path")
    return Path(path)


def prefetch_hint(repo_id: str, revision: str | None = None) -> str:
    """The command that fills the hub cache with ``repo_id`` where there is internet."""
    return f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")


def _hub():
    return optional_import("huggingface_hub", "hub", "loading by Hugging Face hub id")


def hub_snapshot(repo_id: str, revision: str | None = None, what: str = "model") -> Path:
    """The local folder of ``repo_id`` at ``revision`` (default: main) holding a detection
    model's files: from the cache when it has them, else downloaded (never when
    ``HF_HUB_OFFLINE=1``). One CheckpointError line for anything missing."""
    from detr_deform.io.checkpoint import CheckpointError

    hub = _hub()
    from huggingface_hub import errors

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES))
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{what} {where}: no such repository on the Hugging Face hub (or it is private: log in "
                              f"with `hf auth login`), and no such local path") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{what} {where}: the repository has no such revision (a branch, tag or commit)") \
            from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as error:
        state = ("HF_HUB_OFFLINE=1 forbids downloading" if hub.constants.HF_HUB_OFFLINE else
                 "the hub could not be reached")
        raise CheckpointError(f"{what} {where} is not in the Hugging Face cache ({hub.constants.HF_HUB_CACHE}) and "
                              f"{state}: where there is internet run `{prefetch_hint(repo_id, revision)}` (then copy "
                              f"the cache folder here, or point HF_HUB_CACHE at it), or pass a local folder "
                              f"({type(error).__name__})") from None
    except Exception as error:  # HTTP errors, a gated repository, a broken connection: the hub's own words
        raise CheckpointError(f"{what} {where}: could not be fetched from the Hugging Face hub "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{what} {where}: the repository has no config.json; it is not a transformers "
                              f"DeformableDetr model (files: {sorted(p.name for p in folder.iterdir())[:8]})")
    return folder


def hub_file(repo_id: str, filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin"),
             what: str = "model.pretrained_backbone") -> Path:
    """The first of ``filenames`` that ``repo_id`` has (cache first), as a local path."""
    from detr_deform.io.checkpoint import CheckpointError

    hub = _hub()
    from huggingface_hub import errors

    last: Exception | None = None
    for name in filenames:
        try:
            return Path(hub.hf_hub_download(repo_id, name))
        except (errors.EntryNotFoundError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as error:
            last = error  # not in the repository, or not cached offline: the next name may be
        except Exception as error:
            raise CheckpointError(f"{what}=hf-hub:{repo_id}: could not be fetched from the Hugging Face hub "
                                  f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    state = ("HF_HUB_OFFLINE=1 forbids downloading" if hub.constants.HF_HUB_OFFLINE else
             "the hub has none of them or could not be reached")
    raise CheckpointError(f"{what}=hf-hub:{repo_id}: none of {list(filenames)} is in the Hugging Face cache "
                          f"({hub.constants.HF_HUB_CACHE}) and {state}: where there is internet run "
                          f"`{prefetch_hint(repo_id)}` (then copy the cache here), or give a local file "
                          f"({type(last).__name__})") from None


def torchvision_weights(name: str, architecture: str):
    """The torchvision weights enum entry ``name`` (e.g. ResNet50_Weights.IMAGENET1K_V2, or
    IMAGENET1K_V2 alone) of ``architecture`` (e.g. resnet50); CheckpointError naming the valid ones."""
    import torchvision

    from detr_deform.io.checkpoint import CheckpointError

    enum = torchvision.models.get_model_weights(architecture)
    entry = name.split(".")[-1]
    if "." in name and name.split(".")[0] != enum.__name__:
        raise CheckpointError(f"model.pretrained_backbone=torchvision:{name}: these are not {architecture}'s weights "
                              f"({enum.__name__}: {', '.join(w.name for w in enum)})")
    try:
        return enum[entry]
    except KeyError:
        raise CheckpointError(f"model.pretrained_backbone=torchvision:{name}: {enum.__name__} has no {entry}; one of "
                              f"{', '.join(w.name for w in enum)} (or DEFAULT)") from None


def torchvision_state_dict(weights, what: str) -> dict:
    """``weights.get_state_dict()`` through the torch hub cache; a missing file offline is one line
    naming the URL and the file to put it in."""
    import torch

    from detr_deform.io.checkpoint import CheckpointError

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.is_file() and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CheckpointError(f"{what}: {weights.url} is not in the torch hub cache ({cached}) and HF_HUB_OFFLINE=1 "
                              f"forbids downloading: fetch that URL where there is internet and put the file there "
                              f"(TORCH_HOME moves the cache)")
    try:
        return weights.get_state_dict(progress=False, check_hash=True)  # as torchvision's own constructors
    except OSError as error:  # no network (URLError is an OSError), a read-only cache, ...
        raise CheckpointError(f"{what}: could not get {weights.url} ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:160]}): fetch it where there is internet and put it at "
                              f"{cached} (TORCH_HOME moves the cache)") from None
