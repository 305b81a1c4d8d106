"""The layering written down in docs/architecture.md, read from that page and checked against every import in
the code (imports inside functions included): a module imports only modules in its own layer or below."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"  # the layer table's one home (the README links to it)
# Source folders and the import names they ship as (pyproject.toml's package-dir).
PACKAGES = {"vilex": "vilex", "export": "vilex.export", "benchmarks": "vilex.benchmarks",
            "triton_repo": "vilex.triton_repo"}
COMMANDS_PATTERN = "*/cli.py"  # "every `*/cli.py`": a package's command module is a command


def module_name(relative: str) -> str:
    """A path as the layer table writes it (`vilex/serving/client.py`, `export/`) -> its import name."""
    top, _, rest = relative.strip("/").partition("/")
    parts = [PACKAGES[top], *[p for p in rest.removesuffix(".py").split("/") if p]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def documented_layers() -> dict[str, int]:
    """{module or package name: layer} from the rows `| N. name | `path`, `path` ... |` of the layer table."""
    text = ARCHITECTURE.read_text()
    table = text[text.index("| layer | modules |"):]
    table = table[:table.index("\n\n")]
    layers = {}
    for number, cells in re.findall(r"^\| (\d)\. [^|]+\| (.+) \|$", table, flags=re.M):
        for path in re.findall(r"`([^`]+)`", cells):
            if path == COMMANDS_PATTERN or "/" not in path:
                continue  # the commands rule, or a plain word in backticks
            layers[module_name(path)] = int(number)
    return layers


LAYERS = documented_layers()
COMMAND = 5


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            found[module_name(f"{folder}/{path.relative_to(ROOT / folder).as_posix()}")] = path
    return found


def layer(module: str) -> int | None:
    if module.endswith(".cli"):
        return COMMAND
    named = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(named, key=len)] if named else None


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


def test_the_layer_table_is_read():
    """The parse found every row, each with the paths it names (a reformatted table must not pass as empty)."""
    assert set(LAYERS.values()) == {0, 1, 2, 3, 4, 5}
    assert LAYERS["vilex.settings"] == 0 and LAYERS["vilex.pipeline"] == 2 and LAYERS["vilex.serving"] == 4
    assert layer("vilex.serving.client") == 3 and layer("vilex.serving.bls") == 4 and layer("vilex.export.cli") == 5


def test_every_module_is_in_the_table():
    unlisted = sorted(m for m in modules() if layer(m) is None)
    assert not unlisted, f"not in the layer table of docs/architecture.md: {unlisted}"


def test_no_module_imports_a_module_above_it():
    known = modules()
    assert {"vilex.pipeline", "vilex.engines.contract", "vilex.export.onnx_export", "vilex.runtime"} <= set(known)
    upward = sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                    for m, path in known.items() for t in imports(m, path, known)
                    if None not in (layer(m), layer(t)) and layer(t) > layer(m))
    assert not upward, "\n".join(upward)


def test_the_core_never_imports_the_build_tools():
    known = modules()
    core = [m for m in known if not m.startswith(("vilex.export", "vilex.benchmarks")) and (layer(m) or 9) <= 3]
    offenders = sorted(f"{m} imports {t}" for m in core for t in imports(m, known[m], known)
                       if t.startswith("vilex.export"))
    assert not offenders, "\n".join(offenders)
