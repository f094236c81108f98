"""Deployment on digits: export round trips (ONNX Runtime and torch.export against PyTorch) for
one model of each family, int8 post-training quantisation of a trained student, one QAT epoch
(its lock and its stop on a non-finite loss; tests/test_chaos.py resumes a QAT run), evaluate.py's
deployment rows, scripts/export.py and scripts/pareto.py."""
import fcntl
import shutil
import sys

import pytest
import torch

import evaluate
import train_student
from conftest import ROOT, fast_args, read_json
from deploy import data
from deploy.export import check_exports, export_onnx, export_program
from deploy.quantize import quantize_int8
from deploy.runtime import batched_logits, ort_runner, ort_session, torch_runner
from engine.build import build_model
from engine.checkpoint import load_checkpoint

sys.path.insert(0, str(ROOT / "scripts"))
import export as export_script  # noqa: E402  (scripts/export.py)
import pareto  # noqa: E402

FAMILIES = ("resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2")
# int8 may cost a trained digits student at most this many points of test top-1
PTQ_MARGIN = 3.0




def _digits_network(checkpoint, num_classes):
    model = build_model("resnet8", num_classes)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model.eval()


@pytest.fixture(scope="session")
def digits_split():
    _, test_loader, info = data.loaders("digits", "./data")
    return data.split_tensors(test_loader), info


@pytest.fixture(scope="session")
def digits_student(digits_teacher):
    """A resnet8 student distilled (CE + 0.5 KD) from the digits teacher for 2 epochs at a constant
    lr of 0.02 and batch 16 (45% test top-1 in fp32; the one-epoch teacher's 15%; at lr 0.05 the
    second epoch can fall back): its run directory."""
    save, teacher_dir = digits_teacher
    results = train_student.main(fast_args(save, "--path_t", str(teacher_dir / "best.pth"), "--model_s", "resnet8",
                                           "--distill", "kd", "-r", "1", "-a", "0.5", "--epochs", "2",
                                           "--batch_size", "16", "--lr_decay_epochs", "100", "--learning_rate", "0.02",
                                           "--trial", "deploy"))
    return save / "students" / results["run_name"]


# CI budget: resnet8 (plain convolutions, as WRN and VGG) and MobileNetV2 (reshapes, as the
# ShuffleNets' channel shuffle) stand for the families in `make test`; the others run in
# `make test-slow`
@pytest.mark.parametrize("arch", [a if a in ("resnet8", "MobileNetV2") else pytest.param(a, marks=pytest.mark.slow)
                                  for a in FAMILIES])
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
    model = _digits_network(digits_student / "best.pth", info.num_classes)
    train_loader, _, _ = data.loaders("digits", "./data")
    export_onnx(model, images, tmp_path / "m.onnx")
    int8 = quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", data.first_images(train_loader, 256))

    def top1(run):
        return 100.0 * batched_logits(run, images).argmax(1).eq(targets).double().mean().item()

    fp32, quantised = top1(torch_runner(model)), top1(ort_runner(ort_session(int8)))
    assert fp32 > 30.0, "the fixture student should have learnt digits (chance is 10%)"
    assert quantised >= fp32 - PTQ_MARGIN
    assert int8.stat().st_size < 0.5 * (tmp_path / "m.onnx").stat().st_size  # int8 weights


def _qat_argv(student_dir, teacher_dir, save_dir, epochs, *extra):
    """QAT through train_student.py (--qat_epochs from --init_student, KD at T = 1 from the teacher)."""
    return ["--qat_epochs", str(epochs), "--init_student", str(student_dir / "best.pth"),
            "--path_t", str(teacher_dir / "best.pth"), "--qat_lr", "1e-3", "-r", "0.1", "-a", "0.9",
            "--dataset", "digits", "--save_dir", str(save_dir), "--trial", "q", *extra]


@pytest.fixture(scope="session")
def qat_run(digits_student, digits_teacher, tmp_path_factory):
    """One QAT epoch after the digits student: its run directory."""
    save = tmp_path_factory.mktemp("qat")
    return save / "students" / train_student.main(_qat_argv(digits_student, digits_teacher[1], save, 1))["run_name"]


