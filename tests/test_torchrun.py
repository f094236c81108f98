"""train_student.py under torchrun: two CPU ranks (Gloo) distil with CRD on digits. Rank 0
alone writes the run directory, and the accuracy the run logged over the sharded test split
equals a single-process evaluation of the checkpoint it saved (so shards are gathered and the
ranks' BatchNorm statistics agree with what was saved)."""
import csv
import subprocess
import sys

import pytest
import torch

import evaluate
from conftest import ROOT, fast_args, read_json

EPOCHS = 2


@pytest.mark.skipif(sys.platform != "linux" or not torch.distributed.is_available(),
                    reason="Gloo ranks on Linux")
def test_two_ranks_distil_with_crd_and_log_what_they_saved(digits_teacher, tmp_path):
    _, teacher_dir = digits_teacher
    save = tmp_path / "save"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_student.py"), "--path_t", str(teacher_dir / "best.pth"),
               "--model_s", "resnet8", "--distill", "crd", "--nce_k", "64", "--batch_size", "32",
               "--epochs", str(EPOCHS), "--num_workers", "0", *fast_args(save)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]

    [run_dir] = (save / "students").iterdir()
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert "train_crd" in rows[0]
    results = read_json(run_dir / "results.json")
    assert results["epochs"] == EPOCHS

    report = evaluate.main([str(run_dir / "ckpt_last.pth"), "--dataset", "digits", "--device", "cpu",
                            "--latency_runs", "1", "--latency_warmup", "0", "--cpu_threads", "1"])
    assert report["top1"] == pytest.approx(float(rows[-1]["test_top1"]), abs=1e-6)
    assert results["last_top1"] == pytest.approx(report["top1"], abs=1e-6)
