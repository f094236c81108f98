"""Student training: `gamma * CE + alpha * KD + sum(beta_m * method_m)` over the registered
methods, with their init stages. Knows no method by name.

Strong view: when a distiller's data needs include a strong view (MLKD), the loader's images are 2B,
the B weak views then the B strong views of the same samples. The student runs on each view
separately (its BatchNorm sees one view per pass, as in MLKD's official trainer), the frozen
teacher on both at once. Cross-entropy covers both views, `CE(weak) + CE(strong)` logged as
'ce' and 'ce_strong' (MLKD's official loss); KD (-a) and every distiller without the flag see
the weak half only; a strong-view distiller receives the Features of all 2B rows. The logits
returned for the accuracy are the weak half's, one row per sample.

Rotated views: when a distiller's data needs include rotations (SSKD), the loader's images are
4B, each sample rotated by 0, 90, 180 and 270 degrees in blocks of B. Student and teacher each
run once on all 4B rows (SSKD's official step: BatchNorm sees the four rotations together);
cross-entropy, KD and every distiller without the flag see the upright block, a rotation
distiller the Features of all 4B rows; the accuracy counts the upright block.

Several teachers: `teacher` feeds the methods; `kd_teachers` (the others, frozen) join it in
the KD term only, which `combine(student logits, list of teacher logits, targets) -> loss`
then computes in place of `kd`; it must not depend on the teachers' order
(distiller_zoo/multi_teacher.py).

A method whose head replaces the student's classifier in the deployed network (SimKD) makes
`deployed_network()` the student with that head; the training accuracy counts the head's
logits, which the method returns in its parts (distiller_zoo.base.DEPLOYED_LOGITS).

A recipe's mapping (distiller_zoo/recipe.py) gives a method the recorded stages it sees
(`stages`: a StageSelection by method name), in its main step and its init stage alike; a
method not named sees them all."""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from distiller_zoo.base import DEPLOYED_LOGITS, Batch, DeployedNetwork, Distiller, InitStage, head_record
from distiller_zoo.temperature import Temperature
from engine.task import Task, compile_features
from engine.trainer import Stage
from models.features import Features, StageSelection