def test_qat_epoch_writes_a_plain_checkpoint(qat_run, digits_student):
    results = read_json(qat_run / "results.json")
    assert results["epochs"] == 1 and results["last_top1"] > 0 and results["qat"]["kd_T"] == 1.0
    assert results["method"] == "qat" and read_json(qat_run / "args.json")["qat_epochs"] == 1
    weights = load_checkpoint(qat_run / "best.pth")["model"]
    before = load_checkpoint(digits_student / "best.pth")["model"]
    assert weights.keys() == before.keys()  # an ordinary checkpoint of the float network
    assert not torch.equal(weights["conv1.weight"], before["conv1.weight"])
    rows = (qat_run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and "train_kd" in rows[0]


def test_qat_writes_the_int8_model(qat_run):
    assert (qat_run / "int8.onnx").stat().st_size < 0.5 * (qat_run / "qat.fp32.onnx").stat().st_size


def _one_line_exit(capsys, argv, status) -> str:
    with pytest.raises(SystemExit) as stop:
        train_student.main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == status, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_qat_run_directory_has_one_owner(qat_run, digits_student, digits_teacher, tmp_path, capsys):
    run_dir = tmp_path / "students" / qat_run.name
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as held:  # another QAT process's lock (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        err = _one_line_exit(capsys, _qat_argv(digits_student, digits_teacher[1], tmp_path, 1), 2)
    assert f"run directory {run_dir} is in use by another process (pid 1 on elsewhere)" in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_qat_stops_on_a_non_finite_loss(digits_student, digits_teacher, tmp_path, capsys):
    argv = _qat_argv(digits_student, digits_teacher[1], tmp_path, 1, "--qat_lr", "1e30", "--print_freq", "1")
    err = _one_line_exit(capsys, argv, 1)
    assert "became non-finite" in err and "no checkpoint was written yet" in err


def test_evaluate_deployment_rows(digits_student, qat_run, tmp_path):
    report = evaluate.main([str(digits_student / "best.pth"), "--dataset", "digits", "--qat", str(qat_run / "best.pth"),
                            "--latency_runs", "2", "--latency_warmup", "0", "--calib_images", "128",
                            "--json", str(tmp_path / "eval.json"), "--markdown", str(tmp_path / "eval.md")])
    rows = {row["variant"]: row for row in report["deployment"]}
    assert list(rows) == ["fp32", "int8-PTQ", "int8-QAT"]
    assert rows["fp32"]["top1"] == pytest.approx(report["top1"])
    assert rows["int8-PTQ"]["size_bytes"] < 0.5 * rows["fp32"]["size_bytes"]
    assert set(rows["int8-QAT"]["latency_ms"]) == {"onnxruntime_cpu_b1", "onnxruntime_cpu_b64"}
    assert set(rows["fp32"]["latency_ms"]) >= {"pytorch_cpu_b1", "pytorch_cpu_b64", "onnxruntime_cpu_b1"}
    assert "| int8-QAT |" in (tmp_path / "eval.md").read_text()
    assert read_json(tmp_path / "eval.json")["calibration_images"] == 128


def test_pareto_front_flags():
    points = [(1.0, 50.0), (2.0, 70.0), (1.5, 40.0), (3.0, 70.0), (0.5, 20.0), (2.0, 60.0)]
    assert pareto.pareto_front(points) == [True, True, False, False, True, False]


def test_pareto_script_draws_students_and_teacher(digits_student, tmp_path):
    save = digits_student.parent.parent
    points = pareto.main([str(save), "--figure", str(tmp_path / "pareto.png"), "--json", str(tmp_path / "p.json"),
                          "--runs", "2", "--warmup", "0"])
    roles = {p["run"]: p["role"] for p in points}
    assert roles[str(digits_student)] == "student" and "teacher" in roles.values()
    assert any(p["pareto"] for p in points)
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert len(read_json(tmp_path / "p.json")["points"]) == len(points)


def test_pareto_script_skips_an_unreadable_results_json(digits_teacher, tmp_path, capsys):
    _, teacher_dir = digits_teacher
    shutil.copytree(teacher_dir, tmp_path / "teachers" / teacher_dir.name)
    shutil.copytree(teacher_dir, tmp_path / "teachers" / "broken")
    (tmp_path / "teachers" / "broken" / "results.json").write_text('{"best_top1": ')
    points = pareto.main([str(tmp_path), "--runs", "1", "--warmup", "0"])
    assert [p["run"] for p in points] == [str(tmp_path / "teachers" / teacher_dir.name)]
    assert "warning: skipping unreadable" in capsys.readouterr().err


def test_pareto_script_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pareto.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no run directory" in capsys.readouterr().err


def test_export_script_writes_checked_files(digits_student, tmp_path):
    out = tmp_path / "export"
    report = export_script.main([str(digits_student / "best.pth"), "--out", str(out),  # the run's data set
                                 "--check_images", "64", "--int8", "--calib_images", "128"])
    assert report["dataset"] == "digits"
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
