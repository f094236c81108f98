"""Three optimisation steps of the suite against three steps of RepDistiller's training loop.

The suite's side is what train_student.py runs: a distiller built from one sample batch in
eval mode, engine's DistillTask forward and engine's SGD over `task.main_parameters()`.
The reference side is written here the way RepDistiller's `train_distill` does it: a module
list (student, connectors, teacher last), a criterion list (CE, KD, the method), a trainable
list (student and connectors) under one SGD with its momentum and weight decay, every module
in train mode but the teacher, the total `gamma * CE + alpha * KD + beta * method`. Its
criteria are RepDistiller's formulas written out again here, not the suite's modules; only
the networks' features and the connectors' initial weights (copied) are shared.

Both start from the same weights and see the same batches; after three steps the student's
weights and statistics and the connectors' weights must agree up to float rounding. A change
that alters what a method trains fails here.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distiller_zoo.base import BuildContext, resolve
from distiller_zoo.kd import DistillKL
from distiller_zoo.temperature import Temperature
from engine.distill_task import DistillTask
from engine.optim import build_sgd
from method_helpers import make_args
from models import model_dict

STUDENT, TEACHER = "resnet8", "resnet8x4"
CLASSES, BATCH, STEPS, N_DATA, NCE_K = 10, 4, 3, 40, 12
LR, MOMENTUM, WEIGHT_DECAY, KD_T = 0.05, 0.9, 5e-4, 4.0


# --- RepDistiller's criteria, on its feature lists [stem, stage_1, ..., stage_n, pooled] ------

def kd_div(y_s, y_t, T=KD_T):
    """DistillKL: KL(p_t || p_s) at temperature T, summed, times T^2 / batch."""
    return F.kl_div(F.log_softmax(y_s / T, 1), F.softmax(y_t / T, 1), reduction="sum") * T ** 2 / y_s.shape[0]


def attention_loss(fs, ft, *_):
    def at(f):
        return F.normalize(f.pow(2).mean(1).flatten(1))
    return sum((at(s) - at(t)).pow(2).mean() for s, t in zip(fs[1:-1], ft[1:-1]))


def similarity_loss(fs, ft, *_):
    s, t = fs[-2].flatten(1), ft[-2].flatten(1)
    g_s, g_t = F.normalize(s @ s.t()), F.normalize(t @ t.t())
    return (g_t - g_s).pow(2).sum() / s.shape[0] ** 2


def nst_loss(fs, ft, *_):
    def kernel(a, b):
        return torch.einsum("nip,njp->nij", a, b).pow(2).mean()
    total = 0
    for s, t in zip(fs[1:-1], ft[1:-1]):
        s, t = F.normalize(s.flatten(2), dim=2), F.normalize(t.flatten(2), dim=2)
        total = total + kernel(t, t).detach() + kernel(s, s) - 2 * kernel(s, t)
    return total


def rkd_loss(fs, ft, *_, w_d=25.0, w_a=50.0):
    def distances(e):
        sq = e.pow(2).sum(1)
        d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
        d = d * (1 - torch.eye(len(e)))
        return d / d[d > 0].mean()

    def angles(e):
        unit = F.normalize(e[None, :, :] - e[:, None, :], dim=2)
        return (unit @ unit.transpose(1, 2)).flatten()

    s, t = fs[-1].flatten(1), ft[-1].flatten(1)
    return w_d * F.smooth_l1_loss(distances(s), distances(t)) + w_a * F.smooth_l1_loss(angles(s), angles(t))


def pkt_loss(fs, ft, *_, eps=1e-7):
    def conditional(x):
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1) / 2
        return k / k.sum(1, keepdim=True)
    p_s, p_t = conditional(fs[-1]), conditional(ft[-1])
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class HintRegressor(nn.Module):
    """RepDistiller's ConvReg for equal spatial sizes: 1x1 conv, BN, ReLU."""

    def __init__(self, c_s, c_t):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c_s, c_t, 1), nn.BatchNorm2d(c_t)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class GaussianRegressor(nn.Module):
    """RepDistiller's VIDLoss(C_s, C_t, C_t): its regressor and per-channel log-scale."""

    def __init__(self, c_s, c_t):
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c_t, c_t, 1, bias=False), nn.ReLU(),
                                       nn.Conv2d(c_t, c_t, 1, bias=False))
        self.log_scale = nn.Parameter(torch.zeros(c_t))

    def forward(self, s, t):
        var = (torch.log(1 + torch.exp(self.log_scale)) + 1e-5).view(1, -1, 1, 1)
        return (0.5 * ((self.regressor(s) - t).pow(2) / var + torch.log(var))).mean()


