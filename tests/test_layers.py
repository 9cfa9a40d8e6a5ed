"""The package's layers import downwards only: ``core/``, ``data/``, ``eval/`` and ``train/``
never import ``stages/`` or the CLI, and ``core/`` never imports ``train/`` (imports inside
functions included)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "snapgen_cli"

#: layer -> package modules it must not import (top-level packages/modules of snapgen_cli)
FORBIDDEN = {
    "core": {"stages", "cli", "recipe", "report", "train"},
    "data": {"stages", "cli", "recipe", "report"},
    "eval": {"stages", "cli", "recipe", "report"},
    "train": {"stages", "cli", "recipe", "report"},
}


def imported_layers(source: str, rel: tuple[str, ...]) -> set[str]:
    """The first component below ``snapgen_cli`` of every module that ``source`` (the module
    ``snapgen_cli.<rel>``, e.g. ``("core", "unet")``) imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(rel[:-1])[: len(rel) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts[0]] if parts else [a.name for a in node.names]
            elif node.module and node.module.startswith("snapgen_cli."):
                names = [node.module.split(".")[1]]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("snapgen_cli."))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    bad = {}
    for path in sorted((PKG / layer).rglob("*.py")):
        hits = imported_layers(path.read_text(), path.relative_to(PKG).with_suffix("").parts) & FORBIDDEN[layer]
        if hits:
            bad[str(path.relative_to(PKG))] = sorted(hits)
    assert not bad, f"upward imports: {bad}"


def test_the_scan_sees_relative_absolute_and_lazy_imports():
    """Negative control: upward imports inside a function, relative or absolute, are found."""
    src = "from .flow import x\ndef f():\n    from ..stages.base import y\n    import snapgen_cli.train.loop\n"
    assert imported_layers(src, ("core", "probe")) == {"core", "stages", "train"}
    assert imported_layers("from . import unet\n", ("core", "probe")) == {"core"}
