"""Quantisation-aware training (QAT) after distillation, with PyTorch's PT2E flow (torchao).

The distilled student is captured by torch.export (dynamic batch, train mode) and prepared by
`prepare_qat_pt2e` with X86InductorQuantizer's QAT configuration: weights fake-quantised to
int8, symmetric, per output channel (BatchNorm folded in, as PT2E's conv-bn QAT pattern
simulates), activations to uint8 per tensor with moving-average min/max ranges. That is the
scheme of the int8 model deploy/quantize.py writes with ONNX Runtime, so the weights learn the
grid they are deployed on. Training continues with cross-entropy and, given a teacher, still
distils with KD at T = 1 by default (the advice for 8-bit QAT: match the teacher's actual
probabilities, which an 8-bit network can still represent, rather than softened ones).

PT2E keeps the float model's parameter and buffer names, so the trained weights load back into
the plain network: best.pth is an ordinary checkpoint ({'model', 'arch', ...}) that evaluate.py
and scripts/export.py read, and `--int8` quantises. Observers are off while evaluating, so a
test pass never moves the activation ranges. Every epoch writes ckpt_last.pth atomically
(float weights, the fake-quantisation state, the optimizer, the epoch); `run_qat` on a run
directory that has one continues from it, and the resumed run equals an uninterrupted one."""
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from deploy.data import first_images
from deploy.export import example_input, export_onnx
from deploy.quantize import CALIBRATION_IMAGES, quantize_int8
from distiller_zoo.kd import DistillKL
from engine import runs
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.loop import evaluate, train_epoch
from engine.metrics_log import MetricsLog

STAGE = "qat"
# what ckpt_last.pth keeps of a run's progress
POSITION = ("epoch", "best_acc", "best_epoch", "elapsed", "last_top1")


@dataclass
class QATConfig:
    epochs: int
    # QAT fine-tunes a trained network: a small constant learning rate, not the schedule's start
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    gamma: float = 1.0   # weight of cross-entropy
    alpha: float = 0.0   # weight of KD from the teacher (needs one)
    kd_T: float = 1.0
    print_freq: int = 100


