"""MLKD: each alignment level against loops over plain Python lists, the confidence-mask
factors against numpy's percentile, the full loss composed independently, the zero for
identical logits, gradients, logit standardisation, the shared temperature, the task's
two-view split (CE on both views, other methods on the weak half), and the loaders' strong
view (2B rows, weak half unchanged, strong half different, reproducible)."""
import math

import numpy as np
import pytest
import torch

from core.errors import UserError
from dataset.digits import digits_mean_std, load_digits_split
from dataset.loaders import build_loaders
from dataset.memory import InMemoryLoader
from dataset.strong import Cutout, cutout, cutout_boxes, rand_augment, rand_augment_each, two_view_transform
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.dist import DIST
from distiller_zoo.kd import DistillKL
from distiller_zoo.mlkd import MLKD, MLKDLoss, batch_term, class_term, instance_term, mask_fractions
from distiller_zoo.temperature import Temperature
from engine.distill_task import DistillTask
from method_helpers import make_args
from models import Features, model_dict

TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)


def logit_features(logits):
    return Features(stem=logits, stages=[logits], preact=[logits], pooled=logits, logits=logits)


def make_mlkd(temperature=4.0, logit_stand=False, num_classes=5):
    f = logit_features(torch.zeros(4, num_classes))
    return MLKD(BuildContext(None, None, f, f, make_args(), n_train=10, num_classes=num_classes,
                             temperature=temperature, logit_stand=logit_stand))


def rand(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale


# --------------------------------------------------------------------------- references (lists)

def ref_softmax(row, T=1.0):
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_standardize(row):
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def ref_instance(zs, zt, T, stand=False):
    total = 0.0
    for rs, rt in zip(zs, zt):
        if stand:
            rs, rt = ref_standardize(rs), ref_standardize(rt)
        ps, pt = ref_softmax(rs, T), ref_softmax(rt, T)
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return total / len(zs) * T * T


def ref_batch(zs, zt, T):
    ps = [ref_softmax(r, T) for r in zs]
    pt = [ref_softmax(r, T) for r in zt]
    b = len(zs)
    total = 0.0
    for i in range(b):
        for j in range(b):
            gs = sum(ps[i][k] * ps[j][k] for k in range(len(ps[i])))
            gt = sum(pt[i][k] * pt[j][k] for k in range(len(pt[i])))
            total += (gt - gs) ** 2
    return total / b


def ref_class(zs, zt, T):
    ps = [ref_softmax(r, T) for r in zs]
    pt = [ref_softmax(r, T) for r in zt]
    c = len(zs[0])
    total = 0.0
    for a in range(c):
        for b in range(c):
            ms = sum(row[a] * row[b] for row in ps)
            mt = sum(row[a] * row[b] for row in pt)
            total += (mt - ms) ** 2
    return total / c


def ref_fractions(zt):
    """The official masks, with numpy: le(percentile 50), averaged."""
    q = np.array([ref_softmax(r) for r in zt])
    conf = q.max(axis=1)
    mass = q.sum(axis=0)
    return float(np.mean(conf <= np.percentile(conf, 50))), float(np.mean(mass <= np.percentile(mass, 50)))


def ref_mlkd(ws, wt, ss, st, temps=TEMPS, stand=False):
    rho_b, rho_c = ref_fractions(wt)
    return {
        "inst_weak": rho_b * sum(ref_instance(ws, wt, T, stand) for T in temps),
        "inst_strong": sum(ref_instance(ss, st, T, stand) for T in temps),
        "batch": rho_b * sum(ref_batch(ws, wt, T) for T in temps),
        "class": rho_c * sum(ref_class(ws, wt, T) for T in temps),
    }


# --------------------------------------------------------------------------- the levels

def test_registry():
    spec = resolve("MLKD")
    assert spec.name == "mlkd" and spec.cls is MLKD and MLKD.data_needs(None).strong_view
    assert (spec.gamma, spec.alpha, spec.beta) == (0.1, 0.0, 0.9)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 6.0])
def test_each_level_matches_loops(T):
    zs, zt = rand(5, 7, seed=1), rand(5, 7, seed=2)
    ls, lt = zs.tolist(), zt.tolist()
    assert instance_term(zs, zt, T).item() == pytest.approx(ref_instance(ls, lt, T), rel=1e-5)
    assert batch_term(zs, zt, T).item() == pytest.approx(ref_batch(ls, lt, T), rel=1e-4)
    assert class_term(zs, zt, T).item() == pytest.approx(ref_class(ls, lt, T), rel=1e-4)


