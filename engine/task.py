"""What the trainer optimises. A task owns the trained network (`model`) and turns a
batch into named loss terms; subclasses add teachers, connectors and init stages."""
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn


class Task(nn.Module):
    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.model = model
        self.num_classes = num_classes

    def init_stages(self) -> list:
        """Stages to run before the main training (none by default)."""
        return []

    def main_parameters(self) -> list:
        return [p for p in self.model.parameters() if p.requires_grad]

    def main_constant_lr(self):
        """The main stage's constant learning rate; None: the configuration's schedule."""
        return None

    def model_state(self) -> dict:
        """`model`'s weights as checkpoints store them under 'model'."""
        return self.model.state_dict()

    def evaluating(self):
        """A context the trainer evaluates in (QAT freezes its observers there); none by default."""
        return nullcontext()

    def has_unused_parameters(self, module: nn.Module, params) -> bool:
        """Whether a step of `module` leaves one of its trainable parameters without a gradient
        (DDP must then look for them every step: find_unused_parameters). A stage's own
        parameters all get one; those it does not optimise (another stage's) do not."""
        optimised = {id(p) for p in params}
        return any(p.requires_grad and id(p) not in optimised for p in module.parameters())

    def set_epoch(self, epoch: int) -> None:
        """Called before each main epoch (warm-ups and schedules hook in here)."""

    def compile_networks(self) -> None:
        """torch.compile the networks' forward passes in place (state_dict keys unchanged)."""
        compile_features(self.model)

    def side_networks(self) -> dict:
        """Networks trained besides `model` that are evaluated and saved on their own
        ({name: (architecture, network)}; see engine/trainer.py). None by default."""
        return {}

    def deployed_network(self) -> nn.Module:
        """The network the run evaluates, checkpoints and deploys: `model` unless a method's
        head replaces its classifier (distiller_zoo.base.DeployedNetwork)."""
        return self.model

    def deployed_record(self):
        """What a checkpoint stores under 'head' to rebuild `deployed_network()`; None when it is `model`."""
        return None

    def frozen_networks(self) -> list:
        """Networks that run forward only (a teacher): the speed probe times them too."""
        return []

    def keep_frozen_in_eval(self) -> None:
        """Called after task.train(): frozen networks (a teacher) go back to eval mode."""

    def epoch_metrics(self) -> dict:
        """Extra figures to log once per epoch (e.g. a learned temperature)."""
        return {}

    def extra_state(self) -> dict:
        """What a checkpoint needs beyond `model` to resume (connectors, memory banks)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class SupervisedTask(Task):
    """Plain cross-entropy training: how teachers and vanilla students are trained."""

    def forward(self, images, targets, *unused):
        logits = self.model(images)
        ce = F.cross_entropy(logits, targets)
        return {"loss": ce, "ce": ce}, logits


def compile_features(model: nn.Module) -> None:
    model.forward_features = torch.compile(model.forward_features)
