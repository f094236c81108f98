"""DistillBench as an installed package.

In a checkout the project's folders are top-level packages (`models`, `engine`, ...) and the
entry points are run as `python train_student.py`. `pip install .` installs the same code under
this one name instead (`distillbench.models`, `distillbench.engine`, ...; setup.py rewrites the
imports while it builds), so no generic top-level name such as `models`, `dataset` or
`evaluate` shadows another package, and adds the console commands distillbench-train-teacher,
distillbench-train-student, distillbench-evaluate and distillbench-table.
"""
