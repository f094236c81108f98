"""Shared by the method tests: every method's options at their declared defaults, and a
BuildContext built from real student and teacher networks on a random batch."""
from types import SimpleNamespace

import torch

import dataset.digits
import dataset.loaders
import train_student
from conftest import fast_args
from distiller_zoo import METHODS
from distiller_zoo.base import BuildContext
from models import model_dict

# CRD's 16,384 negatives need a larger data set than the tests' hundred samples.
TEST_SIZES = dict(nce_k=16)


def make_args(**overrides) -> SimpleNamespace:
    """Every registered method's options at the defaults its file declares, with overrides."""
    defaults = {opt.name: opt.default for spec in METHODS.values() for opt in spec.options}
    return SimpleNamespace(**{**defaults, **TEST_SIZES, **overrides})


def wave(*shape, phase=0.0, scale=1.0) -> torch.Tensor:
    """A float32 tensor from a closed formula (sines of the flat index), the same on every machine
    and torch version: the fixed inputs on which reference numbers were computed offline."""
    k = torch.arange(torch.Size(shape).numel(), dtype=torch.float64)
    return (scale * torch.sin(0.37 * k + phase) + 0.25 * torch.cos(1.3 * k + 2 * phase)).reshape(shape).float()


def make_ctx(s_name, t_name, batch=2, n_train=100, prepare_teacher=None, **overrides):
    """(BuildContext, the input batch) for a 10-class pair; `prepare_teacher(teacher)` may
    change the teacher before its features are taken."""
    torch.manual_seed(0)
    student = model_dict[s_name](num_classes=10)
    teacher = model_dict[t_name](num_classes=10).eval()
    if prepare_teacher is not None:
        prepare_teacher(teacher)
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        feat_s, feat_t = student.forward_features(x), teacher.forward_features(x)
    ctx = BuildContext(student, teacher, feat_s, feat_t, make_args(**overrides), n_train=n_train,
                       num_classes=10, student_name=s_name, teacher_name=t_name)
    return ctx, x


def step_on_real_models(distiller, ctx, x):
    """One forward and backward of `distiller` on the context's real networks: checks that the
    loss is a finite scalar and that no teacher parameter received a gradient; (loss, parts)."""
    feat_s = ctx.student.forward_features(x)
    with torch.no_grad():
        feat_t = ctx.teacher.forward_features(x)
    loss, parts = distiller(feat_s, feat_t)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in ctx.teacher.parameters())
    return loss, parts


def quarter_digits(monkeypatch) -> None:
    """Every fourth digit, for the rest of the test: the real loader on the real images, a quarter
    of the steps."""
    full = dataset.digits.load_digits_split
    quarter = lambda train: tuple(t[::4] for t in full(train))  # noqa: E731
    for module in (dataset.digits, dataset.loaders):  # the torch path's and the in-memory path's
        monkeypatch.setattr(module, "load_digits_split", quarter)


def one_digits_epoch(monkeypatch, save, teacher_dir, method: str, *flags):
    """One epoch of `method` through train_student.py from the `digits_teacher` fixture's teacher,
    on a quarter of the digits in fp32 NCHW (no speed probe): (results, run directory)."""
    quarter_digits(monkeypatch)
    results = train_student.main(fast_args(save, "--path_t", str(teacher_dir / "best.pth"), "--distill", method,
                                           "--epochs", "1", "--batch_size", "128", "--trial", method,
                                           "--amp", "off", "--no-channels_last", *flags))
    return results, save / "students" / results["run_name"]
