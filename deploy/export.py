"""Export a network to ONNX (run by ONNX Runtime) and to a torch.export program, both with a
dynamic batch dimension, and check each against the PyTorch model on real images.

ONNX: torch.onnx's exporter (dynamo=True, built on torch.export), opset OPSET, weights inside
the one .onnx file, input `images` (N x C x H x W, float32), output `logits`. The check: every
logit within ATOL + RTOL * |logit| of PyTorch's (torch.allclose's rule), and the top-1
agreement, on the images given (the scripts use the test split)."""
import warnings
from pathlib import Path

import torch

from deploy.runtime import ORT_INPUT, batched_logits, ort_runner, ort_session, torch_runner

OPSET = 18
ATOL = 1e-4
RTOL = 1e-4
# torch.export specialises a dimension of size 0 or 1, so the example batch must be larger.
EXAMPLE_BATCH = 2


def _dynamic_batch():
    return ({0: torch.export.Dim("batch")},)


def example_input(images: torch.Tensor) -> tuple:
    return (images[:EXAMPLE_BATCH].contiguous(),)


def export_program(model, images: torch.Tensor, path) -> torch.export.ExportedProgram:
    """torch.export the eval-mode model with a dynamic batch and save it (.pt2)."""
    program = torch.export.export(model.eval(), example_input(images), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(path))
    return program


def export_onnx(model, images: torch.Tensor, path, opset: int = OPSET) -> Path:
    """Write the eval-mode model as one self-contained ONNX file."""
    with warnings.catch_warnings():  # the exporter warns about its own internals, not about the model
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example_input(images), str(path), dynamo=True, opset_version=opset,
                          dynamic_shapes=_dynamic_batch(), input_names=[ORT_INPUT], output_names=["logits"],
                          external_data=False, verbose=False)
    return Path(path)


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """How far `logits` are from the PyTorch `reference`, and whether within ATOL/RTOL."""
    gap = (logits - reference).abs()
    return {"max_abs_diff": float(gap.max()), "within_tolerance": bool(torch.allclose(logits, reference, RTOL, ATOL)),
            "top1_agreement": 100.0 * float(logits.argmax(1).eq(reference.argmax(1)).double().mean()),
            "images": int(reference.shape[0])}


def check_exports(model, images: torch.Tensor, onnx_path, program_path) -> dict:
    """Both exported files, loaded back from disk, against the PyTorch model on `images`."""
    reference = batched_logits(torch_runner(model.eval()), images)
    program = torch.export.load(str(program_path)).module()
    return {"onnx": compare(reference, batched_logits(ort_runner(ort_session(onnx_path)), images)),
            "torch_export": compare(reference, batched_logits(torch_runner(program), images))}
