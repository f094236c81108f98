"""OFA-KD: the loss and the stage branches (CNN and token students) against numbers from the
official code, the loss against a hand computation, its ε = 1 form against KD, gradient flow
(a timm ViT student included), the errors, and digits epochs through train_student.py (a
suite CNN student, a timm ViT student)."""
import math

import pytest
import torch
from torch import nn

from conftest import read_json
from core.errors import UserError
from distiller_zoo.base import Batch, BuildContext, resolve
from distiller_zoo.kd import DistillKL
from distiller_zoo.ofa import OFA, PatchMerge, TokenBranch, TransformerBlock, ofa_loss, parse_stages
from distiller_zoo.options import defaults
from engine.build import build_model
from method_helpers import make_args, make_ctx, one_digits_epoch, wave
from models import model_dict
from models.features import Features

B, K = 4, 5
Y = torch.tensor([0, 3, 1, 4])
STAGES = [(4, 16, 16), (6, 8, 8), (8, 4, 4), (10, 2, 2)]
D_S, D_T = 8, 12


def logits():
    return wave(B, K, phase=0.0, scale=3.0), wave(B, K, phase=1.0, scale=4.0)


# Hao840/OFAKD at f7bb896cac9879040800bde08a8cc2057a904c52, distillers/ofa.py `ofa_loss(logits()[0],
# logits()[1], one_hot(Y), eps, temperature)`, run offline with torch 2.14 CPU: (eps, T) -> loss.
OFFICIAL_LOSS = {(1.0, 1.0): 1.636902093887329, (1.5, 1.0): 1.1305123567581177,
                 (1.2, 2.0): 1.3115825653076172, (0.8, 4.0): 2.028193473815918}

# The same commit's distillers/ofa.py `OFA` (stages 1-4 of a four-stage CNN student with the STAGES
# maps, penultimate widths D_S and D_T, 5 classes, train mode), every projector parameter set to
# `wave(*shape, phase=100 + k, scale=0.3)` in named_parameters order: (eps, T) -> (the OFA loss
# of each stage's branch, loss_kd: the OFA loss of the student's logits).
OFFICIAL_BRANCHES = {
    (1.0, 1.0): ([1.6092312335968018, 1.6547012329101562, 1.755415916442871, 1.7385621070861816],
                 1.636902093887329),
    (1.5, 2.0): ([1.097520112991333, 1.110724925994873, 1.1236498355865479, 1.1454769372940063],
                 1.0554935932159424),
}


# A token student's stages: (grid side, channels), the tokens wave(B, side², channels, phase=10 + i)
# in row-major grid order; its penultimate width D_S_TOKENS. Stage 1 merges twice (28 -> 7), stage
# 2 once, stages 3 and 4 not at all.
TOKEN_STAGES = [(28, 8), (14, 12), (8, 16), (4, 16)]
D_S_TOKENS = 16

# The same commit's distillers/ofa.py `OFA` with a token student (stage_info (side², channels) of
# TOKEN_STAGES, penultimate width D_S_TOKENS, no `num_tokens`, as every timm 0.6.5 model; timm
# 0.6.5 from its git tag), every projector parameter set to `wave(*shape, phase=100 + k,
# scale=0.3)` in named_parameters order, each projector run on its stage's tokens: (eps, T) ->
# the OFA loss of each stage's branch.
OFFICIAL_TOKEN_BRANCHES = {
    (1.0, 1.0): [6.3706865310668945, 6.060266971588135, 4.091653347015381, 7.174607276916504],
    (1.5, 2.0): [2.7428998947143555, 1.981038212776184, 1.6498892307281494, 2.6886134147644043],
}


def fixed_features(z, width, maps=None, tokens=()):
    maps = maps or [wave(B, *s, phase=10.0 + i) for i, s in enumerate(STAGES)]
    return Features(stem=maps[0], stages=maps, preact=maps, pooled=wave(B, width, phase=20.0), logits=z,
                    tokens=tokens)


def token_maps():
    """TOKEN_STAGES' tokens as the suite's B x C x H x W maps."""
    return [wave(B, side * side, c, phase=10.0 + i).transpose(1, 2).reshape(B, c, side, side)
            for i, (side, c) in enumerate(TOKEN_STAGES)]