def test_hand_made_two_by_two():
    """Two samples, two classes, T = 1: the Grams written out by hand."""
    zs = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])     # p_s = [.5 .5], [.75 .25]
    zt = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])     # p_t = [.75 .25], [.5 .5]
    # batch Grams: G_s = [[.5, .5], [.5, .625]], G_t = [[.625, .5], [.5, .5]]
    assert batch_term(zs, zt, 1.0).item() == pytest.approx((0.125 ** 2 + 0.125 ** 2) / 2, rel=1e-5)
    # class Grams: M = P^T P is the same for both (the rows are swapped), so the class term is 0
    assert class_term(zs, zt, 1.0).item() == pytest.approx(0.0, abs=1e-7)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5) + 0.5 * math.log(0.5 / 0.75) \
        + 0.5 * math.log(0.5 / 0.25)
    assert instance_term(zs, zt, 1.0).item() == pytest.approx(kl / 2, rel=1e-5)


def test_mask_fractions_match_numpy_percentile():
    # confidences 0.9 > 0.8 > ... : an odd batch keeps the median sample itself (3 of 5)
    rows = [[math.log(c), math.log(1 - c)] for c in (0.9, 0.8, 0.7, 0.6, 0.55)]
    zt = torch.tensor(rows)
    rho_b, rho_c = mask_fractions(zt)
    assert rho_b.item() == pytest.approx(3 / 5)
    assert (rho_b.item(), rho_c.item()) == pytest.approx(ref_fractions(rows))
    # an even batch: the interpolated median leaves exactly half at or below it
    rho_b, _ = mask_fractions(zt[:4])
    assert rho_b.item() == pytest.approx(0.5)
    # ties: identical rows are all at the median
    rho_b, rho_c = mask_fractions(torch.zeros(6, 4))
    assert (rho_b.item(), rho_c.item()) == (1.0, 1.0)
    for seed in range(4):
        z = rand(9, 11, seed=seed)
        assert tuple(v.item() for v in mask_fractions(z)) == pytest.approx(ref_fractions(z.tolist()))


def test_full_loss_composed_independently():
    ws, wt, ss, st = (rand(6, 5, seed=s) for s in (3, 4, 5, 6))
    loss, parts = MLKDLoss(4.0)(ws, wt, ss, st)
    ref = ref_mlkd(*(t.tolist() for t in (ws, wt, ss, st)))
    assert set(parts) == set(ref)
    for k in ref:
        assert parts[k].item() == pytest.approx(ref[k], rel=1e-4), k
    assert loss.item() == pytest.approx(sum(ref.values()), rel=1e-4)
    assert loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-6)


def test_distiller_splits_the_two_views_and_rejects_one_view():
    ws, wt, ss, st = (rand(4, 5, seed=s) for s in (7, 8, 9, 10))
    d = make_mlkd()
    loss, parts = d(logit_features(torch.cat([ws, ss])), logit_features(torch.cat([wt, st])),
                    Batch(targets=torch.tensor([0, 1, 2, 3])))
    assert loss.item() == pytest.approx(sum(ref_mlkd(*(t.tolist() for t in (ws, wt, ss, st))).values()), rel=1e-4)
    with pytest.raises(UserError, match="strong view"):
        d(logit_features(ws), logit_features(wt), Batch(targets=torch.tensor([0, 1, 2, 3])))


def test_zero_for_identical_logits():
    w, s = rand(5, 6, seed=11), rand(5, 6, seed=12)
    loss, parts = MLKDLoss(4.0)(w, w.clone(), s, s.clone())
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    loss, _ = MLKDLoss(2.0, stand=True)(w, w.clone(), s, s.clone())
    assert loss.item() == 0.0


def test_logit_standardisation_only_at_the_instance_level():
    ws, wt, ss, st = rand(5, 6, seed=13), rand(5, 6, seed=14, scale=8.0), rand(5, 6, seed=15), rand(5, 6, seed=16)
    _, plain = MLKDLoss(2.0)(ws, wt, ss, st)
    _, stand = MLKDLoss(2.0, stand=True)(ws, wt, ss, st)
    ref = ref_mlkd(*(t.tolist() for t in (ws, wt, ss, st)), temps=(2.0, 3.0, 5.0, 2.0, 6.0), stand=True)
    for k in ("inst_weak", "inst_strong"):
        assert stand[k].item() == pytest.approx(ref[k], rel=1e-4)
        assert stand[k].item() != pytest.approx(plain[k].item(), rel=1e-3)
    for k in ("batch", "class"):
        assert stand[k].item() == plain[k].item()
    assert make_mlkd(logit_stand=True).loss.stand


