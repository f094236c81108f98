"""torchvision and timm networks by name (models/external.py): the recorded feature shapes, that
the hooks leave the logits unchanged, token sequences as maps, one line for a wrong module path,
and end to end on digits: a torchvision teacher distilled into a torchvision student (checkpoint
loads strict into torchvision's own model, evaluate.py, scripts/export.py) and a timm ViT
teacher distilled into the suite's resnet8."""
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import MobileNet_V3_Small_Weights

import dataset.digits
import dataset.loaders
import evaluate
import train_student
from conftest import crash_after_checkpoint, fast_args, read_json
from core.errors import UserError
from deploy import data
from deploy.export import check_exports, export_onnx, export_program
from deploy.network import load_network
from distiller_zoo import METHODS
from engine.build import build_model, check_model_name
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.runs import dir_name
from engine.teacher import build_teacher, read_teacher
from method_helpers import quarter_digits
from models.external import FeaturePaths, parse_name, tokens_to_map

TINY_VIT = "timm:test_vit:patch_size=4"  # timm's 6-block test ViT on an 8x8 grid of 4x4 patches


def _digits_batch():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_recorded_shapes_of_a_torchvision_resnet():
    net = build_model("torchvision:resnet18", 10, "digits")
    feat = net.eval().forward_features(_digits_batch())
    assert net.feature_stages == ["layer1", "layer2", "layer3", "layer4"] and net.feature_head == "fc"
    assert [tuple(s.shape[1:]) for s in feat.stages] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert tuple(feat.stem.shape[1:]) == (64, 8, 8)  # the max-pool's output, which enters layer1
    assert tuple(feat.pooled.shape[1:]) == (512,) and tuple(feat.logits.shape[1:]) == (10,)
    assert net.stage_channels == [64, 128, 256, 512] and net.token_stages == [False] * 4


def test_named_modules_and_head_are_recorded():
    net = build_model("torchvision:mobilenet_v3_small", 10, "digits",
                      FeaturePaths("features.3,features.8", "classifier.3"))
    feat = net.eval().forward_features(_digits_batch())
    assert [tuple(s.shape[1:]) for s in feat.stages] == [(24, 4, 4), (48, 2, 2)]
    assert tuple(feat.pooled.shape[1:]) == (1024,)  # the input of the last Linear
    default = build_model("torchvision:mobilenet_v3_small", 10, "digits")
    assert default.feature_stages == ["features.1", "features.3", "features.8", "features.12"]


@pytest.mark.parametrize("name", ["torchvision:resnet18", TINY_VIT])
def test_hooks_leave_the_logits_unchanged(name):
    torch.manual_seed(0)
    wrapped = build_model(name, 10, "digits").eval()
    net = parse_name(name)
    plain = (torchvision.models.get_model(net.name, num_classes=10) if net.library == "torchvision" else
             __import__("timm").create_model(net.name, num_classes=10, img_size=32, **net.kwargs)).eval()
    plain.load_state_dict(wrapped.state_dict(), strict=True)  # the library's parameter names
    x = _digits_batch()
    with torch.no_grad():
        expected = plain(x)
        assert torch.equal(wrapped(x), expected)
        assert torch.equal(wrapped.forward_features(x).logits, expected)


def test_tokens_become_maps_without_the_class_token():
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    by_hand = tokens[:, 1:].reshape(2, 4, 4, 3).permute(0, 3, 1, 2)
    assert torch.equal(tokens_to_map(tokens, 1, (4, 4)), by_hand)
    vit = build_model(TINY_VIT, 10, "digits").eval()
    seen = {}
    vit.blocks[-1].register_forward_hook(lambda m, i, out: seen.setdefault("last", out))
    feat = vit.forward_features(_digits_batch())
    assert vit.feature_stages[-1] == "blocks.5" and vit.num_prefix_tokens == 1 and vit.token_stages == [True] * 4
    assert torch.equal(feat.stages[-1], seen["last"][:, 1:].reshape(2, 8, 8, -1).permute(0, 3, 1, 2))
    assert tuple(feat.pooled.shape[1:]) == (64,)  # the class token after the final norm


