"""ImageNet end to end on the CPU: torchvision teachers by name from a local cache, the
published recipe as the defaults, one clear line for a network that does not fit the data
set, one KD and one CRD step ResNet-34 -> ResNet-18, and train_student.main on a tiny tree of
real JPEGs. Torchvision's weights files are written by the tests into a temporary TORCH_HOME
under the names torchvision expects; nothing is downloaded."""
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet34_Weights

import train_student
from core.errors import UserError
from distiller_zoo.base import BuildContext
from distiller_zoo.objective import parse_objective
from distiller_zoo.temperature import Temperature
from engine.args import Parser, add_common_args
from engine.build import check_fits_dataset
from engine.config import TeacherConfig
from engine.distill_task import DistillTask
from engine.teacher import build_teacher, read_teacher
from models import model_dict
from tests.imagenet_tree import write_tree
from tests.method_helpers import make_args

TEACHER_FILE = Path(ResNet34_Weights.IMAGENET1K_V1.url).name


def _cache_resnet34(monkeypatch, tmp_path, num_classes=1000) -> torchvision.models.ResNet:
    """torchvision's resnet34 with random weights, saved where its weights API looks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    reference = torchvision.models.resnet34(num_classes=num_classes).eval()
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / TEACHER_FILE)
    return reference


@pytest.fixture
def offline(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_teacher_by_name_from_the_cache(monkeypatch, tmp_path, offline):
    reference = _cache_resnet34(monkeypatch, tmp_path)
    x = torch.randn(2, 3, 64, 64)
    for spec in ("torchvision:resnet34", "torchvision:resnet34:IMAGENET1K_V1"):
        state, arch = read_teacher(spec, None)
        assert arch == "imagenet_resnet34"
        teacher = build_teacher(state, arch, 1000, spec)
        with torch.no_grad():
            assert torch.equal(teacher(x), reference(x))


def test_weights_file_by_path_names_its_architecture(monkeypatch, tmp_path):
    _cache_resnet34(monkeypatch, tmp_path)
    _, arch = read_teacher(Path(torch.hub.get_dir()) / "checkpoints" / TEACHER_FILE, None)
    assert arch == "imagenet_resnet34"


def test_teacher_by_name_mistakes_are_one_line(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError, match=f"cannot load .*put {TEACHER_FILE} .* into .*empty"):
        read_teacher("torchvision:resnet34", None)
    with pytest.raises(UserError, match="no torchvision network 'vgg99'"):
        read_teacher("torchvision:vgg99", None)
    with pytest.raises(UserError, match="no weights 'V9' for resnet34; use one of: IMAGENET1K_V1"):
        read_teacher("torchvision:resnet34:V9", None)
    with pytest.raises(UserError, match="is the network imagenet_resnet34, but --model_t says ResNet34"):
        read_teacher("torchvision:resnet34", "ResNet34")


def test_network_and_dataset_must_fit():
    with pytest.raises(UserError, match="--model_s imagenet_resnet18 is an ImageNet network, .* 32x32 images"):
        check_fits_dataset("imagenet_resnet18", "cifar100", "--model_s")
    with pytest.raises(UserError, match="--model ResNet18 is a CIFAR network, .* imagenet has 224x224 images"):
        check_fits_dataset("ResNet18", "imagenet")
    check_fits_dataset("imagenet_mobilenet_v1", "imagenet")
    check_fits_dataset("resnet8", "digits")


def _finalized(argv, monkeypatch, world_size=1, model="imagenet_resnet18"):
    """The configuration of a teacher run with these flags (the recipe is resolved as it is built)."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    parser = Parser()
    add_common_args(parser)
    return TeacherConfig.from_dict({**vars(parser.parse_args(argv)), "model": model})


