"""The measurements of a trained network that the evaluation report (evaluate.py) and the
analysis scripts (scripts/pareto.py) share: prediction metrics on logits, agreement with a
teacher, cost (parameters, MACs, latency), and the report's Markdown table.

Top-k accuracy is counted as the training loop counts it. ECE is Guo et al., "On Calibration of
Modern Neural Networks" (ICML 2017): 15 equal-width confidence bins (lo, hi], the sum over bins
of |bin|/n * |accuracy - mean confidence|, as a fraction. Entropy and KL(teacher || student) are
in nats at T = 1, averaged over the samples. MACs are torch.utils.flop_counter.FlopCounterMode's
FLOPs / 2 (torch counts a multiply-add as two FLOPs, and only convolutions and matrix products).
Latency is the median and interquartile range of timed forward passes on a fixed random input,
after untimed warm-up passes (deploy/runtime.py), in PyTorch or ONNX Runtime."""
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from deploy.export import export_onnx
from deploy.runtime import latency_stats, ort_runner, ort_session, random_batch
from engine.loop import move_batch, topk_correct
from engine.precision import autocast

ECE_BINS = 15
LATENCY_BATCHES = (1, 64)


# --- one pass over the test split ------------------------------------------------------------
@torch.inference_mode()
def collect_logits(models: list, loader, device, amp_dtype):
    """(float32 CPU logits of each model, targets, shape of one input image) over `loader`."""
    outputs, targets, shape = [[] for _ in models], [], None
    for batch in loader:
        images, labels, *_ = move_batch(batch, device, False)
        shape = tuple(images.shape[1:])
        with autocast(device, amp_dtype):
            for out, model in zip(outputs, models):
                out.append(model(images).float().cpu())
        targets.append(labels.cpu())
    return [torch.cat(out) for out in outputs], torch.cat(targets), shape


# --- metrics on tensors -----------------------------------------------------------------------
def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list:
    """Top-k accuracies in %, counted as the training loop counts them."""
    hits = topk_correct(logits, targets, ks).tolist()
    return [100.0 * h / targets.shape[0] for h in hits]


def confidence_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> tuple:
    """Guo et al. (2017)'s binning of the top-1 confidence into equal-width bins (lo, hi]:
    per bin (samples, correct predictions, sum of confidences), float64."""
    confidence, prediction = probs.max(1)
    correct = prediction.eq(targets).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)[1:]
    index = torch.bucketize(confidence, edges).clamp(max=bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    hits = torch.bincount(index, weights=correct, minlength=bins)
    confidence_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    return count, hits, confidence_sum


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Guo et al. (2017): over the bins of `confidence_bins`, as a fraction."""
    _, hits, confidence_sum = confidence_bins(probs, targets, bins)
    gap = (hits - confidence_sum).abs()
    return float(gap.sum() / targets.shape[0])


def prediction_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per sample -sum_c p_c log p_c, in nats (0 log 0 = 0), float64."""
    return torch.special.entr(probs.double()).sum(1)


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean over samples of `prediction_entropy`."""
    return float(prediction_entropy(probs).mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """% of samples on which the two top-1 predictions agree."""
    same = student_logits.argmax(1).eq(teacher_logits.argmax(1))
    return 100.0 * same.double().mean().item()


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """KL(teacher || student) at T = 1 in nats, summed over classes, averaged over samples."""
    log_s = F.log_softmax(student_logits.double(), 1)
    log_t = F.log_softmax(teacher_logits.double(), 1)
    return float(F.kl_div(log_s, log_t, reduction="batchmean", log_target=True))


def prediction_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    probs = F.softmax(logits.double(), 1)
    top1, top5 = topk_accuracy(logits, targets)
    return {"top1": top1, "top5": top5, "test_loss": float(F.cross_entropy(logits, targets)),
            "ece": expected_calibration_error(probs, targets), "ece_bins": ECE_BINS,
            "mean_entropy": mean_entropy(probs), "n_test": int(targets.shape[0])}


def teacher_metrics(logits: torch.Tensor, teacher_logits) -> dict:
    if teacher_logits is None:
        return {"agreement": None, "kl_teacher_student": None}
    return {"agreement": agreement(logits, teacher_logits),
            "kl_teacher_student": kl_teacher_student(logits, teacher_logits)}


# --- cost -------------------------------------------------------------------------------------
def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def count_macs(model, input_shape) -> int:
    """Multiply-adds of one forward pass on one input: FlopCounterMode's FLOPs / 2."""
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return counter.get_total_flops() // 2


def cost_metrics(model, device, input_shape, amp_dtype, runs: int, warmup: int, cpu_threads=None) -> dict:
    """Parameters, MACs per image and latencies (`latencies`), with `cpu_threads` torch threads
    while timing on the CPU (None: torch's own setting)."""
    cpu_model = model if device.type == "cpu" else copy.deepcopy(model).cpu()
    cuda_model = model if device.type == "cuda" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads or threads)
    try:
        timed = latencies(cpu_model, cuda_model, input_shape, amp_dtype, runs, warmup)
    finally:
        torch.set_num_threads(threads)
    return {"params": count_params(model), "macs": count_macs(cpu_model, input_shape),
            "input_shape": list(input_shape), "cpu_threads": cpu_threads or threads,
            "latency_runs": runs, "latency_warmup": warmup, **timed}


