"""What the GPU check needs on the lent machine beyond what its image already has: the wheels to
carry, pinned, and the check that this list is complete (every third-party module the check's code
can import is on the machine, carried, or opt-in: imported only inside a function the check never
calls). IBM Spyre's compiler (``torch_sendnn``) is imported by name only with device spyre, so it is
no import here.

The machine's packages are those of the device tool's KINDS.md ("Python packages already there",
read 2026-11-17): python3 3.12, torch 2.11.0 (CUDA 13), transformers 5.17.0, tokenizers 0.23.2,
safetensors 0.8.0, numpy 2.5.2, pillow, jinja2, torchvision 0.26.0, huggingface-hub 1.33.0.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("spyre_backend", "tools", "testkit")

# the modules the check runs on the machine (processes of their own), and what they import
ENTRY_MODULES = ("tools.gpu_check.__main__", "tools.gpu_check.reference", "tools.gpu_check.engine_phase",
                 "tools.tiny_checkpoint.random_checkpoint")

# import name -> distribution: already in the machine's image (KINDS.md); never carried
ON_THE_MACHINE = {"torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers",
                  "safetensors": "safetensors", "numpy": "numpy", "PIL": "pillow", "jinja2": "jinja2",
                  "huggingface_hub": "huggingface-hub"}
# import name -> the pinned wheel carried in .whl/ (the versions of requirements.txt); xgrammar
# because the LLM's warmup runs a request with a grammar (spyre_backend/serving/warmup.py)
CARRIED = {"fms": "ibm-fms==1.13.1", "xgrammar": "xgrammar==0.2.8"}
# what the carried wheels import in turn and the machine lacks (installed with --no-deps there):
# xgrammar's runtime and pydantic (the machine has typing-extensions and triton, with torch)
CARRIED_DEPENDENCIES = ("apache-tvm-ffi==0.1.15.post2", "pydantic==2.14.4", "pydantic-core==2.50.5",
                        "annotated-types==0.8.0", "typing-inspection==0.4.5")
# import name -> the setting that reaches it: imported only inside functions that the check's
# default, exact path never calls, so neither on the machine nor carried
OPT_IN = {"torchao": "quantization: int8 (spyre_backend/device/quantize.py)",
          "jsonschema": "a request with a JSON schema (spyre_backend/engine/structured_request.py)"}


def module_file(name: str) -> Path | None:
    """The source of a project module (a package's __init__.py), or None if there is none."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imported_names(path: Path, module: str) -> dict[str, bool]:
    """Absolute names of every module ``path`` imports, and whether at module level (importing
    ``path`` runs it) rather than only inside a function (calling it does); none under ``if
    TYPE_CHECKING``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: dict[str, bool] = {}

    def add(name: str, top_level: bool) -> None:
        names[name] = names.get(name, False) or top_level

    def visit(node, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, top_level)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, up level - 1
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                for name in [base, *(f"{base}.{alias.name}" for alias in child.names)]:
                    add(name, top_level)
            visit(child, top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), True)
    return names


def third_party_imports(entries=ENTRY_MODULES) -> dict[str, dict[str, bool]]:
    """Top-level third-party module -> {project module importing it: at module level}, over every
    project module the entries can reach (parent packages included, as importing runs them)."""
    found: dict[str, dict[str, bool]] = {}
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = module_file(module)
        if path is None:
            continue
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        for name, top_level in imported_names(path, module).items():
            top = name.split(".")[0]
            if top in PROJECT_PACKAGES:
                todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                users = found.setdefault(top, {})
                users[module] = users.get(module, False) or top_level
    return found


def uncovered() -> dict[str, dict[str, bool]]:
    """Third-party modules the check can import that are neither on the machine nor carried, and
    opt-in ones imported where merely importing the project module would need them."""
    found = third_party_imports()
    missing = {n: users for n, users in found.items() if n not in {**ON_THE_MACHINE, **CARRIED, **OPT_IN}}
    eager = {n: users for n, users in found.items() if n in OPT_IN and any(users.values())}
    return {**missing, **eager}


def main(argv: list[str]) -> int:
    """``--missing``: exit 1 where this Python lacks a carried module (the wheels need installing);
    otherwise list the third-party modules the check imports, and where from."""
    if argv == ["--missing"]:
        return int(any(importlib.util.find_spec(name) is None for name in CARRIED))
    for name, users in sorted(third_party_imports().items()):
        print(f"{name}: {', '.join(m if top else m + ' (in a function)' for m, top in sorted(users.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
