"""The design's arrows, enforced on the source (AST): which package may import which, and that no
module outside ``deltahub/codec/`` branches on a codec's name.

    cli → api → {ops, serve};  ops → {store, index, hub, formats, codec, runtime, calibrate}
    serve → {runtime, formats, codec} (the HTTP layer; it is handed an ops.pool.ModelPool)
    integrations → {api, ops, serve, runtime, formats, codec, kernels} (plug-ins other engines load)
    runtime → {kernels, codec};  calibrate → {runtime, formats, codec}
    codec and kernels import nothing of the rest;  store and index never import each other

Every package may also use the leaf modules (errors, config, fileio, progress, defaults), except
codec and kernels, which use nothing of deltahub; ``cli`` uses only ``api`` and ``errors``.
"""

from __future__ import annotations

import ast

import pytest
from test_layering import MODULES, REPO, Module, _imports, _under

LEAF = ("deltahub._version", "deltahub.errors", "deltahub.config", "deltahub.fileio", "deltahub.progress", "deltahub.defaults")

#: package -> the deltahub packages/modules it may import (besides itself).
ALLOWED: dict[str, tuple[str, ...]] = {
    "deltahub.cli": ("deltahub.api", "deltahub.errors"),
    "deltahub.api": ("deltahub.ops", "deltahub.serve", *LEAF),
    "deltahub.serve": ("deltahub.runtime", "deltahub.formats", "deltahub.codec", *LEAF),
    # loaded by other engines (vLLM's plug-in entry point, Ray Serve); nothing of deltahub imports it
    "deltahub.integrations": (
        "deltahub.api", "deltahub.ops", "deltahub.serve", "deltahub.runtime", "deltahub.formats", "deltahub.codec",
        "deltahub.kernels", *LEAF,
    ),
    "deltahub.ops": (
        "deltahub.store", "deltahub.index", "deltahub.hub", "deltahub.formats", "deltahub.codec",
        "deltahub.runtime", "deltahub.calibrate", "deltahub.kernels", *LEAF,
    ),
    "deltahub.calibrate": ("deltahub.runtime", "deltahub.formats", "deltahub.codec", *LEAF),
    "deltahub.runtime": ("deltahub.codec", "deltahub.kernels"),
    "deltahub.hub": ("deltahub.formats", *LEAF),
    "deltahub.store": ("deltahub.formats", *LEAF),
    "deltahub.index": ("deltahub.migrations", *LEAF),  # the Alembic scripts it runs
    "deltahub.formats": ("deltahub.codec", *LEAF),
    "deltahub.codec": (),
    "deltahub.kernels": (),
    "deltahub.migrations": ("deltahub.index", *LEAF),
    **{leaf: LEAF for leaf in LEAF},
}


def _package(mod: Module) -> str | None:
    return next((p for p in sorted(ALLOWED, key=len, reverse=True) if _under(mod.name, p)), None)


def _arrow_violations(modules: list[Module]) -> list[str]:
    bad = []
    for mod in modules:
        pkg = _package(mod)
        if pkg is None:
            continue
        allowed = (pkg, *ALLOWED[pkg])
        for imp in sorted(_imports(mod)):
            if imp in ("deltahub", "deltahub.__version__"):  # the package root (its version)
                if pkg in ("deltahub.codec", "deltahub.kernels"):
                    bad.append(f"{mod.path.relative_to(REPO)} imports {imp}")
                continue
            if _under(imp, "deltahub") and not any(_under(imp, a) for a in allowed):
                bad.append(f"{mod.path.relative_to(REPO)} imports {imp}")
    return bad


def test_every_module_has_a_place_in_the_arrows():
    homeless = [m.name for m in MODULES if _package(m) is None and m.name not in ("deltahub",)]
    assert not homeless, homeless


def test_arrows():
    bad = _arrow_violations(MODULES)
    assert not bad, bad


def test_arrow_checker_finds_a_wrong_import():
    fake = Module("deltahub.runtime.fake", REPO / "deltahub" / "runtime" / "fake.py",
                  ast.parse("from deltahub.store import ObjectStore\nfrom deltahub import codec\n"))
    assert _arrow_violations([fake]) == ["deltahub/runtime/fake.py imports deltahub.store",
                                          "deltahub/runtime/fake.py imports deltahub.store.ObjectStore"]


def _codec_branches(mod: Module) -> list[str]:
    """Comparisons against a codec's name (``rec.codec == "sign1"``, ``x is Codec.SIGN1``) and any
    use of the ``Codec`` enum's members."""
    found = []
    for node in ast.walk(mod.tree):
        where = f"{mod.path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Codec":
            found.append(f"{where} uses Codec.{node.attr}")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names_codec = any(
                (isinstance(s, ast.Attribute) and s.attr in ("codec", "codec_name"))
                or (isinstance(s, ast.Name) and s.id in ("codec", "codec_name"))
                for s in sides
            )
            if names_codec and any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
                found.append(f"{where} compares a codec with a name")
    return found


@pytest.mark.parametrize("where", ["deltahub"])
def test_nothing_outside_the_registry_branches_on_a_codec_name(where):
    bad = [b for m in MODULES if _under(m.name, where) and not _under(m.name, "deltahub.codec") for b in _codec_branches(m)]
    assert not bad, bad


def test_codec_branch_checker_works():
    src = 'if rec.codec == "sign1":\n    pass\nif c is Codec.DENSE:\n    pass\n'
    fake = Module("deltahub.ops.fake", REPO / "deltahub" / "ops" / "fake.py", ast.parse(src))
    assert len(_codec_branches(fake)) == 2
