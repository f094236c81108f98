"""engine/programs.py, the one table of the suite's programs, and its readers: the run
directories and resume lines (engine/), scripts/run_commands.py (every program of the table);
setup.py's console commands are checked in tests/test_packaging.py."""
import ast
import importlib

import pytest

from conftest import ROOT
from engine import programs
from engine.trainer import Trainer
from scripts import run_commands


def test_every_program_is_a_file_of_the_checkout_with_a_main():
    for program in programs.PROGRAMS:
        tree = ast.parse((ROOT / program.script).read_text())
        assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body), program.script


def test_each_trainer_starts_its_runs_under_its_own_kind():
    """The entry point passes its table row's kind to the run directory and resume logic
    (engine/session.py's configure; its library run starts under the same kind)."""
    for program in programs.TRAINERS:
        source = (ROOT / program.script).read_text()
        row = next(name for name in ("TEACHER", "STUDENT", "MUTUAL", "SELF") if getattr(programs, name) is program)
        assert f"configure(parse_args(argv), {row}.kind," in source, program.script
    assert len({p.kind for p in programs.TRAINERS}) == len(programs.TRAINERS) == 4


@pytest.mark.parametrize("program", programs.TRAINERS, ids=lambda p: p.module)
def test_run_commands_runs_a_line_of_every_trainer(program, capsys):
    assert run_commands.run_line(f"OMP_NUM_THREADS=1 python {program.script} --help")
    description = importlib.import_module(program.module).build_parser().description
    out = capsys.readouterr().out
    assert out.index("usage:") < out.index(description)   # the program's own --help


def test_run_commands_refuses_a_program_outside_the_table():
    with pytest.raises(ValueError, match="train_teacher.py, train_student.py, train_mutual.py, train_self.py"):
        run_commands.parse_line("python train_other.py --epochs 1")


def test_a_stopped_run_is_resumed_by_the_program_of_its_kind(tmp_path):
    for program in programs.TRAINERS:
        trainer = Trainer.__new__(Trainer)
        trainer.run_dir, trainer.ctx = tmp_path / program.kind / "run", type("Ctx", (), {"distributed": False})
        assert trainer._resume_command() == f"python {program.script} --resume {trainer.run_dir}"
