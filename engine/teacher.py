"""Finding and loading the teacher: our checkpoints, RepDistiller's/mdistiller's
({'model': state_dict}), or torchvision's or timm's by name (torchvision:resnet34, timm:NAME); its architecture
named by --model_t, the checkpoint, the run's args.json, a torchvision weights file's name, or
the folder name as RepDistiller does."""
from pathlib import Path

from core.errors import UserError
from distiller_zoo.base import deployed_network
from engine import runs
from engine.build import build_model
from engine.checkpoint import load_checkpoint, load_model_weights
from engine.programs import TEACHER
from engine.torchvision_teacher import arch_from_weights_file, is_library_spec, read_library_teacher
from models import arch_from_folder as registry_arch_from_folder
from models.external import FeaturePaths

# RepDistiller's teachers: its download script's <arch>_vanilla/ and its train_teacher.py's
# <arch>_cifar100_lr_..._trial_<k>/ folders, both under save/models/; all are CIFAR-100 networks.
REPDISTILLER_TEACHERS = "models/*/ckpt_epoch_240.pth"
REPDISTILLER_DATASET = "cifar100"


def find_best_teacher(save_dir, dataset: str) -> Path:
    """The best.pth of this suite's teacher run with the highest best top-1 for `dataset`; only
    when there is none, the RepDistiller teacher under `save_dir` with the highest accuracy its
    checkpoint records. Our runs rank first: their data set and accuracy are recorded by this
    suite, a RepDistiller checkpoint's data set is implied by its folder alone."""
    candidates = _suite_teachers(save_dir, dataset) or _repdistiller_teachers(save_dir, dataset)
    if not candidates:
        raise UserError(f"no trained teacher for {dataset} under {Path(save_dir) / TEACHER.kind}; train one first: "
                        f"python train_teacher.py --model resnet32x4 --dataset {dataset}")
    return max(candidates)[1]


def _suite_teachers(save_dir, dataset: str) -> list:
    candidates = []
    for results_path in sorted(Path(save_dir, TEACHER.kind).glob(f"*/{runs.RESULTS_FILE}")):
        results = runs.read_results(results_path)
        best = results_path.parent / runs.BEST_CKPT
        if results is not None and results.get("dataset") == dataset and best.is_file():
            candidates.append((results.get("best_top1", 0.0), best))
    return candidates


def _repdistiller_teachers(save_dir, dataset: str) -> list:
    """(accuracy recorded at epoch 240, path) of RepDistiller's teacher checkpoints."""
    if dataset != REPDISTILLER_DATASET:
        return []
    return [(float(load_checkpoint(path).get("accuracy", float("-inf"))), path)
            for path in sorted(Path(save_dir).glob(REPDISTILLER_TEACHERS))]


def teacher_arch(path: Path, state: dict, model_t) -> str:
    if model_t:
        return model_t
    if "arch" in state:
        return state["arch"]
    args_json = path.parent / runs.ARGS_FILE
    if args_json.is_file():
        stored = runs.load_run_args(path.parent)
        for key in ("model", "model_s"):  # a teacher run, or a distilled student used as a teacher
            if key in stored:
                return stored[key]
    return arch_from_weights_file(path) or arch_from_folder(path)


def arch_from_folder(path: Path) -> str:
    """RepDistiller's rule: the folder is '<model>_<anything>' (models/registry.py)."""
    arch = registry_arch_from_folder(path.parent.name)
    if arch is None:
        raise UserError(f"cannot tell the architecture of {path} from its folder name {path.parent.name!r}; "
                        "pass --model_t")
    return arch


def read_teacher(path, model_t):
    """Returns (checkpoint, architecture name) of the teacher checkpoint at `path`."""
    if is_library_spec(path):
        return read_library_teacher(str(path), model_t)
    path = Path(path)
    state = load_checkpoint(path)
    return state, teacher_arch(path, state, model_t)


def build_teacher(state: dict, arch: str, num_classes: int, path, dataset: str = None,
                  features: FeaturePaths = None):
    """The network with the checkpoint's weights, in eval mode; with the method's head when the
    checkpoint stores one (a SimKD student: distiller_zoo.base.DeployedNetwork). A library
    network is built for the data set it was trained on and records the modules `features` names."""
    trained_on = state.get("dataset")  # our checkpoints say; RepDistiller's do not
    if None not in (trained_on, dataset) and trained_on != dataset:
        raise UserError(f"teacher {path} was trained on {trained_on}, not {dataset}; "
                        f"pick one trained on --dataset {dataset}")
    weights = state["model"]
    classes = _classifier_outputs(weights)
    if classes is not None and classes != num_classes:
        raise UserError(f"checkpoint {path} predicts {classes} classes but {dataset or 'the data set'} has {num_classes}; "
                        "pick one trained on the same --dataset")
    model = build_model(arch, num_classes, trained_on or dataset, features or FeaturePaths(role="t"), "--model_t")
    load_model_weights(model, weights, arch, path)
    if state.get("head") is not None:
        return deployed_network(model, state["head"], path)
    return model.eval()


def _classifier_outputs(state_dict: dict):
    """Rows of the last 2-D weight (the classifier), if any."""
    matrices = [v for k, v in state_dict.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    return matrices[-1].shape[0] if matrices else None
