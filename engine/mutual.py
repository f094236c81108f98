"""Deep Mutual Learning: Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018.

K >= 2 peers of any architectures train together from scratch, with no pretrained teacher.
Peer k minimises its own cross-entropy plus the mean KL divergence from each other peer's
prediction to its own (the paper's eq. 10, at T = 1 as in the paper):

    L_k = CE(z_k, y) + 1/(K-1) * sum_{l != k} KL(softmax(z_l) || softmax(z_k))

The paper updates the peers in turn, each against the others' current predictions. Here every
peer takes its step at once from one forward pass, the other peers' predictions detached, so
each peer's gradient is that of its own L_k and the sum of the L_k is what one optimizer
minimises; the difference from the alternating updates is only which weights the other peers
hold during a step (those before it rather than those after their own update in the same step).

Every peer is evaluated each epoch (metrics.csv columns test_top1_peer<k>_<arch>, ...; the same
TensorBoard scalars) and saved as <run>/peer<k>_<arch>/best.pth in the checkpoint format of
best.pth, so evaluate.py reads it and train_student.py takes it as --path_t. The run's own
best.pth, test_top1 and results.json's best_top1 are peer 0's.

Run by train_mutual.py from a MutualConfig (engine/config.py):

    results = train(MutualConfig(models="resnet8,resnet14", dataset="digits", epochs=2))
"""
import torch.nn.functional as F
from torch import nn

from distiller_zoo.kd import DistillKL
from engine.build import build_model
from engine.config import MutualConfig
from engine.programs import MUTUAL
from engine.session import build_data, create_run_dir, start
from engine.task import Task, compile_features
from engine.trainer import fit_task


class MutualTask(Task):
    """The peers, peer 0 as `model`; every peer a side network of the trainer."""

    def __init__(self, peers, archs, num_classes: int):
        super().__init__(peers[0], num_classes)
        self.peers = nn.ModuleList(peers)
        self.archs = list(archs)
        self.kl = DistillKL(T=1.0)

    def forward(self, images, targets, *unused):
        logits = [peer(images).float() for peer in self.peers]
        others = len(logits) - 1
        terms, loss = {}, 0.0
        for k, z in enumerate(logits):
            ce = F.cross_entropy(z, targets)
            kl = sum(self.kl(z, other.detach()) for l, other in enumerate(logits) if l != k) / others
            terms[f"ce_peer{k}"], terms[f"kl_peer{k}"] = ce, kl
            loss = loss + ce + kl
        terms["loss"] = loss
        return terms, logits[0]

    def main_parameters(self) -> list:
        return [p for p in self.peers.parameters() if p.requires_grad]

    def side_networks(self) -> dict:
        return {f"peer{k}_{arch}": (arch, peer) for k, (arch, peer) in enumerate(zip(self.archs, self.peers))}

    def compile_networks(self) -> None:
        for peer in self.peers:
            compile_features(peer)

    def extra_state(self) -> dict:
        return {"peers": self.peers.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.peers.load_state_dict(state["peers"])


def run_name(config: MutualConfig) -> str:
    return f"DML-{'+'.join(config.peers)}_{config.dataset}_trial{config.trial}"


def train(config: MutualConfig, resume=False) -> dict:
    """Train the configured peers; `resume` is the run directory to go on with (or False)."""
    archs = config.peers
    ctx, run_dir = start(config, MUTUAL.kind, run_name, resume)
    train_loader, test_loader, info = build_data(config, ctx)
    peers = [build_model(arch, info.num_classes, config.dataset).to(ctx.device) for arch in archs]
    task = MutualTask(peers, archs, info.num_classes).to(ctx.device)
    create_run_dir(config, ctx, run_dir, resume)
    results = fit_task(config, ctx, run_dir, resume, task, archs[0], train_loader, test_loader,
                       describe={"method": "dml", "teacher": "peers", "peers": archs})
    if ctx.is_main:
        best = ", ".join(f"{name} {results['best_top1_' + name]:.2f}" for name in task.side_networks())
        print(f"mutual learning on {config.dataset}: best top-1 {best}; run directory {run_dir}")
    return results
