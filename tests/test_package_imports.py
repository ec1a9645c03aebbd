"""Every module of the package imports on its own, the package has no import cycle, and the top-level
package stays light.

How cycles are found: every module of ``autoselect_fast`` (with ``autoselect_fast.training`` and
``autoselect_fast.kernels``, installed from ``training/`` and ``kernels/``) is parsed, and each of its
``import`` statements becomes an edge of a graph, wherever it stands: at module level and also inside
functions (a deferred import that dodges a cycle at import time is still a cycle in the design), but
not under ``if TYPE_CHECKING:``. ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module of the package (a ``.py`` file or the compiled extension), else to ``pkg``. Imports by string
(``importlib.import_module``, the top-level package's lazy exports) are not edges: the package is fully
initialised before its ``__getattr__`` runs. A strongly connected component of more than one module (or
a module importing itself) is a cycle. Independently, a fresh interpreter imports every module (but
``__main__``, which runs the CLI), so a module that only imports in a certain order fails here too.
"""
import ast
import importlib.util
import os
import subprocess
import sys

ROOTS = ("autoselect_fast", "autoselect_fast.training", "autoselect_fast.kernels")
NEEDS_VLLM = {"autoselect_fast.vllm_plugin.qwen2_5_vl"}  # the plugin's model module imports vLLM by design


def package_modules() -> dict[str, str]:
    """Module name -> file, for every ``.py`` file under the three roots."""
    modules = {}
    for root in ROOTS:
        folder = importlib.util.find_spec(root).submodule_search_locations[0]
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, folder)
            prefix = root if rel == "." else root + "." + rel.replace(os.sep, ".")
            if prefix != root and root + "." + rel.split(os.sep)[0] in ROOTS:
                continue  # a nested root is walked on its own
            for name in filenames:
                if name.endswith(".py"):
                    module = prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"
                    modules[module] = os.path.join(dirpath, name)
                elif name.endswith(".so"):  # the compiled extension: a leaf
                    modules[f"{prefix}.{name.split('.')[0]}"] = os.path.join(dirpath, name)
    return modules


def _import_nodes(nodes):
    """Every import statement among ``nodes`` and the statements nested in them, but under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _import_nodes(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.stmt, ast.excepthandler)))


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    graph = {}
    for module, path in modules.items():
        if not path.endswith(".py"):
            graph[module] = set()
            continue
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        edges = set()
        for node in _import_nodes(tree.body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = node.module if node.level == 0 else ".".join(p for p in (base, node.module) if p)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a package-external name
                    target = target.rpartition(".")[0]
                if target:
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or with a self-edge (Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    assert {"autoselect_fast.engine.engine", "autoselect_fast.models", "autoselect_fast.placeholders",
            "autoselect_fast.training.trainer", "autoselect_fast.kernels.selection"} <= set(modules)
    graph = import_graph(modules)
    assert "autoselect_fast.placeholders" in graph["autoselect_fast.models.base"]  # the edges are seen
    assert "autoselect_fast.models.llava" in graph["autoselect_fast.models"]  # also those inside functions
    assert cycles(graph) == []


def test_the_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_imports_in_a_fresh_interpreter():
    try:
        import vllm  # noqa: F401
        skip = set()
    except ImportError:
        skip = NEEDS_VLLM
    modules = package_modules()
    names = sorted(m for m, path in modules.items() if m not in skip and path.endswith(".py") and not m.endswith(".__main__"))  # __main__ runs the CLI
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported', len(sys.argv) - 1)"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"imported {len(names)}"


def test_top_level_exports_are_lazy():
    """``import autoselect_fast`` imports neither torch nor the engine (nor vLLM); a public name imports its
    module on first use and is the object of that module."""
    code = (
        "import sys, autoselect_fast\n"
        "print(not any(m in sys.modules for m in ('torch', 'transformers', 'vllm', 'autoselect_fast.engine')))\n"
        "from autoselect_fast import engine, modules, ops\n"
        "print(autoselect_fast.AutoSelectEngine is engine.AutoSelectEngine, autoselect_fast.Request is engine.Request,\n"
        "      autoselect_fast.ImageInput is engine.ImageInput, autoselect_fast.GenerateOutput is engine.GenerateOutput,\n"
        "      autoselect_fast.Scorer is modules.Scorer, autoselect_fast.ops is ops, 'vllm' in sys.modules)\n"
        "try:\n    autoselect_fast.nothing\nexcept AttributeError as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout.splitlines()
    assert out == ["True", "True True True True True True False", "module 'autoselect_fast' has no attribute 'nothing'"]
