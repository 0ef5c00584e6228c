"""The layering, written down: each package imports only its own framework (checked in a fresh
interpreter), and no module imports one that imports it back (read from the source, imports
inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mobilenet_arch", "toolkit", "flax_mobilenet", "torch_ref", "parity", "train", "bench")


def _modules(root: Path, packages) -> dict[str, Path]:
    """Every module of `packages` under `root`, by dotted name."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(name: str, path: Path, modules) -> set[str]:
    """The modules among `modules` that `name` imports anywhere in its source: at the top, in
    functions, under conditions. `from package import x` imports the module package.x where there
    is one, else package itself. (A package's __init__, which Python runs before any of its
    modules, is an edge only where a module names it.)"""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    found = set()
    for target in targets:
        # `import a.b.c` imports a.b.c; a name inside a module stands for that module.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """What each module of the project imports of the project."""
    modules = _modules(root, packages)
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component) -> list[str]:
    """A path from the component's first module back to itself, inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for succ in sorted(graph[node] & component):
            if succ == start:
                return paths[node] + [start]
            if succ not in paths:
                paths[succ] = paths[node] + [succ]
                frontier.append(succ)
    raise AssertionError(f"no cycle through {start}")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_imports_one_that_imports_it_back(package):
    graph = import_graph()
    cycles = [cycle for cycle in _cycles(graph) if cycle[0].split(".")[0] == package]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_import_graph_counts_imports_inside_functions_and_names_the_cycle(tmp_path):
    # The checker itself, on a package of three modules: a -> b at the top, b -> c in a function,
    # c -> a by a relative import inside a condition.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    import pkg.c\n")
    (tmp_path / "pkg" / "c.py").write_text("if True:\n    from .a import thing\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}}
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_low_level_modules_do_not_import_the_layers():
    # Dependencies point down: the kernels and the pure-JAX forms know nothing of the model.
    graph = import_graph()
    low = [name for name in graph if name.startswith("flax_mobilenet.native") or name == "flax_mobilenet.portable"]
    for name in low:
        assert not graph[name] & {"flax_mobilenet.layers", "flax_mobilenet.depthwise", "flax_mobilenet.models", "flax_mobilenet.backend"}, name
    assert not {g for g in graph["flax_mobilenet.portable"] if g.startswith("flax_mobilenet")}


def test_layouts_sit_below_what_reads_them():
    # A layout module knows its own library and the shared primitives (and files through io); the
    # registry knows the layouts; load/save and the tools know only the registry's records.
    graph = import_graph()
    layouts = [name for name in graph if name.startswith("parity.layouts.") and name != "parity.layouts.registry"]
    above = {"parity.layouts.registry", "parity.checkpoint", "parity.weights", "parity.convert", "parity.report", "parity.export"}
    for name in layouts + ["parity.io", "parity.layouts"]:
        assert not graph[name] & above, (name, graph[name] & above)
    assert not graph["parity.io"] & set(layouts), graph["parity.io"]


# The rooms of training (docs/architecture.md), each with what it may not import of the project,
# at the top or inside a function. A name stands for itself and every module under it.
EVERYTHING = PACKAGES
TRAIN_ROOMS = [
    # The command line: parse, check, lock, summarise; the run is train.loop's.
    ("train.main", ["train.runners", "train.step", "train.torch_step", "train.optim", "train.data", "parity", "torch_ref", "flax_mobilenet"]),
    # The loop and its periodic actions reach a framework only through a runner.
    ("train.loop", ["train.step", "train.torch_step", "train.optim", "train.checkpoint", "train.distributed", "parity", "torch_ref", "flax_mobilenet"]),
    ("train.periodic", EVERYTHING),
    # Configuration holds configuration: no optimizer, data pipeline, step or run.
    ("train.config", ["train.data", "train.folder", "train.optim", "train.param_groups", "train.step", "train.torch_step", "train.plan", "train.loop", "train.runners"]),
    # The data side answers its own questions about a dataset.
    ("train.data", ["train.config"]),
    ("train.datasets", EVERYTHING),
    # Both frameworks' optimizers read the parameter groups; they import neither framework.
    ("train.param_groups", ["train", "toolkit", "parity", "flax_mobilenet", "torch_ref"]),
    # A run's record is written and read without the run's machinery.
    ("train.record", ["train", "flax_mobilenet", "torch_ref"]),
]


@pytest.mark.parametrize("module, forbidden", TRAIN_ROOMS, ids=[room for room, _ in TRAIN_ROOMS])
def test_each_room_of_training_imports_only_what_it_needs(module, forbidden):
    imported = import_graph()[module]
    reached = sorted(name for name in imported for prefix in forbidden if name == prefix or name.startswith(prefix + "."))
    assert not reached, f"{module} imports {reached}"


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("mobilenet_arch", ["torch", "jax", "flax"]),
        ("toolkit", ["torch", "jax", "flax"]),
        ("flax_mobilenet", ["torch"]),
        ("flax_mobilenet.summary", ["torch"]),
        ("torch_ref", ["jax", "flax", "torchvision"]),
    ],
)
def test_package_does_not_import_the_other_framework(package, forbidden):
    code = f"import sys, importlib; importlib.import_module({package!r}); print(' '.join(m for m in {forbidden!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


# Each module imported alone, in a child of one fresh interpreter (forked, so that none sees
# another's imports): which of the two frameworks it brings in.
FRAMEWORKS_LOADED = """
import importlib, os, sys
for name in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            loaded = "ok: " + " ".join(m for m in ("jax", "torch") if m in sys.modules)
        except BaseException as error:  # SystemExit too: a module that runs a command line on import
            loaded = f"failed: {type(error).__name__}: {error}".replace("\\n", " ")
        os.write(write, loaded.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        print(f"{name}\\t{pipe.read() or 'failed: the import ended the process'}")
    os.wait()
"""


def test_only_parity_imports_both_frameworks_when_imported():
    # Any other module may reach the other framework inside a function (train's --framework torch,
    # the benchmarks' PyTorch side), never at import time.
    names = [name for name in _modules(ROOT, PACKAGES) if not name.startswith("parity") and not name.endswith("__main__")]
    result = subprocess.run([sys.executable, "-c", FRAMEWORKS_LOADED, *names], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    loaded = dict(line.split("\t") for line in result.stdout.splitlines())
    assert sorted(loaded) == sorted(names)
    failed = {name: what for name, what in loaded.items() if what.startswith("failed")}
    assert not failed, failed
    both = sorted(name for name, what in loaded.items() if what.removeprefix("ok:").split() == ["jax", "torch"])
    assert not both, f"{both} import both jax and torch at import time; only parity may (import the other inside a function)"
