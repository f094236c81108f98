"""Shared by the method tests: a stand-in for train_student.py's parsed arguments, and a
BuildContext built from real student and teacher networks on a random batch."""
from argparse import Namespace

import torch

from distiller_zoo.base import BuildContext
from models import model_dict

DEFAULT_ARGS = dict(kd_T=4, hint_layer=2, feat_dim=128, nce_k=16, nce_t=0.07, nce_m=0.5,
                    mode="exact", init_epochs=30)


def make_args(**overrides) -> Namespace:
    return Namespace(**{**DEFAULT_ARGS, **overrides})


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
    loss, parts = distiller(feat_s, feat_t, None, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in ctx.teacher.parameters())
    return loss, parts
