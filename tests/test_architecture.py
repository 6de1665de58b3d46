"""The layers stay as the folder names say: no import circle, and a core that knows no upstream."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lcaam_patch"
UPSTREAMS = {"timm", "transformers", "peft", "accelerate", "qd_detr", "llama", "src"}
CORE = (
    "errors",
    "config",
    "generators",
    "site",
    "patching",
    "state_dict",
    "compat",
    "verification",
    "probe",
    "backends",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Every module `path` imports at module level or in functions, type-only ones included;
    `from package import submodule` counts as an import of the submodule alone."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in modules else target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    names = set(modules)
    return {name: {m for m in _imports(path, names) if m in names and m != name} for name, path in modules.items()}


def test_no_module_imports_itself_through_others():
    graph = _graph()
    visiting: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append([*visiting[visiting.index(node) :], node])
            return
        visiting.append(node)
        for target in sorted(graph[node]):
            visit(target)
        visiting.pop()
        done.add(node)

    for module in sorted(graph):
        visit(module)
    assert not cycles, cycles


def test_the_core_imports_no_upstream():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if not any(name == f"lcaam_patch.{c}" or name.startswith(f"lcaam_patch.{c}.") for c in CORE):
            continue
        upstream = {m for m in _imports(path) if m.split(".")[0] in UPSTREAMS}
        if upstream:
            offenders[name] = sorted(upstream)
    assert not offenders, offenders


def test_what_the_package_imports_from_patching_is_declared() -> None:
    from lcaam_patch import patching

    allowed = {"apply", "remove", "is_patched", "patched_sites", "reset_generators", *patching.INTERNAL_API}
    offenders = {}
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("patching"):
                undeclared = {alias.name for alias in node.names} - allowed
                if undeclared and path.name != "patching.py":
                    offenders[str(path)] = sorted(undeclared)
    assert not offenders, offenders