def prepare_qat(model: torch.nn.Module, images: torch.Tensor) -> torch.fx.GraphModule:
    """The fake-quantised training graph of `model`; .train()/.eval() switch it like a module."""
    # torchao (the optional deploy extra) is imported only by a QAT run: it costs every
    # train_student.py start seconds otherwise
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config(is_qat=True))
    graph = torch.export.export(model.train(), example_input(images),
                                dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    prepared = prepare_qat_pt2e(graph, quantizer)
    allow_exported_model_train_eval(prepared)
    return prepared


def float_state(prepared: torch.fx.GraphModule, model: torch.nn.Module) -> dict:
    """The trained weights under the float model's names (PT2E keeps them), for a plain checkpoint."""
    trained = prepared.state_dict()
    return {name: trained[name].clone() for name in model.state_dict()}


class QATStep:
    """One training step's loss terms: gamma * CE + alpha * KD(T) against a frozen teacher."""

    def __init__(self, prepared, config: QATConfig, teacher=None):
        if config.alpha and teacher is None:
            raise ValueError("a KD weight (alpha) needs a teacher")
        # the teacher stays in eval mode, as in every distillation run (README, Decisions)
        self.prepared, self.config, self.teacher = prepared, config, teacher.eval() if teacher else None
        self.kd = DistillKL(config.kd_T)

    def __call__(self, images, targets, *unused):
        logits = self.prepared(images)
        terms = {"ce": F.cross_entropy(logits, targets)}
        loss = self.config.gamma * terms["ce"]
        if self.config.alpha:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            terms["kd"] = self.kd(logits, teacher_logits)
            loss = loss + self.config.alpha * terms["kd"]
        return {"loss": loss, **terms}, logits


def evaluate_quantised(prepared, loader, device) -> dict:
    """Test metrics of the fake-quantised network with its observers frozen."""
    from torchao.quantization.pt2e import disable_observer, enable_observer
    prepared.apply(disable_observer)
    try:
        return evaluate(prepared, loader, device=device, amp_dtype=None, channels_last=False)
    finally:
        prepared.apply(enable_observer)


def _resume(run_dir: Path, prepared, optimizer) -> dict:
    """The progress of an interrupted run (epoch 0 for a new one), its state loaded in place."""
    last = run_dir / runs.LAST_CKPT
    if not last.is_file():
        return {"epoch": 0, "best_acc": 0.0, "best_epoch": 0, "elapsed": 0.0, "last_top1": None}
    state = load_checkpoint(last)
    prepared.load_state_dict(state["qat_state"])
    optimizer.load_state_dict(state["optimizer"])
    return {k: state[k] for k in POSITION}


def run_qat(model, train_loader, test_loader, run_dir, config: QATConfig, *, arch: str, dataset: str,
            teacher=None, device=torch.device("cpu")) -> dict:
    """QAT of the trained `model` for config.epochs epochs into `run_dir` (continued if it holds
    ckpt_last.pth); returns results.json's content. best.pth and ckpt_last.pth hold float weights."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_qat(model, next(iter(test_loader))[0])
    step = QATStep(prepared, config, teacher)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    progress = _resume(run_dir, prepared, optimizer)
    log = MetricsLog(run_dir, {"rows": progress["epoch"], "stage": STAGE, "epoch": progress["epoch"]})
    identity = {"arch": arch, "dataset": dataset, "qat": asdict(config)}
    for epoch in range(progress["epoch"] + 1, config.epochs + 1):
        start = time.perf_counter()
        train_loader.set_epoch(epoch)
        prepared.train()
        metrics = train_epoch(step, train_loader, optimizer, torch.amp.GradScaler(device.type, enabled=False),
                              device=device, amp_dtype=None, channels_last=False, print_freq=config.print_freq,
                              desc=f"{STAGE} {epoch}/{config.epochs}", show_progress=False)
        metrics.update(evaluate_quantised(prepared, test_loader, device))
        log.log_epoch(STAGE, epoch, metrics)
        progress = _advance(progress, epoch, metrics["test_top1"], time.perf_counter() - start)
        _save(run_dir, prepared, model, optimizer, progress, identity)
        print(f"{STAGE} {epoch}/{config.epochs} | fake-quantised test top1 {metrics['test_top1']:.2f} "
              f"| best {progress['best_acc']:.2f}")
    log.close()
    return _finish(run_dir, progress, identity)


def write_int8(run_dir, model, train_loader, calibration_images: int = CALIBRATION_IMAGES) -> Path:
    """The run's deployable int8 model: best.pth's float weights exported to ONNX and quantised by
    ONNX Runtime's static QDQ quantiser (deploy/quantize.py), calibrated on training images."""
    run_dir = Path(run_dir)
    model.load_state_dict(load_checkpoint(run_dir / runs.BEST_CKPT)["model"])
    calibration = first_images(train_loader, calibration_images)
    fp32 = export_onnx(model.cpu().eval(), calibration[:8], run_dir / "qat.fp32.onnx")
    return quantize_int8(fp32, run_dir / "int8.onnx", calibration)


def _advance(progress: dict, epoch: int, top1: float, seconds: float) -> dict:
    improved = top1 > progress["best_acc"] or progress["best_epoch"] == 0
    return {"epoch": epoch, "best_acc": top1 if improved else progress["best_acc"],
            "best_epoch": epoch if improved else progress["best_epoch"],
            "elapsed": progress["elapsed"] + seconds, "last_top1": top1, "improved": improved}


def _save(run_dir: Path, prepared, model, optimizer, progress: dict, identity: dict) -> None:
    weights = float_state(prepared, model)
    position = {k: progress[k] for k in POSITION}
    save_checkpoint({"model": weights, "qat_state": prepared.state_dict(), "optimizer": optimizer.state_dict(),
                     **position, **identity}, run_dir / runs.LAST_CKPT)
    if progress["improved"]:
        save_checkpoint({"model": weights, "epoch": progress["epoch"], "best_acc": progress["best_acc"],
                         **identity}, run_dir / runs.BEST_CKPT)


def _finish(run_dir: Path, progress: dict, identity: dict) -> dict:
    results = {"run_name": run_dir.name, "model": identity["arch"], "dataset": identity["dataset"],
               "method": STAGE, "epochs": identity["qat"]["epochs"], "best_top1": progress["best_acc"],
               "best_epoch": progress["best_epoch"], "last_top1": progress["last_top1"], "qat": identity["qat"],
               "wall_time_s": round(progress["elapsed"], 2), "code_version": runs.code_version()}
    runs.write_json(run_dir / runs.RESULTS_FILE, results)
    return results
