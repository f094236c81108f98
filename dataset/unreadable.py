"""Image files that do not decode (a truncated download, a text file named .JPEG): each stops
the run with one line naming the file, or, with `--skip_bad_images`, is left out of its batch,
named once in a warning and counted.

The ImageFolder datasets never raise for such a file: `__getitem__` returns an `Unreadable`
marker in the image's place, and `collate_readable` hands the batch's markers to the main
process beside the good samples. So a file that fails in a DataLoader worker is reported by
the main process in one line, not as the worker's re-raised traceback.
"""
import re
import sys
from pathlib import Path
from typing import Dict, Optional

from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate

from core.errors import UserError
from dataset.image_codec import decode_any, read_bytes

# PIL: OSError (truncated files, and UnidentifiedImageError for what is no image), ValueError and
# SyntaxError for some malformed headers; the tensor decoders: RuntimeError, ValueError
DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError)
_SOURCE_PREFIX = re.compile(r"^\w+, \S+:\d+, ")  # "decode_jpeg, /path/decode_jpeg.cpp:171, "


class Unreadable:
    """What a dataset returns in place of an image it cannot decode."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason


def reason(err: Exception) -> str:
    """An exception as a short cause (the decoder's source location dropped)."""
    if isinstance(err, UnidentifiedImageError):  # its text names a file object, not the file
        return "not an image file"
    text = _SOURCE_PREFIX.sub("", str(err).splitlines()[0] if str(err) else type(err).__name__)
    return text.split(". ")[0]


def collate_readable(collate=default_collate):
    """A collate function: (the collated batch of the readable samples, or None when there is
    none, and the batch's Unreadable markers)."""
    def collate_fn(samples):
        bad = [s[0] for s in samples if isinstance(s[0], Unreadable)]
        good = [s for s in samples if not isinstance(s[0], Unreadable)]
        return (collate(good) if good else None), bad
    return collate_fn


class BadImages:
    """A run's policy for unreadable images, shared by its loaders: stop at the first, or skip
    each, warning once per file; `seen` maps every skipped file to its reason. A training batch
    that skipping leaves with one sample is dropped too (BatchNorm cannot train on one)."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.seen: Dict[str, str] = {}

    def too_small(self, batch_size: int, train: bool) -> bool:
        return batch_size < (2 if train else 1)

    def report(self, bad: Unreadable) -> None:
        if not self.skip:
            raise UserError(f"cannot read image {bad.path} ({bad.reason}); replace or remove it "
                            "(scripts/verify_data.py lists every bad file), or pass --skip_bad_images")
        if bad.path not in self.seen:
            self.seen[bad.path] = bad.reason
            print(f"warning: skipping unreadable image {bad.path} ({bad.reason}); "
                  f"{len(self.seen)} skipped so far", file=sys.stderr)


def check_image(path: Path) -> Optional[str]:
    """None when both loaders can decode the file (PIL for --loader torch, the tensor decoder
    for --loader jpeg), else why not."""
    try:
        with Image.open(path) as image:
            image.convert("RGB")
        decode_any(read_bytes(path))
    except DECODE_ERRORS as err:
        return reason(err)
    return None
