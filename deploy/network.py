"""A trained network from its checkpoint (ours, or RepDistiller's {'model': state_dict}), its
architecture found as evaluate.py finds it: --model, the checkpoint's 'arch', the run's
args.json, RepDistiller's folder-name rule."""
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
