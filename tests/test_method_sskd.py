"""SSKD: the loss against numbers from the official code and against a loop written from the
paper's description, the teacher head's init stage (its loss, length, lr steps, all four views),
the task's rotation batch (one pass over 4B rows, CE/KD and other methods on the upright block),
gradients, the loaders' rotated views (shapes, view k = the image rotated k * 90 degrees then
cropped), the refusals, and one digits epoch through train_student.py."""
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import train_student
from conftest import fast_args, read_json
from core.errors import UserError
from dataset.digits import digits_mean_std, load_digits_split
from dataset.loaders import build_loaders
from dataset.memory import PADDING, InMemoryLoader
from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.dist import DIST
from distiller_zoo.kd import DistillKL
from distiller_zoo.options import DataNeeds
from distiller_zoo.sskd import SSKD, SSKDLoss, head_loss
from distiller_zoo.temperature import Temperature
from engine.distill_task import DistillTask
from method_helpers import make_args, one_digits_epoch
from models import model_dict


def wave(f, a, b, n, m, scale=1.0):
    k = torch.arange(n * m, dtype=torch.float64)
    return (scale * f(k * a + b)).float().view(n, m)


def official_inputs(B=4, C=5, D=6):
    """The fixed inputs of the offline run: logits and head embeddings of 4B rows in rotation blocks."""
    return (wave(torch.sin, 0.37, 0.1, 4 * B, C, 3.0), wave(torch.cos, 0.53, 0.2, 4 * B, C, 3.0),
            wave(torch.sin, 0.71, 0.3, 4 * B, D), wave(torch.cos, 0.29, 0.4, 4 * B, D), torch.tensor([0, 3, 1, 4]))


# Computed by running xuguodong03/SSKD@661b972 student.py offline on official_inputs() (rows
# reordered to its interleaved layout): loss3 (tf) and loss4 (ss) of the student loop at
# tf_T 4, ss_T 0.5, ratio_ss 0.75 and ratio_tf 1.0, 0.5, 0.25, and the teacher-head loop's loss.
OFFICIAL_TF = {1.0: 1.3429113626480103, 0.5: 1.5484524965286255, 0.25: 1.0796805620193481}
OFFICIAL_SS = 0.4117758870124817
OFFICIAL_HEAD = 1.5349159240722656


@pytest.mark.parametrize("ratio", sorted(OFFICIAL_TF))
def test_matches_the_official_code(ratio):
    ls, lt, es, et, y = official_inputs()
    tf, ss = SSKDLoss(4.0, 0.5, ratio, 0.75)(ls, lt, es, et, y)
    assert tf.item() == pytest.approx(OFFICIAL_TF[ratio], rel=1e-5)
    assert ss.item() == pytest.approx(OFFICIAL_SS, rel=1e-5)
    assert head_loss(et, 4).item() == pytest.approx(OFFICIAL_HEAD, rel=1e-5)


def loop_term(scores_s, scores_t, target, ratio, T):
    """One filtered KL term row by row: rank by sorting, keep the correct rows and the best
    floor(ratio * wrong) wrong rows, average T^2 * KL over them."""
    ranks = [sorted(range(len(row)), key=lambda j, row=row: -row[j]).index(t) for row, t in zip(scores_t, target)]
    wrong = sum(r > 0 for r in ranks)
    keep = sorted(range(len(ranks)), key=lambda r: ranks[r])[:len(ranks) - wrong + int(wrong * ratio)]
    total = 0.0
    for r in keep:
        p_t = torch.softmax(torch.tensor(scores_t[r], dtype=torch.float64) / T, 0)
        p_s = torch.softmax(torch.tensor(scores_s[r], dtype=torch.float64) / T, 0)
        total += float((p_t * (p_t.log() - p_s.log())).sum())
    return total / len(keep) * T * T


def loop_sskd(ls, lt, es, et, y, tf_ratio, ss_ratio, tf_T=4.0, ss_T=0.5):
    B = y.shape[0]
    rows = [(i, k) for i in range(B) for k in (1, 2, 3)]            # sample-major, as the official

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))
    tf = loop_term([ls[k * B + i].tolist() for i, k in rows], [lt[k * B + i].tolist() for i, k in rows],
                   [int(y[i]) for i, _ in rows], tf_ratio, tf_T)
    sim = [[[cos(e[k * B + i].double(), e[j].double()) for j in range(B)] for i, k in rows] for e in (es, et)]
    ss = loop_term(sim[0], sim[1], [i for i, _ in rows], ss_ratio, ss_T)
    return tf, ss


