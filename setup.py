"""Installs DistillBench under the single top-level name `distillbench`.

The checkout keeps the project's folders as top-level packages (`python train_student.py` from
the checkout root). An installed copy must not claim generic names such as `models`, `dataset`
or `evaluate` (Hugging Face's package), so the build places every package under `distillbench`
and rewrites the absolute imports between them (`from engine.x import y` becomes `from
distillbench.engine.x import y`) in the copies it installs; the checkout's files are untouched.
"""
import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGES = ("core", "models", "dataset", "crd", "distiller_zoo", "engine", "deploy", "scripts")
MODULES = ("train_teacher", "train_student", "train_mutual", "train_self", "evaluate")
IMPORT = re.compile(r"^(\s*)(from|import) (" + "|".join(PACKAGES + MODULES) + r")\b", re.M)
# the scripts put the checkout root on sys.path; installed, the package is importable already
CHECKOUT_PATH = re.compile(r"^sys\.path\.insert\(0, .*\)\n", re.M)


def namespaced(source: str) -> str:
    """`import X` -> `from distillbench import X`; `from X... import` -> `from distillbench.X... import`."""
    def rewrite(match):
        indent, keyword, name = match.groups()
        return f"{indent}from distillbench import {name}" if keyword == "import" else f"{indent}from distillbench.{name}"
    return IMPORT.sub(rewrite, CHECKOUT_PATH.sub("", source))


class BuildNamespaced(build_py):
    """build_py, plus the entry-point modules moved into the package and every import namespaced."""

    def run(self):
        super().run()
        package = Path(self.build_lib) / "distillbench"
        for module in MODULES:
            shutil.copyfile(f"{module}.py", package / f"{module}.py")
        for path in package.rglob("*.py"):
            path.write_text(namespaced(path.read_text()))


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
    entry_points={"console_scripts": [
        "distillbench-train-teacher = distillbench.train_teacher:main",
        "distillbench-train-student = distillbench.train_student:main",
        "distillbench-train-mutual = distillbench.train_mutual:main",
        "distillbench-train-self = distillbench.train_self:main",
        "distillbench-evaluate = distillbench.evaluate:main",
        "distillbench-table = distillbench.scripts.make_table:main",
    ]},
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
        "test": ["pytest>=7", "import-linter>=2.0", "submitit>=1.5"],
        # the table scripts' --launcher slurm / submitit-local (scripts/slurm.py)
        "slurm": ["submitit>=1.5"],
        # export, int8 and QAT (deploy/): torch.onnx's exporter needs onnx and onnxscript
        "deploy": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18", "torchao>=0.12"],
    },
)