class ContrastBank(nn.Module):
    """RepDistiller's ContrastMemory and two ContrastLoss terms (CRDLoss without its embeds)."""

    def __init__(self, memory_v1, memory_v2, T=0.07, momentum=0.5):
        super().__init__()
        self.register_buffer("memory_v1", memory_v1.clone())
        self.register_buffer("memory_v2", memory_v2.clone())
        self.z_v1 = self.z_v2 = None
        self.T, self.momentum = T, momentum

    def scores(self, memory, idx, anchor):
        rows = memory[idx.flatten()].view(*idx.shape, -1)
        return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / self.T)

    def contrast_loss(self, x, eps=1e-7):
        noise = (x.shape[1] - 1) / len(self.memory_v1)
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
        log_d0 = torch.log(noise / (x[:, 1:] + noise + eps))
        return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

    def forward(self, v1, v2, y, idx):
        out_v1 = self.scores(self.memory_v2, idx, v1)   # student anchor against the teacher bank
        out_v2 = self.scores(self.memory_v1, idx, v2)
        if self.z_v1 is None:
            self.z_v1 = (out_v1.mean() * len(self.memory_v1)).item()
            self.z_v2 = (out_v2.mean() * len(self.memory_v1)).item()
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                moved = memory[y] * self.momentum + v.detach() * (1 - self.momentum)
                memory[y] = moved / moved.pow(2).sum(1, keepdim=True).sqrt()
        return self.contrast_loss(out_v1 / self.z_v1) + self.contrast_loss(out_v2 / self.z_v2)


# --- each method: its trainable connectors (initial weights copied from the suite's) and its
# criterion on (feat_s, feat_t, index, contrast_idx), as RepDistiller's train_student.py builds them

def copy_into(reference: nn.Module, tensors):
    """Load `tensors` into `reference`'s parameters and buffers, in registration order."""
    targets = list(reference.state_dict().values())
    tensors = list(tensors)
    assert [t.shape for t in targets] == [t.shape for t in tensors]
    with torch.no_grad():
        for dst, src in zip(targets, tensors):
            dst.copy_(src)
    return reference


def reference_kd(d):
    return [], lambda *_: 0


def reference_fitnet(d):
    reg = copy_into(HintRegressor(d.regressor.conv.in_channels, d.regressor.conv.out_channels),
                    d.regressor.state_dict().values())
    return [reg], lambda fs, ft, *_: F.mse_loss(reg(fs[2]), ft[2])


def reference_cc(d):
    embed_s = copy_into(nn.Linear(*reversed(d.embed_s.linear.weight.shape)), d.embed_s.state_dict().values())
    embed_t = copy_into(nn.Linear(*reversed(d.embed_t.linear.weight.shape)), d.embed_t.state_dict().values())

    def loss(fs, ft, *_):
        delta = (embed_s(fs[-1]) - embed_t(ft[-1])).abs()
        return (delta[:-1] * delta[1:]).sum(1).mean()
    return [embed_s, embed_t], loss


def reference_vid(d):
    regs = nn.ModuleList()
    for vid in d.losses:
        c_t, c_s = vid.regressor[0].weight.shape[:2]
        ref = GaussianRegressor(c_s, c_t)
        copy_into(ref.regressor, vid.regressor.state_dict().values())
        with torch.no_grad():
            ref.log_scale.copy_(vid.alpha)
        regs.append(ref)
    return [regs], lambda fs, ft, *_: sum(r(s, t) for r, s, t in zip(regs, fs[1:-1], ft[1:-1]))


def reference_crd(d):
    crd = d.criterion
    embed_s = copy_into(nn.Linear(*reversed(crd.embed_s.linear.weight.shape)), crd.embed_s.state_dict().values())
    embed_t = copy_into(nn.Linear(*reversed(crd.embed_t.linear.weight.shape)), crd.embed_t.state_dict().values())
    bank = ContrastBank(crd.contrast.memory_v1, crd.contrast.memory_v2)

    def loss(fs, ft, index, contrast_idx):
        v1 = F.normalize(embed_s(fs[-1]), dim=1)
        v2 = F.normalize(embed_t(ft[-1]), dim=1)
        return bank(v1, v2, index, contrast_idx)
    loss.bank = bank
    return [embed_s, embed_t], loss


def connector_free(criterion):
    return lambda d: ([], criterion)


