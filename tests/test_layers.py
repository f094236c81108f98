"""The layering of docs/design.md (Layers): the import contract (.importlinter) holds, no module imports one
of the project's packages inside a function (the way a cycle is dodged), and the run wiring
(engine/) reaches the methods only through the registry's interface, never by a method's module."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from distiller_zoo import METHODS

PACKAGES = ("core", "models", "dataset", "crd", "distiller_zoo", "engine", "deploy")
# deploy/ rests on an optional extra (onnx, onnxruntime, torchao): the entry points import it
# where a deployment step runs, so that a plain run neither needs nor pays for it
OPTIONAL = {"deploy"}
METHOD_INTERFACE = {"distiller_zoo", "distiller_zoo.base", "distiller_zoo.options", "distiller_zoo.objective",
                    "distiller_zoo.temperature"}


def imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name


def source_files():
    files = [path for package in PACKAGES for path in (ROOT / package).glob("*.py")]
    return files + sorted(ROOT.glob("*.py"))


def test_import_contract_holds():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(lint).exists():
        pytest.fail("lint-imports is missing: install the test extra (pip install -e .[test])")
    done = subprocess.run([lint, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_project_import_inside_a_function(path):
    tree = ast.parse(path.read_text())
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node, module in imported_modules(function):
                top = module.split(".")[0]
                assert top not in PACKAGES or top in OPTIONAL, f"{path.name}:{node.lineno} imports {module} in a function"


def test_engine_names_no_method():
    method_modules = {f"distiller_zoo.{spec.cls.__module__.rsplit('.', 1)[-1]}" for spec in METHODS.values()
                      if spec.cls is not None} - METHOD_INTERFACE
    for path in (ROOT / "engine").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node, module in imported_modules(tree):
            assert module not in method_modules, f"engine/{path.name}:{node.lineno} imports the method {module}"
        names = {n.value.lower() for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not names & set(METHODS), f"engine/{path.name} names a method: {names & set(METHODS)}"