def fixed_ofa(eps, T, tokens=False):
    z_s, z_t = logits()
    feat_s = (fixed_features(z_s, D_S_TOKENS, token_maps(), tokens=(True,) * len(TOKEN_STAGES)) if tokens
              else fixed_features(z_s, D_S))
    feat_t = fixed_features(z_t, D_T)
    ctx = BuildContext(nn.Identity(), nn.Identity(), feat_s, feat_t,
                       defaults(OFA.options, ofa_eps=eps, ofa_temperature=T), n_train=100, num_classes=K)
    ofa = OFA(ctx).train()
    with torch.no_grad():
        for k, p in enumerate(ofa.parameters()):
            p.copy_(wave(*p.shape, phase=100.0 + k, scale=0.3))
    return ofa, feat_s, feat_t


@pytest.mark.parametrize("eps,T", sorted(OFFICIAL_LOSS))
def test_loss_matches_the_official_code(eps, T):
    z_s, z_t = logits()
    assert ofa_loss(z_s, z_t, Y, eps, T).item() == pytest.approx(OFFICIAL_LOSS[eps, T], rel=1e-6)


@pytest.mark.parametrize("eps,T", sorted(OFFICIAL_BRANCHES))
def test_branches_match_the_official_code(eps, T):
    ofa, feat_s, feat_t = fixed_ofa(eps, T)
    loss, parts = ofa(feat_s, feat_t, Batch(targets=Y))
    stages, final = OFFICIAL_BRANCHES[eps, T]
    assert [parts[f"stage{i}"].item() for i in (1, 2, 3, 4)] == pytest.approx(stages, rel=1e-5)
    assert parts["logits"].item() == pytest.approx(final, rel=1e-6)
    assert loss.item() == pytest.approx(sum(stages) + final, rel=1e-5)


@pytest.mark.parametrize("eps,T", sorted(OFFICIAL_TOKEN_BRANCHES))
def test_token_branches_match_the_official_code(eps, T):
    ofa, feat_s, feat_t = fixed_ofa(eps, T, tokens=True)
    _, parts = ofa(feat_s, feat_t, Batch(targets=Y))
    expected = OFFICIAL_TOKEN_BRANCHES[eps, T]
    assert [parts[f"stage{i}"].item() for i in (1, 2, 3, 4)] == pytest.approx(expected, rel=1e-5)


def test_token_branch_shapes():
    """log2(side / 7) merges, the first to D_S; max(S - i, 1) blocks of width D_S; GELU after
    every merge but the last of two."""
    ofa, _, _ = fixed_ofa(1.0, 1.0, tokens=True)
    merges = [[(m.reduction.in_features, type(m.act).__name__) for m in branch.merges] for branch in ofa.branches]
    assert merges == [[(32, "GELU"), (64, "Identity")], [(48, "GELU")], [], []]
    assert [len(branch.blocks) for branch in ofa.branches] == [3, 2, 1, 1]
    assert all(isinstance(branch, TokenBranch) and branch.fc.in_features == D_S_TOKENS for branch in ofa.branches)


