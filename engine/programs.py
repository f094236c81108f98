"""The suite's programs, in one table: each entry point's module, its console command, and for
the trainers the run kind (the folder under --save_dir that holds its runs) and the stored
argument naming the network it trains.

Read by setup.py (console commands, the top-level modules it installs), engine/runs.py and
engine/session.py (run directories, resume lines, what a resume requires), the entry points
(their kind) and scripts/run_commands.py (which command lines it can run).

This module imports nothing, on purpose: setup.py executes this file by its path (runpy) at
build time, when an isolated build has neither torch nor the project's packages importable.
"""


class Program:
    """One program. `target` is the console script's object inside `module`; `kind` and
    `trained` are None for programs that do not train."""

    def __init__(self, module, command, target="main.command", kind=None, trained=None):
        self.module, self.command, self.target = module, command, target
        self.kind, self.trained = kind, trained

    @property
    def script(self):
        """The checkout's file that runs the program (`python train_student.py ...`)."""
        return self.module.replace(".", "/") + ".py"

    def console_script(self, package):
        return f"{self.command} = {package}.{self.module}:{self.target}"


TEACHER = Program("train_teacher", "distillbench-train-teacher", kind="teachers", trained="model")
STUDENT = Program("train_student", "distillbench-train-student", kind="students", trained="model_s")
MUTUAL = Program("train_mutual", "distillbench-train-mutual", kind="mutual", trained="models")
SELF = Program("train_self", "distillbench-train-self", kind="self", trained="model")
TRAINERS = (TEACHER, STUDENT, MUTUAL, SELF)
PROGRAMS = TRAINERS + (Program("evaluate", "distillbench-evaluate"),
                       Program("scripts.make_table", "distillbench-table", target="main"))


# the trainer whose runs live under save/<kind>/
BY_KIND = {program.kind: program for program in TRAINERS}


def entry_modules():
    """The programs that are top-level files of the checkout (train_*.py, evaluate.py)."""
    return tuple(p.module for p in PROGRAMS if "." not in p.module)
