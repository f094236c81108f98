"""`pip install .` installs one top-level package, `distillbench`, whose copies of the project's
modules import each other under that name; the console commands and the published-number CSV
come with it; the checkout is untouched."""
import subprocess
import sys
import zipfile

from conftest import ROOT

GENERIC = {"core", "models", "dataset", "crd", "distiller_zoo", "engine", "deploy", "scripts", "evaluate",
           "train_student", "train_teacher", "train_mutual", "train_self"}


def build_wheel(folder):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return next(folder.glob("distillbench-*.whl"))


def test_the_wheel_installs_one_namespace_that_works_alone(tmp_path):
    wheel = build_wheel(tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    tops = {name.split("/")[0].removesuffix(".py") for name in names}
    assert not tops & GENERIC and "distillbench" in tops
    assert "distillbench/scripts/published_cifar100.csv" in names
    for command in ("distillbench-train-teacher", "distillbench-train-student", "distillbench-train-mutual",
                    "distillbench-train-self", "distillbench-evaluate", "distillbench-table"):
        assert command in entry_points
    probe = ("import sys\n"
             "import distillbench.train_student as ts\n"
             "from distillbench.scripts import make_table\n"
             "assert ts.parse_args(['--distill', 'crd', '--nce_k', '8']).nce_k == 8\n"
             "assert all(p.is_file() for p in make_table.PUBLISHED.values())\n"
             "print(sorted(set(sys.modules) & " + repr(GENERIC) + "))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
