"""Extra cost of each method's training step over plain KD.

    python scripts/method_cost.py --teacher resnet32x4 --student resnet8x4 --batch 64 --steps 10

Times forward + backward + SGD step of the full objective (CE + method) on random
CIFAR-sized batches, after warm-up, and prints milliseconds per step and the ratio
to KD. Init stages are not timed (they run once, before training).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import distiller_zoo  # noqa: E402
from distiller_zoo.base import BuildContext  # noqa: E402
from distiller_zoo.objective import parse_objective  # noqa: E402
from distiller_zoo.temperature import Temperature  # noqa: E402
from engine.build import build_model  # noqa: E402
from engine.distill_task import DistillTask  # noqa: E402


def build(method: str, teacher_name: str, student_name: str, images, n_train: int, num_classes: int):
    """The DistillTask train_student.py would build for `method` (its published weights and
    option defaults, per-pair values included), on random networks; and its options' values."""
    pair = (teacher_name, student_name)
    objective = parse_objective(method, None, None, None, False, pair)
    options, _ = objective.resolve_options({}, pair)
    teacher = build_model(teacher_name, num_classes).eval()
    student = build_model(student_name, num_classes)
    with torch.no_grad():
        student.eval()
        feat_s, feat_t = student.forward_features(images), teacher.forward_features(images)
        student.train()
    temperature = Temperature(4.0)
    methods = []
    for term in objective.methods:
        ctx = BuildContext(student, teacher, feat_s, feat_t, term.options, n_train, num_classes, student_name,
                           teacher_name, temperature)
        methods.append((term.spec.name, term.weight, term.spec.cls(ctx)))
    task = DistillTask(student, teacher, methods, objective.gamma, objective.alpha, objective.kd_term(temperature),
                       temperature, num_classes)
    return task, options


def rotations(images):
    """The four rotated views of a batch, in blocks of B, as the loader gives a rotation method."""
    return torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])


def time_step(task, images, targets, indices, contrast, steps: int) -> float:
    optimizer = torch.optim.SGD(task.main_parameters(), lr=0.01, momentum=0.9)
    task.train()
    task.keep_frozen_in_eval()

    def step():
        terms, _ = task(images, targets, indices, contrast)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", default=",".join(["kd", *sorted(set(distiller_zoo.METHODS) - {"kd"})]),
                        help="comma-separated; the first is the baseline of the ratios")
    opts = parser.parse_args(argv)
    torch.manual_seed(0)
    num_classes, n_train = 100, 50000
    images = torch.randn(opts.batch, 3, 32, 32)
    targets = torch.randint(0, num_classes, (opts.batch,))
    indices = torch.randint(0, n_train, (opts.batch,))
    print(f"{opts.teacher} -> {opts.student}, batch {opts.batch}, {torch.get_num_threads()} threads, "
          f"ms per training step (forward, backward, SGD), mean of {opts.steps}")
    base, rows = None, []
    for method in opts.methods.split(","):
        task, options = build(method, opts.teacher, opts.student, images, n_train, num_classes)
        contrast = torch.randint(0, n_train, (opts.batch, (options.get("nce_k") or 0) + 1))
        # a strong-view method (MLKD) takes 2B images, weak then strong, a rotation method (SSKD)
        # 4B; the augmentation itself is the loader's cost and is not timed here
        batch = torch.cat([images, torch.randn_like(images)]) if task.strong_view else images
        if task.rotations:
            batch = rotations(images)
        ms = time_step(task, batch, targets, indices, contrast, opts.steps)
        base = ms if base is None else base
        print(f"{method:8s} {ms:8.1f} ms   x{ms / base:.2f} of {opts.methods.split(',')[0]}", flush=True)
        rows.append((method, ms))
    return rows


if __name__ == "__main__":
    main()
