"""The ImageNet networks against torchvision's own under the same weights, and the
`Features` contract. Inputs are 2x3x64x64 so every model runs in well under a second."""
import pytest
import torch
import torch.nn as nn
import torchvision

from model_helpers import randomise_bn
from models import FeatureModel, imagenet_model_dict, model_dict

TORCHVISION = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "shufflenet_v2_x1_0"]
POST_ACTIVATION = {"imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_mobilenet_v1"}


def _input():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))




@pytest.mark.parametrize("tv_name", TORCHVISION)
def test_torchvision_weights_load_strictly_and_give_torchvision_logits(tv_name):
    torch.manual_seed(0)
    reference = torchvision.models.get_model(tv_name, weights=None)
    randomise_bn(reference)
    ours = model_dict[f"imagenet_{tv_name}"]()
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.eval(), ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(_input()), reference(_input()))
        assert torch.equal(ours.forward_features(_input()).logits, reference(_input()))


def test_mobilenet_v1_has_the_reference_parameters():
    """mdistiller's MobileNetV1: `model.0` conv-BN-ReLU, `model.1..13` depthwise-separable
    blocks, `fc`; 4,231,976 parameters with 1000 classes."""
    model = model_dict["imagenet_mobilenet_v1"]()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 4231976
    assert len(shapes) == 6 + 13 * 12 + 2
    assert shapes["model.0.0.weight"] == [32, 3, 3, 3]
    assert shapes["model.1.0.weight"] == [32, 1, 3, 3]
    assert shapes["model.1.3.weight"] == [64, 32, 1, 1]
    assert shapes["model.13.4.running_var"] == [1024]
    assert shapes["fc.weight"] == [1000, 1024]


def test_names_cannot_be_mistaken_for_cifar_names():
    cifar = {n.lower() for n in model_dict if n not in imagenet_model_dict}
    for name in imagenet_model_dict:
        assert name.startswith("imagenet_") and name.lower() not in cifar
    assert not any(n.startswith("imagenet_") for n in model_dict if n not in imagenet_model_dict)


@pytest.fixture(scope="module", params=list(imagenet_model_dict))
def name(request):
    return request.param


@pytest.fixture(scope="module")
def model(name):
    torch.manual_seed(0)
    m = imagenet_model_dict[name](num_classes=10)
    randomise_bn(m)
    return m.eval()


def test_features_contract(name, model):
    assert isinstance(model, FeatureModel) and type(model).forward is FeatureModel.forward
    with torch.no_grad():
        feats = model.forward_features(_input())
    assert feats.logits.shape == (2, 10)
    assert feats.pooled.ndim == 2 and feats.stem.ndim == 4
    assert model.stage_channels == [s.shape[1] for s in feats.stages]
    assert [p.shape for p in feats.preact] == [s.shape for s in feats.stages]
    for pre, stage in zip(feats.preact, feats.stages):
        if name in POST_ACTIVATION:
            assert torch.equal(torch.relu(pre), stage) and (pre < 0).any()
        else:
            assert torch.equal(pre, stage)


def test_bn_before_relu(model):
    own = {id(m) for m in model.modules()}
    bns = model.bn_before_relu()
    assert len(bns) == len(model.stage_channels)
    assert all(isinstance(bn, nn.BatchNorm2d) and id(bn) in own for bn in bns)


def test_one_pass_runs_every_batchnorm_once(name):
    model = imagenet_model_dict[name](num_classes=10).train()
    model.forward_features(_input())
    counts = {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {1}
