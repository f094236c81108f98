"""SimKD: the loss and the reused-classifier logits against a hand computation and against
numbers from the official code, gradient flow, the errors, and one digits epoch whose deployed
network (student + projector + teacher classifier) is what the trainer evaluates, what the
checkpoint holds, what evaluate.py measures and what the export runs."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evaluate
import train_student
from conftest import fast_args
from core.errors import UserError
from deploy.export import check_exports, export_onnx, export_program
from deploy.network import load_network
from distiller_zoo.base import DEPLOYED_LOGITS, BuildContext, DeployedNetwork, resolve
from distiller_zoo.classifier import last_linear
from distiller_zoo.simkd import SimKD, SimKDHead, SimKDLoss
from engine.checkpoint import load_checkpoint
from engine.distill_task import DistillTask
from method_helpers import make_args, make_ctx, step_on_real_models
from models.features import Features


def fixed(shape, k, scale=1.0):
    """Deterministic values without a random generator: sin(0.37 n + k) * scale."""
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + k) * scale).reshape(shape).float()


def hand_features(f: torch.Tensor, classes: int = 5) -> Features:
    """Features whose last stage is `f` and whose classifier input is its spatial mean."""
    return Features(stem=f, stages=[f], preact=[f], pooled=f.mean(dim=(2, 3)), logits=torch.zeros(f.shape[0], classes))


def fixed_simkd(s_shape, t_shape, factor):
    """A SimKD distiller built on hand-made features, every parameter set by `fixed` in the
    order the official script filled the official module's (transfer.0 ... transfer.7), and
    the teacher's classifier Linear(C_t, 5) set by `fixed` too."""
    f_s, f_t = fixed(s_shape, 1), fixed(t_shape, 2).clamp(min=0)
    teacher = nn.Linear(t_shape[1], 5)
    with torch.no_grad():
        teacher.weight.copy_(fixed(teacher.weight.shape, 50, 0.5))
        teacher.bias.copy_(fixed(teacher.bias.shape, 51, 0.5))
    feat_s, feat_t = hand_features(f_s), hand_features(f_t)
    ctx = BuildContext(student=nn.Identity(), teacher=teacher, feat_s=feat_s, feat_t=feat_t,
                       options=make_args(simkd_factor=factor), n_train=10, num_classes=5)
    distiller = SimKD(ctx).train()
    with torch.no_grad():
        for k, (_, p) in enumerate(distiller.head.projector.named_parameters()):
            p.copy_(fixed(p.shape, 100 + k, 0.3))
    return distiller, feat_s, feat_t


# DefangChen/SimKD at 2b389c31ed7779aea31e7aaf0bb0f2d8b6ac2f01, models/util.py SimKD(s_n, t_n, factor)
# in train mode, forward(feat_s, feat_t, cls_t) with nn.MSELoss() on its two maps (helper/loops.py),
# on the inputs and parameters of `fixed_simkd`; run offline with torch 2.14 CPU. The first case
# pools the student's 8x8 map to the teacher's 4x4, the second the teacher's 8x8 map to 4x4.
OFFICIAL = [
    ((4, 6, 8, 8), (4, 8, 4, 4), 2, 0.2035691738128662,
     [0.6115526556968689, 0.26538556814193726, 0.5777625441551208, 0.5051010251045227, 0.2732052803039551,
      0.6894322633743286]),
    ((4, 6, 4, 4), (4, 8, 8, 8), 4, 0.07251360267400742,
     [0.5112872123718262, 0.3591019809246063, 0.493677020072937, 0.576790452003479, 0.21626940369606018,
      0.5112872123718262]),
]


@pytest.mark.parametrize("s_shape,t_shape,factor,loss,logits", OFFICIAL)
def test_matches_the_official_code(s_shape, t_shape, factor, loss, logits):
    distiller, feat_s, feat_t = fixed_simkd(s_shape, t_shape, factor)
    value, parts = distiller(feat_s, feat_t)
    assert value.item() == pytest.approx(loss, rel=1e-5)
    assert parts[DEPLOYED_LOGITS].reshape(-1)[:6].tolist() == pytest.approx(logits, rel=1e-5)


