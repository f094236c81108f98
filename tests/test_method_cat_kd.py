"""CAT-KD: pooled CAMs against full-resolution CAMs from a bias-free 1x1 convolution (then
pooled), the 1x1 CAM equal to the logits less the bias, the MSE and its normalised variant by
hand and against the official code's numbers, per-pair -b weights and options, gradients into
the student only, real networks, and the refusal of networks whose classifier reads another
map."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from core.errors import UserError
from distiller_zoo.base import resolve
from distiller_zoo.cat_kd import CATKD, CATLoss, pooled_cams
from distiller_zoo.classifier import class_map, last_linear
from distiller_zoo.objective import parse_objective
from distiller_zoo.options import resolve_options
from method_helpers import make_ctx, step_on_real_models


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_cams(fmap, head):
    """The official networks' CAMs: the classifier weights as a 1x1 convolution without bias."""
    return F.conv2d(fmap, head.weight[:, :, None, None])


def fixed(shape, phase):
    """Inputs that do not depend on a random generator: sin(0.37 i + phase), i = 0, 1, ..."""
    return torch.sin(torch.arange(torch.Size(shape).numel(), dtype=torch.float64) * 0.37 + phase).reshape(shape)


@pytest.mark.parametrize("size,res", [(8, 2), (8, 4), (4, 1), (6, 4)])
def test_pooled_cams_equal_pooled_full_cams(size, res):
    head = torch.nn.Linear(5, 3)
    fmap = rand(2, 5, size, size, seed=size)
    expected = F.adaptive_avg_pool2d(full_cams(fmap, head), res)
    assert torch.allclose(pooled_cams(fmap, head, res), expected, atol=1e-5)


def test_one_by_one_cam_is_the_logit_less_the_bias():
    ctx, x = make_ctx("resnet8", "resnet20")
    head = last_linear(ctx.student)
    torch.nn.init.normal_(head.bias)
    cams = pooled_cams(class_map(ctx.feat_s), head, 1)
    assert torch.allclose(cams.flatten(1), head(class_map(ctx.feat_s).mean(dim=(2, 3))) - head.bias, atol=1e-5)


@pytest.mark.parametrize("res,normalize,official", [(2, False, 3.587000173900686), (4, True, 0.10817897056824517),
                                                    (1, False, 3.1238794301077295)])
def test_loss_equals_the_official_code(res, normalize, official):
    # `official`: GzyAftermath/CAT-KD at 4467073ca31b9929e7c45f5a6761e5e1b7c9442f, run offline in float64:
    # CAT_loss(stu, tea, res, normalize) of mdistiller/distillers/CAT_KD.py on the CAMs of the official
    # ResNet_test (conv_test, a bias-free 1x1 convolution with the classifier's weights) of these maps
    fs, ft = fixed((2, 4, 4, 4), 0.1).relu(), fixed((2, 6, 8, 8), 0.7).relu()
    head_s, head_t = torch.nn.Linear(4, 3).double(), torch.nn.Linear(6, 3).double()
    with torch.no_grad():
        head_s.weight.copy_(fixed((3, 4), 1.3))
        head_t.weight.copy_(fixed((3, 6), 2.1))
        head_s.bias.fill_(0.5)          # the official maps have no bias: these must not count
        head_t.bias.fill_(-1.0)
    loss = CATLoss(normalize)(pooled_cams(fs, head_s, res), pooled_cams(ft, head_t, res))
    assert loss.item() == pytest.approx(official, rel=1e-12)


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
    # the official configs/cifar100/CAT_KD/*.yaml: (weight, resolution, normalised) by pair
    official = {("resnet32x4", "resnet8x4"): (15.0, 2, False), ("resnet56", "resnet20"): (0.7, 2, False),
                ("resnet110", "resnet32"): (1.8, 2, False), ("vgg13", "vgg8"): (4.5, 2, False),
                ("wrn_40_2", "wrn_40_1"): (1.5, 2, False), ("wrn_40_2", "wrn_16_2"): (12.0, 2, False),
                ("resnet32x4", "ShuffleV1"): (600.0, 4, True), ("wrn_40_2", "ShuffleV1"): (80.0, 4, True),
                ("resnet8x4", "resnet8"): (15.0, 2, False)}   # no config: the defaults
    unset = SimpleNamespace(cat_resolution=None, cat_normalize=None)
    for pair, (weight, res, normalize) in official.items():
        assert parse_objective("cat_kd", None, None, None, pair=pair).methods[0].weight == weight
        opts, sources = resolve_options(CATKD.options, SimpleNamespace(**vars(unset)), pair)
        assert (opts.cat_resolution, opts.cat_normalize) == (res, normalize)
    opts, sources = resolve_options(CATKD.options, SimpleNamespace(cat_resolution=2, cat_normalize=False),
                                    ("wrn_40_2", "ShuffleV1"))
    assert (opts.cat_resolution, opts.cat_normalize, sources["cat_normalize"]) == (2, False, "given")
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
