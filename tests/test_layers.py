"""The layering of the README's Layout section, checked against every import in the code (imports inside
functions included): a module imports only modules in its own layer or below."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"vilex": "vilex", "export": "vilex.export", "benchmarks": "vilex.benchmarks"}

# The README's table. A module takes the layer of the longest prefix listed; `*.cli` modules are commands.
LAYERS = {
    "vilex.errors": 0, "vilex.settings": 0,
    "vilex.model": 1, "vilex.bridge": 1, "vilex.stages": 1, "vilex.tokenizer": 1, "vilex.images": 1,
    "vilex.outputs": 1, "vilex.samples": 1, "vilex.toyworld.shipped": 1,
    "vilex.backends": 2, "vilex.engines": 2, "vilex.pipeline": 2, "vilex": 2,
    "vilex.runtime": 3, "vilex.presets": 3, "vilex.engines.host": 3, "vilex.serving.remote": 3,
    "vilex.serving.client": 3, "vilex.serving.interface": 3,
    "vilex.evaluation": 4, "vilex.toyworld": 4, "vilex.training": 4, "vilex.export": 4, "vilex.benchmarks": 4,
    "vilex.serving": 4,
    "vilex.cli": 5, "vilex.demo": 5,
}
COMMAND = 5


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> int:
    if module.endswith(".cli"):
        return COMMAND
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The vilex modules `module` imports (a `from package import name` counts `package.name` when that is
    a module, else `package`)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def test_no_module_imports_a_module_above_it():
    known = modules()
    assert {"vilex.pipeline", "vilex.engines.contract", "vilex.export.onnx_export", "vilex.runtime"} <= set(known)
    upward = sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                    for m, path in known.items() for t in imports(m, path, known) if layer(t) > layer(m))
    assert not upward, "\n".join(upward)


def test_the_core_never_imports_the_build_tools():
    known = modules()
    core = [m for m in known if not m.startswith(("vilex.export", "vilex.benchmarks")) and layer(m) <= 3]
    offenders = sorted(f"{m} imports {t}" for m in core for t in imports(m, known[m], known)
                       if t.startswith("vilex.export"))
    assert not offenders, "\n".join(offenders)
