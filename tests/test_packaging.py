"""pyproject's explicit package list must name every package folder."""
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "detr_deform").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert config["package-dir"]["detr_deform._csrc"] == "ops/ms_deform_attn"
    assert (ROOT / "ops" / "ms_deform_attn" / "ms_deform_attn_ops.cpp").is_file()
