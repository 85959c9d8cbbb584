"""The package's shape: every module name unique, no import cycle, nothing in the library importing the
command line, and every model generation's logical axes known to the sharding rules. The tests' shape: no
file under tests/ imports a test module (shared code lives in tests/helpers.py and tests/conftest.py)."""

import ast
import pathlib
import re
from collections import Counter

from rwkv_jax.model import VERSIONS, family
from rwkv_jax.train import sharding

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rwkv_jax"
TESTS = pathlib.Path(__file__).resolve().parent


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


# --- The tests' own layout ----------------------------------------------------------------------------------

_TEST_MODULE = re.compile(r"^(?:tests\.)?(test_\w+)$")
# `from tests.test_x import y` / `import tests.test_x` inside a string: code run by a subprocess (python -c)
_TEST_MODULE_IN_CODE = re.compile(r"\b(?:from|import)\s+(?:tests\.)?(test_\w+)\b")


def _test_modules_imported(source: str, in_strings: bool = True) -> set[str]:
    """The test_* modules that `source` imports, at any depth (lazy imports too), and with `in_strings` also
    in string constants that hold code for a subprocess: `import tests.test_x`, `from tests.test_x import y`,
    `from tests import test_x`, `from .test_x import y`, `from . import test_x` and `import test_x`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if (node.level and not module) or module == "tests":  # from . import test_x, from tests import test_x
                names = [alias.name for alias in node.names]
            else:
                names = [module]
        elif in_strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(_TEST_MODULE_IN_CODE.findall(node.value))
            continue
        else:
            continue
        found.update(m[1] for name in names if (m := _TEST_MODULE.match(name)))
    return found


def test_no_file_under_tests_imports_a_test_module():
    """A helper or fixture that two test modules need lives in tests/helpers.py or tests/conftest.py."""
    paths = sorted(TESTS.rglob("*.py"))
    assert TESTS / "test_train.py" in paths and TESTS / "helpers.py" in paths  # the walk sees the tests
    # A module importing itself counts too: `python -c "from tests.test_x import ..."` runs it a second time.
    # This file's strings are the detector's own examples: its imports alone are checked.
    this = pathlib.Path(__file__).resolve()
    offenders = {str(path.relative_to(TESTS)): sorted(imported) for path in paths
                 if (imported := _test_modules_imported(path.read_text(), in_strings=path != this))}
    assert not offenders, f"test modules imported by other files: {offenders}"


def test_the_import_detector_finds_test_module_imports():
    """The detector sees every spelling of an import of a test module (a check that could not fail would
    prove nothing), and not the imports that are allowed."""
    imports = {
        "from tests.test_train import make_config": {"test_train"},
        "import tests.test_wkv": {"test_wkv"},
        "import tests.test_wkv as w": {"test_wkv"},
        "from tests import test_generate": {"test_generate"},
        "from . import test_generate, helpers": {"test_generate"},
        "from .test_wkv import assert_close": {"test_wkv"},
        "import test_eval": {"test_eval"},
        "def f():\n    from tests.test_train import REPO\n": {"test_train"},
        'code = "import sys; from tests.test_checkpoint import child_main; child_main()"': {"test_checkpoint"},
        "from tests.helpers import make_config\nfrom tests.peers import hf_logits\nimport tests.conftest": set(),
        "from rwkv_jax.train import trainer\nimport pytest": set(),
        "from tests import helpers": set(),
        'message = "test_train failed"': set(),
    }
    for source, expected in imports.items():
        assert _test_modules_imported(source) == expected, source
    assert _test_modules_imported('code = "from tests.test_x import y"', in_strings=False) == set()