def latencies(cpu_model, cuda_model, input_shape, amp_dtype, runs: int, warmup: int) -> dict:
    """CPU latency (float32) at batch 1 and 64, and CUDA latency (under `amp_dtype`) given a GPU
    model: median and [first, third quartile] in ms."""
    out = {}
    for kind, model, dtype in (("cpu", cpu_model, None), ("cuda", cuda_model, amp_dtype)):
        for batch in LATENCY_BATCHES:
            median, q1, q3 = (None,) * 3 if model is None else torch_latency(model, batch, input_shape, runs,
                                                                            warmup, dtype)
            out[f"{kind}_latency_ms_b{batch}"] = median
            out[f"{kind}_latency_iqr_ms_b{batch}"] = None if median is None else [q1, q3]
    return out


def torch_latency(model, batch: int, input_shape, runs: int, warmup: int, amp_dtype=None) -> tuple:
    """(median, first quartile, third quartile) in ms of PyTorch forward passes at `batch` on the
    model's device."""
    device = next(model.parameters()).device
    inputs = random_batch(batch, input_shape).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with autocast(device, amp_dtype), torch.inference_mode():
        return latency_stats(model, inputs, runs, warmup, sync)


def onnxruntime_latency(model, batch: int, input_shape, runs: int, warmup: int, threads=None) -> tuple:
    """(median, first quartile, third quartile) in ms of ONNX Runtime CPU passes at `batch` of the
    model exported to fp32 ONNX (needs the deploy extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, random_batch(2, input_shape), Path(tmp) / "model.onnx")
        run = ort_runner(ort_session(path, threads))
        return latency_stats(run, random_batch(batch, input_shape), runs, warmup)


# --- the report -------------------------------------------------------------------------------
def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _escape(value) -> str:
    """A table cell's text, with any '|' (say, in a path) escaped."""
    return str(value).replace("|", "\\|")


def _latency_rows(r: dict) -> list:
    rows = []
    threads = r["cpu_threads"]
    for kind, label in (("cpu", f"CPU, {threads} thread{'s' * (threads != 1)}"), ("cuda", "CUDA")):
        for batch in LATENCY_BATCHES:
            value = r[f"{kind}_latency_ms_b{batch}"]
            if value is not None:
                q1, q3 = r[f"{kind}_latency_iqr_ms_b{batch}"]
                name = f"latency, batch {batch} ({label}; ms, median and interquartile range of {r['latency_runs']})"
                rows.append((name, f"{value:.3f} ({q1:.3f}–{q3:.3f})"))
    return rows


def _teacher_rows(r: dict) -> list:
    if r["teacher"] is None:
        return []
    return [("teacher", f"{r['model_t']} ({r['teacher']})"),
            ("top-1 agreement with the teacher (%)", _cell(r["agreement"], ".2f")),
            ("KL(teacher ‖ student), T=1 (nats)", _cell(r["kl_teacher_student"], ".4f"))]


def markdown_table(r: dict) -> str:
    """The report as a two-column Markdown table."""
    rows = [("model", r["model"]), ("checkpoint", r["checkpoint"]),
            ("data set", f"{r['dataset']} (test split, {r['n_test']} images)"),
            ("top-1 (%)", _cell(r["top1"], ".2f")), ("top-5 (%)", _cell(r["top5"], ".2f")),
            ("test loss (cross-entropy)", _cell(r["test_loss"], ".4f")),
            ("parameters", f"{r['params']:,}"),
            ("MACs / image (FlopCounterMode FLOPs / 2)", f"{r['macs']:,}"),
            *_latency_rows(r),
            (f"ECE ({r['ece_bins']} bins)", _cell(r["ece"], ".4f")),
            ("mean prediction entropy (nats)", _cell(r["mean_entropy"], ".4f")),
            *_teacher_rows(r)]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_escape(value)} |" for name, value in rows]
    return "\n".join(lines) + "\n"