def test_imagenet_recipe_defaults(monkeypatch):
    args = _finalized(["--dataset", "imagenet"], monkeypatch, world_size=8)
    assert (args.epochs, args.batch_size, args.learning_rate) == (100, 32, 0.1)
    assert (args.lr_decay_epochs, args.weight_decay) == ((30, 60, 90), 1e-4)
    args = _finalized(["--dataset", "imagenet", "--batch_size", "128", "--epochs", "10"], monkeypatch)
    assert (args.learning_rate, args.lr_decay_epochs) == (0.05, (3, 6, 9))
    args = _finalized(["--dataset", "imagenet", "--learning_rate", "0.3", "--weight_decay", "5e-5"], monkeypatch)
    assert (args.batch_size, args.learning_rate, args.weight_decay) == (256, 0.3, 5e-5)
    args = _finalized(["--dataset", "cifar100"], monkeypatch, world_size=8, model="resnet8")
    assert (args.epochs, args.batch_size, args.learning_rate, args.weight_decay) == (240, 64, 0.05, 5e-4)
    with pytest.raises(UserError, match="total batch 256 does not split over 3 processes"):
        _finalized(["--dataset", "imagenet"], monkeypatch, world_size=3)


@pytest.mark.parametrize("method", ["kd", "crd"])
def test_one_step_resnet34_to_resnet18(method):
    """One optimiser step of ImageNet's ResNet-18 under its ResNet-34 teacher, through the
    trainer's DistillTask, on a 2 x 3 x 64 x 64 batch of a 10-class, 20-image data set."""
    torch.manual_seed(0)
    student = model_dict["imagenet_resnet18"](num_classes=10)
    teacher = model_dict["imagenet_resnet34"](num_classes=10).eval()
    x, targets, indices = torch.randn(2, 3, 64, 64), torch.tensor([1, 7]), torch.tensor([3, 12])
    with torch.no_grad():
        feat_s, feat_t = student.forward_features(x), teacher.forward_features(x)
    options = make_args(nce_k=4)
    objective = parse_objective(method, None, None, None, False)
    temperature = Temperature(4.0)
    build = BuildContext(student, teacher, feat_s, feat_t, options, n_train=20, num_classes=10,
                         student_name="imagenet_resnet18", teacher_name="imagenet_resnet34", temperature=temperature)
    methods = [(term.spec.name, term.weight, term.spec.cls(build)) for term in objective.methods]
    task = DistillTask(student, teacher, methods, objective.gamma, objective.alpha, objective.kd_term(temperature),
                       temperature, 10)
    before = [p.detach().clone() for p in student.parameters()]
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    optimizer = torch.optim.SGD(task.main_parameters(), lr=0.1, momentum=0.9)
    contrast = torch.cat([indices[:, None], torch.randint(0, 20, (2, 4))], dim=1)
    task.train()
    task.keep_frozen_in_eval()
    terms, logits = task(x, targets, indices, contrast)
    terms["loss"].backward()
    optimizer.step()
    assert logits.shape == (2, 10) and torch.isfinite(terms["loss"])
    assert method in terms and terms[method] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))


def test_train_student_on_a_jpeg_tree_with_a_torchvision_teacher(monkeypatch, tmp_path, offline):
    """The command of the issue, on the CPU: 4 training and 2 validation JPEGs at 224 x 224.
    The cached resnet34 file has 2 classes, as the tree has; a 1000-class tree would be too slow
    for a test, and the loading path is the same."""
    _cache_resnet34(monkeypatch, tmp_path, num_classes=2)
    tree = write_tree(tmp_path / "imagenet")
    results = train_student.main([
        "--dataset", "imagenet", "--data_folder", str(tree), "--path_t", "torchvision:resnet34",
        "--model_s", "imagenet_resnet18", "--distill", "kd", "--epochs", "1", "--batch_size", "2",
        "--num_workers", "0", "--device", "cpu", "--save_dir", str(tmp_path / "save"), "--print_freq", "1"])
    assert results["teacher"] == "imagenet_resnet34" and results["path_t"] == "torchvision:resnet34"
    assert results["epochs"] == 1 and results["model"] == "imagenet_resnet18"
    run = tmp_path / "save" / "students" / results["run_name"]
    assert (run / "best.pth").is_file() or (run / "ckpt_last.pth").is_file()


def test_train_student_refuses_an_imagenet_student_on_cifar(monkeypatch, tmp_path, capsys):
    _cache_resnet34(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(["--dataset", "digits", "--path_t", "torchvision:resnet34", "--model_s", "resnet8",
                            "--save_dir", str(tmp_path / "save")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--model_t imagenet_resnet34 is an ImageNet network" in err
