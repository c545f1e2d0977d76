"""The import rules of ARCHITECTURE.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hal", "sandbox", "keyfile", "oci", "agent", "coordinator")

# Module prefix -> the project prefixes it may import. The longest matching prefix rules.
ALLOWED = {
    "hal": ("hal",),
    "sandbox": ("sandbox",),
    # Key files, read and made alike by the node (its identity) and the coordinator.
    "keyfile": ("keyfile",),
    # Images from registries: the coordinator resolves tags, the agent checks what it pulls.
    "oci": ("oci", "keyfile"),
    "agent": ("hal", "sandbox", "keyfile", "oci", "agent"),
    "agent.protocol": ("agent.protocol",),
    # The tray app talks to the daemon through the control package only: never hal or
    # sandbox, nor the daemon's internals. The control package itself reaches no further.
    "agent.tray": ("agent.tray", "agent.control", "agent.owner.policy", "agent.errors"),
    "agent.control": ("agent.control", "agent.owner.policy", "agent.errors"),
    "agent.owner.policy": ("agent.owner.policy",),
    "agent.errors": ("agent.errors",),
    # The spec a coordinator signs must pass the node's own validation (sandbox.spec, a pure
    # library: msgspec and the standard library), so the coordinator runs that validation.
    # Nothing else of the sandbox but the bounded file reader the spec's loader uses: the
    # test below checks what the three reach.
    "coordinator": (
        "coordinator",
        "agent.protocol",
        "keyfile",
        "oci",
        "sandbox.spec",
        "sandbox.errors",
        "sandbox.files",
    ),
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def _rule(module: str) -> tuple[str, ...]:
    prefix = max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)
    return ALLOWED[prefix]


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize(("module", "path"), sorted(_modules().items()))
def test_module_imports_only_the_layers_below_it(module: str, path: Path) -> None:
    forbidden = sorted(n for n in _imports(path) if not _within(n, _rule(module)))
    assert forbidden == [], f"{module} may not import {forbidden}"


def test_only_the_nvml_boundary_imports_pynvml() -> None:
    """ARCHITECTURE: one boundary per outside thing; NVML's is hal.backends.nvml."""
    importers = []
    for module, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(name.split(".")[0] == "pynvml" for name in names):
                importers.append(module)
    assert sorted(set(importers)) == ["hal.backends.nvml"]


def test_there_are_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: {n for n in _imports(p) if n in modules} for m, p in modules.items()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in visiting:
            cycle = [*visiting[visiting.index(module) :], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        visiting.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


@pytest.mark.parametrize(
    "module", sorted(m for m in _modules() if m.startswith(("agent.control", "agent.tray")))
)
def test_the_tray_apps_client_reaches_neither_hal_nor_sandbox(module: str) -> None:
    modules = _modules()
    reached, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in reached or name not in modules:
            continue
        reached.add(name)
        todo.extend(_imports(modules[name]) | _parents(name))
    assert sorted(n for n in reached if n.split(".")[0] in ("hal", "sandbox")) == []
    assert module in reached


def test_the_coordinator_reaches_only_the_sandboxs_spec_and_its_errors() -> None:
    modules = _modules()
    reached: set[str] = set()
    todo = [m for m in modules if m == "coordinator" or m.startswith("coordinator.")]
    while todo:
        name = todo.pop()
        if name in reached or name not in modules:
            continue
        reached.add(name)
        todo.extend(_imports(modules[name]) | _parents(name))
    assert sorted(n for n in reached if n.split(".")[0] == "sandbox") == [
        "sandbox",
        "sandbox.errors",
        "sandbox.files",
        "sandbox.service_spec",  # the spec's [service] table: types only
        "sandbox.spec",
        "sandbox.urls",  # the spec's check of input URLs: pure, stdlib only
    ]
    assert sorted(n for n in reached if n.split(".")[0] in ("hal", "agent")) == sorted(
        n for n in reached if n == "agent" or n.startswith("agent.protocol")
    )


def _parents(name: str) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}
