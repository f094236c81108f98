"""Quantisation-aware training (QAT) with PyTorch's PT2E flow (torchao): the fake-quantised
network, its evaluation and its int8 model. The run itself (`train_student.py --qat_epochs`) is a
task of the one trainer, deploy/qat_run.py.

The distilled student is captured by torch.export (dynamic batch, train mode) and prepared by
`prepare_qat_pt2e` with X86InductorQuantizer's QAT configuration: weights fake-quantised to
int8, symmetric, per output channel (BatchNorm folded in, as PT2E's conv-bn QAT pattern
simulates), activations to uint8 per tensor with moving-average min/max ranges. That is the
scheme of the int8 model deploy/quantize.py writes with ONNX Runtime, so the weights learn the
grid they are deployed on.

PT2E keeps the float model's parameter and buffer names, so the trained weights load back into
the plain network: best.pth is an ordinary checkpoint ({'model', 'arch', ...}) that evaluate.py
and scripts/export.py read, and `--int8` quantises. Observers are off while evaluating, so a
test pass never moves the activation ranges."""
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from deploy.data import first_images
from deploy.export import example_input, export_onnx
from deploy.quantize import CALIBRATION_IMAGES, quantize_int8
from engine import runs
from engine.checkpoint import load_checkpoint


def prepare_qat(model: torch.nn.Module, images: torch.Tensor) -> torch.fx.GraphModule:
    """The fake-quantised training graph of `model`; .train()/.eval() switch it like a module."""
    # torchao (the optional deploy extra) is imported only by a QAT run: it costs every
    # train_student.py start seconds otherwise. Its import registers an Enum with torch's pytree,
    # which newer torch answers with a deprecation line on stderr: not the user's concern
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
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


@contextmanager
def observers_frozen(prepared: torch.fx.GraphModule):
    """Within it, a forward pass of the fake-quantised network leaves its activation ranges as they are."""
    from torchao.quantization.pt2e import disable_observer, enable_observer
    prepared.apply(disable_observer)
    try:
        yield
    finally:
        prepared.apply(enable_observer)


def write_int8(run_dir, model, train_loader, calibration_images: int = CALIBRATION_IMAGES) -> Path:
    """The run's deployable int8 model: best.pth's float weights exported to ONNX and quantised by
    ONNX Runtime's static QDQ quantiser (deploy/quantize.py), calibrated on training images."""
    run_dir = Path(run_dir)
    model.load_state_dict(load_checkpoint(run_dir / runs.BEST_CKPT)["model"])
    calibration = first_images(train_loader, calibration_images)
    fp32 = export_onnx(model.cpu().eval(), calibration[:8], run_dir / "qat.fp32.onnx")
    return quantize_int8(fp32, run_dir / "int8.onnx", calibration)
