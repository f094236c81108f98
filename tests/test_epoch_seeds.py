"""Random draws in training and resume: the trainer reseeds the global generators every epoch from
(seed, epoch, rank), so a network with dropout and drop-path resumed after a crash ends
bit-identical to the uninterrupted run, and a checkpoint from before that seeding resumes with
one warning line."""
import csv
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import train_teacher
from conftest import ROOT, crash_after_checkpoint, fast_args
from engine.checkpoint import save_checkpoint
from engine.resume import EPOCH_SEEDED, load_resume_state
from engine.trainer import seed_epoch
from method_helpers import quarter_digits

# timm's test ResNet with a dropout before its classifier and drop-path in its blocks: both draw
# from torch's global generator in every training step
DROPPING_NETWORK = "timm:test_resnet:drop_rate=0.5:drop_path_rate=0.2"


def _draws():
    return torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)]


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_an_epoch_seed_sets_every_generator_whatever_was_drawn_before():
    seed_epoch(5, 3, 0)
    first = _draws()
    torch.randn(100), np.random.rand(7), random.random()  # another history before the same epoch
    seed_epoch(5, 3, 0)
    assert _same(_draws(), first)
    for other in ((6, 3, 0), (5, 4, 0), (5, 3, 1)):  # another seed, epoch, rank: its own masks
        seed_epoch(*other)
        assert not torch.equal(torch.rand(4), first[0]), other


@pytest.mark.e2e
def test_a_network_with_dropout_resumed_after_a_crash_ends_as_the_uninterrupted_run(tmp_path, monkeypatch,
                                                                                    capsys):
    quarter_digits(monkeypatch)
    flags = ["--model", DROPPING_NETWORK, "--epochs", "2", "--batch_size", "64", "--amp", "off",
             "--no-channels_last"]
    train_teacher.main(fast_args(tmp_path / "full", *flags))
    crash_after_checkpoint(train_teacher.main, fast_args(tmp_path / "cut", *flags), monkeypatch, epoch=1)
    capsys.readouterr()
    train_teacher.main(fast_args(tmp_path / "cut", *flags, "--resume"))
    assert "warning" not in capsys.readouterr().err

    [full], [cut] = (list((tmp_path / run / "teachers").iterdir()) for run in ("full", "cut"))
    assert _metrics(full) == _metrics(cut)
    full_state, cut_state = (torch.load(run / "ckpt_last.pth", weights_only=False) for run in (full, cut))
    assert cut_state[EPOCH_SEEDED]
    for key, value in full_state["model"].items():
        assert torch.equal(value, cut_state["model"][key]), key


def _metrics(run_dir) -> list:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("epoch_time", "images_per_s")}
                for row in csv.DictReader(f)]


def test_a_checkpoint_from_before_epoch_seeds_resumes_with_one_warning(tmp_path, capsys):
    model = nn.Linear(3, 2)
    state = {"model": model.state_dict(), "stage": "main", "epoch": 1, "rows": 1, "optimizer": {}, "best_acc": 0.0}
    save_checkpoint(state, tmp_path / "ckpt_last.pth")
    assert load_resume_state(tmp_path, 1, 64, model, "linear")["epoch"] == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: ckpt_last.pth predates the per-epoch seeding") and "bit-identical" in line

    save_checkpoint({**state, EPOCH_SEEDED: True}, tmp_path / "ckpt_last.pth")
    load_resume_state(tmp_path, 1, 64, model, "linear")
    assert capsys.readouterr().err == ""


# train_teacher.py whose rank 0 dies right after writing epoch 1's ckpt_last.pth (torchrun then
# ends the other rank): a crash under torchrun, where no monkeypatch reaches
CRASHING_TEACHER = """import os, sys
sys.path.insert(0, {root!r})
import engine.trainer, train_teacher
real_save = engine.trainer.save_checkpoint
def save_then_die(state, path):
    real_save(state, path)
    if str(path).endswith("ckpt_last.pth") and state["epoch"] == 1:
        os._exit(3)
engine.trainer.save_checkpoint = save_then_die
train_teacher.main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(), reason="Gloo ranks on Linux")
def test_two_ranks_with_dropout_resumed_after_a_crash_end_as_the_uninterrupted_run(tmp_path):
    crashing = tmp_path / "crashing_teacher.py"
    crashing.write_text(CRASHING_TEACHER.format(root=str(ROOT)))
    flags = ["--model", DROPPING_NETWORK, "--epochs", "2", "--batch_size", "64", "--amp", "off",
             "--no-channels_last", "--num_workers", "0"]
    assert _torchrun(ROOT / "train_teacher.py", fast_args(tmp_path / "full", *flags)).returncode == 0
    assert _torchrun(crashing, fast_args(tmp_path / "cut", *flags)).returncode != 0
    resumed = _torchrun(ROOT / "train_teacher.py", fast_args(tmp_path / "cut", *flags, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [full], [cut] = (list((tmp_path / run / "teachers").iterdir()) for run in ("full", "cut"))
    assert [row["epoch"] for row in _metrics(cut)] == ["1", "2"]
    assert _metrics(full) == _metrics(cut)


def _torchrun(script, argv) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
