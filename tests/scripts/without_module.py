"""Runs a tool as if an optional package were not installed (tests only):

    python tests/scripts/without_module.py onnx tools/export.py ck.pth --output m.onnx

Importing the named modules (comma-separated, with their submodules) raises
ModuleNotFoundError, as it would without the package; the tool gets the remaining
arguments unchanged. torch and torchvision are imported first: their start-up
probes which packages exist (importlib.util.find_spec), which this finder would
otherwise break.
"""
import importlib.abc
import runpy
import sys

import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torch.onnx  # noqa: F401
import torchvision  # noqa: F401


class _Missing(importlib.abc.MetaPathFinder):
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == name or fullname.startswith(name + ".") for name in self.names):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


names = sys.argv[1].split(",")
for loaded in [m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in names)]:
    del sys.modules[loaded]
sys.meta_path.insert(0, _Missing(names))
tool = sys.argv[2]
sys.argv = [tool, *sys.argv[3:]]
sys.path.insert(0, str(__import__("pathlib").Path(tool).resolve().parent.parent))
runpy.run_path(tool, run_name="__main__")
