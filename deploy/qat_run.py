"""The QAT run after distillation (`train_student.py --qat_epochs N --init_student CKPT`): the
fake-quantised student (deploy/qat.py) trained as a task of the one trainer (engine/trainer.py),
so it takes the run directory's lock, stops cleanly on a signal or a non-finite loss and resumes
exactly like every run; then the deployable int8 model beside its best.pth.

The loss is cross-entropy and, given a teacher, still KD, at T = 1 by default (the advice for
8-bit QAT: match the teacher's actual probabilities, which an 8-bit network can still represent,
rather than softened ones). QAT fine-tunes a trained network: a small constant learning rate,
not the schedule's start, on deploy/data.py's CPU batches (fp32; the graph is traced there)."""
import os

import torch
import torch.nn.functional as F

from core.errors import UserError
from deploy import data as deploy_data
from deploy import extras
from deploy.network import load_network
from deploy.qat import float_state, observers_frozen, prepare_qat, write_int8
from distiller_zoo.base import DeployedNetwork
from distiller_zoo.kd import DistillKL
from engine.loop import NonFiniteLoss
from engine.programs import STUDENT
from engine.session import create_run_dir, start
from engine.task import Task
from engine.teacher import find_best_teacher
from engine.trainer import Trainer

METHOD = "qat"


class QATTask(Task):
    """gamma * CE + alpha * KD(T) of the fake-quantised network `prepared` against a frozen
    teacher. `model` is the float network: checkpoints hold the trained weights under its names,
    and the fake-quantisation state (observers, ranges) as the task's extra state."""

    def __init__(self, model, prepared, num_classes: int, lr: float, gamma: float, alpha: float, kd_T: float,
                 teacher=None):
        super().__init__(model, num_classes)
        if alpha and teacher is None:
            raise ValueError("a KD weight (alpha) needs a teacher")
        self.prepared, self.teacher = prepared, teacher
        self.lr, self.gamma, self.alpha = lr, gamma, alpha
        self.kd = DistillKL(kd_T)

    def forward(self, images, targets, *unused):
        try:
            logits = self.prepared(images)
        except RuntimeError:
            # the fake-quantisers cannot take ranges from values that overflowed (their observed
            # ranges turn infinite): that is the non-finite stop, not a traceback
            if all(torch.isfinite(t).all() for t in (*self.prepared.parameters(), *self.prepared.buffers())
                   if t.is_floating_point()):
                raise
            raise NonFiniteLoss("the fake-quantised network's values became non-finite") from None
        terms = {"ce": F.cross_entropy(logits, targets)}
        loss = self.gamma * terms["ce"]
        if self.alpha:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            terms["kd"] = self.kd(logits, teacher_logits)
            loss = loss + self.alpha * terms["kd"]
        return {"loss": loss, **terms}, logits

    def main_parameters(self) -> list:
        return [p for p in self.prepared.parameters() if p.requires_grad]

    def main_constant_lr(self) -> float:
        return self.lr

    def model_state(self) -> dict:
        return float_state(self.prepared, self.model)

    def evaluating(self):
        return observers_frozen(self.prepared)

    def deployed_network(self):
        return self.prepared

    def frozen_networks(self) -> list:
        return [self.teacher] if self.teacher is not None else []

    def keep_frozen_in_eval(self) -> None:
        # the teacher stays in eval mode, as in every distillation run (README, Decisions)
        if self.teacher is not None:
            self.teacher.eval()

    def extra_state(self) -> dict:
        return {"qat_state": self.prepared.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.prepared.load_state_dict(state["qat_state"])


def run_name(args) -> str:
    return f"QAT-{args.model_s}_{args.dataset}_a{args.alpha:g}_T{args.kd_T:g}_trial{args.trial}"


def settle_args(args, arch: str) -> None:
    """A QAT run's flags in the names every run uses (what args.json records and the trainer reads)."""
    args.model_s, args.method = arch, METHOD
    args.epochs, args.learning_rate = args.qat_epochs, args.qat_lr
    args.gamma = 1.0 if args.gamma is None else args.gamma
    args.alpha = args.alpha or 0.0
    args.kd_T = 1.0 if args.kd_T is None else args.kd_T
    args.batch_size, args.device, args.amp, args.channels_last, args.compile = (
        deploy_data.BATCH, "cpu", "off", False, False)


def describe(args, teacher_arch) -> dict:
    return {"method": METHOD, "teacher": teacher_arch or "none", "path_t": args.path_t if teacher_arch else None,
            "init_student": args.init_student, "gamma": args.gamma, "alpha": args.alpha, "kd_T": args.kd_T,
            "qat": {"epochs": args.epochs, "learning_rate": args.learning_rate, "momentum": args.momentum,
                    "weight_decay": args.weight_decay, "gamma": args.gamma, "alpha": args.alpha, "kd_T": args.kd_T}}


def check_qat_args(args) -> None:
    if args.init_student is None:
        raise UserError("--qat_epochs needs --init_student, the distilled student's checkpoint")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--qat_epochs runs on one process; run it without torchrun")


def run_qat(args) -> dict:
    """The QAT run of train_student.py's parsed arguments (a --resume'd run's restored already),
    then its int8.onnx; returns results.json's content."""
    extras.require()
    check_qat_args(args)
    train_loader, test_loader, info = deploy_data.loaders(args.dataset, args.data_folder)
    student, arch = load_network(args.init_student, None, info.num_classes, args.dataset)
    if isinstance(student, DeployedNetwork):
        raise UserError(f"--init_student {args.init_student} deploys a method's head beside the student (SimKD); "
                        "QAT covers plain networks only; evaluate or export it as it is")
    settle_args(args, arch)
    teacher, teacher_arch = None, None
    if args.alpha:
        args.path_t = args.path_t or str(find_best_teacher(args.save_dir, args.dataset))
        teacher, teacher_arch = load_network(args.path_t, args.model_t, info.num_classes, args.dataset)
    args, ctx, run_dir = start(args, STUDENT.kind, lambda a: a.model_s, run_name)
    prepared = prepare_qat(student, next(iter(test_loader))[0])
    task = QATTask(student, prepared, info.num_classes, args.learning_rate, args.gamma, args.alpha, args.kd_T,
                   teacher).to(ctx.device)
    create_run_dir(args, ctx, run_dir)
    results = Trainer(args, ctx, run_dir, task, arch, train_loader, test_loader,
                      describe=describe(args, teacher_arch)).fit()
    int8 = write_int8(run_dir, student, train_loader)
    print(f"QAT of {args.init_student}: fake-quantised best top-1 {results['best_top1']:.2f}; "
          f"{run_dir / 'best.pth'}, {int8}")
    return results
