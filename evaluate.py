"""Evaluate one checkpoint (ours or RepDistiller's {'model': state_dict}) on a data set's test split.

    python evaluate.py save/students/<run>/best.pth --dataset digits
    python evaluate.py student.pth --dataset cifar100 --teacher save/teachers/<run>/best.pth --json out.json

Reports top-1/top-5 (%), test cross-entropy, parameters, MACs per image, median CPU latency at
batch 1 and 64 (and CUDA latency when evaluating on a GPU), expected calibration error and mean
prediction entropy; with --teacher also top-1 agreement with the teacher and KL(teacher || student).
With --deploy (or --qat CKPT) a second table: fp32, int8-PTQ and int8-QAT rows with test top-1,
size on disk and latency in PyTorch and ONNX Runtime (deploy/report.py; needs pip install '.[deploy]').

MACs are torch.utils.flop_counter.FlopCounterMode's FLOPs / 2: torch counts a multiply-add as two
FLOPs, and counts only convolutions and matrix products (not BatchNorm, activations or pooling).
ECE is Guo et al. (2017): 15 equal-width confidence bins (lo, hi], sum over bins of
|bin|/n * |accuracy - mean confidence|, as a fraction. Entropy and KL are in nats, at T = 1,
averaged over the test images. Accuracy, loss, ECE, entropy and KL come from full-precision
logits unless --amp asks otherwise.

The architecture is --model, else the checkpoint's 'arch', else the run's args.json ('model',
or a student run's 'model_s'), else RepDistiller's folder-name rule. The data set is --dataset,
else the checkpoint's 'dataset', else the run's args.json, else CIFAR-100 (RepDistiller's
checkpoints say nothing); --data_folder, else the run's (stored absolute), else ./data.
"""
from core.errors import UserError, exit_quietly_on_ctrl_c, exits_cleanly

exit_quietly_on_ctrl_c()  # before the imports below, which take seconds

import argparse
import copy
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from core.distributed import setup
from dataset.loaders import build_loaders
from deploy import data as deploy_data
from deploy import extras
from deploy.network import load_network, read_network, run_data
from deploy.quantize import CALIBRATION_IMAGES
from deploy.report import deployment_rows, markdown_rows
from deploy.runtime import latency_stats
from engine import runs
from engine.loop import move_batch, topk_correct
from engine.precision import autocast, resolve_amp
from engine.teacher import build_teacher

ECE_BINS = 15
LATENCY_BATCHES = (1, 64)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a checkpoint on a data set's test split.")
    parser.add_argument("checkpoint", type=str, help="a checkpoint file: ours, or RepDistiller's")
    parser.add_argument("--dataset", type=str, default=None,
                        help="cifar100, cifar10, digits, imagenet, tinyimagenet; default: the data set the "
                             "checkpoint's run trained on, else cifar100")
    parser.add_argument("--model", type=str, default=None, help="architecture, if the checkpoint does not say")
    parser.add_argument("--teacher", type=str, default=None, help="a teacher checkpoint to compare predictions with")
    parser.add_argument("--model_t", type=str, default=None,
                        help="teacher architecture, if its checkpoint does not say")
    parser.add_argument("--json", type=str, default=None, help="write every number to this JSON file")
    parser.add_argument("--markdown", type=str, default=None, help="write the table to this Markdown file")
    parser.add_argument("--batch_size", type=int, default=256, help="test batch size")
    parser.add_argument("--data_folder", type=str, default=None,
                        help="default: the folder the checkpoint's run read (its args.json), else ./data")
    parser.add_argument("--loader", type=str, default="auto", choices=("auto", "memory", "torch"))
    parser.add_argument("--num_workers", type=int, default=8, help="DataLoader workers (torch loader only)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:<k>")
    parser.add_argument("--amp", type=str, default="off", choices=("off", "auto", "bf16", "fp16"),
                        help="autocast precision of the evaluation and the CUDA latency (default: full precision)")
    parser.add_argument("--latency_runs", type=int, default=20, help="timed forward passes per latency figure")
    parser.add_argument("--latency_warmup", type=int, default=5, help="untimed forward passes before timing")
    parser.add_argument("--cpu_threads", type=int, default=None,
                        help="torch CPU threads while timing CPU latency (default: torch's own setting)")
    parser.add_argument("--deploy", action="store_true",
                        help="add the fp32 and int8-PTQ deployment rows (ONNX Runtime; needs the deploy extra)")
    parser.add_argument("--qat", type=str, default=None,
                        help="a QAT run's checkpoint: adds the int8-QAT row (implies --deploy)")
    parser.add_argument("--calib_images", type=int, default=CALIBRATION_IMAGES,
                        help="training images the int8 models are calibrated on")
    return _check_args(parser.parse_args(argv))


