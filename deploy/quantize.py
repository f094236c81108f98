"""int8 post-training quantisation with ONNX Runtime's static QDQ quantiser.

Why this stack: ONNX Runtime turns the QuantizeLinear/DequantizeLinear pairs it writes into
int8 kernels on any x86 or ARM CPU, without a compiler (3.5x faster than fp32 for resnet8x4 at
batch 64 on our CPU, BENCHMARKS.md). PyTorch's PT2E flow (torchao) gives int8 speed only after
torch.compile lowers it with Inductor; run eagerly its int8 program simulates int8 and is
slower than fp32, and the QDQ graph it exports leaves the convolutions' outputs unquantised, so
ONNX Runtime cannot fuse them into int8 kernels either. PT2E is still what QAT trains with
(deploy/qat.py): its scheme is the one used here.

The scheme (ONNX Runtime's recommended x86 one, the same as PT2E's X86InductorQuantizer):
weights int8, symmetric, per output channel; activations uint8, asymmetric, per tensor, their
ranges the min/max over the calibration images (CalibrationMethod.MinMax). The model is first
pre-processed (shape inference, graph optimisation that folds BatchNorm into the convolutions),
as ONNX Runtime's quantisation guide asks."""
import tempfile
from pathlib import Path

import torch

try:  # the optional deploy extra; deploy.extras.require() names the install command when missing
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )
except ImportError:
    CalibrationDataReader = object

from deploy.runtime import ORT_INPUT

CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 64


class ImageReader(CalibrationDataReader):
    """Feeds the calibration images to the quantiser in batches of CALIBRATION_BATCH."""

    def __init__(self, images: torch.Tensor):
        self.batches = iter(images.split(CALIBRATION_BATCH))

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {ORT_INPUT: batch.contiguous().numpy()}


def quantize_int8(fp32_onnx, int8_onnx, calibration: torch.Tensor) -> Path:
    """Write the int8 QDQ model of `fp32_onnx`, calibrated on the images `calibration`."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))
        quantize_static(str(prepared), str(int8_onnx), ImageReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return Path(int8_onnx)
