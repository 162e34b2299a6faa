"""The package's shape (issue 12): its modules form one import order with no cycle, and no pass reaches
back into the backend (passes take what they need as arguments)."""
from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "paracompile"


def _imports() -> dict[str, set[str]]:
    files = {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).replace(".__init__", ""): path
             for path in PACKAGE.rglob("*.py")}
    imports = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("paracompile"):
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in files}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("paracompile")}
        imports[name] = found - {name, "paracompile"}
    return imports


def _cycle(imports: dict[str, set[str]]):
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for dependency in sorted(imports.get(module, ())):
            if state.get(dependency) == 1:
                return path + [dependency]
            if dependency not in state:
                found = visit(dependency, path + [dependency])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(imports):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_modules_import_each_other_without_a_cycle():
    assert _cycle(_imports()) is None, " -> ".join(_cycle(_imports()))


def test_the_cycle_check_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_pass_imports_the_backend():
    offenders = [name for name, found in _imports().items()
                 if name.startswith("paracompile.passes") and "paracompile.backend" in found]
    assert not offenders, offenders
