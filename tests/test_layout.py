"""The package's shape: every module name unique, no import cycle, nothing in the library importing the
command line, and every model generation's logical axes known to the sharding rules."""

import ast
import pathlib
from collections import Counter

from rwkv_jax.model import VERSIONS, family
from rwkv_jax.train import sharding

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rwkv_jax"


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """The package's modules that `path` imports, at any depth of its code (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c`: the module a.b.c when it is one, else a.b
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_module_basenames_are_unique():
    names = Counter(path.name for path in PACKAGE.rglob("*.py") if path.name != "__init__.py")
    assert not [name for name, count in names.items() if count > 1], names.most_common(5)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    """The walk fails on a cycle (a check that could not fail would prove nothing)."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_library_does_not_import_the_command_line():
    graph = _graph()
    upward = {name: sorted(m for m in deps if m.startswith("rwkv_jax.cli"))
              for name, deps in graph.items() if not name.startswith("rwkv_jax.cli")}
    assert not {name: deps for name, deps in upward.items() if deps}


def test_every_generation_logical_axis_has_a_sharding_rule():
    for version in VERSIONS:
        missing = set(family(version).logical_axes) - set(sharding.RULES)
        assert not missing, f"RWKV-{version}: no sharding rule for {sorted(missing)}"
