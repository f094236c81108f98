"""Deployment on digits: export round trips (ONNX Runtime and torch.export against PyTorch) for
one model of each family, int8 post-training quantisation of a trained student, one QAT epoch
and its resume, and scripts/export.py's files and user errors."""
import sys

import pytest
import torch

import train_student
from conftest import ROOT, fast_args, read_json
from deploy import data
from deploy.export import check_exports, export_onnx, export_program
from deploy.qat import QATConfig, run_qat
from deploy.quantize import quantize_int8
from deploy.runtime import batched_logits, ort_runner, ort_session, torch_runner
from engine.build import build_model
from engine.checkpoint import load_checkpoint

sys.path.insert(0, str(ROOT / "scripts"))
import export as export_script  # noqa: E402  (scripts/export.py)

FAMILIES = ("resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2")
# int8 may cost a trained digits student at most this many points of test top-1
PTQ_MARGIN = 3.0


@pytest.fixture(scope="session")
def digits_split():
    _, test_loader, info = data.loaders("digits", "./data")
    return data.split_tensors(test_loader), info


@pytest.fixture(scope="session")
def digits_student(digits_teacher):
    """A resnet8 student distilled (CE + 0.5 KD) from the digits teacher for 3 epochs at a constant
    lr and batch 16 (about 60% test top-1, the one-epoch teacher's is about 15%): its run directory."""
    save, teacher_dir = digits_teacher
    results = train_student.main(fast_args(save, "--path_t", str(teacher_dir / "best.pth"), "--model_s", "resnet8",
                                           "--distill", "kd", "-r", "1", "-a", "0.5", "--epochs", "3",
                                           "--batch_size", "16", "--lr_decay_epochs", "100", "--trial", "deploy"))
    return save / "students" / results["run_name"]


@pytest.mark.parametrize("arch", FAMILIES)
def test_export_round_trip(arch, digits_split, tmp_path):
    (images, _), info = digits_split
    torch.manual_seed(0)
    model = build_model(arch, info.num_classes).eval()
    images = images[:16]
    export_onnx(model, images, tmp_path / "m.onnx")
    export_program(model, images, tmp_path / "m.pt2")
    checks = check_exports(model, images, tmp_path / "m.onnx", tmp_path / "m.pt2")
    for check in checks.values():
        assert check["within_tolerance"], checks
        assert check["top1_agreement"] == 100.0
    assert checks["onnx"]["images"] == 16  # a batch other than the example's: the batch is dynamic


def test_ptq_keeps_accuracy(digits_student, digits_split, tmp_path):
    (images, targets), info = digits_split
    model = build_model("resnet8", info.num_classes)
    model.load_state_dict(load_checkpoint(digits_student / "best.pth")["model"])
    model.eval()
    train_loader, _, _ = data.loaders("digits", "./data")
    export_onnx(model, images, tmp_path / "m.onnx")
    int8 = quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", data.first_images(train_loader, 256))

    def top1(run):
        return 100.0 * batched_logits(run, images).argmax(1).eq(targets).double().mean().item()

    fp32, quantised = top1(torch_runner(model)), top1(ort_runner(ort_session(int8)))
    assert fp32 > 40.0, "the fixture student should have learnt digits (chance is 10%)"
    assert quantised >= fp32 - PTQ_MARGIN
    assert int8.stat().st_size < 0.5 * (tmp_path / "m.onnx").stat().st_size  # int8 weights


def test_qat_epoch_runs_and_resumes(digits_student, digits_teacher, tmp_path):
    train_loader, test_loader, info = data.loaders("digits", "./data")
    student = build_model("resnet8", info.num_classes)
    student.load_state_dict(load_checkpoint(digits_student / "best.pth")["model"])
    teacher = build_model("resnet8", info.num_classes)
    teacher.load_state_dict(load_checkpoint(digits_teacher[1] / "best.pth")["model"])
    config = dict(learning_rate=1e-3, gamma=0.1, alpha=0.9, kd_T=1.0)
    common = dict(arch="resnet8", dataset="digits", teacher=teacher.eval())
    first = run_qat(student, train_loader, test_loader, tmp_path / "qat", QATConfig(epochs=1, **config), **common)
    assert first["epochs"] == 1 and first["last_top1"] > 0
    weights = load_checkpoint(tmp_path / "qat" / "best.pth")["model"]
    assert weights.keys() == student.state_dict().keys()  # an ordinary checkpoint of the float network
    assert not torch.equal(weights["conv1.weight"], student.state_dict()["conv1.weight"])

    resumed = run_qat(student, train_loader, test_loader, tmp_path / "qat", QATConfig(epochs=2, **config), **common)
    assert resumed["epochs"] == 2
    rows = (tmp_path / "qat" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "train_kd" in rows[0]  # a header and one row per epoch: epoch 1 was not rerun
    assert load_checkpoint(tmp_path / "qat" / "ckpt_last.pth")["epoch"] == 2


def test_export_script_writes_checked_files(digits_student, tmp_path):
    out = tmp_path / "export"
    report = export_script.main([str(digits_student / "best.pth"), "--dataset", "digits", "--out", str(out),
                                 "--check_images", "64", "--int8", "--calib_images", "128"])
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt2", "model.int8.onnx", "export.json"}
    assert read_json(out / "export.json")["opset"] == 18
    assert all(check["within_tolerance"] for check in report["checks"].values())
    assert report["int8"]["calibration_images"] == 128
    assert report["int8"]["top1_int8_onnxruntime"] >= report["int8"]["top1_fp32_pytorch"] - PTQ_MARGIN


@pytest.mark.parametrize("argv, message", [
    (["missing.pth", "--dataset", "digits"], "does not exist"),
    (["x.pth", "--check_images", "0"], "--check_images must be at least 1"),
])
def test_export_script_user_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_script.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
