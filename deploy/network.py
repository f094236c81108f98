"""A trained network from its checkpoint (ours, or RepDistiller's {'model': state_dict}), its
architecture found as evaluate.py finds it: --model, the checkpoint's 'arch', the run's
args.json, RepDistiller's folder-name rule; its data set and data folder as the checkpoint or
its run recorded them."""
from pathlib import Path

from core.errors import UserError
from engine import runs
from engine.args import split_paths
from engine.build import check_model_name
from engine.teacher import build_teacher, read_teacher


def read_network(path, model=None, flag: str = "--model"):
    """(checkpoint, architecture) read and checked before any data loads."""
    state, arch = read_teacher(path, model)
    return state, check_model_name(arch, flag)


def load_network(path, model, num_classes: int, dataset: str):
    """(the network in eval mode with the checkpoint's weights, its architecture name)."""
    state, arch = read_network(path, model)
    return build_teacher(state, arch, num_classes, path, dataset), arch


def run_data(path, state: dict, dataset=None, data_folder=None):
    """(data set, data folder) to evaluate a checkpoint on: those given, else what the checkpoint
    or its run's args.json records (the data folder is stored absolute, so this works from any
    directory), else CIFAR-100 and ./data (RepDistiller's checkpoints record nothing). A data
    set other than the one it was trained on is one line."""
    path = Path(path)
    needed = "dataset" not in state or data_folder is None
    stored = runs.load_run_args(path.parent) if needed and (path.parent / runs.ARGS_FILE).is_file() else {}
    trained = state.get("dataset", stored.get("dataset"))
    if dataset is not None and trained is not None and trained != dataset:
        raise UserError(f"{path} was trained on {trained}, not {dataset}; "
                        f"leave out --dataset or pass --dataset {trained}")
    return dataset or trained or "cifar100", data_folder or stored.get("data_folder", "./data")


def read_run(run_dir) -> dict:
    """A run directory's best.pth and what it was trained on, read before any data loads:
    {'dir', 'args' (args.json), 'path' (best.pth), 'state', 'arch', 'dataset', 'data_folder',
    'teachers' (the checkpoints of its --path_t, in order; none for a run from labels alone)}."""
    run_dir = Path(run_dir)
    if not (run_dir / runs.ARGS_FILE).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {runs.ARGS_FILE}); name a folder that "
                        "train_student.py or train_teacher.py wrote, such as save/students/<run>")
    stored = runs.load_run_args(run_dir)
    path = run_dir / runs.BEST_CKPT
    if not path.is_file():
        raise UserError(f"{run_dir} holds no {runs.BEST_CKPT} (it has not finished an epoch); "
                        f"resume it first: python train_student.py --resume {run_dir}")
    state, arch = read_network(path)
    dataset, data_folder = run_data(path, state)
    teachers = split_paths(stored["path_t"]) if stored.get("path_t") else []
    return {"dir": run_dir, "args": stored, "path": path, "state": state, "arch": arch, "dataset": dataset,
            "data_folder": data_folder, "teachers": teachers}
