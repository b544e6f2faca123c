"""The command line of ``tools/train.py``: Hydra composition of ``configs/``
with every problem as one line (before anything is created), and its usage text."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detr_deform.config import Config, ConfigError, register_configs, validate
from detr_deform.utils.fields import did_you_mean

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def config_from_hydra(cfg: DictConfig) -> Config:
    """The composed Hydra config as a validated ``Config``; keys the schema does not
    know (added with ``+``) are refused, not silently dropped."""
    _check_known_keys(cfg)
    return validate(OmegaConf.to_object(cfg))


def compose_config(overrides: Sequence[str], config_dir: Path = CONFIG_DIR) -> Config:
    """What ``tools/train.py <overrides>`` would run with, or ConfigError (one line)."""
    register_configs()
    refuse_unknown_flags(overrides)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as error:
            raise ConfigError(_one_line(error)) from error
    return config_from_hydra(cfg)


HELP_FLAGS = ("--help", "-h")


def usage_text(config_dir: Path = CONFIG_DIR) -> str:
    """``tools/train.py --help``: the template of ``hydra.help`` in configs/config.yaml filled in
    exactly as Hydra fills it, without Hydra's composition of every option of every group (which
    takes seconds: it copies the whole config repository once per group)."""
    root = OmegaConf.load(config_dir / "config.yaml")
    template = str(OmegaConf.select(root, "hydra.help.template"))
    for name in ("header", "footer"):
        template = template.replace(f"${{hydra.help.{name}}}", str(OmegaConf.select(root, f"hydra.help.{name}")))
    return template.replace("$APP_CONFIG_GROUPS", _config_groups(config_dir))


def _config_groups(config_dir: Path) -> str:
    """Hydra's $APP_CONFIG_GROUPS: one ``group: option, option`` line per folder of configs/ (sorted)."""
    lines = []
    for folder in sorted(p for p in config_dir.rglob("*") if p.is_dir()):
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options:
            lines.append(f"{folder.relative_to(config_dir).as_posix()}: {', '.join(options)}")
    return "\n".join(lines) + "\n"


def hydra_mode(argv: Sequence[str]) -> bool:
    """Whether ``tools/train.py argv`` is for Hydra's own machinery (``--help``, ``--cfg job``,
    ``--multirun``, ``hydra.*`` overrides) rather than a plain run; any other flag (e.g.
    ``--experiment demo``) is one ConfigError (``refuse_unknown_flags``)."""
    refuse_unknown_flags(argv)
    return any(arg.startswith("-") or arg.startswith("hydra.") for arg in argv)


def refuse_unknown_flags(argv: Sequence[str]) -> None:
    """A flag that is not one of Hydra's own (Hydra's argument parser says which exist: no copy of
    the list here) is one ConfigError naming the override meant, not the parser's exception."""
    from hydra._internal.utils import get_args_parser

    options = get_args_parser()._option_string_actions
    for index, arg in enumerate(argv):
        if arg.startswith("-") and arg.split("=")[0] not in options:
            key, _, value = arg.lstrip("-").partition("=")
            following = argv[index + 1] if index + 1 < len(argv) else ""
            if not value and following and not following.startswith("-") and "=" not in following:
                value = following  # "--experiment demo": the override meant is experiment=demo
            meant = f"{key}={value}" if key and value else "experiment=demo"
            raise ConfigError(f"{arg}: not an option of tools/train.py; settings are given as key=value overrides, "
                              f"e.g. {meant} (every key is in docs/configuration.md; python tools/train.py --help)")


def _one_line(error: Exception) -> str:
    cause = error.__cause__
    text = str(error).splitlines()[0].strip() if str(error).strip() else type(error).__name__
    if isinstance(error, MissingConfigException):
        first = str(error).splitlines()[0]
        options = getattr(error, "options", None) or []
        return f"{first}; available: {', '.join(options)}" if options else first
    if isinstance(error, OverrideParseException):
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and "hydra.cc" not in line]
        # the parser's own class names ("LexerNoViableAltException: ...") mean nothing to a user
        lines = [re.sub(r"^\w+(Exception|Error): ", "", line) for line in lines]
        return "; ".join(lines) + " (overrides are key=value, e.g. optim.lr=1e-4)"
    if cause is not None:
        detail = str(cause).splitlines()[0].strip()
        key = str(getattr(cause, "full_key", "") or "")
        if "not in" in detail and key:
            parent, _, name = key.rpartition(".")
            return (f"{key}: unknown key ({detail}){did_you_mean(name, _known_keys(parent))}; every key is in "
                    f"docs/configuration.md")
        override = text.removeprefix("Error merging override ").strip()
        return f"{override}: {detail}"
    return text


def _known_keys(section: str) -> list[str]:
    """The keys the schema declares for ``section`` ("" for the top level, "model", ...)."""
    schema = {"": Config, **{f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}}
    node = schema.get(section)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _check_known_keys(cfg: DictConfig) -> None:
    top = _known_keys("")
    for section in cfg.keys():
        if section not in top and section != "hydra":
            raise ConfigError(f"{section}: unknown top-level key{did_you_mean(str(section), top)}; every key is in "
                              f"docs/configuration.md")
    for section in ("model", "data", "optim", "runtime"):
        known = _known_keys(section)
        for key in cfg.get(section, {}).keys():
            if key not in known:
                raise ConfigError(f"{section}.{key}: unknown key (added with +?){did_you_mean(str(key), known)}; "
                                  f"every key is in docs/configuration.md")