class DistillTask(Task):
    def __init__(self, student: nn.Module, teacher: nn.Module, methods: List[Tuple[str, float, Distiller]],
                 gamma: float, alpha: float, kd_term: Tuple[str, nn.Module], temperature: Temperature,
                 num_classes: int, init_lr: Optional[float] = None, base_lr: float = 0.05,
                 kd_teachers: Sequence[nn.Module] = (), combine: Optional[nn.Module] = None,
                 stages: Optional[Mapping[str, StageSelection]] = None):
        super().__init__(student, num_classes)
        self.teacher = teacher.eval()
        self.kd_teachers = nn.ModuleList(t.eval() for t in kd_teachers)
        self.combine = combine
        for p in [*self.teacher.parameters(), *self.kd_teachers.parameters()]:
            p.requires_grad_(False)
        self.distillers = nn.ModuleDict({name: d for name, _, d in methods})
        self.weights: Dict[str, float] = {name: w for name, w, _ in methods}
        self.selections = {name: (stages or {}).get(name, StageSelection()) for name, _, _ in methods}
        self.gamma, self.alpha = gamma, alpha
        self.init_lr, self.base_lr = init_lr, base_lr
        self.temperature = temperature
        self.kd_name, self.kd = kd_term  # the -a term (KD) and the name it is logged under
        self.strong_view = any(d.needs.strong_view for _, _, d in methods)
        self.rotations = any(d.needs.rotations for _, _, d in methods)
        heads = [(name, head) for name, _, d in methods if (head := d.deployed_head()) is not None]
        if len(heads) > 1:
            raise UserError(f"{' and '.join(name for name, _ in heads)} both replace the student's classifier "
                            "in the deployed network; combine at most one of them")
        self.head_name, self.head = heads[0] if heads else (None, None)

    def teacher_features(self, images):
        with torch.no_grad():
            return self.teacher.forward_features(images)

    def forward(self, images, targets, indices=None, contrast=None):
        batch = Batch(targets=targets, indices=indices, contrast=contrast)
        if self.strong_view:
            feat_s, feat_t, weak_s, weak_t = self._two_view_features(images, targets.shape[0])
        elif self.rotations:
            feat_s, feat_t, weak_s, weak_t = self._rotated_features(images, targets.shape[0])
        else:
            feat_s = weak_s = self.model.forward_features(images)
            feat_t = weak_t = self.teacher_features(images)
        ce = F.cross_entropy(weak_s.logits.float(), targets)
        terms = {"ce": ce}
        logits = weak_s.logits
        loss = self.gamma * ce
        if self.strong_view:
            terms["ce_strong"] = F.cross_entropy(feat_s.logits[targets.shape[0]:].float(), targets)
            loss = loss + self.gamma * terms["ce_strong"]
        terms["task"] = loss  # the CE share, which DOT steps apart from the distillation share
        if self.alpha:
            terms[self.kd_name] = self._kd(images[:targets.shape[0]], weak_s.logits, weak_t, targets)
            loss = loss + self.alpha * terms[self.kd_name]
        for name, distiller in self.distillers.items():
            if not self.weights[name]:
                continue  # a zero weight switches a term off; it costs nothing
            if distiller.needs.strong_view or distiller.needs.rotations:
                value, parts = distiller(*self.selections[name](feat_s, feat_t), batch)
            else:
                value, parts = distiller(*self.selections[name](weak_s, weak_t), batch)
            if DEPLOYED_LOGITS in parts:
                logits = parts.pop(DEPLOYED_LOGITS)
            terms[name] = value
            terms.update({f"{name}_{k}": v.detach() for k, v in parts.items()})
            loss = loss + self.weights[name] * value
        terms["loss"] = loss
        return terms, logits

    def _kd(self, images, logits_s, weak_t: Features, targets):
        """The KD term: against the teacher, or against all teachers through `combine`."""
        if not self.kd_teachers:
            return self.kd(logits_s, weak_t.logits)
        with torch.no_grad():
            others = [t(images) for t in self.kd_teachers]
        return self.combine(logits_s, [weak_t.logits, *others], targets)

    def _two_view_features(self, images, n: int):
        """(student 2B, teacher 2B, student weak B, teacher weak B) Features of a two-view batch."""
        if images.shape[0] != 2 * n:
            raise ValueError(f"a strong-view method needs batches of 2B images (weak, then strong) for B labels; "
                             f"got {images.shape[0]} images for {n} labels: build the loader with strong_view=True")
        weak_s = self.model.forward_features(images[:n])
        feat_s = Features.cat([weak_s, self.model.forward_features(images[n:])])
        feat_t = self.teacher_features(images)
        return feat_s, feat_t, weak_s, feat_t.rows(0, n)

    def _rotated_features(self, images, n: int):
        """(student 4B, teacher 4B, student upright B, teacher upright B) Features of a rotation batch."""
        if images.shape[0] != 4 * n:
            raise ValueError(f"a rotation method needs batches of 4B images (four rotations in blocks of B) for B "
                             f"labels; got {images.shape[0]} images for {n} labels: build the loader with rotations=True")
        feat_s = self.model.forward_features(images)
        feat_t = self.teacher_features(images)
        return feat_s, feat_t, feat_s.rows(0, n), feat_t.rows(0, n)

    def has_unused_parameters(self, module: nn.Module, params) -> bool:
        """Also a term switched off by a zero weight: its connectors take no part in the step."""
        idle = [d for name, d in self.distillers.items() if not self.weights[name]]
        if not self.alpha and self.combine is not None:
            idle.append(self.combine)
        return super().has_unused_parameters(module, params) or any(
            p.requires_grad for d in idle for p in d.parameters())

    # --- stages -----------------------------------------------------------------------------
    def _declared_init_stages(self):
        return [(name, stage) for name, d in self.distillers.items()
                if (stage := d.init_stage()) is not None and stage.epochs > 0]

    def init_stages(self) -> list:
        return [Stage(f"init_{name}", stage.epochs, InitStep(self, stage, self.selections[name]), stage.params,
                      evaluate=False, constant_lr=self._init_lr(stage), lr_milestones=stage.lr_milestones)
                for name, stage in self._declared_init_stages()]

    def _init_lr(self, stage: InitStage) -> float:
        """--init_lr, else the method's own init lr, else the base lr."""
        if self.init_lr is not None:
            return self.init_lr
        return self.base_lr if stage.lr is None else stage.lr

    def main_parameters(self) -> list:
        """The student, and every connector no init stage owns (an init stage's connectors,
        e.g. FT's paraphraser, are frozen once it has run)."""
        owned = {id(p) for _, stage in self._declared_init_stages() for p in stage.params}
        student = [p for p in self.model.parameters() if p.requires_grad]
        student_ids = {id(p) for p in student}
        connectors = [p for p in self.distillers.parameters()
                      if p.requires_grad and id(p) not in owned and id(p) not in student_ids]
        return student + connectors

    def deployed_network(self) -> nn.Module:
        return self.model if self.head is None else DeployedNetwork(self.model, self.head)

    def deployed_record(self):
        return None if self.head is None else head_record(self.head_name, self.head)

    def compile_networks(self) -> None:
        compile_features(self.model)
        compile_features(self.teacher)
        for t in self.kd_teachers:
            t.forward = torch.compile(t.forward)

    def set_epoch(self, epoch: int) -> None:
        self.temperature.set_epoch(epoch)
        for distiller in self.distillers.values():
            distiller.set_epoch(epoch)

    def frozen_networks(self) -> list:
        return [self.teacher, *self.kd_teachers]

    def keep_frozen_in_eval(self) -> None:
        self.teacher.eval()
        self.kd_teachers.eval()

    def epoch_metrics(self) -> dict:
        metrics = {f"{name}_{k}": v for name, d in self.distillers.items() for k, v in d.epoch_metrics().items()}
        return {"kd_T": float(self.temperature), **metrics}

    def extra_state(self) -> dict:
        return {"distillers": self.distillers.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "distillers" in state:
            self.distillers.load_state_dict(state["distillers"])


class InitStep(nn.Module):
    """One step of a method's init stage: its loss on the (frozen) teacher's features and,
    when the stage needs it, the student's."""

    def __init__(self, task: DistillTask, stage: InitStage, select: StageSelection = StageSelection()):
        super().__init__()
        self.task = task
        self.stage = stage
        self.select = select

    def forward(self, images, targets, *unused):
        if not self.stage.all_views:
            images = images[:targets.shape[0]]  # the weak views of a two-view batch, the upright of a rotation batch
        feat_t = self.task.teacher_features(images)
        feat_s = self.task.model.forward_features(images) if self.stage.needs_student else None
        return self.stage.loss(*self.select(feat_s, feat_t)), None
