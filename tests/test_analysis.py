"""scripts/analyze.py and scripts/transfer.py: the measurements of deploy/analysis.py against hand
counts and second formulas, the probe data sets' real readers on tiny files in their real
formats, and both tools end to end on digits students (a KD and a CRD student of the
`digits_teacher` fixture, one epoch on a quarter of the digits, and a vanilla student)."""
import csv
import json
import math
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_teacher
from conftest import ROOT, fast_args
from core.distributed import setup
from core.errors import UserError
from dataset.digits import load_digits_split
from dataset.probe import STL10_FOLDER, probe_dataset
from deploy import analysis
from deploy.metrics import expected_calibration_error, prediction_entropy
from engine.build import build_model
from engine.checkpoint import save_checkpoint
from method_helpers import one_digits_epoch, quarter_digits, wave
from models import model_dict

sys.path.insert(0, str(ROOT / "scripts"))
import analyze  # noqa: E402
import transfer  # noqa: E402


# --- CKA ---------------------------------------------------------------------------------------
def feature_space_cka(x, y) -> float:
    """Kornblith et al. (2019), linear CKA in its feature-space form: ||Y^T X||_F^2 /
    (||X^T X||_F ||Y^T Y||_F) on column-centred features; the library uses the Gram form."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_cka_of_a_network_with_itself_is_one():
    torch.manual_seed(0)
    with torch.no_grad():
        stages = model_dict["resnet8"](num_classes=10).eval().forward_features(torch.randn(24, 3, 32, 32)).stages
    matrix = analysis.cka_matrix(stages, stages)
    assert torch.allclose(matrix.diagonal(), torch.ones(len(stages), dtype=torch.float64), atol=1e-12)
    assert (matrix <= 1 + 1e-12).all() and (matrix > 0).all()


def test_cka_of_independent_features_is_near_zero():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 8, generator=generator), torch.randn(2000, 8, generator=generator)
    assert analysis.linear_cka(x, y) < 0.02  # about sqrt(8 * 8) / 2000 = 0.004 in expectation


def test_cka_gram_form_equals_the_feature_space_form_and_its_invariances():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, 3, 3, generator=generator)
    y = torch.tanh(x.flatten(1) @ torch.randn(36, 7, generator=generator)) + 0.3 * torch.randn(50, 7, generator=generator)
    value = analysis.linear_cka(x, y)
    assert value == pytest.approx(feature_space_cka(x, y), abs=1e-12)
    assert 0.1 < value < 0.99
    rotation, _ = torch.linalg.qr(torch.randn(36, 36, generator=generator, dtype=torch.float64))
    assert analysis.linear_cka(3.0 * x.flatten(1).double() @ rotation, y) == pytest.approx(value, abs=1e-12)
    assert analysis.cka_matrix([x, y], [y])[0, 0].item() == pytest.approx(value, abs=1e-12)


def test_cka_equals_the_papers_demo_output():
    """google-research/google-research representation_similarity/Demo.ipynb (commit 10bf941), the
    paper's own demo: np.random.seed(1337); X = randn(100, 10); Y = randn(100, 10) + X prints
    "Linear CKA from Examples: 0.55761"."""
    state = np.random.RandomState(1337)
    x = state.randn(100, 10)
    y = state.randn(100, 10) + x
    assert analysis.linear_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(0.55761, abs=5e-6)


# --- correlation difference, calibration, per class --------------------------------------------
def test_correlation_difference_by_hand_and_zero_for_a_student_equal_to_its_teacher():
    teacher = torch.tensor([[2.0, 0.0], [4.0, 1.0], [0.0, 3.0]])
    student = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    targets = torch.tensor([0, 0, 1])
    # class 0: teacher mean (3, 0.5), student (1, 1); class 1: teacher (0, 3), student (0, 0)
    diff = analysis.logit_correlation_difference(student, teacher, targets, 2)
    assert diff.tolist() == [[0.0, 0.5], [0.0, 0.0]]
    assert analysis.logit_correlation_difference(teacher, teacher, targets, 2).abs().max() == 0


# mdistiller, tools/visualizations/correlation.ipynb at commit a08d46f: its get_output_metric cell run
# offline on these inputs (a stand-in model returning the logits, the loader in two batches of 6),
# then |ms - mt| with the diagonal set to 0 as its get_tea_stu_diff does (MAX_DIFF scaling left out).
MDISTILLER_DIFF = [[0.0, 2.0192707479, 1.6688303749, 1.079082489],
                   [0.6813538074, 0.0, 1.49861827, 1.8618770738],
                   [0.9463742773, 1.2792080343, 0.0, 1.1380571127],
                   [0.7623911301, 0.0457972685, 0.717546863, 0.0]]


def test_correlation_difference_equals_mdistillers_on_fixed_inputs():
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 2, 1, 3])
    diff = analysis.logit_correlation_difference(wave(12, 4, phase=0.3, scale=2.0), wave(12, 4, phase=1.1, scale=3.0),
                                                 targets, 4)
    assert torch.allclose(diff, torch.tensor(MDISTILLER_DIFF, dtype=torch.float64), atol=1e-6)


def test_reliability_bins_by_hand():
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.01, 0.97, 0.02], [0.5, 0.3, 0.2], [0.2, 0.55, 0.25]],
                         dtype=torch.float64)
    targets = torch.tensor([0, 0, 0, 1])
    bins = analysis.reliability_bins(probs, targets)
    # 15 bins (lo, hi]: 0.95 and 0.97 in bin 14, 0.5 in bin 7 (7/15, 8/15], 0.55 in bin 8
    assert bins["count"].tolist() == [0] * 7 + [1, 1] + [0] * 5 + [2]
    assert bins["accuracy"][[7, 8, 14]].tolist() == [1.0, 1.0, 0.5]
    assert bins["confidence"][[7, 8, 14]].tolist() == pytest.approx([0.5, 0.55, 0.96])
    assert bins["accuracy"][0].isnan() and len(bins["edges"]) == 16
    # ECE from the same bins: 2/4 |0.5 - 0.96| + 1/4 |1 - 0.5| + 1/4 |1 - 0.55|
    assert expected_calibration_error(probs, targets) == pytest.approx(0.4675)


def test_confusion_and_per_class_accuracy_by_hand():
    targets = torch.tensor([0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0]), 4).float()
    assert analysis.confusion_matrix(logits, targets, 4).tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0],
                                                                      [0, 0, 0, 0]]
    accuracy = analysis.per_class_accuracy(logits, targets, 4)
    assert accuracy[:3].tolist() == [50.0, 100.0, 0.0] and accuracy[3].isnan()
    teacher = torch.tensor([100.0, 100.0, 0.0, float("nan")])
    assert analysis.largest_disagreements(accuracy, teacher, 5) == [0, 1, 2]


def test_prediction_entropy_of_a_uniform_and_a_certain_prediction():
    probs = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]])
    assert prediction_entropy(probs).tolist() == pytest.approx([math.log(4), 0.0])


# --- the probe data sets' readers --------------------------------------------------------------
def write_stl10(folder, n_train=100, n_test=60):
    """Digits images, upscaled to 96 x 96, in STL-10's binary format: uint8 images stored
    channel by channel in column-major order, labels 1..10, and class_names.txt."""
    root = folder / STL10_FOLDER
    root.mkdir(parents=True)
    written = {}
    for split, train, n in (("train", True, n_train), ("test", False, n_test)):
        images, targets = (t[:n] for t in load_digits_split(train))
        big = images.repeat_interleave(3, 2).repeat_interleave(3, 3)
        (root / f"{split}_X.bin").write_bytes(big.transpose(2, 3).contiguous().numpy().tobytes())
        (root / f"{split}_y.bin").write_bytes((targets + 1).to(torch.uint8).numpy().tobytes())
        written[split] = (big, targets)
    (root / "class_names.txt").write_text("\n".join(f"digit{k}" for k in range(10)) + "\n")
    return written


def write_tinyimagenet(folder, per_class=6):
    """Digits images as 64 x 64 JPEGs in Tiny-ImageNet's layout: train/<wnid>/images/*.JPEG and
    the flat val/images/ with val/val_annotations.txt."""
    root = folder / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    images, targets = load_digits_split(True)
    lines, counts = [], {}
    for k, (image, target) in enumerate(zip(images, targets.tolist())):
        if counts.get(target, 0) >= 2 * per_class:
            continue
        counts[target] = counts.get(target, 0) + 1
        picture = Image.fromarray(image.repeat_interleave(2, 1).repeat_interleave(2, 2).permute(1, 2, 0).numpy())
        if counts[target] <= per_class:
            (root / "train" / f"n{target:08d}" / "images").mkdir(parents=True, exist_ok=True)
            picture.save(root / "train" / f"n{target:08d}" / "images" / f"{k}.JPEG")
        else:
            picture.save(root / "val" / "images" / f"val_{k}.JPEG")
            lines.append(f"val_{k}.JPEG\tn{target:08d}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_stl10_reader_on_files_in_the_real_binary_format(tmp_path):
    written = write_stl10(tmp_path, n_train=12, n_test=8)
    test = probe_dataset("stl10", tmp_path, False)
    big, targets = written["test"]
    assert len(test) == 8 and test.classes[3] == "digit3"
    assert torch.equal(torch.from_numpy(test.data), big)  # torchvision's reader undoes the column-major order
    image, target, index = test[5]
    assert image.shape == (3, 32, 32) and target == targets[5].item() and index == 5
    (tmp_path / STL10_FOLDER / "train_X.bin").write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="not 12 images"):
        probe_dataset("stl10", tmp_path, True)
    with pytest.raises(UserError, match="STL-10 not found"):
        probe_dataset("stl10", tmp_path / "elsewhere", True)


def test_tinyimagenet_reader_resizes_to_32(tmp_path):
    write_tinyimagenet(tmp_path, per_class=1)
    train, test = probe_dataset("tinyimagenet", tmp_path, True), probe_dataset("tinyimagenet", tmp_path, False)
    assert len(train.classes) == 10 and len(train) == 10 and len(test) == 10
    assert train[0][0].shape == test[0][0].shape == (3, 32, 32)


# --- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def students(digits_teacher, tmp_path_factory):
    """{'kd', 'crd', 'vanilla': run directory}: one epoch each on a quarter of the digits."""
    save = tmp_path_factory.mktemp("students")
    found = {}
    for method in ("kd", "crd"):
        with pytest.MonkeyPatch.context() as monkeypatch:
            flags = ("--nce_k", "64") if method == "crd" else ()
            found[method] = one_digits_epoch(monkeypatch, save, digits_teacher[1], method, *flags)[1]
    with pytest.MonkeyPatch.context() as monkeypatch:
        quarter_digits(monkeypatch)
        results = train_teacher.main(fast_args(save, "--model", "resnet8", "--epochs", "1", "--trial", "vanilla",
                                               "--amp", "off", "--no-channels_last"))
    found["vanilla"] = save / "teachers" / results["run_name"]
    return found


SMALL = ["--stage_images", "60", "--tsne_images", "60", "--num_workers", "0", "--device", "cpu", "--classes", "3"]


@pytest.mark.e2e
def test_analysis_report_of_a_kd_and_a_crd_student(students):
    reports = analyze.main([str(students["kd"]), str(students["crd"]), *SMALL])
    for run, report in zip((students["kd"], students["crd"]), reports):
        text = report.read_text()
        for name in analyze.FIGURES:
            assert f"]({name}.png)" in text
            for suffix in ("png", "pdf"):
                assert (run / "analysis" / f"{name}.{suffix}").stat().st_size > 1000
        numbers = json.loads((run / "analysis" / "analysis.json").read_text())
        assert numbers["n_test"] == 360 and numbers["cka_images"] == 60
        cka = torch.tensor(numbers["cka"])
        assert cka.shape == (3, 3) and ((cka > 0) & (cka <= 1)).all()
        assert len(numbers["largest_disagreements"]) == 3
        assert sum(map(sum, numbers["confusion_student"])) == 360
        events = EventAccumulator(str(run)).Reload()
        assert {f"analysis/{name}" for name in analyze.FIGURES} <= set(events.Tags()["images"])
        assert "analysis_penultimate_teacher" in (run / "projector_config.pbtxt").read_text()


@pytest.mark.e2e
def test_analysis_of_a_student_equal_to_its_teacher(digits_teacher, tmp_path):
    """The teacher's own run, made to name itself as its teacher: CKA 1 on the diagonal, no
    correlation difference, full agreement (the measurements alone, no figures)."""
    run = tmp_path / "self"
    run.mkdir()
    shutil.copy(digits_teacher[1] / "best.pth", run / "best.pth")
    stored = json.loads((digits_teacher[1] / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**stored, "path_t": str(run / "best.pth")}))
    args = analyze.parse_args([str(run), *SMALL])
    [m] = analyze.measure(analyze.read_student(run), args, setup("cpu"), None)
    assert torch.allclose(m["cka"].diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert m["correlation_difference"].abs().max() == 0 and m["agreement"] == 100
    assert m["kl_teacher_student"] == pytest.approx(0, abs=1e-12)
    assert m["cka_pooled"] == pytest.approx(1, abs=1e-9)


def run_with_teachers(digits_teacher, folder, teachers: list, **flags):
    """The digits teacher's own run as a student of `teachers` (checkpoints), args.json changed alone."""
    folder.mkdir()
    shutil.copy(digits_teacher[1] / "best.pth", folder / "best.pth")
    stored = json.loads((digits_teacher[1] / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**stored, "path_t": ",".join(map(str, teachers)), "distill": "kd",
                                                  **flags}))
    return folder


