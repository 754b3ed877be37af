"""The layering rules of docs/architecture.md, checked on the package's own imports (module
level and inside functions), so a later change cannot quietly break them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mm_pipelines"

# layer -> top-level modules (or mm_pipelines sub-packages) it must not import
FORBIDDEN = {
    "models": {
        "psycopg",
        "dagster",
        "dagster_aws",
        "dagster_k8s",
        "mlflow",
        "mm_pipelines.storage",
        "mm_pipelines.pipeline",
        "mm_pipelines.defs",
        "mm_pipelines.serving",
        "mm_pipelines.cli",
    },
    "storage": {
        "torch",
        "open_clip",
        "diffusers",
        "dagster",
        "mlflow",
        "mm_pipelines.models",
        "mm_pipelines.pipeline",
        "mm_pipelines.defs",
        "mm_pipelines.serving",
    },
    "pipeline": {"dagster", "dagster_aws", "dagster_k8s", "mm_pipelines.defs", "mm_pipelines.cli"},
    "serving": {"dagster", "mm_pipelines.defs", "mm_pipelines.cli"},
}


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _violations(layer: str) -> list[str]:
    found = []
    for path in _modules(layer):
        for name in sorted(_imports(path)):
            for banned in FORBIDDEN[layer]:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    assert _modules(layer), f"no modules found for layer {layer}"
    assert _violations(layer) == []


def _reads_environment(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        # os.environ / os.getenv / os.putenv, and settings.env(...) used as a back door
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("environ", "getenv", "putenv")
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            lines.append(node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr == "env" and isinstance(f.value, ast.Name) and f.value.id == "settings":
                lines.append(node.lineno)
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and any(a.name in ("environ", "getenv") for a in node.names)
        ):
            lines.append(node.lineno)
    return lines


def test_only_settings_reads_the_environment() -> None:
    readers = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "settings.py" or path.parent != PACKAGE
        if (lines := _reads_environment(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert readers == {}


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checks above are not vacuous: the same functions flag a bad module."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom mlflow import log_metric\nx = os.environ.get('A')\n")
    assert "mlflow.log_metric" in _imports(bad)
    assert _reads_environment(ast.parse(bad.read_text())) == [3]


def _asset_functions() -> list[tuple[str, int]]:
    found = []
    for path in sorted((PACKAGE / "defs").rglob("assets.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and any(
                "asset" in ast.unparse(d) for d in node.decorator_list
            ):
                found.append((f"{path.parent.name}.{node.name}", node.end_lineno - node.lineno + 1))
    return found


def test_asset_bodies_stay_thin() -> None:
    """An asset resolves resources, calls one driver and turns its result into metadata."""
    assets = _asset_functions()
    assert len(assets) >= 15
    assert [(name, n) for name, n in assets if n > 40] == []


def test_loading_the_definitions_imports_no_ml_framework() -> None:
    """Dagster's code server, every step process (a pod on Kubernetes) and `mm` load the
    definitions; torch, open_clip and the rest load in the steps that use a model (they
    took ~12 s of the ~18 s the definitions took to import on 2 cores; pandas ~1.6 s)."""
    heavy = ("torch", "torchvision", "open_clip", "diffusers", "transformers", "peft")
    heavy += ("faster_whisper", "mlflow", "pandas")
    code = f"import sys, mm_pipelines.defs; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