def test_wrong_names_are_one_line_with_the_nearest():
    with pytest.raises(UserError, match=r"--feat_t: torchvision:resnet18 has no module 'layr4'; nearest: layer4"):
        build_model("torchvision:resnet18", 10, "digits", FeaturePaths("layer3,layr4", role="t"))
    with pytest.raises(UserError, match=r"--head_s: .* no module 'fcc'; nearest: fc"):
        build_model("torchvision:resnet18", 10, "digits", FeaturePaths(head="fcc"))
    with pytest.raises(UserError, match=r"torchvision has no classification model 'resnet19'; nearest: torchvision:resnet1"):
        check_model_name("torchvision:resnet19", "--model_s")
    with pytest.raises(UserError, match=r"'depth' is not KEY=VALUE"):
        check_model_name("timm:test_vit:depth", "--model_s")
    with pytest.raises(UserError, match=r"--feat_s layer4: resnet8 is one of the suite's networks"):
        build_model("resnet8", 10, "digits", FeaturePaths("layer4"))


def test_a_wrong_module_path_stops_train_student_in_one_line(tmp_path, capsys):
    teacher = _random_teacher(tmp_path / "resnet18.pth", "torchvision:resnet18")
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(fast_args(tmp_path / "save", "--path_t", str(teacher), "--model_s", "resnet8",
                                     "--distill", "at", "--feat_t", "layer3,layr4"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no module 'layr4'; nearest: layer4" in err
    assert not (tmp_path / "save" / "students").exists()


def test_library_teachers_by_name_from_the_caches(monkeypatch, tmp_path):
    """torchvision's weights of a network the zoo lacks, from torch's hub cache; timm's, offline with
    an empty cache, are one line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small().eval()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(MobileNet_V3_Small_Weights.DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    state, arch = read_teacher("torchvision:mobilenet_v3_small", None)
    assert arch == "torchvision:mobilenet_v3_small" and read_teacher(cached, None)[1] == arch
    teacher = build_teacher(state, arch, 1000, "torchvision:mobilenet_v3_small", "imagenet")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(teacher(x), reference(x))
    hub = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="cannot load timm's weights for test_vit .*--model_t timm:test_vit$"):
        read_teacher("timm:test_vit", None)


def test_run_directory_names_are_path_safe():
    assert dir_name("S-torchvision:mobilenet_v3_small_T-timm:hf-hub:org/net") == \
        "S-torchvision-mobilenet_v3_small_T-timm-hf-hub-org-net"


def _random_teacher(path, arch):
    """A randomly initialised library teacher saved as a checkpoint of this suite."""
    torch.manual_seed(0)
    save_checkpoint({"model": build_model(arch, 10, "digits").state_dict(), "arch": arch, "dataset": "digits"}, path)
    return path


@pytest.mark.e2e
def test_torchvision_pair_distils_evaluates_and_exports(monkeypatch, tmp_path, capsys):
    quarter_digits(monkeypatch)
    teacher = _random_teacher(tmp_path / "resnet18.pth", "torchvision:resnet18")
    save = tmp_path / "save"
    results = train_student.main(fast_args(
        save, "--path_t", str(teacher), "--model_s", "torchvision:mobilenet_v3_small", "--distill", "at", "-a", "1",
        "--feat_t", "layer2,layer3", "--feat_s", "features.3,features.8", "--epochs", "1", "--batch_size", "128",
        "--amp", "off", "--no-channels_last"))
    run = save / "students" / results["run_name"]
    assert run.name.startswith("S-torchvision-mobilenet_v3_small_T-torchvision-resnet18_digits_at")
    stored = read_json(run / "args.json")
    assert (stored["model_s"], stored["model_t"], stored["feat_t"]) == \
        ("torchvision:mobilenet_v3_small", "torchvision:resnet18", "layer2,layer3")
    assert "at: stages paired from the deepest: s0(24, 4, 4)->t0(128, 4, 4), s1(48, 2, 2)->t1(256, 2, 2)" in \
        capsys.readouterr().out
    state = load_checkpoint(run / "best.pth")
    torchvision.models.mobilenet_v3_small(num_classes=10).load_state_dict(state["model"], strict=True)
    report = evaluate.main([str(run / "best.pth"), "--latency_runs", "1", "--latency_warmup", "0"])
    assert report["model"] == "torchvision:mobilenet_v3_small" and report["top1"] == pytest.approx(results["last_top1"])
    _check_export(run / "best.pth", tmp_path)


def _check_export(checkpoint, tmp_path):
    """scripts/export.py's steps on the checkpoint. After one epoch of a few steps the network's own
    fp32 rounding moves its logits by ~1e-3 (its BatchNorm statistics, at torchvision MobileNetV3's
    momentum of 0.01, are far from the batches'), beyond export.py's 1e-4 verdict, so ONNX Runtime is
    held to the predictions here and torch.export to the exact logits."""
    model, _ = load_network(checkpoint, None, 10, "digits")
    images = data.split_tensors(data.loaders("digits", "./data")[1])[0][:16]
    onnx_path = export_onnx(model, images, tmp_path / "model.onnx")
    export_program(model, images, tmp_path / "model.pt2")
    checks = check_exports(model, images, onnx_path, tmp_path / "model.pt2")
    assert checks["torch_export"]["within_tolerance"] and checks["onnx"]["top1_agreement"] == 100.0


@pytest.mark.e2e
def test_a_timm_vit_teacher_distils_into_resnet8(monkeypatch, tmp_path):
    quarter_digits(monkeypatch)
    teacher = _random_teacher(tmp_path / "vit.pth", TINY_VIT)
    results = train_student.main(fast_args(tmp_path / "save", "--path_t", str(teacher), "--model_s", "resnet8",
                                           "--distill", "kd", "--epochs", "1", "--batch_size", "128"))
    assert results["teacher"] == TINY_VIT and results["model"] == "resnet8"
    report = evaluate.main([str(teacher), "--latency_runs", "1", "--latency_warmup", "0"])
    assert report["model"] == TINY_VIT and report["dataset"] == "digits"


@pytest.mark.slow
def test_a_timm_vit_exports(tmp_path):
    _check_export(_random_teacher(tmp_path / "vit.pth", TINY_VIT), tmp_path)


SWEEP_FLAGS = ("--epochs", "1", "--init_epochs", "1", "--sskd_head_epochs", "1", "--nce_k", "64", "--batch_size", "128")
EQUAL_CHANNELS = ("fsp", "kdsvd")  # their formulas compare paired stages channel by channel
# WKD-F's per-channel standard deviation is undefined on a 1x1 map (layer4 of a ResNet on 32x32
# images): its stages end at 2x2
NAMED_STAGES = {"wkd_f": ("--feat_t", "layer1,layer2,layer3", "--feat_s", "maxpool,stage2,stage3")}


@pytest.fixture(scope="module")
def library_pair(tmp_path_factory):
    """(save folder, teacher checkpoint) with a quarter of the digits for the module: a randomly
    initialised torchvision ResNet-18 teacher for a torchvision ShuffleNetV2 student."""
    full = dataset.digits.load_digits_split
    with pytest.MonkeyPatch.context() as patch:
        for module in (dataset.digits, dataset.loaders):
            patch.setattr(module, "load_digits_split", lambda train: tuple(t[::4] for t in full(train)))
        save = tmp_path_factory.mktemp("library")
        yield save, _random_teacher(save / "resnet18.pth", "torchvision:resnet18")


def _distil(save, teacher, *flags):
    return train_student.main(fast_args(save, "--path_t", str(teacher), "--model_s", "torchvision:shufflenet_v2_x0_5",
                                        *SWEEP_FLAGS, *flags))


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(m for m in METHODS if m not in EQUAL_CHANNELS))
def test_every_method_runs_on_a_library_pair(library_pair, method):
    save, teacher = library_pair
    results = _distil(save, teacher, "--distill", method, *NAMED_STAGES.get(method, ()))
    run = save / "students" / results["run_name"]
    logged = read_json(run / "results.json")
    assert logged["method"] == results["method"] and (run / "best.pth").is_file()


@pytest.mark.slow
def test_a_library_student_resumes(library_pair, monkeypatch):
    save, teacher = library_pair
    argv = fast_args(save, "--path_t", str(teacher), "--model_s", "torchvision:shufflenet_v2_x0_5", "--distill", "kd",
                     "--epochs", "2", "--batch_size", "128", "--trial", "resume")
    crash_after_checkpoint(train_student.main, argv, monkeypatch, epoch=1)
    [run] = (save / "students").glob("S-torchvision-shufflenet_v2_x0_5_T-torchvision-resnet18_*_trialresume")
    results = train_student.main(["--resume", str(run)])
    assert results["epochs"] == 2 and results["run_name"] == run.name
