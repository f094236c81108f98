"""scripts/chaos.py on digits: runs killed by SIGKILL, SIGTERM and SIGINT (in the first epoch,
during a checkpoint write, at random) and resumed each time end exactly as uninterrupted
ones, for a teacher, KD, CRD and FT (an init stage). Small numbers of kills keep it short;
the README reports a longer run."""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import chaos  # noqa: E402

FAST = ["--dataset", "digits", "--epochs", "2", "--batch_size", "256", "--deterministic", "--amp", "off",
        "--no-channels_last", "--print_freq", "1"]


@pytest.fixture(scope="module")
def teacher_survives(tmp_path_factory):
    """The teacher's chaos run (three kills: one at each moment); its final checkpoint is the
    teacher of the students."""
    save = tmp_path_factory.mktemp("chaos_teacher")
    delivered = chaos.survive("train_teacher.py", ["--model", "resnet8", *FAST], save, kills=3, seed=1)
    return delivered, chaos.run_dir_of(save / "chaos") / "ckpt_last.pth"


def test_teacher_survives_kills(teacher_survives):
    assert teacher_survives[0] >= 2


@pytest.mark.parametrize("method, extra", [("kd", []), ("crd", ["--nce_k", "64"]), ("ft", ["--init_epochs", "1"])])
def test_student_survives_a_kill(teacher_survives, tmp_path, method, extra):
    argv = ["--path_t", str(teacher_survives[1]), "--distill", method, *extra, *FAST]
    chaos.survive("train_student.py", argv, tmp_path, kills=1, seed=2)