@pytest.mark.parametrize("tf_ratio,ss_ratio", [(1.0, 0.75), (0.5, 0.5), (0.3, 1.0)])
def test_matches_a_loop_over_rows(tf_ratio, ss_ratio):
    torch.manual_seed(1)
    B, C, D = 5, 7, 4
    ls, lt = torch.randn(4 * B, C) * 2, torch.randn(4 * B, C) * 2
    es, et = torch.randn(4 * B, D), torch.randn(4 * B, D)
    y = torch.randint(0, C, (B,))
    tf, ss = SSKDLoss(4.0, 0.5, tf_ratio, ss_ratio)(ls, lt, es, et, y)
    want_tf, want_ss = loop_sskd(ls, lt, es, et, y, tf_ratio, ss_ratio)
    assert tf.item() == pytest.approx(want_tf, rel=1e-4)
    assert ss.item() == pytest.approx(want_ss, rel=1e-4)


def test_identical_student_and_teacher_give_zero():
    ls, _, es, _, y = official_inputs()
    tf, ss = SSKDLoss()(ls, ls, es, es, y)
    assert tf.item() == pytest.approx(0, abs=1e-6) and ss.item() == pytest.approx(0, abs=1e-6)


def test_registry_and_published_values():
    spec = resolve("sskd")
    assert (spec.gamma, spec.alpha, spec.beta) == (0.1, 0.9, 1.0)
    defaults = {o.name: o.default for o in spec.options}
    assert defaults == {"sskd_tf_weight": 2.7, "sskd_ss_weight": 10.0, "sskd_tf_T": 4.0, "sskd_ss_T": 0.5,
                        "sskd_tf_ratio": 1.0, "sskd_ss_ratio": 0.75, "sskd_head_epochs": 60}
    assert SSKD.data_needs(None) == DataNeeds(rotations=True)
    with pytest.raises(UserError, match="mlkd"):
        DataNeeds(rotations=True).merge(DataNeeds(strong_view=True))


# --------------------------------------------------------------------------- the networks

class Rows(DIST):
    """DIST (no rotation need) recording how many rows it is given."""

    def forward(self, feat_s, feat_t, batch=None):
        self.rows = (feat_s.logits.shape[0], feat_t.logits.shape[0])
        return super().forward(feat_s, feat_t, batch)


def sskd_task(B=3, **options):
    torch.manual_seed(0)
    student, teacher = model_dict["resnet8"](num_classes=10), model_dict["resnet8x4"](num_classes=10).eval()
    x = torch.randn(4 * B, 3, 32, 32)
    with torch.no_grad():
        fs, ft = student.forward_features(x[:B]), teacher.forward_features(x[:B])
    ctx = BuildContext(student, teacher, fs, ft, make_args(**options), n_train=100, num_classes=10,
                       temperature=Temperature(4.0))
    sskd, other = SSKD(ctx), Rows(ctx)
    task = DistillTask(student, teacher, [("sskd", 1.0, sskd), ("other", 1.0, other)], gamma=0.1, alpha=0.9,
                       kd_term=("kd", DistillKL(4.0)), temperature=Temperature(4.0), num_classes=10)
    return task, sskd, other, x, torch.arange(B) % 10


def test_task_runs_once_on_all_rows_and_ce_kd_on_the_upright_block():
    task, sskd, other, x, y = sskd_task()
    terms, logits = task(x, y, torch.arange(3))
    assert logits.shape == (3, 10) and other.rows == (3, 3)
    with torch.no_grad():
        all_rows = task.model.forward_features(x).logits     # train mode: the batch statistics of 4B rows
        teacher_rows = task.teacher(x)
    torch.testing.assert_close(logits.detach(), all_rows[:3])
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(all_rows[:3], y).item(), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(DistillKL(4.0)(all_rows[:3], teacher_rows[:3]).item(), rel=1e-5)
    assert terms["sskd"].item() == pytest.approx((terms["sskd_tf"] + terms["sskd_ss"]).item(), rel=1e-6)
    expected = 0.1 * terms["ce"] + 0.9 * terms["kd"] + terms["sskd"] + terms["other"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["loss"].backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is None for p in sskd.head_t.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sskd.head_s.parameters())
    with pytest.raises(ValueError, match="rotations=True"):
        task(x[:3], y, torch.arange(3))