def untrained_resnet14(path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_checkpoint({"model": build_model("resnet14", 10).state_dict(), "arch": "resnet14", "dataset": "digits",
                         "num_classes": 10}, path)
    return path


PREDICTIONS = ("top1_teacher", "ece_teacher", "mean_entropy_teacher", "agreement", "kl_teacher_student",
               "per_class_top1_teacher")


@pytest.mark.e2e
def test_analysis_of_two_equal_teachers_gives_equal_sections_and_their_ensemble(digits_teacher, tmp_path):
    """One checkpoint twice: both sections the same numbers, and the camkd ensemble (weights 1/2
    for equal teachers) predicts as that teacher does, in its own section and figures."""
    run = run_with_teachers(digits_teacher, tmp_path / "twice", [untrained_resnet14(tmp_path / "r14.pth")] * 2,
                            alpha=1.0, multi_teacher="camkd")
    found = analyze.read_student(run)
    assert [ref["tag"] for ref in found["references"]] == ["teacher0", "teacher1", "ensemble"]
    args = analyze.parse_args([str(run), *SMALL, "--stage_images", "8"])
    compared = analyze.measure(found, args, setup("cpu"), None)
    records = [analyze.summary(found, ref, m) for ref, m in zip(found["references"], compared)]
    first, second, ensemble = records
    assert first == second and first["agreement"] < 100
    assert "cka" not in ensemble and ensemble["teacher"] == "camkd ensemble of resnet14 + resnet14"
    for key in PREDICTIONS:
        assert ensemble[key] == pytest.approx(first[key], abs=1e-9)
    text = analyze.report_markdown(found, records)
    assert "## The camkd ensemble of the teachers" in text and "](per_class_accuracy_ensemble.png)" in text
    figures = analyze.draw(compared[2], {"student": "s", "teacher": "e"}, args, analyze.PREDICTION_FIGURES, "_ensemble")
    assert sorted(figures) == ["entropy_ensemble", "per_class_accuracy_ensemble", "reliability_ensemble"]
    for figure in figures.values():
        analyze.plt.close(figure)


@pytest.mark.e2e
def test_analysis_report_of_a_student_of_two_teachers(digits_teacher, tmp_path):
    """Teacher 1 is the student's own checkpoint, teacher 0 another network: a section, figures
    and TensorBoard tags per teacher, each with its own numbers; with -a 0 no ensemble."""
    teachers = [untrained_resnet14(tmp_path / "r14.pth"), digits_teacher[1] / "best.pth"]
    run = run_with_teachers(digits_teacher, tmp_path / "two", teachers, alpha=0.0)
    [report] = analyze.main([str(run), *SMALL, "--tsne_images", "6", "--stage_images", "8"])
    text, folder = report.read_text(), run / "analysis"
    sections = ["## Teacher 0: resnet14", "## Teacher 1: resnet8", "## The student"]
    assert [line for line in text.splitlines() if line.startswith("## ")] == sections
    names = [f"{name}_teacher{k}" for k in (0, 1) for name in analyze.FIGURES if name != "confusion"] + ["confusion"]
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(names)
    assert all(f"]({name}.png)" in text for name in names)
    numbers = json.loads((folder / "analysis.json").read_text())
    other, itself = numbers["teachers"]
    assert (itself["agreement"], itself["kl_teacher_student"], itself["cka_pooled"]) == (100, pytest.approx(0, abs=1e-12),
                                                                                        pytest.approx(1, abs=1e-9))
    assert other["teacher"] == "resnet14" and other["agreement"] < 100 and len(other["cka"]) == 3
    assert numbers["ensemble"] is None
    events = EventAccumulator(str(run)).Reload()
    assert {f"analysis/{name}" for name in names} == set(events.Tags()["images"])
    projector = (run / "projector_config.pbtxt").read_text()
    assert all(f"analysis_penultimate_{who}" in projector for who in ("student", "teacher0", "teacher1"))


@pytest.mark.e2e
def test_transfer_table_has_teacher_vanilla_kd_and_crd_rows(students, tmp_path):
    write_stl10(tmp_path / "data")
    write_tinyimagenet(tmp_path / "data")
    out = tmp_path / "out"
    rows = transfer.main([str(students[k]) for k in ("kd", "crd", "vanilla")]
                         + ["--data_folder", str(tmp_path / "data"), "--epochs", "1",
                            "--batch_size", "25", "--num_workers", "0", "--device", "cpu", "--out", str(out)])
    assert [(r["role"], r["method"]) for r in rows] == [("teacher", ""), ("vanilla", ""), ("student", "kd"),
                                                        ("student", "crd")]
    with open(out / "transfer.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["", "", "kd", "crd"]
    for row in table:
        for column in ("STL-10 top-1 (%)", "Tiny-ImageNet top-1 (%)"):
            assert 0 <= float(row[column]) <= 100
    assert "| teacher |" in (out / "transfer.md").read_text()
    assert (out / "transfer.png").stat().st_size > 1000 and (out / "transfer.pdf").stat().st_size > 1000


class PixelFeatures(torch.nn.Module):
    """A frozen "network" whose penultimate features are the image average-pooled to 8 x 8 after
    a BatchNorm: a linear probe on them separates digits well, and the BatchNorm's running
    statistics show whether the probe kept the network frozen."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.BatchNorm2d(3)

    def forward_features(self, x):
        return SimpleNamespace(pooled=torch.nn.functional.avg_pool2d(self.norm(x), 4).flatten(1))


def test_linear_probe_learns_on_frozen_features_and_leaves_them_frozen(tmp_path):
    write_stl10(tmp_path)
    args = transfer.parse_args([str(tmp_path), "--data_folder", str(tmp_path), "--epochs", "12",
                                "--lr_decay_epochs", "10", "--batch_size", "25", "--num_workers", "0"])
    network = PixelFeatures().eval()
    assert transfer.probe_top1(network, "stl10", args, torch.device("cpu"), 0.2) > 50  # chance: 10%
    assert network.norm.running_mean.abs().max() == 0 and network.norm.num_batches_tracked == 0


# --- bad inputs ---------------------------------------------------------------------------------
def one_line_exit(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_bad_inputs_are_one_line(digits_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(digits_teacher[1] / "args.json", run / "args.json")
    assert "holds no best.pth" in one_line_exit(analyze.main, [str(run)], capsys)
    assert "is not a run directory" in one_line_exit(analyze.main, [str(tmp_path / "nothing")], capsys)
    assert "trained from labels alone" in one_line_exit(analyze.main, [str(digits_teacher[1])], capsys)
    assert "unknown probe data set mnist" in one_line_exit(
        transfer.main, [str(digits_teacher[1]), "--probe", "stl10,mnist"], capsys)
    assert "STL-10 not found" in one_line_exit(
        transfer.main, [str(digits_teacher[1]), "--probe", "stl10", "--data_folder", str(tmp_path)], capsys)
    assert not (run / "analysis").exists() and not (digits_teacher[1] / "analysis").exists()