def test_shared_temperature_moves_the_base_temperature():
    ws, wt, ss, st = (rand(4, 5, seed=s) for s in (17, 18, 19, 20))
    temp = Temperature(4.0, 2.0, "linear", epochs=3)
    d = make_mlkd(temperature=temp)
    feats = logit_features(torch.cat([ws, ss])), logit_features(torch.cat([wt, st]))
    lists = [t.tolist() for t in (ws, wt, ss, st)]
    for epoch, T0 in ((1, 4.0), (3, 2.0)):
        temp.set_epoch(epoch)
        assert d.loss.temperatures() == (T0, 3.0, 5.0, 2.0, 6.0)
        loss, _ = d(*feats, Batch(targets=torch.arange(4)))
        assert loss.item() == pytest.approx(sum(ref_mlkd(*lists, temps=(T0, 3.0, 5.0, 2.0, 6.0)).values()), rel=1e-4)


def test_gradients_reach_student_never_teacher():
    zs = rand(8, 5, seed=21).requires_grad_()
    zt = rand(8, 5, seed=22).requires_grad_()
    loss, _ = make_mlkd()(logit_features(zs), logit_features(zt), Batch(targets=torch.arange(4)))
    loss.backward()
    assert zs.grad is not None and zs.grad[:4].abs().sum() > 0 and zs.grad[4:].abs().sum() > 0
    assert zt.grad is None


def test_float32_under_bf16_autocast():
    ws, wt, ss, st = (rand(4, 5, seed=s).bfloat16() for s in (1, 2, 3, 4))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, _ = MLKDLoss(4.0)(ws, wt, ss, st)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --------------------------------------------------------------------------- the task

class Recorder(DIST):
    """DIST that records the batch size it was given."""

    def forward(self, feat_s, feat_t, batch=None):
        self.rows = (feat_s.logits.shape[0], feat_t.logits.shape[0], feat_s.stages[-1].shape[0])
        return super().forward(feat_s, feat_t, batch)


