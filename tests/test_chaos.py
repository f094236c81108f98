"""scripts/chaos.py on digits: runs killed by SIGKILL, SIGTERM and SIGINT (in the first epoch,
during a checkpoint write, at random) and resumed each time end exactly as uninterrupted
ones, for a teacher, KD, CRD, FT (an init stage) and QAT after distillation. Small numbers of kills keep it short;
the README reports a longer run."""
import signal
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


# CI's budget holds the teacher's and the QAT run's chaos proofs; the students' are `make test-slow`'s
@pytest.mark.parametrize("method, extra", [pytest.param("kd", [], marks=pytest.mark.slow),
                                           pytest.param("crd", ["--nce_k", "64"], marks=pytest.mark.slow),
                                           pytest.param("ft", ["--init_epochs", "1"], marks=pytest.mark.slow)])
def test_student_survives_a_kill(teacher_survives, tmp_path, method, extra):
    argv = ["--path_t", str(teacher_survives[1]), "--distill", method, *extra, *FAST]
    chaos.survive("train_student.py", argv, tmp_path, kills=1, seed=2)



def test_qat_stops_on_a_signal_and_resumes_exactly(teacher_survives, tmp_path):
    """QAT of the chaos teacher (a plain resnet8 checkpoint), distilling from it, 2 epochs: stopped
    by SIGTERM once its first checkpoint is on disk, then continued (--auto_resume), it ends as the
    uninterrupted run."""
    checkpoint = str(teacher_survives[1])
    argv = ["--qat_epochs", "2", "--init_student", checkpoint, "--path_t", checkpoint, "-r", "0.1", "-a", "0.9", *FAST]
    # the uninterrupted reference runs beside the stopped run (two cores: half the wall time)
    reference = chaos.start("train_student.py", argv, tmp_path / "reference")
    process = chaos.start("train_student.py", argv, tmp_path / "chaos")
    assert chaos.wait_for(lambda: process.poll() is None,
                          lambda: any((tmp_path / "chaos").glob("*/*/ckpt_last.pth")), limit_s=600)
    process.send_signal(signal.SIGTERM)
    err = process.communicate()[1].strip().splitlines()[-1]
    assert "ckpt_last.pth keeps main epoch 1" in err and "go on with: python train_student.py --resume" in err, err
    chaos.finish("train_student.py", argv, tmp_path / "chaos")
    reference_err = reference.communicate()[1]
    assert reference.returncode == 0, reference_err
    assert chaos.differences(chaos.run_dir_of(tmp_path / "reference"), chaos.run_dir_of(tmp_path / "chaos")) == []
