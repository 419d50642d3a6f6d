"""The shape of the code, checked (docs/architecture.md draws it): the daemon reaches the trainer only through the
`contract` package; the contract is TensorFlow-free by construction; no import cycles; small functions.

Read from the source (``ast``), with imports inside functions counted too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = ("contract", "trainer", "daemon")
MAX_LINES, MAX_PARAMETERS = 80, 8
# What the contract may import besides the standard library and itself: validation and YAML, nothing heavy.
CONTRACT_MAY_IMPORT = {"pydantic", "pydantic_core", "yaml"}


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` gives ``a.b`` when that is a module)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                    else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {i for i in imports(path, name) if i in mods and i != name} for name, path in mods.items()}


def test_the_daemon_imports_nothing_of_the_trainer_but_the_contract():
    mods = modules()
    offending = {name: sorted(i for i in imports(path, name) if i == "trainer" or i.startswith("trainer."))
                 for name, path in mods.items() if name.split(".")[0] == "daemon"}
    assert {k: v for k, v in offending.items() if v} == {}


def test_the_contract_imports_only_the_standard_library_pydantic_and_yaml():
    mods = modules()
    allowed = set(sys.stdlib_module_names) | CONTRACT_MAY_IMPORT | {"contract", "__future__"}
    offending = {}
    for name, path in mods.items():
        if name.split(".")[0] == "contract":
            bad = sorted({i for i in imports(path, name) if i.split(".")[0] not in allowed})
            if bad:
                offending[name] = bad
    assert offending == {}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    # A package's __init__ importing its own modules is not a cycle of the design: only module-to-module edges.
    edges = {m: {d for d in deps if not (modules()[d].name == "__init__.py" and m.startswith(d + "."))}
             for m, deps in graph().items()}
    assert cycles(edges) == []


def test_functions_are_short_and_take_few_parameters():
    too_long, too_many = [], []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    too_long.append(f"{name}.{node.name}: {lines} lines")
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                count -= bool(a.args) and a.args[0].arg in ("self", "cls")
                if count > MAX_PARAMETERS:
                    too_many.append(f"{name}.{node.name}: {count} parameters")
    assert too_long == [] and too_many == []