def test_patch_merge_and_block_by_hand():
    """PatchMerge concatenates each 2x2 group as (0,0), (1,0), (0,1), (1,1); the block is
    x + attention, then + MLP, against a plain softmax attention."""
    torch.manual_seed(0)
    merge = PatchMerge(1, 4, nn.Identity())
    with torch.no_grad():
        merge.norm.weight.fill_(1.0)
        merge.reduction.weight.copy_(torch.eye(4))
    grid = torch.arange(16.0).reshape(1, 4, 4, 1)
    groups = merge(grid)
    first = torch.tensor([0.0, 4.0, 1.0, 5.0])
    assert torch.allclose(groups[0, 0, 0], (first - first.mean()) / (first.var(unbiased=False) + 1e-5).sqrt())
    block, x = TransformerBlock(8), torch.randn(2, 5, 8)
    q, k, v = block.qkv(block.norm1(x)).reshape(2, 5, 3, 4, 2).unbind(2)
    attn = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / 2 ** 0.5, dim=-1)
    y = x + block.proj(torch.einsum("bhnm,bmhd->bnhd", attn, v).reshape(2, 5, 8))
    expected = y + block.fc2(torch.nn.functional.gelu(block.fc1(block.norm2(y))))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_a_timm_vit_student_gets_token_branches_and_gradients():
    torch.manual_seed(0)
    student = build_model("timm:test_vit:patch_size=4", 10, "digits")
    teacher = model_dict["resnet8"](num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ctx = BuildContext(student, teacher, student.forward_features(x), teacher.forward_features(x),
                           make_args(ofa_stages="1,4"), n_train=100, num_classes=10)
    ofa = OFA(ctx)
    assert all(isinstance(branch, TokenBranch) for branch in ofa.branches)
    assert [len(branch.blocks) for branch in ofa.branches] == [3, 1]
    loss, parts = ofa(student.forward_features(x), teacher.forward_features(x), Batch(targets=torch.tensor([1, 7])))
    assert torch.isfinite(loss) and set(parts) == {"stage1", "stage4", "logits"}
    loss.backward()
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ofa.parameters())


@pytest.mark.parametrize("stage,width,message", [
    ((12, 8, 8), 16, "needs no patch merging.*12 channels.*penultimate width 16"),
    ((16, 15, 15), 16, "odd side at one of its 1 patch merges"),
    ((18, 8, 8), 18, "18 is not divisible by the 4 heads"),
])
def test_token_stages_the_official_branch_cannot_take(stage, width, message):
    maps = [wave(B, *stage)]
    ctx = BuildContext(nn.Identity(), nn.Identity(), fixed_features(logits()[0], width, maps, tokens=(True,)),
                       fixed_features(logits()[1], D_T), defaults(OFA.options), n_train=100, num_classes=K)
    with pytest.raises(UserError, match=message):
        OFA(ctx)


def test_branch_shapes_follow_the_stage_count():
    """Stage i of S gets S - i halving blocks ending at max(D_S, D_T); the deepest a 1x1 conv."""
    ofa, _, _ = fixed_ofa(1.0, 1.0)
    for i, branch in enumerate(ofa.branches):
        convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == (4 * (3 - i) if i < 3 else 1)
        assert convs[0].in_channels == STAGES[i][0] and convs[-1].out_channels == max(D_S, D_T)
        assert branch[-1].out_features == K


