"""The house stays clean: imports inside `ptmoe` point down the floors, never up, never in a cycle, and no module
uses another package's private names. The floors are the layout map of docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ptmoe"

# Floor of every top-level unit of ptmoe (a package or a module). A unit may import units on its own floor or below.
FLOORS = {
    "models": 0,
    "metrics": 0,
    "outputs": 0,
    "errors": 0,
    "corpora": 0,
    "energy": 0,
    "hardware": 0,
    "calibration": 1,
    "auto": 2,
    "parallel": 2,
    "lora": 2,
    "telemetry": 2,
    "upcycling": 2,
    "convert": 2,
    "quantization": 3,
    "compress": 3,
    "merging": 3,
    "training": 3,
    "domains": 4,
    "sparsify": 4,
    "evaluation": 5,
    "zoo": 6,
    "cards": 6,
    "demo": 7,
    "cli": 8,
    "__init__": 9,
}


def _unit(module: str) -> str:
    """`ptmoe.sparsify.routers` → `sparsify`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    """Yield (importing module, imported module, imported names) for every `ptmoe` import in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(relative.parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        if path.name == "__init__.py":
            module = package
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] == "ptmoe":
                    yield module, target, [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "ptmoe":
                        yield module, alias.name, []


def test_every_unit_has_a_floor():
    units = {_unit(module) for module, _, _ in _imports()} | {
        path.stem if path.is_file() else path.name
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" or (path / "__init__.py").exists())
    }
    assert units <= set(FLOORS), f"give these a floor in FLOORS: {sorted(units - set(FLOORS))}"


def test_no_import_runs_upwards():
    upward = []
    for module, target, names in _imports():
        source, destination = _unit(module), _unit(target)
        if target == "ptmoe":
            # `from . import training`: the imported names are the units. A bare `import ptmoe` / `from . import
            # __version__` inside a function (registering the Auto classes at run time) is the one allowed
            # look at the root facade; it is never a module-level import, so it makes no import-time cycle.
            destinations = [name for name in names if name in FLOORS]
        else:
            destinations = [destination]
        for unit in destinations:
            if unit != source and FLOORS[unit] > FLOORS[source]:
                upward.append(f"{module} imports {target} ({unit}, floor {FLOORS[unit]} > {FLOORS[source]})")
    assert not upward, "\n".join(upward)


def test_models_import_only_siblings():
    # `models/` travels to the Hub: relative sibling imports only (no `ptmoe…`, no parent package).
    offenders = [
        (module, target)
        for module, target, _ in _imports()
        if module.startswith("ptmoe.models") and not target.startswith("ptmoe.models")
    ]
    assert not offenders


def test_no_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for module, target, _names in _imports():
        source = _unit(module)
        if target == "ptmoe":
            continue  # the top-level package: the top floor, checked above
        destination = _unit(target)
        if destination != source:
            graph.setdefault(source, set()).add(destination)
    state: dict[str, int] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for nxt in sorted(graph.get(unit, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(path + [unit, nxt]))
            if not state.get(nxt):
                visit(nxt, path + [unit])
        state[unit] = 2

    for unit in sorted(graph):
        if not state.get(unit):
            visit(unit, [])


def test_no_private_names_across_units():
    private = [
        f"{module} imports {name} from {target}"
        for module, target, names in _imports()
        for name in names
        if name.startswith("_") and not name.startswith("__") and _unit(module) != _unit(target)
    ]
    assert not private, "\n".join(private)
