"""The package's import graph has no circle, and the Loader's settings have one signature.

Every ``import`` / ``from ... import`` of an ``imagenet_seq`` module counts, wherever it stands:
at the top, inside a function (a lazy import) or under ``if TYPE_CHECKING`` -- a circle through
any of them still means two modules that need each other. The graph is read from the source
(``ast``), nothing is imported.
"""
import ast
import inspect
import os
from typing import Dict, List, Set

import imagenet_seq

PACKAGE = "imagenet_seq"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(imagenet_seq.__file__)))


def modules(root: str = ROOT) -> Dict[str, str]:
    """Module name -> path of every ``.py`` file of the package."""
    out = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                mod = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[mod[:-len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return out


def _extension(mods: Dict[str, str], name: str) -> bool:
    """``name`` is a compiled module of the package (its C source sits in the tree)."""
    package, _, leaf = name.rpartition(".")
    folder = os.path.dirname(mods.get(package, ""))
    return bool(package in mods and mods[package].endswith("__init__.py")
                and os.path.exists(os.path.join(folder, leaf + ".c")))


def _target(mods: Dict[str, str], name: str) -> str:
    """The module an import of ``name`` runs: ``name`` itself, or the package holding it."""
    while name not in mods and not _extension(mods, name) and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph(root: str = ROOT) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (anywhere in its source)."""
    mods = modules(root)
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_package = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package
                    base = mod if is_package else mod.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        base = base.rsplit(".", 1)[0]
                    source = base + ("." + node.module if node.module else "")
                else:
                    source = node.module or ""
                # ``from pkg import sub`` imports the module pkg.sub when there is one
                names = [f"{source}.{a.name}" if _target(mods, f"{source}.{a.name}") ==
                         f"{source}.{a.name}" else source for a in node.names]
            for name in names:
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    target = _target(mods, name)
                    if target != mod and target in mods:
                        graph[mod].add(target)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_and_reads_every_kind_of_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from imagenet_seq.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import X\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    import imagenet_seq.a\n")
    (pkg / "d.py").write_text("import imagenet_seq.c\n")
    graph = import_graph(str(tmp_path))
    assert graph["imagenet_seq.a"] == {"imagenet_seq.sub.b"}
    assert graph["imagenet_seq.sub.b"] == {"imagenet_seq.c"}
    assert cycles(graph) == [["imagenet_seq.a", "imagenet_seq.c", "imagenet_seq.sub.b"]]


def test_no_import_circle_inside_the_package():
    graph = import_graph()
    assert "imagenet_seq.loader.loader" in graph and len(graph) > 50
    assert cycles(graph) == []


def test_the_settings_take_exactly_the_loaders_arguments():
    """``Loader.__init__`` holds the defaults and passes every argument to ``resolve``."""
    from imagenet_seq.data import Loader
    from imagenet_seq.loader.config import resolve

    ours = list(inspect.signature(Loader.__init__).parameters)[1:]
    assert ours == list(inspect.signature(resolve).parameters)
    assert all(p.default is inspect.Parameter.empty
               for p in inspect.signature(resolve).parameters.values())


def test_plan_modules_ask_no_environment():
    """The plan is a pure function: no environment, no process group, no CPU count in plan/."""
    asks = ("os.environ", "getenv", "torch.distributed", "sched_getaffinity", "cpu_count")
    plan = [m for m in modules() if m.startswith(PACKAGE + ".plan")]
    assert len(plan) >= 4
    for mod in plan:
        with open(modules()[mod]) as f:
            text = f.read()
        assert not [a for a in asks if a in text], mod
