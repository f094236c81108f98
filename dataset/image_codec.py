"""Decoding image files into uint8 tensors, for the device loader (`--loader jpeg`) and the data
check (scripts/verify_data.py).

TorchCodec's decoders where it is installed (the `imagenet` extra): torchvision 0.29 deprecated
its own image decoders in their favour, and TorchCodec's give the same pixels (libjpeg on the
CPU, nvJPEG on CUDA, one call per batch; tests/test_jpeg_decode.py compares the two).
torchvision.io's otherwise, for the older torch releases that no TorchCodec with image decoders
supports. A TorchCodec built for another torch fails at import with an OSError or a
RuntimeError, not an ImportError: that too falls back.
"""
from pathlib import Path
from typing import List

import torch
from torch import Tensor

try:
    from torchcodec.decoders import decode_image as _decode_image
    from torchcodec.decoders import decode_jpeg as _decode_jpeg
    BACKEND = "torchcodec"
except (ImportError, OSError, RuntimeError):
    from torchvision.io import decode_image as _decode_image
    from torchvision.io import decode_jpeg as _decode_jpeg
    BACKEND = "torchvision"

# what a file that does not decode raises: RuntimeError from both libraries' JPEG decoders,
# ValueError from TorchCodec's decode_image for a format it does not know
DECODE_ERRORS = (RuntimeError, ValueError)


def read_bytes(path) -> Tensor:
    """A file's bytes as a 1-D uint8 tensor, what the decoders read."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def decode_jpegs(files: List[Tensor], device: torch.device) -> List[Tensor]:
    """3 x H x W RGB images on `device`, decoded there in one call; raises one of DECODE_ERRORS
    when any file is not a JPEG it can read (a PNG, a CMYK JPEG for nvJPEG)."""
    return _decode_jpeg(files, mode="RGB", device=device)


def decode_any(file: Tensor) -> Tensor:
    """One 3 x H x W RGB image decoded on the CPU, whatever its format (JPEG, PNG, CMYK JPEG)."""
    return _decode_image(file, mode="RGB")
