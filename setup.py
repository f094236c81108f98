"""Installs DistillBench under the single top-level name `distillbench`.

The checkout keeps the project's folders as top-level packages (`python train_student.py` from
the checkout root). An installed copy must not claim generic names such as `models`, `dataset`
or `evaluate` (Hugging Face's package), so the build places every package under `distillbench`
and rewrites the absolute imports between them in the copies it installs; the checkout's files
are untouched. The rewrite works on the syntax tree, not on text: only real import statements
change (never a docstring or a comment that looks like one), every rewritten file is compiled,
and the build fails if one does not compile or still imports a project module by its bare name.

The console commands and the entry-point modules come from engine/programs.py, the suite's one
table of its programs. setup.py executes that file by its path instead of importing `engine`:
in an isolated build (pip's default) neither torch nor the project's packages can be imported,
and engine/programs.py imports nothing.
"""
import ast
import runpy
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGES = ("core", "models", "dataset", "crd", "distiller_zoo", "engine", "deploy", "scripts")
PROGRAMS = runpy.run_path(str(Path(__file__).resolve().parent / "engine" / "programs.py"))
MODULES = PROGRAMS["entry_modules"]()
OURS = frozenset(PACKAGES + MODULES)
ROOT_PACKAGE = "distillbench"


def _ours(dotted: str) -> bool:
    return dotted.split(".")[0] in OURS


def _import_alias(alias: ast.alias) -> str:
    """One name of an `import` statement, as it must read inside the installed package."""
    name, bound = alias.name, alias.asname
    if not _ours(name):
        return f"import {name}" + (f" as {bound}" if bound else "")
    if bound:
        return f"import {ROOT_PACKAGE}.{name} as {bound}"
    top = name.split(".")[0]
    # `import engine.checkpoint` binds `engine` and loads its submodule: do both under the new name
    loads = f"import {ROOT_PACKAGE}.{name}; " if "." in name else ""
    return f"{loads}from {ROOT_PACKAGE} import {top}"


def _is_checkout_path_insert(node: ast.AST) -> bool:
    """`sys.path.insert(...)`: the scripts put the checkout root on sys.path; installed, the
    package is importable already."""
    call = node.value if isinstance(node, ast.Expr) else None
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "insert"
            and ast.unparse(call.func.value) == "sys.path")


def _replacement(node: ast.AST, segment: str):
    if isinstance(node, ast.Import) and any(_ours(a.name) for a in node.names):
        return "; ".join(_import_alias(a) for a in node.names)
    if isinstance(node, ast.ImportFrom) and node.level == 0 and _ours(node.module):
        keyword, rest = segment.split(None, 1)
        return f"{keyword} {ROOT_PACKAGE}.{rest}"
    if _is_checkout_path_insert(node):
        return "pass"
    return None


def namespaced(source: str, filename: str = "<source>") -> str:
    """The module's source with every project import moved under `distillbench`."""
    data = source.encode()
    line_starts = [0]
    for line in data.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    edits = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr)):
            continue
        # ast's column offsets count UTF-8 bytes
        start = line_starts[node.lineno - 1] + node.col_offset
        end = line_starts[node.end_lineno - 1] + node.end_col_offset
        new = _replacement(node, data[start:end].decode())
        if new is not None:
            edits.append((start, end, new.encode()))
    for start, end, new in sorted(edits, reverse=True):
        data = data[:start] + new + data[end:]
    result = data.decode()
    _check_namespaced(result, filename)
    return result


def _check_namespaced(source: str, filename: str) -> None:
    compile(source, filename, "exec")
    for node in ast.walk(ast.parse(source, filename)):
        bare = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        if any(_ours(name) for name in bare):
            raise RuntimeError(f"{filename}:{node.lineno}: still imports a project module by its bare name")


class BuildNamespaced(build_py):
    """build_py, plus the entry-point modules moved into the package and every import namespaced."""

    def run(self):
        super().run()
        package = Path(self.build_lib) / ROOT_PACKAGE
        for module in MODULES:
            shutil.copyfile(f"{module}.py", package / f"{module}.py")
        for path in package.rglob("*.py"):
            path.write_text(namespaced(path.read_text(), str(path)))


setup(
    name="distillbench",
    version="0.1.0",
    description="Knowledge-distillation benchmark suite: RepDistiller-compatible model zoo, "
    "the published distillation methods, reproduction scripts and comparison tables.",
    python_requires=">=3.9",
    packages=["distillbench"] + [f"distillbench.{p}" for p in PACKAGES],
    package_dir={"distillbench": "distillbench", **{f"distillbench.{p}": p for p in PACKAGES}},
    package_data={"distillbench.scripts": ["*.csv", "*.sh"]},
    cmdclass={"build_py": BuildNamespaced},
    entry_points={"console_scripts": [p.console_script(ROOT_PACKAGE) for p in PROGRAMS["PROGRAMS"]]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "tensorboard>=2.10",
        "numpy>=1.22",
        "scipy>=1.8",
        "pandas>=1.4",
        "scikit-learn>=1.0",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "tabulate>=0.8",
        "pyyaml>=5.4",
    ],
    extras_require={
        "test": ["pytest>=7", "import-linter>=2.0", "submitit>=1.5", "ruff>=0.5"],
        # the table scripts' --launcher slurm / submitit-local (scripts/slurm.py)
        "slurm": ["submitit>=1.5"],
        # export, int8 and QAT (deploy/): torch.onnx's exporter needs onnx and onnxscript
        "deploy": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18", "torchao>=0.12"],
        # --loader jpeg's decoders (dataset/image_codec.py; torchvision.io's without it)
        "imagenet": ["torchcodec>=0.16"],
        # timm:NAME networks as teacher or student
        "timm": ["timm>=1.0"],
        # scripts/tune.py's studies (its retry callback is 4.9's RetryHeartbeatStaleTrialCallback)
        "tune": ["optuna>=4.9"],
    },
)