REFERENCES = {
    "kd": reference_kd, "fitnet": reference_fitnet, "at": connector_free(attention_loss),
    "sp": connector_free(similarity_loss), "cc": reference_cc, "vid": reference_vid,
    "rkd": connector_free(rkd_loss), "pkt": connector_free(pkt_loss), "nst": connector_free(nst_loss),
    "crd": reference_crd,
}


# --- the two loops ------------------------------------------------------------------------------

def make_batches():
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(STEPS):
        images = torch.randn(BATCH, 3, 32, 32, generator=g)
        targets = torch.randint(0, CLASSES, (BATCH,), generator=g)
        index = torch.randperm(N_DATA, generator=g)[:BATCH]
        negatives = torch.randint(0, N_DATA, (BATCH, NCE_K), generator=g)
        batches.append((images, targets, index, torch.cat([index[:, None], negatives], 1)))
    return batches


def rep_feats(features):
    return [features.stem, *features.stages, features.pooled]


def suite_task(name, student, teacher, batches):
    """A DistillTask built as train_student.py builds it, and its optimiser."""
    spec = resolve(name)
    args = make_args(feat_dim=128, nce_k=NCE_K, learning_rate=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    student.eval()
    with torch.no_grad():
        feat_s, feat_t = student.forward_features(batches[0][0]), teacher.forward_features(batches[0][0])
    student.train()
    ctx = BuildContext(student, teacher, feat_s, feat_t, args, n_train=N_DATA, num_classes=CLASSES,
                       student_name=STUDENT, teacher_name=TEACHER)
    methods = [(spec.name, spec.beta, spec.cls(ctx))] if spec.cls is not None else []
    temperature = Temperature(KD_T)
    task = DistillTask(student, teacher, methods, spec.gamma, spec.alpha, ("kd", DistillKL(temperature)),
                       temperature, CLASSES)
    return task, build_sgd(task.main_parameters(), args, torch.device("cpu"))


def suite_steps(task, optimizer, batches):
    for batch in batches:
        task.train()
        task.keep_frozen_in_eval()
        terms, _ = task(*batch)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()


def reference_steps(model_s, model_t, connectors, criterion, weights, batches):
    """RepDistiller's train_distill, one SGD step per batch."""
    gamma, alpha, beta = weights
    module_list = nn.ModuleList([model_s, *connectors, model_t])
    trainable_list = nn.ModuleList([model_s, *connectors])
    optimizer = torch.optim.SGD(trainable_list.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for images, target, index, contrast_idx in batches:
        for module in module_list:
            module.train()
        module_list[-1].eval()
        out_s = model_s.forward_features(images)
        with torch.no_grad():
            out_t = model_t.forward_features(images)
        feat_s, feat_t = rep_feats(out_s), [f.detach() for f in rep_feats(out_t)]
        loss_cls = F.cross_entropy(out_s.logits, target)
        loss_div = kd_div(out_s.logits, out_t.logits)
        loss_kd = criterion(feat_s, feat_t, index, contrast_idx)
        loss = gamma * loss_cls + alpha * loss_div + beta * loss_kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_close(ours, theirs, what):
    for (key, a), b in zip(ours.items(), theirs):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6, msg=lambda m, key=key: f"{what} {key}: {m}")
        else:
            assert torch.equal(a, b), f"{what} {key}"


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_three_steps_equal_repdistillers_loop(name):
    torch.manual_seed(0)
    teacher = model_dict[TEACHER](num_classes=CLASSES).eval()
    student = model_dict[STUDENT](num_classes=CLASSES)
    reference_student = copy.deepcopy(student)
    start = copy.deepcopy(student.state_dict())
    batches = make_batches()

    task, optimizer = suite_task(name, student, teacher, batches)
    distiller = task.distillers[name] if name in task.distillers else None
    connectors, criterion = REFERENCES[name](distiller)
    spec = resolve(name)

    suite_steps(task, optimizer, batches)
    reference_steps(reference_student, teacher, connectors, criterion, (spec.gamma, spec.alpha, spec.beta), batches)

    assert not torch.equal(student.conv1.weight, start["conv1.weight"])
    assert_close(student.state_dict(), reference_student.state_dict().values(), "student")
    if connectors:
        ours = {k: v for k, v in distiller.state_dict().items() if "contrast" not in k}
        theirs = [v for c in connectors for v in c.state_dict().values()]
        assert_close(ours, theirs, "connector")
    if name == "crd":
        memory = distiller.criterion.contrast
        torch.testing.assert_close(memory.memory_v1, criterion.bank.memory_v1, rtol=1e-4, atol=2e-6)
        torch.testing.assert_close(memory.memory_v2, criterion.bank.memory_v2, rtol=1e-4, atol=2e-6)
