"""The deployment rows of the evaluation report: the fp32 network, its int8 post-training
quantisation and, given a QAT checkpoint, the int8 model of the QAT-trained weights, side by
side: test top-1, size on disk of the deployed file, and latency at each batch size with
PyTorch and ONNX Runtime on the CPU.

Both int8 models are ONNX Runtime's static QDQ quantisation (deploy/quantize.py) calibrated on
the same training images; only their weights differ. The PyTorch cells of the int8 rows are
empty: int8 in PyTorch runs fast only once torch.compile lowers a PT2E program (see
deploy/quantize.py), which this report does not do."""
from pathlib import Path

import torch

from deploy.export import export_onnx
from deploy.quantize import quantize_int8
from deploy.runtime import batched_logits, median_ms, ort_runner, ort_session, random_batch, torch_runner


def top1(run, images: torch.Tensor, targets: torch.Tensor) -> float:
    return 100.0 * float(batched_logits(run, images).argmax(1).eq(targets).double().mean())


def ort_latencies(path: Path, input_shape, timing: dict) -> dict:
    """ONNX Runtime CPU latency (ms) at each batch size, with the same thread count as PyTorch's."""
    run = ort_runner(ort_session(path, timing["threads"]))
    return {f"onnxruntime_cpu_b{batch}": median_ms(run, random_batch(batch, input_shape), timing["runs"],
                                                   timing["warmup"]) for batch in timing["batches"]}


def _row(variant: str, onnx_path: Path, accuracy: float, latency: dict) -> dict:
    return {"variant": variant, "top1": accuracy, "file": onnx_path.name, "size_bytes": onnx_path.stat().st_size,
            "latency_ms": latency}


def fp32_row(model, test_split, workdir: Path, timing: dict, torch_latency: dict) -> dict:
    """`torch_latency`: PyTorch's figures for the float network, measured by the caller."""
    images, targets = test_split
    path = export_onnx(model.cpu().eval(), images, workdir / "fp32.onnx")
    return _row("fp32", path, top1(torch_runner(model), images, targets),
                {**torch_latency, **ort_latencies(path, images.shape[1:], timing)})


def int8_row(variant: str, model, test_split, calibration: torch.Tensor, workdir: Path, timing: dict) -> dict:
    images, targets = test_split
    fp32 = export_onnx(model.cpu().eval(), images, workdir / f"{variant}.fp32.onnx")
    path = quantize_int8(fp32, workdir / f"{variant}.onnx", calibration)
    return _row(variant, path, top1(ort_runner(ort_session(path)), images, targets),
                ort_latencies(path, images.shape[1:], timing))


def deployment_rows(model, qat_model, test_split, calibration, workdir, timing: dict, torch_latency: dict) -> list:
    """fp32, int8-PTQ and (with a QAT-trained `qat_model`) int8-QAT rows; timing: threads, runs,
    warmup, batches."""
    workdir = Path(workdir)
    rows = [fp32_row(model, test_split, workdir, timing, torch_latency),
            int8_row("int8-PTQ", model, test_split, calibration, workdir, timing)]
    if qat_model is not None:
        rows.append(int8_row("int8-QAT", qat_model, test_split, calibration, workdir, timing))
    return rows


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_rows(rows: list, timing: dict) -> str:
    """The rows as a Markdown table; a column for each runtime, device and batch size measured."""
    keys = sorted({key for row in rows for key in row["latency_ms"]}, key=_column_order)
    header = ["variant", "top-1 (%)", "size (KiB)"] + [_column_name(key) for key in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], f"{row['top1']:.2f}", f"{row['size_bytes'] / 1024:.1f}"]
        cells += [_ms(row["latency_ms"].get(key)) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Latency: median of {timing['runs']} runs in ms, {timing['threads']} CPU thread(s); size: the "
            "deployed ONNX file; int8 top-1 from ONNX Runtime on the test split.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def _column_order(key: str):
    runtime, device, batch = key.split("_")
    return (runtime != "pytorch", device, int(batch[1:]))


def _column_name(key: str) -> str:
    runtime, device, batch = key.split("_")
    name = {"pytorch": "PyTorch", "onnxruntime": "ONNX Runtime"}[runtime]
    return f"{name} {device.upper()} b{batch[1:]} (ms)"
