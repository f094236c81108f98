"""Finding and loading the teacher: our checkpoints, RepDistiller's/mdistiller's
({'model': state_dict}), or torchvision's by name (torchvision:resnet34); its architecture
named by --model_t, the checkpoint, the run's args.json, a torchvision weights file's name, or
the folder name as RepDistiller does."""
import json
from pathlib import Path

from engine import runs
from engine.build import build_model
from engine.checkpoint import load_checkpoint, load_model_weights
from engine.errors import UserError
from engine.torchvision_teacher import arch_from_weights_file, is_torchvision_spec, read_torchvision_teacher


def find_best_teacher(save_dir, dataset: str) -> Path:
    """The best.pth of the teacher run with the highest best top-1 for `dataset`."""
    candidates = []
    for results_path in sorted(Path(save_dir, "teachers").glob(f"*/{runs.RESULTS_FILE}")):
        with open(results_path) as f:
            results = json.load(f)
        best = results_path.parent / runs.BEST_CKPT
        if results.get("dataset") == dataset and best.is_file():
            candidates.append((results.get("best_top1", 0.0), best))
    if not candidates:
        raise UserError(f"no trained teacher for {dataset} under {Path(save_dir) / 'teachers'}; train one first: "
                        f"python train_teacher.py --model resnet32x4 --dataset {dataset}")
    return max(candidates)[1]


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
    """RepDistiller's rule: the folder is '<model>_<dataset>_...', wrn names keep three parts."""
    segments = path.parent.name.split("_")
    return "_".join(segments[:3]) if segments[0] == "wrn" else segments[0]


def read_teacher(path, model_t):
    """Returns (checkpoint, architecture name) of the teacher checkpoint at `path`."""
    if is_torchvision_spec(path):
        return read_torchvision_teacher(str(path), model_t)
    path = Path(path)
    state = load_checkpoint(path)
    return state, teacher_arch(path, state, model_t)


def build_teacher(state: dict, arch: str, num_classes: int, path, dataset: str = "the data set"):
    """The network with the checkpoint's weights, in eval mode."""
    weights = state["model"]
    classes = _classifier_outputs(weights)
    if classes is not None and classes != num_classes:
        raise UserError(f"checkpoint {path} predicts {classes} classes but {dataset} has {num_classes}; "
                        "pick one trained on the same --dataset")
    model = build_model(arch, num_classes)
    load_model_weights(model, weights, arch, path)
    return model.eval()


def _classifier_outputs(state_dict: dict):
    """Rows of the last 2-D weight (the classifier), if any."""
    matrices = [v for k, v in state_dict.items() if k.endswith("weight") and getattr(v, "ndim", 0) == 2]
    return matrices[-1].shape[0] if matrices else None
