"""The fast path computes the same objective as the plain path.

One batch of the digits data, one distillation task (a resnet8x4 teacher -> resnet8 student with
CE + KD + AT + CRD, built by student_run.build_task from a teacher checkpoint, as a run builds
it), three copies with identical weights, one step each through engine.loop.train_epoch (the
trainer's step: move_batch, engine.precision.autocast, backward) with an lr-0 optimizer, so the
loss terms come back from the on-device meter and the gradients stay in `.grad`:

- plain: fp32, NCHW;
- fast: bf16 autocast + channels_last (Trainer's `task.to(memory_format=...)`): loss terms within
  2e-2 relative, gradient cosine similarity above 0.99;
- channels_last alone (fp32): loss terms within 1e-4 relative; gradients with a cosine similarity
  within 1e-4 of 1 and a relative L2 difference below 5e-3. An element-wise 1e-4 is below fp32's
  own accuracy on this gradient: BatchNorm's backward in training mode amplifies rounding, so
  even the plain fp32 NCHW gradient is about 4e-4 (relative L2) from a float64 computation of
  it, and channels_last kernels sum in another order (measured here: 5e-4 to 1e-3 apart).

That the in-memory and torch loaders give the same batches is tested in test_dataset.py
(same order for the same seed and epoch; identical normalised evaluation batches; training
augmentation equal to torchvision's PIL transforms by construction), so it is not repeated here.
The last test runs scripts/benchmark.py end to end on a tiny configuration.
"""
import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import engine.trainer
import train_student
from conftest import ROOT
from core.distributed import Context
from engine import student_run
from engine.build import build_model
from engine.checkpoint import save_checkpoint
from engine.loop import train_epoch
from engine.precision import Execution
from engine.session import build_data

sys.path.insert(0, str(ROOT / "scripts"))
import benchmark  # noqa: E402

CPU = torch.device("cpu")
BATCH = 16
TERMS = ("loss", "ce", "kd", "at", "crd")


@pytest.fixture(scope="module")
def task_and_batch(tmp_path_factory):
    """(DistillTask, one training batch with CRD's contrast indices)."""
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp("teacher") / "resnet8x4.pth"
    save_checkpoint({"model": build_model("resnet8x4", 10).state_dict(), "arch": "resnet8x4"}, ckpt)
    args = train_student.parse_args(["--dataset", "digits", "--model_s", "resnet8", "--path_t", str(ckpt),
                                     "--distill", "crd:0.8,at:1000", "-r", "1", "-a", "0.9",
                                     "--nce_k", "64", "--batch_size", str(BATCH), "--loader", "memory",
                                     "--seed", "0"])
    run = student_run.configure(vars(args))
    ctx = Context(device=CPU)
    loader, _, info = build_data(run.config, ctx, run.objective.needs)
    torch.manual_seed(1)
    task = student_run.build_task(run, ctx, loader, info)
    loader.set_epoch(1)
    batch = next(iter(loader))
    return task, batch


def one_step(task, batch, amp_dtype, channels_last):
    """Loss terms and the flattened gradient of every trained parameter after one trainer step;
    also the dtype and memory format the student's first convolution saw."""
    task = copy.deepcopy(task)
    if channels_last:
        task.to(memory_format=torch.channels_last)  # as engine.trainer.Trainer does
    task.train()
    task.keep_frozen_in_eval()
    params = task.main_parameters()
    seen = {}
    conv = next(m for m in task.model.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, inp, out: seen.update(
        dtype=out.dtype, channels_last=out.is_contiguous(memory_format=torch.channels_last)))
    optimizer = torch.optim.SGD(params, lr=0.0)  # the weights stay as they were; .grad remains
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    means = train_epoch(task, [batch], optimizer, scaler, device=CPU, amp_dtype=amp_dtype,
                        channels_last=channels_last, print_freq=10**9, desc="test", show_progress=False)
    hook.remove()
    terms = {name: means[f"train_{name}"] for name in TERMS}
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    return terms, grad, seen


@pytest.fixture(scope="module")
def plain(task_and_batch):
    return one_step(*task_and_batch, amp_dtype=None, channels_last=False)


