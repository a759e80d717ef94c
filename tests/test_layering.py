"""The dependency rules of DESIGN.md, checked on the source (AST), plus the packaging of kernels/."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "deltahub"
KERNELS = REPO / "kernels"


@dataclass
class Module:
    name: str  # dotted, as installed (kernels/x.py -> deltahub.kernels.x)
    path: Path
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def _modules() -> list[Module]:
    out = []
    for root, prefix in ((LIB, "deltahub"), (KERNELS, "deltahub.kernels")):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            out.append(Module(name, path, ast.parse(path.read_text(encoding="utf-8"), str(path))))
    return out


MODULES = _modules()


def _from_target(mod: Module, node: ast.ImportFrom) -> str:
    """The module ``from ... import`` names, relative imports resolved against ``mod``'s package."""
    if not node.level:
        return node.module or ""
    base = mod.package.split(".")
    if node.level > 1:
        base = base[: -(node.level - 1)]
    prefix = ".".join(base)
    return f"{prefix}.{node.module}" if node.module else prefix


def _imports(mod: Module) -> set[str]:
    """Every module name ``mod`` imports (relative imports resolved), anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _from_target(mod, node)
            found.add(target)
            for alias in node.names:  # `from deltahub import store` imports deltahub.store
                found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            fname = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if fname in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(where: str, forbidden) -> list[str]:
    bad = []
    for mod in MODULES:
        if not _under(mod.name, where):
            continue
        for imp in sorted(_imports(mod)):
            if forbidden(imp):
                bad.append(f"{mod.path.relative_to(REPO)} imports {imp}")
    return bad


def test_modules_found():
    names = {m.name for m in MODULES}
    for expected in ("deltahub.store.objects", "deltahub.index.db", "deltahub.codec.sign1", "deltahub.kernels", "deltahub.cli"):
        assert expected in names
    assert len(MODULES) > 20


@pytest.mark.parametrize("package", ["deltahub.codec", "deltahub.kernels"])
def test_codec_and_kernels_import_nothing_of_deltahub(package):
    bad = _violations(
        package,
        lambda imp: (_under(imp, "deltahub") and not _under(imp, package))
        or _under(imp, "kernels"),  # the top-level name is not ours
    )
    assert not bad, bad


def test_store_and_index_never_import_each_other():
    assert not _violations("deltahub.store", lambda imp: _under(imp, "deltahub.index"))
    assert not _violations("deltahub.index", lambda imp: _under(imp, "deltahub.store"))


@pytest.mark.parametrize("package", ["deltahub.store", "deltahub.index", "deltahub.codec", "deltahub.formats"])
def test_lower_layers_do_not_import_upper_ones(package):
    upper = ("deltahub.ops", "deltahub.api", "deltahub.cli", "deltahub.hub", "deltahub.runtime", "deltahub.calibrate")
    bad = _violations(package, lambda imp: any(_under(imp, u) for u in upper))
    assert not bad, bad


def test_only_the_cli_imports_click_and_nothing_imports_the_cli():
    bad = [
        f"{m.path.relative_to(REPO)} imports {imp}"
        for m in MODULES
        if m.name != "deltahub.cli"
        for imp in _imports(m)
        if _under(imp, "deltahub.cli") or _under(imp, "click")
    ]
    assert not bad, bad


def test_cli_imports_only_the_api_and_the_errors():
    """cli.py is a layer over deltahub.api: of the package it imports deltahub.api and deltahub.errors
    only (version, defaults, sizes, disk-full messages and the debug flag come through the API)."""
    [cli] = [m for m in MODULES if m.name == "deltahub.cli"]
    ours = sorted(imp for imp in _imports(cli) if _under(imp, "deltahub"))
    bad = [imp for imp in ours if imp != "deltahub" and not (_under(imp, "deltahub.api") or _under(imp, "deltahub.errors"))]
    assert not bad, bad
    assert "deltahub.api" in ours and "deltahub.errors" in ours


def test_ops_do_not_import_api_or_cli():
    bad = _violations("deltahub.ops", lambda imp: _under(imp, "deltahub.api") or _under(imp, "deltahub.cli"))
    assert not bad, bad


def test_nothing_imports_top_level_kernels():
    bad = [f"{m.path.relative_to(REPO)} imports {imp}" for m in MODULES for imp in _imports(m) if _under(imp, "kernels")]
    assert not bad, bad


def _forbidden_calls(mod: Module) -> list[str]:
    out = []
    for node in ast.walk(mod.tree):
        where = f"{mod.path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in ("pickle", "cPickle", "dill", "_pickle")]
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").split(".")[0]
            if root in ("pickle", "cPickle", "dill", "_pickle"):
                out.append(f"{where} imports from {node.module}")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                out.append(f"{where} imports torch.load")
        elif isinstance(node, ast.Attribute) and node.attr == "load":
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("torch", "pickle"):
                out.append(f"{where} uses {value.id}.load")
        elif isinstance(node, ast.Attribute) and node.attr in ("loads", "Unpickler") and isinstance(node.value, ast.Name):
            if node.value.id == "pickle":
                out.append(f"{where} uses pickle.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            if mod.name != "deltahub.cli":
                out.append(f"{where} calls print(")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                out.append(f"{where} passes allow_pickle")
    return out


def test_no_pickle_torch_load_or_print():
    bad = [problem for mod in MODULES for problem in _forbidden_calls(mod)]
    assert not bad, bad


def test_forbidden_call_checker_works():
    """The checker itself finds what it must (so the test above can fail)."""
    src = "import pickle\nimport torch\nx = torch.load('f')\nprint('hi')\nfrom pickle import loads\n"
    mod = Module("deltahub.fake", REPO / "deltahub" / "fake.py", ast.parse(src))
    found = _forbidden_calls(mod)
    assert len(found) == 4, found
    mod2 = Module("deltahub.codec.fake", REPO / "deltahub" / "codec" / "fake.py", ast.parse("from ..store import x\nfrom . import y\n"))
    assert "deltahub.store.x" in _imports(mod2) and "deltahub.codec.y" in _imports(mod2)


def test_kernels_is_not_a_top_level_package(tmp_path):
    """Installed deltahub exposes kernels/ as deltahub.kernels only: from a neutral directory,
    ``kernels`` is not found (or is someone else's, e.g. Hugging Face's kernel loader)."""
    code = (
        "import importlib.util, json\n"
        "top = importlib.util.find_spec('kernels')\n"
        "ours = importlib.util.find_spec('deltahub.kernels')\n"
        "print(json.dumps([top.origin if top else None, ours.origin if ours else None]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json

    top, ours = json.loads(proc.stdout)
    assert ours is not None and Path(ours).resolve() == (KERNELS / "__init__.py").resolve()
    assert top is None or not Path(top).resolve().is_relative_to(KERNELS.resolve()), top


def test_deltahub_kernels_importable():
    spec = importlib.util.find_spec("deltahub.kernels")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve() == (KERNELS / "__init__.py").resolve()
    import deltahub.kernels  # noqa: F401


# ----------------------------------------------------------------------------------- import cycles
def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_edges(mod: Module, known: set[str], module_level: bool) -> set[str]:
    """The deltahub modules ``mod`` imports: at module level only (what runs on ``import``), or
    anywhere (function-level imports too). ``if TYPE_CHECKING:`` blocks never run and are skipped.
    ``from P import x`` is an edge to ``P.x`` when that is a module, else to ``P``; the implicit
    import of a parent package is not an edge (Python initialises parents first, whatever the order)."""
    found: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        if isinstance(node, ast.Import):
            return {alias.name for alias in node.names}
        target = _from_target(mod, node)
        return {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.update(targets(child))
            visit(child)

    visit(mod.tree)
    return {name for name in found if name in known and name != mod.name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def _graph(module_level: bool) -> dict[str, set[str]]:
    known = {m.name for m in MODULES}
    return {m.name: _import_edges(m, known, module_level) for m in MODULES}


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level", "function-level-too"])
def test_no_import_cycles(module_level):
    """DESIGN.md: no import cycles. Module-level imports must form no cycle (else import order
    decides what works); neither may function-level ones (a cycle hidden in a function is still one)."""
    cycles = _cycles(_graph(module_level))
    assert not cycles, cycles


def test_cycle_finder_works():
    """The checker finds a cycle through a package's ``from P import x`` and one hidden in a function."""
    src = {
        "deltahub.fake": "from deltahub.fake import a\n",
        "deltahub.fake.a": "from deltahub.fake import b\n",
        "deltahub.fake.b": "def f():\n    from deltahub.fake.a import g\n",
    }
    mods = [
        Module(name, LIB / "fake" / ("__init__.py" if name == "deltahub.fake" else f"{name[-1]}.py"), ast.parse(text))
        for name, text in src.items()
    ]
    known = set(src)
    module_level = {m.name: _import_edges(m, known, True) for m in mods}
    anywhere = {m.name: _import_edges(m, known, False) for m in mods}
    assert module_level["deltahub.fake.a"] == {"deltahub.fake.b"} and not _cycles(module_level)
    assert _cycles(anywhere) == [["deltahub.fake.a", "deltahub.fake.b"]]
    typed = Module("deltahub.fake.c", LIB / "fake" / "c.py", ast.parse("if TYPE_CHECKING:\n    import deltahub.fake.a\n"))
    assert not _import_edges(typed, known | {"deltahub.fake.c"}, False)


