"""The model zoo against RepDistiller's facts and the `Features` contract.

The reference (tests/data/repdistiller_models.json, a copy of
shared/reference/repdistiller_models.json) was read off RepDistiller's own
models: parameter count, every state_dict key and shape (num_classes=100),
and the feature shapes for a 2x3x32x32 input.

Tests are grouped per model by the module-scoped `name` fixture, so each
model is built once and only one lives at a time. Its BatchNorm affine
parameters and running statistics are randomised, so that eval-mode checks
(e.g. "preact is BN(stage)") cannot pass by BN being the identity.
"""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model_helpers import randomise_bn
from models import MODELS as REGISTRY
from models import FeatureModel, Features, model_dict

HERE = Path(__file__).resolve().parent
REF_PATH = HERE / "data" / "repdistiller_models.json"
SHARED_REF_PATH = (Path(__file__).resolve().parents[2] / "shared" / "reference"
                   / "repdistiller_models.json")
REF = json.loads(REF_PATH.read_text())
MODELS = REF["models"]
NAMES = list(MODELS)

RESNETS = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
           "resnet56", "resnet110", "resnet8x4", "resnet32x4",
           "ResNet18", "ResNet34", "ResNet50"]
VGGS = ["vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]
WRNS = ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]
POST_ACTIVATION = set(RESNETS + VGGS + ["ShuffleV1", "ShuffleV2"])
NO_RELU_AFTER_STAGE = {"MobileNetV2"}


def _input() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(*REF["input_shape"], generator=g)




@pytest.fixture(scope="module", params=NAMES)
def name(request):
    return request.param


@pytest.fixture(scope="module")
def model(name):
    torch.manual_seed(0)
    m = model_dict[name]()  # default num_classes is 100
    randomise_bn(m)
    return m.eval()


@pytest.fixture(scope="module")
def feats(model) -> Features:
    with torch.no_grad():
        return model.forward_features(_input())


def _shape(t):
    return list(t.shape)


# --- registry and reference -------------------------------------------------

def test_every_reference_model_is_registered_as_a_cifar_network():
    assert len(MODELS) == 24 and set(MODELS) <= set(REGISTRY)
    assert {REGISTRY[name].family for name in MODELS} == {"cifar"}
    assert model_dict == {name: entry.build for name, entry in REGISTRY.items()}


@pytest.mark.parametrize("registered", list(REGISTRY))
def test_every_registered_model_keeps_the_features_contract(registered):
    """What every method relies on, for any model a registry entry adds: Features by name,
    one preact per stage of the stage's shape, the declared stage channels, logits = forward."""
    torch.manual_seed(0)
    net = REGISTRY[registered].build(num_classes=10).eval()
    size = {"cifar": 32, "imagenet": 64}[REGISTRY[registered].family]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = net.forward_features(x)
        logits = net(x)
    assert isinstance(net, FeatureModel) and isinstance(feats, Features)
    assert feats.stem.dim() == 4 and feats.pooled.shape[0] == 2 and feats.pooled.dim() == 2
    assert len(feats.preact) == len(feats.stages) == len(net.stage_channels) >= 1
    assert [s.shape[1] for s in feats.stages] == list(net.stage_channels)
    assert all(p.shape == s.shape for p, s in zip(feats.preact, feats.stages))
    assert feats.logits.shape == (2, 10) and torch.equal(feats.logits, logits)


def test_reference_copy_matches_shared():
    if not SHARED_REF_PATH.exists():
        pytest.skip("shared/reference is not present (clean clone)")
    assert json.loads(SHARED_REF_PATH.read_text()) == REF


# --- structure ----------------------------------------------------------------

def test_state_dict_keys_and_shapes(name, model):
    want = {k: shape for k, shape in MODELS[name]["state_dict"]}
    got = {k: _shape(v) for k, v in model.state_dict().items()}
    assert set(got) == set(want), (
        f"missing {sorted(set(want) - set(got))[:5]}, "
        f"extra {sorted(set(got) - set(want))[:5]}")
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not bad


def test_parameter_count(name, model):
    assert sum(p.numel() for p in model.parameters()) == MODELS[name]["params"]


def test_is_feature_model_with_one_code_path(model):
    assert isinstance(model, FeatureModel)
    # forward is the base class's (logits of forward_features), not a copy.
    assert type(model).forward is FeatureModel.forward


def test_num_classes_argument(name):
    m = model_dict[name](num_classes=10).eval()
    with torch.no_grad():
        assert _shape(m(_input())) == [2, 10]


# --- features -----------------------------------------------------------------

def test_feature_shapes(name, feats):
    want = MODELS[name]["features"]
    assert isinstance(feats, Features)
    assert _shape(feats.stem) == want["stem"]
    assert [_shape(s) for s in feats.stages] == want["stages"]
    assert _shape(feats.pooled) == want["pooled"]
    assert _shape(feats.logits) == want["logits"]
    assert torch.isfinite(feats.logits).all()


def test_preact_shapes(feats):
    assert len(feats.preact) == len(feats.stages)
    for pre, stage in zip(feats.preact, feats.stages):
        assert pre.shape == stage.shape


