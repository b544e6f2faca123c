"""The package's shape stays as docs/architecture.md describes it: its folders are layers and
no module imports from a layer above its own (imports inside functions count too), no import
cycle between detr_deform modules, and no function longer than 80 lines (tools included)."""
import ast
from pathlib import Path

from pipeline_helpers import ROOT

PACKAGE = ROOT / "detr_deform"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The detr_deform modules ``path`` imports, anywhere in the file: ``from a.b import c``
    counts as a.b.c when that is a module, else as a.b."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES and name != module_name(path)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    graph = {name: imported_modules(path) for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The layers, bottom first (docs/architecture.md draws the same). A unit is a subpackage of
# detr_deform or a module at its root. A module may import its own unit and the units of lower
# layers only: units that share a layer do not import each other.
LAYERS = (
    ("errors",),                   # the error family and the exit-code table; imports nothing
    ("utils",),                    # boxes, padding, devices, config fields, atomic files, collectives
    ("io",),                       # file formats: checkpoint files, Hugging Face folders
    ("data",),                     # datasets, transforms, the demo data, drawing
    ("evaluation",),               # COCO evaluators, the score threshold
    ("ops",),                      # the MSDeformAttn operator
    ("layers",),                   # reusable modules on top of the operator
    ("models",),                   # the model family, matcher, criterion, post-processing
    ("config",),                   # the run's configuration schema
    ("loading", "export"),         # models from/to files (ours, official, Hugging Face); ONNX
    ("engine", "inference"),       # training and evaluation runs; Detector, inputs, videos
    ("cli",),                      # argv -> validated Config; the torchrun wrapper
    ("launch", "__init__"),        # `python -m detr_deform.launch`; the public API
)
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The layer unit of a detr_deform module: detr_deform.engine.trainer -> engine."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a unit that is not below the importer's own (same unit excepted)."""
    found = []
    for module, imported in sorted(graph.items()):
        mine = unit_of(module)
        for other in sorted(imported):
            theirs = unit_of(other)
            if theirs != mine and LAYER_OF[theirs] >= LAYER_OF[mine]:
                found.append(f"{module} imports {other} ({theirs} is not below {mine})")
    return found


def test_every_package_has_a_layer():
    units = {unit_of(name) for name in MODULES}
    assert units <= set(LAYER_OF), (f"give {sorted(units - set(LAYER_OF))} a layer in LAYERS "
                                    f"and in docs/architecture.md")


def test_no_module_imports_a_layer_above_its_own():
    graph = {name: imported_modules(path) for name, path in MODULES.items()}
    assert not layer_violations(graph), "; ".join(layer_violations(graph))


def test_the_layer_rule_sees_upward_and_sideways_imports():
    graph = {"detr_deform.models.criterion": {"detr_deform.engine.trainer", "detr_deform.utils.box_ops"},
             "detr_deform.engine.trainer": {"detr_deform.inference.detector", "detr_deform.models.build"},
             "detr_deform.data.coco": {"detr_deform.data.transforms"}}
    assert layer_violations(graph) == [
        "detr_deform.engine.trainer imports detr_deform.inference.detector (inference is not below engine)",
        "detr_deform.models.criterion imports detr_deform.engine.trainer (engine is not below models)"]


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions: " + "; ".join(long)