def test_against_a_hand_computation():
    """The projector written out with functional ops (BN on batch statistics), the MSE and
    W_t mean(P(s)) + b_t, on the case where the teacher's map is pooled to the student's size."""
    distiller, feat_s, feat_t = fixed_simkd((4, 6, 4, 4), (4, 8, 8, 8), 4)
    seq = distiller.head.projector
    x = feat_s.stages[-1].double()

    def bn(x, layer):
        mean, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight.double().view(1, -1, 1, 1) \
            + layer.bias.double().view(1, -1, 1, 1)

    x = bn(F.conv2d(x, seq[0].weight.double()), seq[1]).clamp(min=0)
    x = bn(F.conv2d(x, seq[3].weight.double(), padding=1), seq[4]).clamp(min=0)
    x = bn(F.conv2d(x, seq[6].weight.double()), seq[7]).clamp(min=0)
    t = feat_t.stages[-1].double()
    t = t.reshape(4, 8, 4, 2, 4, 2).mean(dim=(3, 5))   # 2x2 average pooling: 8x8 -> 4x4
    classifier = distiller.head.classifier
    logits = x.mean(dim=(2, 3)) @ classifier.weight.double().t() + classifier.bias.double()
    value, parts = distiller(feat_s, feat_t)
    assert value.item() == pytest.approx(((x - t) ** 2).mean().item(), rel=1e-5)
    assert torch.allclose(parts[DEPLOYED_LOGITS].double(), logits, atol=1e-5)
    assert SimKDLoss()(t, t).item() == 0.0


@pytest.mark.parametrize("t_name", ["resnet8", "vgg8", "wrn_16_1"])
def test_gradients_reach_student_and_projector_never_teacher_or_classifier(t_name):
    ctx, x = make_ctx("resnet8", t_name, batch=4)
    distiller = SimKD(ctx)
    assert torch.equal(distiller.head.classifier.weight, last_linear(ctx.teacher).weight)
    step_on_real_models(distiller, ctx, x)
    assert ctx.student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in distiller.head.projector.parameters())
    assert all(not p.requires_grad and p.grad is None for p in distiller.head.classifier.parameters())


def test_head_rebuilds_from_its_config():
    ctx, x = make_ctx("resnet8", "vgg8", batch=4)
    head = SimKD(ctx).head.eval()
    copy = SimKDHead(**head.config())
    copy.load_state_dict(head.state_dict())
    feat = ctx.student.eval().forward_features(x)
    assert torch.equal(copy.eval()(feat), head(feat))


@pytest.mark.parametrize("overrides,t_name,message", [
    (dict(simkd_factor=0), "resnet8", "--simkd_factor"),
    (dict(simkd_factor=1000), "resnet8", "--simkd_factor"),
    ({}, "MobileNetV2", "pools another map"),
])
def test_user_errors(overrides, t_name, message):
    ctx, _ = make_ctx("resnet8", t_name, batch=2, **overrides)
    with pytest.raises(UserError, match=message):
        SimKD(ctx)


def test_two_heads_cannot_be_combined():
    ctx, _ = make_ctx("resnet8", "resnet8", batch=2)
    methods = [("simkd", 1.0, SimKD(ctx)), ("simkd_again", 1.0, SimKD(ctx))]
    with pytest.raises(UserError, match="both replace"):
        DistillTask(ctx.student, ctx.teacher, methods, 0.0, 0.0, ("kd", nn.Identity()), 4.0, 10)


def test_registry():
    spec = resolve("simkd")
    assert (spec.gamma, spec.alpha, spec.beta) == (0.0, 0.0, 1.0)
    assert spec.cls.head_class is SimKDHead


def test_deployed_network_in_training_evaluation_checkpoint_and_export(digits_teacher, tmp_path):
    _, teacher_dir = digits_teacher
    results = train_student.main(fast_args(tmp_path, "--path_t", str(teacher_dir / "best.pth"), "--model_s", "resnet8",
                                           "--distill", "simkd", "--epochs", "1", "--batch_size", "128"))
    run_dir = tmp_path / "students" / results["run_name"]
    checkpoint = run_dir / "ckpt_last.pth"
    state = load_checkpoint(checkpoint)
    assert state["head"]["method"] == "simkd" and state["arch"] == "resnet8"
    network, arch = load_network(checkpoint, None, 10, "digits")
    assert isinstance(network, DeployedNetwork) and arch == "resnet8"
    assert results["params"] == sum(p.numel() for p in network.parameters())
    report = evaluate.main([str(checkpoint), "--latency_runs", "1", "--latency_warmup", "0"])
    assert report["top1"] == pytest.approx(results["last_top1"], abs=1e-6)
    assert report["params"] == results["params"]
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    export_onnx(network, images, tmp_path / "m.onnx")
    export_program(network, images, tmp_path / "m.pt2")
    checks = check_exports(network, images, tmp_path / "m.onnx", tmp_path / "m.pt2")
    assert all(check["within_tolerance"] for check in checks.values())
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(fast_args(tmp_path, "--qat_epochs", "1", "--init_student", str(checkpoint)))
    assert exit_info.value.code == 2
