"""`pip install .` installs one top-level package, `distillbench`, whose copies of the project's
modules import each other under that name; the console commands and the published-number CSV
come with it; the checkout is untouched.

The end-to-end test installs the wheel into a fresh virtual environment (its dependencies come
from this interpreter's site-packages through a .pth file, so nothing is downloaded), compiles
and imports every module of the installed copy, runs each console command's target with --help
in that process and trains one digits epoch with an installed console command."""
import importlib
import json
import re
import runpy
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import setuptools

from conftest import ROOT
from engine.programs import PROGRAMS

GENERIC = {"core", "models", "dataset", "crd", "distiller_zoo", "engine", "deploy", "scripts", "evaluate",
           "train_student", "train_teacher", "train_mutual", "train_self"}
COMMANDS = tuple(program.command for program in PROGRAMS)


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions, read without running setup(); `setup_kwargs` holds what it would
    have been given."""
    real, given = setuptools.setup, {}
    setuptools.setup = lambda **kwargs: given.update(kwargs)
    try:
        return {**runpy.run_path(str(ROOT / "setup.py")), "setup_kwargs": given}
    finally:
        setuptools.setup = real


def test_the_console_commands_are_the_programs_table(setup_py):
    declared = {}
    for line in setup_py["setup_kwargs"]["entry_points"]["console_scripts"]:
        command, target = (part.strip() for part in line.split("="))
        declared[command] = target
    assert declared == {p.command: f"distillbench.{p.module}:{p.target}" for p in PROGRAMS}
    assert set(COMMANDS) >= {"distillbench-train-teacher", "distillbench-train-student", "distillbench-train-mutual",
                             "distillbench-train-self", "distillbench-evaluate", "distillbench-table"}
    # every top-level entry point is installed, and each console target exists
    assert set(setup_py["MODULES"]) == {"train_teacher", "train_student", "train_mutual", "train_self", "evaluate"}
    for program in PROGRAMS:
        obj = importlib.import_module(program.module)
        for attribute in program.target.split("."):
            obj = getattr(obj, attribute)
        assert callable(obj), program.command


def test_setup_py_reads_the_table_without_the_project_or_torch_importable(tmp_path):
    """An isolated build: setup.py run from a copy of the two files it reads, in an interpreter
    where importing torch or any project package fails."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "programs.py").write_text((ROOT / "engine" / "programs.py").read_text())
    (tmp_path / "setup.py").write_text((ROOT / "setup.py").read_text())
    probe = ("import builtins, runpy, setuptools\n"
             "real = builtins.__import__\n"
             "def guarded(name, globals=None, locals=None, fromlist=(), level=0):\n"
             "    if level == 0 and name.split('.')[0] in {'torch', 'engine', 'core', 'models'}:\n"
             "        raise ImportError(name)\n"
             "    return real(name, globals, locals, fromlist, level)\n"
             "builtins.__import__ = guarded\n"
             "given = {}\n"
             "setuptools.setup = lambda **kw: given.update(kw)\n"
             "runpy.run_path('setup.py')\n"
             "print(len(given['entry_points']['console_scripts']))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) == len(PROGRAMS)


def test_the_rewrite_changes_real_imports_only(setup_py):
    source = ('"""Docs quoting `from engine.x import y` and\nimport models."""\n'
              "import os, engine.checkpoint\n"
              "import models as zoo\n"
              "from distiller_zoo.base import (Distiller,\n    register)\n"
              "from . import sibling\n"
              "import modelsx\n"
              "def f():\n"
              "    import engine\n"
              "    sys.path.insert(0, 'checkout')\n"
              "    text = 'import core'  # × a non-ASCII comment before an edit on the same line\n")
    expected = ('"""Docs quoting `from engine.x import y` and\nimport models."""\n'
                "import os; import distillbench.engine.checkpoint; from distillbench import engine\n"
                "import distillbench.models as zoo\n"
                "from distillbench.distiller_zoo.base import (Distiller,\n    register)\n"
                "from . import sibling\n"
                "import modelsx\n"
                "def f():\n"
                "    from distillbench import engine\n"
                "    pass\n"
                "    text = 'import core'  # × a non-ASCII comment before an edit on the same line\n")
    assert setup_py["namespaced"](source) == expected


def test_a_copy_that_still_imports_a_bare_project_name_fails_the_build(setup_py):
    setup_py["_check_namespaced"]("from distillbench import engine\nimport numpy\n", "fine.py")
    with pytest.raises(RuntimeError, match="bad.py:2: still imports"):
        setup_py["_check_namespaced"]("import numpy\nfrom engine.loop import run\n", "bad.py")
    with pytest.raises(SyntaxError):
        setup_py["_check_namespaced"]("def broken(:\n", "broken.py")


def build_wheel(folder):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(folder.glob("distillbench-*.whl"))


def fresh_venv_with(wheel, folder):
    """A new virtual environment holding the wheel, its dependencies seen through a .pth file."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # appended after the venv's own site-packages, so the fresh copy of distillbench wins
    (folder / site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


IMPORT_EVERYTHING = """
import compileall, importlib, pathlib, sys
import distillbench
root = pathlib.Path(distillbench.__file__).parent
assert compileall.compile_dir(str(root), quiet=1), 'a module of the installed copy does not compile'
names = sorted('distillbench.' + '.'.join(p.relative_to(root).with_suffix('').parts).replace('.__init__', '')
               for p in root.rglob('*.py'))
for name in names:
    importlib.import_module(name.removesuffix('.__init__'))
generic = sorted(set(sys.modules) & {generic!r})
# each console command's target, run as its script would run it (one process for all of them;
# the training run below goes through a console script itself)
import contextlib, io
from importlib.metadata import entry_points
for command in {commands!r}:
    [target] = [e for e in entry_points(group='console_scripts') if e.name == command]
    sys.argv, out = [command, '--help'], io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            target.load()()
        except SystemExit as stop:
            assert stop.code == 0, (command, stop.code)
    assert 'usage:' in out.getvalue(), command
print(len(names), generic)
"""


def test_the_wheel_installs_one_namespace_that_works_alone(tmp_path):
    wheel = build_wheel(tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    tops = {name.split("/")[0].removesuffix(".py") for name in names}
    assert not tops & GENERIC and "distillbench" in tops
    assert "distillbench/scripts/published_cifar100.csv" in names
    assert all(command in entry_points for command in COMMANDS)

    venv = tmp_path / "venv"
    python = fresh_venv_with(wheel, venv)
    run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=300)
    done = subprocess.run([str(python), "-c", IMPORT_EVERYTHING.format(generic=GENERIC, commands=COMMANDS)], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    count, generic = done.stdout.split(" ", 1)
    assert int(count) > 100 and generic.strip() == "[]"
    assert all((venv / "bin" / command).is_file() for command in COMMANDS)

    # the demo's teacher, where the README's library snippet reads it, trained by the installed command
    done = subprocess.run([str(venv / "bin" / "distillbench-train-teacher"), "--dataset", "digits", "--model",
                           "resnet20", "--epochs", "1", "--save_dir", "save/demo", "--amp", "off"], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "save/demo/teachers/resnet20_digits_trial0/results.json").read_text())
    assert results["epochs"] == 1 and 0 <= results["best_top1"] <= 100

    snippet = readme_library_snippet() + ("\nassert torch.isfinite(loss) and student.conv1.weight.grad is not None"
                                          "\nassert results['epochs'] == 1 and config.learning_rate == 0.05\n")
    done = subprocess.run([str(python), "-c", snippet], **run)
    assert done.returncode == 0, done.stderr[-3000:]


def readme_library_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Use it as a library"):]
    section = section[:section.index("\n## ")]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))