def _check_args(args: argparse.Namespace) -> argparse.Namespace:
    args.deploy = args.deploy or args.qat is not None
    least = {"batch_size": 1, "latency_runs": 1, "latency_warmup": 0, "cpu_threads": 1, "calib_images": 1}
    for flag, low in least.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            raise UserError(f"--{flag} must be at least {low}, got {value}")
    return args


# --- the networks ---------------------------------------------------------------------------
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


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Guo et al. (2017): equal-width bins (lo, hi] of the top-1 confidence, as a fraction."""
    confidence, prediction = probs.max(1)
    correct = prediction.eq(targets).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)[1:]
    index = torch.bucketize(confidence, edges).clamp(max=bins - 1)
    hits = torch.bincount(index, weights=correct, minlength=bins)
    confidence_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    gap = (hits - confidence_sum).abs()
    return float(gap.sum() / targets.shape[0])


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean over samples of -sum_c p_c log p_c, in nats (0 log 0 = 0)."""
    return float(torch.special.entr(probs.double()).sum(1).mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """% of samples on which the two top-1 predictions agree."""
    same = student_logits.argmax(1).eq(teacher_logits.argmax(1))
    return 100.0 * same.double().mean().item()


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """KL(teacher || student) at T = 1 in nats, summed over classes, averaged over samples."""
    log_s = F.log_softmax(student_logits.double(), 1)
    log_t = F.log_softmax(teacher_logits.double(), 1)
    return float(F.kl_div(log_s, log_t, reduction="batchmean", log_target=True))


# --- cost -------------------------------------------------------------------------------------
def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def count_macs(model, input_shape) -> int:
    """Multiply-adds of one forward pass on one input: FlopCounterMode's FLOPs / 2."""
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return counter.get_total_flops() // 2


def latencies(cpu_model, cuda_model, input_shape, amp_dtype, runs: int, warmup: int) -> dict:
    """CPU latency (float32) at batch 1 and 64, and CUDA latency (under --amp) given a GPU model."""
    out = {}
    for kind, model, dtype in (("cpu", cpu_model, None), ("cuda", cuda_model, amp_dtype)):
        for batch in LATENCY_BATCHES:
            median, q1, q3 = (None,) * 3 if model is None else _latency(model, batch, input_shape, dtype, runs, warmup)
            out[f"{kind}_latency_ms_b{batch}"] = median
            out[f"{kind}_latency_iqr_ms_b{batch}"] = None if median is None else [q1, q3]
    return out


def _latency(model, batch: int, input_shape, amp_dtype, runs: int, warmup: int) -> tuple:
    device = next(model.parameters()).device
    inputs = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with autocast(device, amp_dtype), torch.inference_mode():
        return latency_stats(model, inputs, runs, warmup, sync)


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


def cost_metrics(model, device, input_shape, amp_dtype, args) -> dict:
    cpu_model = model if device.type == "cpu" else copy.deepcopy(model).cpu()
    cuda_model = model if device.type == "cuda" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.cpu_threads or threads)
    try:
        timed = latencies(cpu_model, cuda_model, input_shape, amp_dtype, args.latency_runs, args.latency_warmup)
    finally:
        torch.set_num_threads(threads)
    return {"params": count_params(model), "macs": count_macs(cpu_model, input_shape),
            "input_shape": list(input_shape), "cpu_threads": args.cpu_threads or threads,
            "latency_runs": args.latency_runs, "latency_warmup": args.latency_warmup, **timed}


