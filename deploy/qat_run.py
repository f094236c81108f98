"""The QAT run after distillation (`train_student.py --qat_epochs N --init_student CKPT`): the
fake-quantised student (deploy/qat.py) trained as a task of the one trainer (engine/trainer.py),
so it takes the run directory's lock, stops cleanly on a signal or a non-finite loss and resumes
exactly like every run; then the deployable int8 model beside its best.pth.

The loss is cross-entropy and, given a teacher, still KD, at T = 1 by default (the advice for
8-bit QAT: match the teacher's actual probabilities, which an 8-bit network can still represent,
rather than softened ones). QAT fine-tunes a trained network: a small constant learning rate,
not the schedule's start, on deploy/data.py's CPU batches (fp32; the graph is traced there)."""
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from core.errors import UserError
from deploy import data as deploy_data
from deploy import extras
from deploy.network import load_network, read_network
from deploy.qat import float_state, observers_frozen, prepare_qat, write_int8
from distiller_zoo.base import DeployedNetwork
from distiller_zoo.kd import DistillKL
from engine.config import StudentConfig, world_size
from engine.loop import NonFiniteLoss
from engine.programs import STUDENT
from engine.session import create_run_dir, start
from engine.task import Task
from engine.teacher import find_best_teacher
from engine.trainer import fit_task

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


def run_name(config: StudentConfig) -> str:
    return f"QAT-{config.model_s}_{config.dataset}_a{config.alpha:g}_T{config.kd_T:g}_trial{config.trial}"


def configure(flags: Mapping) -> "QATRun":
    """The QAT run of train_student.py's flag values (a resumed run's stored ones): the student's
    architecture from --init_student, and the flags in the names every run uses (what args.json
    records and the trainer reads): QAT's epochs and constant learning rate with SGD, unclipped
    (the distillation's --optimizer, --clip_grad and schedule are not QAT's), deploy/data.py's
    batch on the CPU in fp32, KD at T = 1 unless given."""
    extras.require()
    if flags["init_student"] is None:
        raise UserError("--qat_epochs needs --init_student, the distilled student's checkpoint")
    if world_size() > 1:
        raise UserError("--qat_epochs runs on one process; run it without torchrun")
    _, arch = read_network(flags["init_student"])
    alpha = flags["alpha"] or 0.0
    path_t = flags["path_t"]
    if alpha and not path_t:
        path_t = str(find_best_teacher(flags["save_dir"], flags["dataset"]))
    return QATRun(StudentConfig.from_dict({
        **flags, "model_s": arch, "method": METHOD, "epochs": flags["qat_epochs"], "learning_rate": flags["qat_lr"],
        "optimizer": "sgd", "clip_grad": None, "lr_schedule": "step", "warmup_epochs": 0,
        "gamma": 1.0 if flags["gamma"] is None else flags["gamma"], "alpha": alpha, "path_t": path_t,
        "kd_T": 1.0 if flags["kd_T"] is None else flags["kd_T"], "batch_size": deploy_data.BATCH,
        "device": "cpu", "amp": "off", "channels_last": False, "compile": False}))


def describe(config: StudentConfig, teacher_arch) -> dict:
    return {"method": METHOD, "teacher": teacher_arch or "none", "path_t": config.path_t if teacher_arch else None,
            "init_student": config.init_student, "gamma": config.gamma, "alpha": config.alpha, "kd_T": config.kd_T,
            "qat": {"epochs": config.epochs, "learning_rate": config.learning_rate, "momentum": config.momentum,
                    "weight_decay": config.weight_decay, "gamma": config.gamma, "alpha": config.alpha,
                    "kd_T": config.kd_T}}


@dataclass
class QATRun:
    config: StudentConfig

    def name(self) -> str:
        return run_name(self.config)

    def train(self, resume=False) -> dict:
        """The QAT run, then its int8.onnx; returns results.json's content. `resume` is the run
        directory to go on with (or False)."""
        config = self.config
        train_loader, test_loader, info = deploy_data.loaders(config.dataset, config.data_folder)
        student, arch = load_network(config.init_student, None, info.num_classes, config.dataset)
        if isinstance(student, DeployedNetwork):
            raise UserError(f"--init_student {config.init_student} deploys a method's head beside the student "
                            "(SimKD); QAT covers plain networks only; evaluate or export it as it is")
        teacher, teacher_arch = None, None
        if config.alpha:
            teacher, teacher_arch = load_network(config.path_t, config.model_t, info.num_classes, config.dataset)
        ctx, run_dir = start(config, STUDENT.kind, run_name, resume)
        prepared = prepare_qat(student, next(iter(test_loader))[0])
        task = QATTask(student, prepared, info.num_classes, config.learning_rate, config.gamma, config.alpha,
                       config.kd_T, teacher).to(ctx.device)
        create_run_dir(config, ctx, run_dir, resume)
        results = fit_task(config, ctx, run_dir, resume, task, arch, train_loader, test_loader,
                           describe=describe(config, teacher_arch))
        int8 = write_int8(run_dir, student, train_loader)
        print(f"QAT of {config.init_student}: fake-quantised best top-1 {results['best_top1']:.2f}; "
              f"{run_dir / 'best.pth'}, {int8}")
        return results
