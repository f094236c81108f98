"""CAT-KD: pooled CAMs against full-resolution CAMs from a 1x1 convolution (then pooled), the
1x1 CAM equal to the logits, the MSE and its normalised variant by hand, per-pair -b weights,
gradients into the student only, real networks, and the refusal of networks whose classifier
reads another map."""
import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from distiller_zoo.base import resolve
from distiller_zoo.cat_kd import CATKD, CATLoss, pooled_cams
from distiller_zoo.classifier import class_map, last_linear
from distiller_zoo.objective import parse_objective
from method_helpers import make_ctx, step_on_real_models


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_cams(fmap, head):
    kernel = head.weight[:, :, None, None]
    return F.conv2d(fmap, kernel, head.bias)


@pytest.mark.parametrize("size,res", [(8, 2), (8, 4), (4, 1), (6, 4)])
def test_pooled_cams_equal_pooled_full_cams(size, res):
    head = torch.nn.Linear(5, 3)
    fmap = rand(2, 5, size, size, seed=size)
    expected = F.adaptive_avg_pool2d(full_cams(fmap, head), res)
    assert torch.allclose(pooled_cams(fmap, head, res), expected, atol=1e-5)


def test_one_by_one_cam_is_the_logit():
    ctx, x = make_ctx("resnet8", "resnet20")
    head = last_linear(ctx.student)
    cams = pooled_cams(class_map(ctx.feat_s), head, 1)
    assert torch.allclose(cams.flatten(1), ctx.feat_s.logits, atol=1e-5)


def test_loss_by_hand():
    a, b = rand(2, 3, 2, 2, seed=1), rand(2, 3, 2, 2, seed=2)
    diff = (a - b).flatten().tolist()
    assert CATLoss()(a, b).item() == pytest.approx(sum(d * d for d in diff) / 24, rel=1e-5)
    total = 0.0
    for i in range(2):
        for k in range(3):
            u, v = a[i, k].flatten(), b[i, k].flatten()
            u, v = u / u.norm(), v / v.norm()
            total += float(((u - v) ** 2).sum())
    assert CATLoss(normalize=True)(a, b).item() == pytest.approx(total / 24, rel=1e-5)


def test_registry_and_per_pair_weights(capsys):
    spec = resolve("CAT_KD")
    assert (spec.gamma, spec.alpha, spec.beta) == (1.0, 0.0, 15.0) and spec.cls is CATKD
    assert resolve("catkd") is spec
    for pair, weight in ((("resnet32x4", "resnet8x4"), 15.0), (("resnet56", "resnet20"), 0.7),
                         (("vgg13", "vgg8"), 4.5), (("wrn_40_2", "wrn_16_2"), 15.0)):
        assert parse_objective("cat_kd", None, None, None, pair=pair).methods[0].weight == weight
    assert parse_objective("cat_kd", None, None, 3.0, pair=("vgg13", "vgg8")).methods[0].weight == 3.0
    ctx, _ = make_ctx("resnet8", "resnet20", cat_resolution=4)
    d = CATKD(ctx)
    assert d.resolution == 4
    assert "cat_kd: CAMs pooled to 4x4" in capsys.readouterr().out
    assert list(d.parameters()) == []


def test_forward_matches_formula_on_real_models():
    ctx, x = make_ctx("resnet8", "resnet8x4", batch=3)
    d = CATKD(ctx)
    loss, parts = step_on_real_models(d, ctx, x)
    assert parts == {}
    head_s, head_t = last_linear(ctx.student), last_linear(ctx.teacher)
    with torch.no_grad():
        fs, ft = ctx.student.forward_features(x), ctx.teacher.forward_features(x)
        a = F.adaptive_avg_pool2d(full_cams(F.relu(fs.preact[-1]), head_s), 2)
        b = F.adaptive_avg_pool2d(full_cams(F.relu(ft.preact[-1]), head_t), 2)
    assert loss.item() == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-4)
    assert head_s.weight.grad is not None and head_s.weight.grad.abs().sum() > 0


def test_heterogeneous_pair_and_refusals():
    ctx, x = make_ctx("ShuffleV1", "wrn_16_2")          # 4x4 student map, 8x8 teacher map
    step_on_real_models(CATKD(ctx), ctx, x)
    ctx, _ = make_ctx("MobileNetV2", "resnet20")
    with pytest.raises(UserError, match="student MobileNetV2"):
        CATKD(ctx)
    ctx, _ = make_ctx("resnet8", "resnet20", cat_resolution=0)
    with pytest.raises(UserError, match="cat_resolution"):
        CATKD(ctx)