def test_every_term_is_present_and_finite(plain):
    terms, grad, seen = plain
    assert seen == {"dtype": torch.float32, "channels_last": False}
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    assert all(abs(terms[name]) > 0 for name in TERMS)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bf16_channels_last_computes_the_same_objective(task_and_batch, plain):
    terms, grad, seen = one_step(*task_and_batch, amp_dtype=torch.bfloat16, channels_last=True)
    assert seen == {"dtype": torch.bfloat16, "channels_last": True}  # the fast path really ran
    for name in TERMS:
        assert terms[name] == pytest.approx(plain[0][name], rel=2e-2), name
    cosine = F.cosine_similarity(grad.double(), plain[1].double(), dim=0).item()
    assert cosine > 0.99


def test_channels_last_alone_changes_nothing_beyond_rounding(task_and_batch, plain):
    terms, grad, seen = one_step(*task_and_batch, amp_dtype=None, channels_last=True)
    assert seen == {"dtype": torch.float32, "channels_last": True}
    for name in TERMS:
        assert terms[name] == pytest.approx(plain[0][name], rel=1e-4), name
    reference = plain[1].double()
    cosine = F.cosine_similarity(grad.double(), reference, dim=0).item()
    assert 1 - cosine < 1e-4
    assert (grad.double() - reference).norm() / reference.norm() < 5e-3


def test_benchmark_runs_end_to_end(tmp_path, capsys, monkeypatch):
    # the fast path takes training's execution choice (--amp auto); fixed here, since a timed
    # probe's pick depends on the machine's load
    measured = engine.trainer.resolve_execution

    def fixed_auto(amp, channels_last, *args, **kwargs):
        if amp == "auto":
            return Execution(torch.bfloat16, True, "fixed by the test")
        return measured(amp, channels_last, *args, **kwargs)

    monkeypatch.setattr(engine.trainer, "resolve_execution", fixed_auto)  # what prepare() chooses with
    out = tmp_path / "bench.json"
    rows = benchmark.main(["--device", "cpu", "--configs", "kd:resnet8-resnet8:8", "--steps", "1",
                           "--warmup", "0", "--n_images", "32", "--num_workers", "0",
                           "--data_folder", str(tmp_path / "none"), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "kd:resnet8-resnet8:8" in printed and "synthetic" in printed
    (row,) = json.loads(out.read_text())["results"]
    assert row == rows[0]
    assert row["plain"]["loader"] == "torch" and row["fast"]["loader"] == "memory"
    assert row["plain"]["amp"] == "off" and row["fast"]["amp"] == "bfloat16"
    assert row["plain"]["optimizer"] == "for-loop" and row["fast"]["optimizer"] == "foreach"
    assert row["fast"]["images_per_s"] > 0 and row["ratio"] > 0
    assert row["projected_240_epochs_h"] == pytest.approx(240 * 50000 / row["fast"]["images_per_s"] / 3600)


def test_config_names():
    configs = benchmark.parse_configs(None)
    assert len(configs) == 2 + 5 * 2 * 2
    assert [c.name for c in benchmark.parse_configs("kd:vgg13-MobileNetV2,teacher:resnet32x4:128")] == [
        "kd:vgg13-MobileNetV2:64", "kd:vgg13-MobileNetV2:128", "teacher:resnet32x4:128"]
    with pytest.raises(SystemExit):
        benchmark.parse_configs("kd:resnet32x4")


def test_benchmark_crd_on_a_small_synthetic_set(tmp_path, capsys):
    """The synthetic set is smaller than CRD's 16,384 negatives + 1: the benchmark draws as many
    as the set allows and says so, instead of ending in CRD's error; a --nce_k above the set is
    the trainers' one-line error with status 2."""
    flags = ["--device", "cpu", "--configs", "crd:resnet8-resnet8:8", "--steps", "1", "--warmup", "0",
             "--n_images", "40", "--num_workers", "0", "--data_folder", str(tmp_path / "none")]
    out = tmp_path / "bench.json"
    (row,) = benchmark.main(flags + ["--json", str(out)])
    assert "crd with --nce_k 39" in capsys.readouterr().out
    assert json.loads(out.read_text())["meta"]["nce_k"] == 39
    assert row["fast"]["images_per_s"] > 0
    with pytest.raises(SystemExit) as stop:
        benchmark.main(flags + ["--nce_k", "40"])
    assert stop.value.code == 2
    assert "--nce_k 40 negatives need a training set larger than its 40" in capsys.readouterr().err
    assert benchmark.default_nce_k(50_000) == 16384 == benchmark.CRD_NCE_K