def test_stage_channels(model, feats):
    assert len(model.stage_channels) == len(feats.stages)
    assert model.stage_channels == [s.shape[1] for s in feats.stages]
    assert all(type(c) is int for c in model.stage_channels)


def test_bn_before_relu(name, model):
    bns = model.bn_before_relu()
    assert len(bns) == len(model.stage_channels)
    own = {id(m) for m in model.modules()}
    for bn, c in zip(bns, model.stage_channels):
        assert isinstance(bn, nn.BatchNorm2d)
        assert id(bn) in own
        # ShuffleV2's bn3 sits on the convolved half of the split.
        assert bn.num_features == (c // 2 if name == "ShuffleV2" else c)
    assert model.get_bn_before_relu() == bns


def test_forward_returns_the_logits_of_forward_features(model, feats):
    with torch.no_grad():
        logits = model(_input())
    assert isinstance(logits, torch.Tensor)
    torch.testing.assert_close(logits, feats.logits, rtol=0, atol=0)


def test_preact_relation(name, model, feats):
    if name in POST_ACTIVATION:
        for pre, stage in zip(feats.preact, feats.stages):
            assert (pre < 0).any()  # a real pre-activation, not the output
            assert torch.equal(F.relu(pre), stage)
    elif name in NO_RELU_AFTER_STAGE:
        for pre, stage in zip(feats.preact, feats.stages):
            assert torch.equal(pre, stage)
    else:
        assert name in WRNS
        # The BN that next reads each stage output, applied in eval mode.
        bns = [model.block2.layer[0].bn1, model.block3.layer[0].bn1,
               model.bn1]
        assert bns == model.bn_before_relu()
        with torch.no_grad():
            for bn, pre, stage in zip(bns, feats.preact, feats.stages):
                torch.testing.assert_close(pre, bn(stage))
                assert not torch.allclose(pre, stage)


def test_train_forward_updates_each_bn_once_and_backprops(model):
    m = copy.deepcopy(model).train()
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert bns and all(int(bn.num_batches_tracked) == 0 for bn in bns)
    f = m.forward_features(_input())
    counts = {n: int(x.num_batches_tracked) for n, x in m.named_modules()
              if isinstance(x, nn.BatchNorm2d)}
    assert all(c == 1 for c in counts.values()), {
        n: c for n, c in counts.items() if c != 1}
    # Every returned tensor is differentiable and no in-place op broke autograd.
    loss = f.logits.sum() + f.pooled.sum() + f.stem.sum()
    loss = loss + sum(s.sum() for s in f.stages) + sum(p.sum() for p in f.preact)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


# --- checkpoints ----------------------------------------------------------------

def test_loads_repdistiller_checkpoint(name, model, tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {}
    for key, shape in MODELS[name]["state_dict"]:
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.randint(0, 1000, shape, generator=g)
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": sd, "epoch": 240}, path)

    ckpt = torch.load(path, map_location="cpu")
    m = copy.deepcopy(model)
    m.load_state_dict(ckpt["model"], strict=True)
    loaded = m.state_dict()
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key



# --- the wider WRNs of DKD's capacity-gap ladder (not RepDistiller's) ------------

def wrn_parameters(depth: int, width: int, classes: int = 100) -> int:
    """WRN-depth-width's parameter count from Zagoruyko & Komodakis' layout: a 3x3 stem of 16
    channels, three stages of (depth - 4) / 6 pre-activation blocks of 16w, 32w, 64w channels
    (two BN + two 3x3 convs each, a 1x1 shortcut where the width changes), a final BN, a linear
    classifier."""
    blocks, params, c_in = (depth - 4) // 6, 3 * 16 * 9, 16
    for c_out in (16 * width, 32 * width, 64 * width):
        for b in range(blocks):
            c = c_in if b == 0 else c_out
            params += 2 * c + c * c_out * 9 + 2 * c_out + c_out * c_out * 9 + (c * c_out if c != c_out else 0)
        c_in = c_out
    return params + 2 * c_in + c_in * classes + classes


@pytest.mark.parametrize("name, depth, width", [("wrn_16_4", 16, 4), ("wrn_28_2", 28, 2), ("wrn_28_4", 28, 4)])
def test_the_capacity_gap_wrns_have_their_depth_and_width(name, depth, width):
    m = model_dict[name]()
    assert sum(p.numel() for p in m.parameters()) == wrn_parameters(depth, width)
    assert [len(block.layer) for block in (m.block1, m.block2, m.block3)] == [(depth - 4) // 6] * 3
    with torch.no_grad():
        f = m.forward_features(torch.zeros(2, 3, 32, 32))
    assert [list(s.shape[1:]) for s in f.stages] == [[16 * width, 32, 32], [32 * width, 16, 16], [64 * width, 8, 8]]
    assert REGISTRY[name].family == "cifar"


def test_the_wrn_parameter_formula_matches_repdistillers_wrns():
    assert all(wrn_parameters(d, w) == MODELS[f"wrn_{d}_{w}"]["params"] for d, w in ((16, 1), (16, 2), (40, 1), (40, 2)))