def deployment(model, report: dict, args) -> list:
    """The fp32 / int8-PTQ / int8-QAT rows (deploy/report.py), on the CPU; PyTorch's fp32 latency
    is the one measured above."""
    train_loader, test_loader, info = deploy_data.loaders(args.dataset, args.data_folder)
    qat_model = load_network(args.qat, None, info.num_classes, args.dataset)[0] if args.qat else None
    torch_latency = {f"pytorch_{key.split('_')[0]}_b{batch}": report[key] for key in report
                     for batch in LATENCY_BATCHES if key.endswith(f"_latency_ms_b{batch}") and report[key] is not None}
    timing = {"threads": report["cpu_threads"], "runs": args.latency_runs, "warmup": args.latency_warmup,
              "batches": LATENCY_BATCHES}
    calibration = deploy_data.first_images(train_loader, args.calib_images)
    with tempfile.TemporaryDirectory() as workdir:
        return deployment_rows(copy.deepcopy(model).cpu(), qat_model, deploy_data.split_tensors(test_loader),
                               calibration, workdir, timing, torch_latency)


def write_outputs(report: dict, table: str, args) -> None:
    print(table, end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        runs.write_json(Path(args.json), report)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)


def read_networks(args) -> dict:
    """Both checkpoints read, their architectures named and the data set settled, before any data loads."""
    path = Path(args.checkpoint)
    state, arch = read_network(path, args.model)
    args.dataset, args.data_folder = run_data(path, state, args.dataset, args.data_folder)
    found = {"path": path, "state": state, "arch": arch}
    if args.teacher:
        found["state_t"], found["arch_t"] = read_network(args.teacher, args.model_t, "--model_t")
    if args.deploy:
        extras.require()
    if args.qat:
        read_network(args.qat)
    return found


@exits_cleanly
def main(argv=None) -> dict:
    args = parse_args(argv)
    found = read_networks(args)
    ctx = setup(args.device)
    amp_dtype = resolve_amp(args.amp, ctx.device)
    _, test_loader, info = build_loaders(args.dataset, args.data_folder, 1, loader=args.loader, device=ctx.device,
                                         num_workers=args.num_workers, test_batch_size=args.batch_size)
    model = build_teacher(found["state"], found["arch"], info.num_classes, found["path"], args.dataset)
    networks = [model.to(ctx.device)]
    if args.teacher:
        teacher = build_teacher(found["state_t"], found["arch_t"], info.num_classes, args.teacher, args.dataset)
        networks.append(teacher.to(ctx.device))
    logits, targets, shape = collect_logits(networks, test_loader, ctx.device, amp_dtype)
    report = {"checkpoint": args.checkpoint, "model": found["arch"], "dataset": args.dataset,
              "device": str(ctx.device), "amp": args.amp, "teacher": args.teacher, "model_t": found.get("arch_t"),
              **prediction_metrics(logits[0], targets),
              **teacher_metrics(logits[0], logits[1] if args.teacher else None),
              **cost_metrics(model, ctx.device, shape, amp_dtype, args)}
    table = markdown_table(report)
    if args.deploy:
        report["deployment"] = deployment(model, report, args)
        report["calibration_images"] = args.calib_images
        table += "\n" + markdown_rows(report["deployment"], {"runs": args.latency_runs, "threads": report["cpu_threads"]})
    write_outputs(report, table, args)
    return report


if __name__ == "__main__":
    main()
