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


def _imports(mod: Module) -> set[str]:
    """Every module name ``mod`` imports (relative imports resolved), anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.package.split(".")
                if node.level > 1:
                    base = base[: -(node.level - 1)]
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
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
