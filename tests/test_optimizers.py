"""--optimizer adamw, --clip_grad and --lr_schedule cosine with --warmup_epochs (engine/optim.py):
the optimiser the flags build, the bound on the gradients' total norm (checked by hand, under
fp16's loss scaling too), the schedule (by hand and against timm's scheduler), the bad inputs,
and an exact resume of an AdamW run."""
import csv
import math

import pytest
import torch

import train_student
import train_teacher
from conftest import crash_after_checkpoint, fast_args, read_json
from core.errors import UserError
from deploy import qat_run
from engine import student_run
from engine.build import build_model
from engine.checkpoint import save_checkpoint
from engine.config import TeacherConfig
from engine.optim import build_optimizer, lr_at, minimise
from method_helpers import quarter_digits

CPU = torch.device("cpu")


def _gradients_after(clip, scaler):
    """The gradients `minimise` leaves for a fixed two-parameter loss, and their norm before any
    clipping, computed here by hand: d/dw of sum(w * x) is x."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))
    x, y = torch.tensor([[3.0, -4.0], [12.0, 0.0], [1.0, 2.0]]), torch.tensor([5.0, -7.0])
    loss = (w * x).sum() + (b * y).sum()
    opt = torch.optim.SGD([w, b], lr=0.0)
    minimise(opt, scaler, {"loss": loss}, clip)
    by_hand = math.sqrt(sum(v * v for v in x.flatten().tolist() + y.tolist()))
    return [w.grad, b.grad], (x, y), by_hand


@pytest.mark.parametrize("scaled", [False, True])
def test_clip_grad_bounds_the_total_norm_after_unscaling(scaled):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
    grads, (x, y), norm = _gradients_after(2.0, scaler)
    assert norm == pytest.approx(math.sqrt(9 + 16 + 144 + 1 + 4 + 25 + 49))  # 15.49...
    factor = 2.0 / (norm + 1e-6)  # torch's clip coefficient, below 1 here
    torch.testing.assert_close(grads[0], x * factor)
    torch.testing.assert_close(grads[1], y * factor)
    assert torch.cat([g.flatten() for g in grads]).norm().item() == pytest.approx(2.0, rel=1e-5)
    unclipped, (x, y), _ = _gradients_after(None, scaler)   # no bound: the loss's own gradients
    torch.testing.assert_close(unclipped[0], x)             # (the scaler's step unscales them in place)
    big, (x, _), _ = _gradients_after(100.0, scaler)        # a bound above the norm changes nothing
    torch.testing.assert_close(big[0], x)


def test_adamw_is_built_from_the_flags_with_decay_on_weights_only():
    net = build_model("resnet8", 10)
    flags = ["--model", "resnet8", "--dataset", "digits", "--optimizer", "adamw", "--learning_rate", "5e-4",
             "--weight_decay", "0.05", "--clip_grad", "5"]
    config = TeacherConfig.from_dict(vars(train_teacher.parse_args(flags)))
    assert (config.optimizer, config.clip_grad, config.main_optimizer) == ("adamw", 5.0, "adamw")
    opt = build_optimizer(net.parameters(), config, CPU, main_stage=True)
    assert type(opt) is torch.optim.AdamW
    decayed, plain = opt.param_groups
    assert (decayed["lr"], decayed["betas"], decayed["eps"]) == (5e-4, (0.9, 0.999), 1e-8)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    assert {p.ndim for p in decayed["params"]} == {2, 4} and {p.ndim for p in plain["params"]} == {1}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(net.parameters()))
    init = build_optimizer(net.parameters(), config, CPU, main_stage=False)   # an init stage keeps SGD
    default = TeacherConfig.from_dict(vars(train_teacher.parse_args(flags[:4])))
    assert type(init) is type(build_optimizer(net.parameters(), default, CPU, True)) is torch.optim.SGD
    assert (default.optimizer, default.clip_grad) == ("sgd", None)


def _schedule(**flags):
    config = TeacherConfig(model="resnet8", dataset="digits", epochs=10, learning_rate=5e-4, **flags)
    return [lr_at(epoch, config) for epoch in range(1, 11)]


def test_cosine_schedule_after_a_linear_warm_up():
    lrs = _schedule(lr_schedule="cosine", warmup_epochs=3, warmup_lr=5e-7, min_lr=1e-5)
    step = (5e-4 - 5e-7) / 3
    assert lrs[:3] == pytest.approx([5e-7, 5e-7 + step, 5e-7 + 2 * step], rel=1e-12)
    # epoch 4 is t = 3 of the cosine over all 10 epochs: 1e-5 + 0.5 * 4.9e-4 * (1 + cos(0.3 pi))
    assert lrs[3] == pytest.approx(1e-5 + 0.245e-3 * (1 + 0.5877852522924731), rel=1e-12)
    assert lrs[9] == pytest.approx(1e-5 + 0.245e-3 * (1 - 0.9510565162951535), rel=1e-12)
    timm_scheduler = pytest.importorskip("timm.scheduler")   # the scheduler OFA-KD's train.py steps per epoch
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    reference = timm_scheduler.CosineLRScheduler(opt, t_initial=10, lr_min=1e-5, warmup_lr_init=5e-7, warmup_t=3)
    timm_lrs = []
    for t in range(10):
        reference.step(t)
        timm_lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx(timm_lrs, rel=1e-12)


def test_step_schedule_is_unchanged_and_takes_the_warm_up():
    assert _schedule(lr_decay_epochs=[5, 8]) == pytest.approx([5e-4] * 5 + [5e-5] * 3 + [5e-6] * 2)
    warm = _schedule(lr_decay_epochs=[5, 8], warmup_epochs=2)
    assert warm == pytest.approx([0.0, 2.5e-4] + [5e-4] * 3 + [5e-5] * 3 + [5e-6] * 2)


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "3", "--warmup_epochs", "3"], "--warmup_epochs 3 leaves no epoch of the schedule"),
    (["--lr_schedule", "cosine", "--min_lr", "0.1", "--learning_rate", "0.1"], "--min_lr 0.1 must be below"),
])
def test_a_schedule_that_cannot_run_is_one_line(flags, message):
    with pytest.raises(UserError, match=message):
        TeacherConfig.from_dict(vars(train_teacher.parse_args(["--model", "resnet8", *flags])))


@pytest.mark.parametrize("flags, message", [
    (["--lr_schedule", "linear"], "--lr_schedule"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be an integer >= 0"),
    (["--warmup_lr", "nan"], "--warmup_lr must be a number >= 0"),
    (["--min_lr=-1e-5"], "--min_lr must be a number >= 0"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--clip_grad", "0"], "--clip_grad must be a positive number, got 0"),
    (["--clip_grad", "-1"], "--clip_grad must be a positive number"),
    (["--clip_grad", "nan"], "--clip_grad must be a positive number"),
    (["--clip_grad", "inf"], "--clip_grad must be a positive number"),
])
def test_bad_optimiser_flags_are_one_line(flags, message):
    with pytest.raises(UserError, match=message):
        train_teacher.parse_args(["--model", "resnet8", *flags])


@pytest.fixture
def random_teacher(tmp_path):
    path = tmp_path / "teacher.pth"
    save_checkpoint({"model": build_model("resnet8", 10).state_dict(), "arch": "resnet8"}, path)
    return str(path)


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "adamw"], "--dot is a variant of SGD with momentum"),
    (["--clip_grad", "5"], "--dot steps its two gradient shares itself"),
])
def test_dot_refuses_adamw_and_clipping(tmp_path, capsys, random_teacher, flags, message):
    with pytest.raises(SystemExit) as stopped:
        train_student.main(fast_args(tmp_path / "save", "--path_t", random_teacher, "--dot", *flags))
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "save").exists()


def test_an_adamw_student_is_a_run_and_table_row_of_its_own(random_teacher):
    args = train_student.parse_args(["--dataset", "digits", "--path_t", random_teacher, "--optimizer", "adamw"])
    assert student_run.configure(vars(args)).config.method == "kd+adamw"
    args = train_student.parse_args(["--dataset", "digits", "--path_t", random_teacher])
    assert student_run.configure(vars(args)).config.method == "kd"


def test_qat_keeps_its_own_recipe(random_teacher):
    """QAT after distillation steps SGD at its constant --qat_lr whatever the distillation's
    optimiser and schedule flags say."""
    args = train_student.parse_args(["--dataset", "digits", "--qat_epochs", "2", "--init_student", random_teacher,
                                     "--optimizer", "adamw", "--clip_grad", "5", "--lr_schedule", "cosine",
                                     "--warmup_epochs", "5"])
    config = qat_run.configure(vars(args)).config
    assert (config.main_optimizer, config.clip_grad, config.warmup_epochs) == ("sgd", None, 0)


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in csv.DictReader(f)]


def test_an_adamw_run_with_clipping_resumes_exactly(tmp_path, monkeypatch):
    quarter_digits(monkeypatch)
    flags = ["--model", "resnet8", "--epochs", "2", "--batch_size", "256", "--deterministic", "--optimizer",
             "adamw", "--learning_rate", "2e-3", "--weight_decay", "0.05", "--clip_grad", "1"]
    bounds = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, bound: bounds.append(bound) or clip(params, bound))
    train_teacher.main(fast_args(tmp_path / "full", *flags))
    assert bounds and set(bounds) == {1.0}   # every step of the main stage is clipped
    crash_after_checkpoint(train_teacher.main, fast_args(tmp_path / "cut", *flags), monkeypatch, epoch=1)
    train_teacher.main(fast_args(tmp_path / "cut", "--resume", str(tmp_path / "cut/teachers/resnet8_digits_trial0")))
    full, cut = (tmp_path / name / "teachers/resnet8_digits_trial0" for name in ("full", "cut"))
    assert _rows(full) == _rows(cut) and len(_rows(cut)) == 2
    ends = [torch.load(run / "ckpt_last.pth", weights_only=False) for run in (full, cut)]
    for key, value in ends[0]["model"].items():
        assert torch.equal(value, ends[1]["model"][key]), key
    assert "exp_avg_sq" in next(iter(ends[1]["optimizer"]["state"].values()))
    assert (read_json(cut / "args.json")["optimizer"], read_json(cut / "args.json")["clip_grad"]) == ("adamw", 1.0)
