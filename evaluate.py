"""Evaluate one checkpoint (ours or RepDistiller's {'model': state_dict}) on a data set's test split.

    python evaluate.py save/students/<run>/best.pth --dataset digits
    python evaluate.py student.pth --dataset cifar100 --teacher save/teachers/<run>/best.pth --json out.json

Reports top-1/top-5 (%), test cross-entropy, parameters, MACs per image, median CPU latency at
batch 1 and 64 (and CUDA latency when evaluating on a GPU), expected calibration error and mean
prediction entropy; with --teacher also top-1 agreement with the teacher and KL(teacher || student).
With --deploy (or --qat CKPT) a second table: fp32, int8-PTQ and int8-QAT rows with test top-1,
size on disk and latency in PyTorch and ONNX Runtime (deploy/report.py; needs pip install '.[deploy]').

The measurements are deploy/metrics.py's (MACs: FlopCounterMode's FLOPs / 2, convolutions and
matrix products only; ECE: Guo et al. 2017, 15 equal-width bins; entropy and KL in nats at T = 1).
Accuracy, loss, ECE, entropy and KL come from full-precision logits unless --amp asks otherwise.

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

from core.distributed import setup
from dataset.loaders import build_loaders
from deploy import data as deploy_data
from deploy import extras
from deploy.metrics import (
    LATENCY_BATCHES,
    collect_logits,
    cost_metrics,
    markdown_table,
    prediction_metrics,
    teacher_metrics,
)
from deploy.network import load_network, read_network, run_data
from deploy.quantize import CALIBRATION_IMAGES
from deploy.report import deployment_rows, markdown_rows
from engine import runs
from engine.precision import resolve_amp
from engine.teacher import build_teacher


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
              **cost_metrics(model, ctx.device, shape, amp_dtype, args.latency_runs, args.latency_warmup,
                             args.cpu_threads)}
    table = markdown_table(report)
    if args.deploy:
        report["deployment"] = deployment(model, report, args)
        report["calibration_images"] = args.calib_images
        table += "\n" + markdown_rows(report["deployment"], {"runs": args.latency_runs, "threads": report["cpu_threads"]})
    write_outputs(report, table, args)
    return report


if __name__ == "__main__":
    main()
