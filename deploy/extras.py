"""The optional `deploy` extra (pip install '.[deploy]'): onnx, onnxscript (torch.onnx's
exporter), onnxruntime and torchao. Entry points call `require()` before a deployment step, so
a missing package ends with one line naming the install command, not an ImportError traceback.
"""
import importlib.util

from core.errors import UserError

PACKAGES = ("onnx", "onnxscript", "onnxruntime", "torchao")


def require() -> None:
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"deployment needs {', '.join(missing)}: pip install '.[deploy]' (make install does)")
