"""The repository's structural rules (issue 28), checked on the source: imports point down the
package's layers with no circles, nothing imports ``tests/``, and no hand-written file is long."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "spyre_backend"

# Layers of the package, lowest first: a module may import its own layer and those below it.
LAYERS = [
    {"errors", "protocol", "config"},
    {"models"},
    {"device"},
    {"preprocess", "vision", "engine"},
    {"serving"},
    {"openai_api", "server"},
]
MAX_LINES = 400
HAND_WRITTEN = ["spyre_backend", "model_repository", "bench", "tools", "testkit", "client", "scripts", "tests"]


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules ``path`` imports (not those only under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if top_level_only and inner:
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names.add(child.module)
                names.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child, inner)

    visit(tree, False)
    return names


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return next((i for i, layer in enumerate(LAYERS) if parts[1] in layer), None)


def test_every_package_folder_has_a_layer():
    folders = {p.name for p in (ROOT / PACKAGE).iterdir() if (p / "__init__.py").exists() or p.suffix == ".py"}
    folders = {f.removesuffix(".py") for f in folders} - {"__init__"}
    assert folders <= set().union(*LAYERS), f"give {folders - set().union(*LAYERS)} a layer in LAYERS"


def test_imports_point_down_the_layers():
    upward = []
    for path in python_files(PACKAGE):
        own = layer_of(module_name(path))
        if own is None:
            continue
        for name in imports(path):
            target = layer_of(name)
            if target is not None and target > own:
                upward.append(f"{module_name(path)} imports {name}")
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
    modules = {module_name(p): p for p in python_files(PACKAGE)}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports(path, top_level_only=True) if m in modules and m != name}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def walk(node: str, stack: list[str]):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    # a package importing its own submodules (``__init__`` re-exports) is not a cycle of code
    cycles = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".")
                                           for a, b in zip(c.split(" -> "), c.split(" -> ")[1:]))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_nothing_outside_tests_imports_tests():
    offenders = [f"{module_name(p)} imports {name}"
                 for p in python_files(*[f for f in HAND_WRITTEN if f != "tests"])
                 for name in imports(p) if name == "tests" or name.startswith("tests.")]
    assert not offenders, "\n".join(offenders)


def test_no_hand_written_file_is_long():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in python_files(*HAND_WRITTEN)
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines:\n" + "\n".join(long)
