"""A run's precision and memory format are measured once, when it starts, and kept in its
checkpoints: a resumed run computes as it started, whatever a new measurement under another
machine load would choose."""
import torch

import engine.trainer
import train_teacher
from conftest import crash_after_checkpoint, fast_args


def test_a_resumed_run_keeps_the_execution_it_started_with(tmp_path, monkeypatch, capsys):
    flags = fast_args(tmp_path, "--model", "resnet8", "--epochs", "2", "--batch_size", "256",
                      "--amp", "off", "--channels_last")
    crash_after_checkpoint(train_teacher.main, flags, monkeypatch, epoch=1)
    run_dir = tmp_path / "teachers" / "resnet8_digits_trial0"
    recorded = torch.load(run_dir / "ckpt_last.pth", weights_only=False)["execution"]
    assert recorded == {"amp": "fp32", "channels_last": True}

    def measured_again(*args, **kwargs):
        raise AssertionError("a resumed run must not measure its execution again")

    monkeypatch.setattr(engine.trainer, "resolve_execution", measured_again)
    capsys.readouterr()
    train_teacher.main(flags + ["--resume"])
    assert "fp32, channels_last (as the run started)" in capsys.readouterr().out
    assert torch.load(run_dir / "ckpt_last.pth", weights_only=False)["execution"] == recorded