def test_task_two_views_ce_on_both_others_on_the_weak_half():
    torch.manual_seed(0)
    student, teacher = model_dict["resnet8"](num_classes=10), model_dict["resnet8"](num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    targets = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        fs, ft = student.forward_features(x[:4]), teacher.forward_features(x[:4])
    ctx = BuildContext(student, teacher, fs, ft, make_args(), n_train=100, num_classes=10, temperature=Temperature(4.0))
    mlkd, other = MLKD(ctx), Recorder(ctx)
    task = DistillTask(student, teacher, [("mlkd", 0.9, mlkd), ("dist", 2.0, other)], gamma=0.1, alpha=0.5,
                       kd_term=("kd", DistillKL(4.0)), temperature=Temperature(4.0), num_classes=10)
    terms, logits = task(x, targets, torch.arange(4))
    assert logits.shape == (4, 10)
    assert other.rows == (4, 4, 4)
    assert {"ce", "ce_strong", "kd", "mlkd", "dist"} <= set(terms)
    # the student runs on each view separately: its weak logits are those of the weak half alone
    student.train()
    with torch.no_grad():
        weak = student.forward_features(x[:4]).logits
        strong = student.forward_features(x[4:]).logits
    torch.testing.assert_close(logits.detach(), weak)
    ce_strong = torch.nn.functional.cross_entropy(strong, targets)
    assert terms["ce_strong"].item() == pytest.approx(ce_strong.item(), rel=1e-5)
    expected = 0.1 * (terms["ce"] + terms["ce_strong"]) + 0.5 * terms["kd"] + 0.9 * terms["mlkd"] + 2.0 * terms["dist"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="strong_view=True"):
        task(x[:4], targets, torch.arange(4))


# --------------------------------------------------------------------------- the loaders

def digits_memory(**kw):
    x, y = load_digits_split(train=True)
    mean, std = digits_mean_std()
    return InMemoryLoader(x, y, batch_size=50, mean=mean, std=std, train=True, seed=3, **kw)


def test_memory_strong_view_keeps_the_weak_half_and_is_reproducible():
    plain, strong = digits_memory(), digits_memory(strong_view=True)
    for loader in (plain, strong):
        loader.set_epoch(2)
    state = torch.get_rng_state()
    first = list(strong)
    assert torch.equal(torch.get_rng_state(), state)       # the global RNG is left alone
    again = list(strong)
    assert len(first) == len(plain)
    for (xs, ys, i_s), (xp, yp, ip), (xa, _, _) in zip(first, plain, again):
        n = ys.shape[0]
        assert xs.shape == (2 * n, 3, 32, 32) and ys.shape == (n,) and i_s.shape == (n,)
        assert torch.equal(xs[:n], xp) and torch.equal(ys, yp) and torch.equal(i_s, ip)
        assert not torch.equal(xs[n:], xp)
        assert (xs[n:] - xp).abs().mean() > 0.1
        assert torch.equal(xs, xa)
    strong.set_epoch(3)
    assert not torch.equal(next(iter(strong))[0], first[0][0])
    with pytest.raises(ValueError, match="train"):
        InMemoryLoader(*load_digits_split(train=False), batch_size=8, mean=(0, 0, 0), std=(1, 1, 1), train=False,
                       strong_view=True)


def test_build_loaders_strong_view_on_both_paths():
    for kind in ("memory", "torch"):
        plain, test_plain, _ = build_loaders("digits", "./data", 200, loader=kind, num_workers=0, seed=5)
        strong, test_strong, _ = build_loaders("digits", "./data", 200, loader=kind, num_workers=0, seed=5,
                                               strong_view=True)
        for loader in (plain, strong):
            loader.set_epoch(1)
        (xp, yp, ip), (xs, ys, i_s) = next(iter(plain)), next(iter(strong))
        assert xs.shape == (400, 3, 32, 32) and torch.equal(ys, yp) and torch.equal(i_s, ip)
        assert torch.equal(xs[:200], xp), kind
        assert not torch.equal(xs[200:], xp)
        assert torch.equal(next(iter(test_strong))[0], next(iter(test_plain))[0])   # the test loader is unchanged


def test_cutout_box_follows_the_official_formula():
    # v = 0.25 of W = 32: side 8; centred at 16 -> [12, 20); near the edge the box is clipped at 0 then
    # extended from there (x1 = x0 + side), as the official CutoutAbs
    params = torch.tensor([[0.25, 0.5, 0.5], [0.25, 0.05, 0.99], [0.0, 0.5, 0.5]])
    x0, x1, y0, y1 = cutout_boxes(params, 32, 32)
    assert (x0.tolist(), x1.tolist()) == ([12.0, 0.0, 16.0], [20.0, 8.0, 16.0])
    assert (y0.tolist(), y1.tolist()) == ([12.0, 27.0, 16.0], [20.0, 32.0, 16.0])
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    out = cutout(images, params, (125, 123, 114))
    assert out[0, :, 12:20, 12:20].flatten(1).tolist() == [[125] * 64, [123] * 64, [114] * 64]
    assert (out[0].sum(0) > 0).sum() == 64 and (out[1].sum(0) > 0).sum() == 8 * 5 and out[2].sum() == 0


def test_pil_strong_transform_shapes_and_cutout():
    from PIL import Image
    from torchvision import transforms
    weak = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    views = two_view_transform(weak)
    img = Image.new("RGB", (32, 32), (200, 10, 10))
    torch.manual_seed(0)
    w, s = views(img)
    assert w.shape == s.shape == (3, 32, 32) and not torch.equal(w, s)
    torch.manual_seed(1)
    cut = np.asarray(Cutout()(Image.new("RGB", (32, 32), (0, 0, 0))))
    painted = (cut != 0).any(axis=2)
    assert painted.any() and (cut[painted] == (125, 123, 114)).all()
    with pytest.raises(ValueError, match="ToTensor"):
        two_view_transform(transforms.Compose([transforms.ToTensor()]))


def test_batched_rand_augment_is_torchvisions_per_image_call_bit_for_bit():
    """The in-memory strong view groups the images by the op they drew; the result is, bit for
    bit, one public `v2.RandAugment` call per image from the same seeded RNG, over enough
    images that every op (and both signs) occurs."""
    images = torch.randint(0, 256, (160, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    augment = rand_augment()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        reference = torch.stack([augment(image) for image in images])
    state = torch.get_rng_state()
    assert torch.equal(rand_augment_each(images, 11), reference)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