@pytest.mark.parametrize("eps,T", [(1.0, 1.0), (1.7, 1.0), (0.6, 3.0)])
def test_loss_by_hand(eps, T):
    z_s, z_t = logits()
    total = 0.0
    for b in range(B):
        e_s = [math.exp(v / T) for v in z_s[b].double().tolist()]
        e_t = [math.exp(v / T) for v in z_t[b].double().tolist()]
        for c in range(K):
            y = 1.0 if c == Y[b] else 0.0
            total -= ((e_t[c] / sum(e_t) + y) ** eps - y) * math.log(e_s[c] / sum(e_s))
    assert ofa_loss(z_s, z_t, Y, eps, T).item() == pytest.approx(total / B, rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_eps_one_is_kd_plus_the_teachers_entropy(T):
    """At ε = 1 the weights are the teacher's probabilities: the soft-target cross-entropy, KD's
    KL (without its T²) plus the teacher's entropy, which has no gradient."""
    z_s, z_t = logits()
    z_s.requires_grad_(True)
    p_t = torch.softmax(z_t / T, dim=1)
    entropy = -(p_t * p_t.log()).sum(dim=1).mean()
    ofa = ofa_loss(z_s, z_t, Y, 1.0, T)
    kd = DistillKL(T)(z_s, z_t) / T ** 2
    assert ofa.item() == pytest.approx((kd + entropy).item(), rel=1e-5)
    grad_ofa, = torch.autograd.grad(ofa, z_s)
    grad_kd, = torch.autograd.grad(kd, z_s)
    assert torch.allclose(grad_ofa, grad_kd, atol=1e-6)


def test_enhancement_raises_the_target_with_the_teachers_confidence():
    z_s, z_t = logits()
    z_s.requires_grad_(True)
    grads = [torch.autograd.grad(ofa_loss(z_s, z_t, Y, eps), z_s)[0][0, 0] for eps in (1.0, 2.0)]
    assert grads[1] < grads[0]   # a larger ε pulls the target logit up harder


@pytest.mark.parametrize("s_name,t_name", [("resnet8", "vgg8"), ("vgg8", "resnet8")])
def test_gradients_reach_student_and_branches_never_teacher(s_name, t_name):
    ctx, x = make_ctx(s_name, t_name, batch=4)
    ofa = OFA(ctx)
    assert len(ofa.branches) == len(ctx.feat_s.stages)
    feat_s = ctx.student.forward_features(x)
    feat_t = ctx.teacher.forward_features(x)
    loss, parts = ofa(feat_s, feat_t, Batch(targets=torch.tensor([1, 0, 3, 9])))
    assert torch.isfinite(loss) and set(parts) == {f"stage{i + 1}" for i in ofa.stages} | {"logits"}
    loss.backward()
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert next(ctx.student.parameters()).grad.abs().sum() > 0
    for name, p in ofa.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_chosen_stages_and_logit_weight():
    ctx, x = make_ctx("resnet8", "resnet8", batch=4, ofa_stages="3,1", ofa_logit_weight=0.0)
    ofa = OFA(ctx)
    assert ofa.stages == [0, 2]
    feat = ctx.student.forward_features(x)
    _, parts = ofa(feat, feat, Batch(targets=torch.tensor([1, 0, 3, 9])))
    assert set(parts) == {"stage1", "stage3", "logits"} and parts["logits"].item() == 0.0


@pytest.mark.parametrize("stages", ["0", "1,x", "", "-2"])
def test_bad_stage_lists(stages):
    with pytest.raises(UserError):
        parse_stages(stages)


def test_errors_that_need_the_networks():
    ctx, x = make_ctx("resnet8", "resnet8", batch=4, ofa_stages="4")
    with pytest.raises(UserError, match="3 stages"):
        OFA(ctx)
    ctx, x = make_ctx("resnet8", "resnet8", batch=4)
    feat = ctx.student.forward_features(x)
    with pytest.raises(UserError, match="labels"):
        OFA(ctx)(feat, feat)


def test_registry():
    spec = resolve("ofa")
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 1.0)
    assert resolve("ofa_kd") is spec
    opts = {o.name: o for o in spec.options}
    assert (opts["ofa_eps"].default, opts["ofa_temperature"].default, opts["ofa_logit_weight"].default,
            opts["ofa_stages"].default) == (1.0, 1.0, 1.0, "all")
    assert opts["ofa_eps"].per_pair == {("timm:deit_tiny_patch16_224", "imagenet_resnet18"): 1.5}


@pytest.mark.e2e
def test_one_digits_epoch_with_its_flags(digits_teacher, tmp_path, monkeypatch):
    _, teacher_dir = digits_teacher
    results, run = one_digits_epoch(monkeypatch, tmp_path, teacher_dir, "ofa", "--model_s", "resnet8",
                                    "--ofa_eps", "1.5", "--ofa_stages", "2,3")
    stored, header = read_json(run / "args.json"), (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert (stored["method"], stored["ofa_eps"], stored["ofa_stages"], stored["ofa_temperature"]) == \
        ("ofa", 1.5, "2,3", 1.0)
    assert {"train_ofa_stage2", "train_ofa_stage3", "train_ofa_logits"} <= set(header)
    assert "train_ofa_stage1" not in header
    assert math.isfinite(results["last_top1"])


@pytest.mark.e2e
def test_one_digits_epoch_with_a_timm_vit_student(digits_teacher, tmp_path, monkeypatch, capsys):
    _, teacher_dir = digits_teacher
    results, run = one_digits_epoch(monkeypatch, tmp_path, teacher_dir, "ofa", "--model_s", "timm:test_vit:patch_size=4",
                                    "--ofa_stages", "3,4", "--learning_rate", "0.01")
    assert "branches on student stages 3 (tokens), 4 (tokens)" in capsys.readouterr().out
    assert math.isfinite(results["last_top1"]) and (run / "best.pth").is_file()
