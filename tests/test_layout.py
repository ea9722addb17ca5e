"""The layer contract parts import-linter cannot check: app.py is a module, not a package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [
    "core",
    "lm",
    "vision",
    "data",
    "generation",
    "segmentation",
    "vlm",
    "train",
    "eval",
    "bench",
]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_imports_app_and_app_imports_no_torch():
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            assert "app" not in _imports(path), f"{path} imports app"
    app_imports = _imports(ROOT / "app.py")
    assert "gradio" in app_imports
    # app.py is UI only: no tensor code.
    assert not app_imports & {"torch", "numpy", "transformers"}, app_imports


def test_the_app_defines_no_gradio_component_class():
    """Gradio writes a .pyi stub beside any module that subclasses one of its components (its
    ComponentMeta): importing app must leave the tree as it is."""
    import app  # noqa: F401

    root = Path(__file__).resolve().parents[1]
    assert not (root / "app.pyi").exists()