# ----------------------------------------------------------------------------------- who may touch what
def test_only_the_index_touches_orm_rows_and_sessions():
    """Outside deltahub/index nothing imports the ORM models (or a row class through the package)
    nor opens a session: everyone calls the index's queries and gets dataclasses back."""
    bad = []
    for mod in MODULES:
        if _under(mod.name, "deltahub.index"):
            continue
        for imp in sorted(_imports(mod)):
            if _under(imp, "deltahub.index.models") or (
                _under(imp, "deltahub.index") and imp.rpartition(".")[2].endswith("Row")
            ):
                bad.append(f"{mod.path.relative_to(REPO)} imports {imp}")
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "session":
                bad.append(f"{mod.path.relative_to(REPO)}:{node.lineno} calls .session(")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(_under(n, "sqlalchemy") for n in names) and not _under(mod.name, "deltahub.cli"):
                    bad.append(f"{mod.path.relative_to(REPO)}:{node.lineno} imports sqlalchemy")
    assert not bad, bad


def test_only_the_hub_package_talks_to_huggingface_hub():
    """Every huggingface_hub call goes through deltahub/hub (transfers, retries, errors, offline).
    The one exception is deltahub/config.py, which reads where the HF cache is (a setting, used by
    formats and the store too, which may not import the hub package)."""
    bad = [
        f"{m.path.relative_to(REPO)} imports {imp}"
        for m in MODULES
        if not (_under(m.name, "deltahub.hub") or m.name == "deltahub.config")
        for imp in sorted(_imports(m))
        if _under(imp, "huggingface_hub")
    ]
    assert not bad, bad


def test_hub_imports_no_store_index_or_ops():
    """Arrows: ops -> {store, index, hub, formats, codec}; the hub package knows none of the first."""
    upper = ("deltahub.ops", "deltahub.store", "deltahub.index", "deltahub.api", "deltahub.cli", "deltahub.runtime")
    bad = _violations("deltahub.hub", lambda imp: any(_under(imp, u) for u in upper))
    assert not bad, bad
