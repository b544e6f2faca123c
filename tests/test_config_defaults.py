"""Defaults live in one place, the dataclasses: the group yaml files (configs/<group>/<default>.yaml)
and the key tables of docs/configuration.md must say the same, key by key."""
import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from detr_deform.config import DataConfig, OptimConfig, RuntimeConfig
from detr_deform.models.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "runtime": RuntimeConfig}
# The file each group composes by default (configs/config.yaml's defaults list).
DEFAULT_FILES = {"model": "model/deformable_detr.yaml", "data": "data/coco.yaml", "optim": "optim/adamw.yaml",
                 "runtime": "runtime/default.yaml"}


def defaults(schema) -> dict:
    values = {}
    for field in dataclasses.fields(schema):
        if field.default is not dataclasses.MISSING:
            values[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
    return values


def as_yaml_text(value) -> str:
    """A default as the docs write it (yaml's spelling: true, null, [1, 2])."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_group_yaml_defaults_equal_the_dataclass(section):
    written = yaml.safe_load((ROOT / "configs" / DEFAULT_FILES[section]).read_text())
    schema = defaults(SECTIONS[section])
    unknown = sorted(set(written) - set(schema))
    assert unknown == [], f"{DEFAULT_FILES[section]}: keys the schema does not have: {unknown}"
    differing = {k: (v, schema[k]) for k, v in written.items() if v != schema[k]}
    assert differing == {}, f"{DEFAULT_FILES[section]} (yaml, dataclass): {differing}"


def doc_tables() -> dict[str, dict[str, str]]:
    """{section: {key: default column}} from the '## <section> (...)' tables of docs/configuration.md."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        heading = re.match(r"## (\w+) \(`\w+Config`", line)
        if heading:
            section = heading.group(1)
            tables[section] = {}
        elif line.startswith("## "):
            section = None
        elif section and (row := re.match(r"\| (`[\w.]+`(?:, `[\w.]+`)*) \| ([^|]*) \|", line)):
            keys = re.findall(r"`([\w.]+)`", row.group(1))
            cells = [row.group(2).strip()]
            if len(keys) > 1:  # one default per key, split on the commas outside [lists]
                cells = [c.strip() for c in re.split(r",(?![^\[]*\])", row.group(2))]
            if len(cells) == 1:  # one default for every key of the row
                cells = cells * len(keys)
            assert len(cells) == len(keys), f"docs/configuration.md: {line!r}: one default per key, or one for all"
            tables[section].update(zip(keys, cells))
    return tables


def same_default(written: str, value) -> bool:
    """The docs' default (its first word group, before an explanation in brackets) is the value."""
    text = written.split(" (")[0].strip()
    if text.endswith("π"):  # e.g. position_embedding_scale: 2π
        return math.isclose(float(text[:-1] or 1) * math.pi, value)
    try:
        parsed = float(text)  # yaml reads 2e-4 (no dot) as a string
    except ValueError:
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = text
    return parsed == value or text == as_yaml_text(value)


def test_docs_key_tables_list_every_key_with_the_dataclass_default():
    tables = doc_tables()
    assert sorted(tables) == sorted(SECTIONS)
    for section, schema in SECTIONS.items():
        values = defaults(schema)
        missing = sorted(set(values) - set(tables[section]))
        assert missing == [], f"docs/configuration.md, {section}: keys not documented: {missing}"
        unknown = sorted(set(tables[section]) - set(values))
        assert unknown == [], f"docs/configuration.md, {section}: keys the schema does not have: {unknown}"
        differing = {k: (tables[section][k], as_yaml_text(v)) for k, v in values.items()
                     if not same_default(tables[section][k], v)}
        assert differing == {}, f"docs/configuration.md, {section} (docs, dataclass): {differing}"
