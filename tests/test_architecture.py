"""The layers of the package: the torch-only library never reaches up into the applications built on it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitlora"
APPLICATIONS = ("vitlora.cli", "vitlora.training", "vitlora.compare", "vitlora.serving", "vitlora.explain")
FORBIDDEN_IN_LIBRARY = ("lightning", "pytorch_lightning", "subprocess", "yaml", "jsonargparse", *APPLICATIONS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """Every import in the file, at any depth (function-level imports too): (line, module, names)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


LIBRARY = sorted(
    path for path in PACKAGE.glob("*.py") if module_name(path) not in APPLICATIONS and path.name != "__init__.py"
)
EVERY_MODULE = sorted(PACKAGE.rglob("*.py"))


def test_the_library_is_most_of_the_flat_top_level():
    assert {path.stem for path in LIBRARY} >= {"lora", "targets", "prompts", "trainable", "adapter", "apply", "merge"}


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_library_modules_import_no_application_nor_lightning_subprocess_or_yaml(path):
    bad = [
        f"line {line}: {module}"
        for line, module, _ in imported_modules(path)
        if any(module == name or module.startswith(name + ".") for name in FORBIDDEN_IN_LIBRARY)
    ]
    assert not bad, f"{path.name} is library code but imports {bad}"


@pytest.mark.parametrize("path", EVERY_MODULE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_the_package_namespace_back(path):
    """``from vitlora import X`` inside the package ties it to __init__'s re-exports and invites cycles."""
    if path == PACKAGE / "__init__.py":
        return
    bad = [f"line {line}" for line, module, _ in imported_modules(path) if module == "vitlora"]
    assert not bad, f"{path.relative_to(PACKAGE)} imports from the vitlora namespace itself at {bad}"


def test_importing_the_library_loads_no_lightning_and_the_cli_starts_without_it():
    code = (
        "import sys, vitlora, vitlora.cli; "
        "loaded = sorted(m for m in ('lightning', 'pytorch_lightning', 'torchmetrics') if m in sys.modules); "
        "print(','.join(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_public_api_is_the_library_alone():
    import vitlora

    modules = {
        getattr(vitlora, name).__module__ for name in vitlora.__all__ if hasattr(getattr(vitlora, name), "__module__")
    }
    assert not [m for m in modules if m.startswith(APPLICATIONS)]
    assert len(vitlora.__all__) <= 50


def test_public_functions_document_their_arguments():
    """torchtune-style Args sections: the API reference and the CLI help read them."""
    import inspect

    import vitlora

    undocumented = [
        name
        for name in vitlora.__all__
        if inspect.isfunction(obj := getattr(vitlora, name))
        and inspect.signature(obj).parameters
        and "Args:" not in (inspect.getdoc(obj) or "")
    ]
    assert not undocumented
