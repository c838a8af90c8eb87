"""The import graph of ``dqo`` and ``dqo_kernels`` has no cycle: read statically (``ast``) from
every module's top-level ``import``/``from`` statements (those run when the module is
imported, including those under a module-level ``if``/``try``), relative imports resolved."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dqo", "dqo_kernels")


def modules(root: Path = ROOT):
    """``{dotted name: path}`` of every module of the packages (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def top_level(tree: ast.Module):
    """The import statements a module runs when imported: not those inside functions or
    classes (they run later, if ever)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def imports(name: str, path: Path, known, nested: bool = False) -> set:
    """The modules of ``known`` that ``name`` (at ``path``) imports at its top level (with
    ``nested``, also in its functions and classes)."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))) \
        if nested else top_level(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            if node.level:
                base = name.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # ``from pkg import sub``: the submodule; ``from pkg import name``: the package,
            # which also runs first whenever it is not one that holds this module (those are
            # initialised before it anyway)
            subs = [f"{mod}.{a.name}" for a in node.names]
            targets = [s for s in subs if s in known]
            if len(targets) < len(subs) or not name.startswith(mod + "."):
                targets.append(mod)
        for t in targets:
            while t and t not in known:  # ``import a.b.c`` of a module we do not know: a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph(root: Path = ROOT, nested: bool = False):
    known = modules(root)
    return {name: imports(name, path, known, nested) for name, path in known.items()}


def find_cycle(g):
    """One cycle of ``g`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(g.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = visit(v)
                if found:
                    return found
        state[u] = "done"
        stack.pop()
        return None

    for u in sorted(g):
        if u not in state:
            found = visit(u)
            if found:
                return found
    return None


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "with-function-level"])
def test_the_import_graph_has_no_cycle(nested):
    """No cycle among the imports a module runs when imported; nor, with the imports inside
    functions counted too, any that a lazy import would only defer."""
    g = graph(nested=nested)
    assert {"dqo.data.schema", "dqo.generation.vllm", "dqo_kernels"} <= set(g)
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_a_cycle(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg / "sub").mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "dqo" / "sub" / "__init__.py").write_text("from .b import x\n")
    (tmp_path / "dqo" / "sub" / "b.py").write_text(
        "import os\ntry:\n    from ..a import y\nexcept ImportError:\n    pass\n"
        "def f():\n    from dqo import c\n")
    (tmp_path / "dqo" / "a.py").write_text("from dqo.sub import b\n")
    (tmp_path / "dqo" / "c.py").write_text("from . import a\n")
    g = graph(tmp_path)
    assert g["dqo.sub.b"] == {"dqo.a"}  # the function-level import is not a top-level edge
    assert g["dqo.c"] == {"dqo.a"}  # its package is initialised before it
    assert find_cycle(g) == ["dqo.a", "dqo.sub", "dqo.sub.b", "dqo.a"]
    del g["dqo.sub.b"]
    assert find_cycle(g) is None


def test_library_modules_import_first():
    """The library's modules, each first in a fresh interpreter (no import order that happens to
    work hides a cycle), without the command lines."""
    import subprocess
    import sys

    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    for m in [m for m in sys.modules if m == 'dqo' or m.startswith('dqo.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module(name)\n"
            "    clis = {'dqo.sample', 'dqo.evaluate', 'dqo.train'} & set(sys.modules)\n"
            "    assert not clis, (name, clis)\n")
    names = ["dqo.data.schema", "dqo.data", "dqo.generation.vllm", "dqo.generation",
             "dqo.evaluation", "dqo.pipeline", "dqo.hf", "dqo.algos", "dqo.loop", "dqo.runs"]
    res = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