def test_the_teacher_head_stage():
    task, sskd, _, x, y = sskd_task(sskd_head_epochs=8)
    (stage,) = task.init_stages()
    assert (stage.name, stage.epochs, stage.lr_milestones) == ("init_sskd", 8, (4, 6))
    assert [stage.lr(e, None) for e in (1, 4, 5, 6, 7)] == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005])
    assert {id(p) for p in stage.params} == {id(p) for p in sskd.head_t.parameters()}
    main = {id(p) for p in task.main_parameters()}
    assert main.isdisjoint(id(p) for p in sskd.head_t.parameters()) and main >= {id(p) for p in sskd.head_s.parameters()}
    terms, _ = stage.module(x, y)
    with torch.no_grad():
        want = head_loss(sskd.head_t(task.teacher.forward_features(x).pooled), 3)   # all 4B rows
    assert terms["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    terms["loss"].backward()
    assert all(p.grad is not None for p in sskd.head_t.parameters())
    assert all(p.grad is None for p in task.teacher.parameters())


# --------------------------------------------------------------------------- the loaders

def crops(image, padding=PADDING):
    """Every crop of `image` (C, H, W) padded with zeros, as RandomCrop(H, padding) draws them."""
    c, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)
    return [padded[:, t:t + h, l:l + w] for t in range(2 * padding + 1) for l in range(2 * padding + 1)]


def test_memory_rotated_views_are_rotations_then_crops():
    x, y = load_digits_split(train=True)
    mean, std = digits_mean_std()
    loader = InMemoryLoader(x, y, batch_size=6, mean=mean, std=std, train=True, seed=4, rotations=True)
    loader.set_epoch(1)
    images, targets, indices = next(iter(loader))
    assert images.shape == (24, 3, 32, 32) and targets.shape == (6,) and indices.shape == (6,)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    raw = torch.round((images * s + m) * 255).to(torch.uint8)
    for i, index in enumerate(indices.tolist()):
        for k in range(4):
            view = raw[k * 6 + i]
            matches = [j for j in range(4) if any(torch.equal(view, c) for c in crops(torch.rot90(x[index], j, (1, 2))))]
            assert matches == [k], (i, k, matches)
    loader.set_epoch(1)
    assert torch.equal(next(iter(loader))[0], images)
    with pytest.raises(ValueError, match="training augmentation"):
        InMemoryLoader(x, y, batch_size=6, mean=mean, std=std, train=False, rotations=True)


def test_build_loaders_rotations_memory_only():
    train, test, _ = build_loaders("digits", "./data", 100, loader="memory", seed=2, rotations=True)
    plain_test = build_loaders("digits", "./data", 100, loader="memory", seed=2)[1]
    assert next(iter(train))[0].shape == (400, 3, 32, 32)
    assert torch.equal(next(iter(test))[0], next(iter(plain_test))[0])
    with pytest.raises(UserError, match="in-memory loader"):
        build_loaders("digits", "./data", 100, loader="torch", num_workers=0, rotations=True)


# --------------------------------------------------------------------------- end to end

def test_one_digits_epoch(digits_teacher, monkeypatch):
    _, run = one_digits_epoch(monkeypatch, *digits_teacher, "sskd", "--sskd_head_epochs", "2", "--sskd_ss_T", "0.7")
    stored, metrics = read_json(run / "args.json"), pd.read_csv(run / "metrics.csv")
    assert (stored["method"], stored["sskd_head_epochs"], stored["sskd_ss_T"]) == ("sskd+kd", 2, 0.7)
    assert list(metrics["stage"]) == ["init_sskd", "init_sskd", "main"]
    assert list(metrics["lr"][:2]) == pytest.approx([0.05, 0.005])
    main = metrics.iloc[-1]
    assert float(main["train_sskd_tf"]) > 0 and float(main["train_sskd_ss"]) > 0 and float(main["train_ce"]) > 0


@pytest.mark.parametrize("flags,message", [(["--distill", "sskd", "--loader", "torch"], "in-memory loader"),
                                           (["--distill", "sskd,mlkd"], "cannot share a batch"),
                                           (["--distill", "sskd", "--sskd_ss_ratio", "0"], "--sskd_ss_ratio")])
def test_mistakes_stop_train_student_with_one_line_before_any_run_directory(digits_teacher, capsys, flags, message):
    save, teacher_dir = digits_teacher
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(fast_args(save, "--path_t", str(teacher_dir / "best.pth"), "--num_workers", "0",
                                     "--trial", "bad_sskd", *flags))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not list((save / "students").glob("*bad_sskd*"))
