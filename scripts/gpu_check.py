"""One prepared check of every GPU path, timed, with a JSON report (scripts/gpu_check.sh wraps it).

    python scripts/gpu_check.py --device cuda --json gpu_check.json          # about 5 minutes on an H100
    python scripts/gpu_check.py --device cpu --small --json dry_run.json     # the CPU dry run of the tests

Sections, each timed and each recorded even when it fails (its error is in the report and the
next section runs):

- precision: every registered method, one training step of the full objective on random
  networks and batches, in fp32, bf16 and fp16 autocast (fp16 with a fixed loss scale of 1024,
  as the gradient scaler would); the loss's relative difference and the gradient's cosine
  similarity and relative L2 difference to fp32 (resnet20 -> resnet8, batch 16); on CUDA also
  the source lines that made the host wait for the device in that step.
- epochs: one epoch of every method through train_student.py on digits at the device's
  defaults (on CUDA: bf16, channels_last, fused SGD, the in-memory loader), from a one-epoch
  resnet8 teacher; the top-1, images/s and wall time of each.
- compile: one KD epoch with --compile; torch._dynamo's graph, graph-break and frame counters
  (a recompilation is a frame compiled again). Skipped by --small: Inductor's first compilation
  takes minutes on a CPU (tests/test_device_paths.py covers it, marked slow).
- ddp: DistributedDataParallel over one process (NCCL on CUDA, Gloo on a CPU), the trainer's
  own wrapper, for CRD, FT (its init stage and its main stage), KD in fp16 with an enabled
  gradient scaler, and ReviewKD: loss and gradients against the unwrapped step; and a
  `torchrun --nproc_per_node 1` KD run of train_student.py (the launcher's path end to end;
  with one process the trainer itself does not wrap, hence the in-process steps above).
- jpeg: the ImageNet JPEG loader on a synthetic tree that holds a CMYK JPEG and a PNG named
  .JPEG: decode on the device against decode on the CPU (largest pixel difference), the
  loader's images/s.
- benchmark: scripts/benchmark.py on the device (KD and CRD, resnet32x4 -> resnet8x4).
- latency: evaluate.py's latency figures (deploy/metrics.py) of the digits teacher, CPU and CUDA, batch 1 and 64.

--small shrinks everything for the CPU dry run: two methods (kd, crd), the precision
step at batch 4, digits reduced to every eighth image, benchmark CRD resnet8 -> resnet8 at
batch 8 for one step, no DataLoader workers, no torchrun run.
"""
import argparse
import contextlib
import copy
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataset.digits  # noqa: E402
import distiller_zoo  # noqa: E402
from dataset import get_info  # noqa: E402
from dataset.image_codec import read_bytes  # noqa: E402
from dataset.jpeg_decode import decode_rgb  # noqa: E402
from dataset.loaders import build_loaders  # noqa: E402
from deploy.metrics import cost_metrics  # noqa: E402
from deploy.network import load_network  # noqa: E402
from engine import student_run, teacher_run  # noqa: E402
from engine.config import StudentConfig, TeacherConfig  # noqa: E402
from engine.loop import train_epoch  # noqa: E402
from engine.metrics_log import MAIN_STAGE  # noqa: E402
from engine.precision import autocast, cpu_name, grad_scaler  # noqa: E402
from engine.programs import STUDENT, TEACHER  # noqa: E402
from engine.trainer import Stage, wrap_ddp  # noqa: E402
from scripts import benchmark, method_cost  # noqa: E402  (by package: installed, a bare `benchmark` is another's)

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_LOSS_SCALE = 1024.0
SMALL_METHODS = ("kd", "crd")
DDP_CASES = (("crd", None), ("ft", None), ("kd", torch.float16), ("reviewkd", None))


# --------------------------------------------------------------------------- precision

def precision_step(task, inputs, device, dtype):
    """(loss, flat gradient of the trained parameters) of one step under `dtype` autocast, on a
    copy of `task` (BatchNorm statistics and memory banks of the original stay as they were)."""
    task = copy.deepcopy(task)
    task.train()
    task.keep_frozen_in_eval()
    params = task.main_parameters()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with autocast(device, dtype):
            terms, _ = task(*inputs)
        loss = terms["loss"].float()
        scale = FP16_LOSS_SCALE if dtype == torch.float16 else 1.0
        grads = torch.autograd.grad(loss * scale, params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g.float() / scale).reshape(-1)
                      for p, g in zip(params, grads)])
    return loss.detach(), flat


def method_inputs(method, teacher, student, batch, device, num_classes=100, n_train=20_000, size=32):
    """(task on `device`, its step's inputs), as scripts/method_cost.py builds them."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    torch.manual_seed(0)
    task, options = method_cost.build(method, teacher, student, images, n_train, num_classes)
    targets = torch.randint(0, num_classes, (batch,), generator=gen)
    indices = torch.randint(0, n_train, (batch,), generator=gen)
    contrast = torch.randint(0, n_train, (batch, (options.get("nce_k") or 0) + 1), generator=gen)
    if task.strong_view:
        images = torch.cat([images, torch.randn(images.shape, generator=gen)])
    if task.rotations:
        images = method_cost.rotations(images)
    return task.to(device), [t.to(device) for t in (images, targets, indices, contrast)]


def host_syncs(task, inputs, device):
    """The lines that made the host wait for the device during one fp32 step
    (torch.cuda.set_sync_debug_mode), {"file:line": count}; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            precision_step(task, inputs, device, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    lines = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return {line: lines.count(line) for line in sorted(set(lines))}


def compare(value, reference) -> dict:
    loss, grad = value
    ref_loss, ref_grad = reference
    grad, ref_grad = grad.double(), ref_grad.double()
    return {"loss": loss.item(),
            "loss_rel_diff": abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12),
            "grad_cosine": F.cosine_similarity(grad, ref_grad, dim=0).item(),
            "grad_rel_l2": ((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)).item(),
            "finite": bool(torch.isfinite(loss) and torch.isfinite(grad).all())}


def precision_row(method, device, teacher="resnet20", student="resnet8", batch=8, size=32,
                  dtypes=("bf16", "fp16")) -> dict:
    """One step of `method` in fp32 and in each of `dtypes`, compared (random networks: resnet20
    and resnet8 have the same channel counts, which FSP and KDSVD need)."""
    task, inputs = method_inputs(method, teacher, student, batch, device, size=size)
    reference = precision_step(task, inputs, device, None)
    row = {"method": method, "fp32_loss": reference[0].item(), "host_syncs": host_syncs(task, inputs, device)}
    for name in dtypes:
        row[name] = compare(precision_step(task, inputs, device, DTYPES[name]), reference)
    return row


def check_precision(opts, device) -> list:
    return [precision_row(m, device, batch=opts.precision_batch) for m in opts.methods]


# --------------------------------------------------------------------------- epochs, compile

def execution(opts) -> dict:
    """The runs' precision and memory format: the device's own choice on a GPU; fp32 NCHW in the
    CPU dry run, where the choice would be the CPU speed probe's, a path no GPU takes."""
    return {"amp": "off", "channels_last": False} if opts.device == "cpu" else {}


def student_flags(opts, save: Path, teacher_ckpt: Path, method: str, **extra) -> dict:
    """train_student.py's flag values of a one-epoch digits run of `method`."""
    return {"dataset": "digits", "save_dir": str(save), "path_t": str(teacher_ckpt), "model_s": "resnet8",
            "distill": method, "epochs": 1, "init_epochs": 1, "sskd_head_epochs": 1, "nce_k": 64,
            "batch_size": 128, "device": opts.device, "print_freq": 1000, **execution(opts), **extra}


def train_digits_teacher(opts, save: Path) -> Path:
    teacher_run.train(TeacherConfig(dataset="digits", save_dir=str(save), model="resnet8", epochs=1, batch_size=128,
                                    device=opts.device, print_freq=1000, trial="0", **execution(opts)))
    return save / TEACHER.kind / "resnet8_digits_trial0" / "best.pth"


def epoch_row(opts, save, teacher_ckpt, method, **extra) -> dict:
    start = time.perf_counter()
    flags = {**StudentConfig.defaults(), **student_flags(opts, save, teacher_ckpt, method, **extra)}
    results = student_run.configure(flags).train()
    run_dir = save / STUDENT.kind / results["run_name"]
    with open(run_dir / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    return {"method": method, "last_top1": results["last_top1"], "images_per_s": float(last["images_per_s"]),
            "wall_s": time.perf_counter() - start}


def check_epochs(opts, work) -> list:
    return [epoch_row(opts, work["save"], work["teacher"], m) for m in opts.methods]


def check_compile(opts, work) -> dict:
    torch._dynamo.reset()
    counters.clear()
    row = epoch_row(opts, work["save"], work["teacher"], "kd", compile=True, trial="compiled")
    breaks = dict(counters["graph_break"])
    return {**row, "graph_breaks": sum(breaks.values()), "graph_break_reasons": dict(list(breaks.items())[:10]),
            "unique_graphs": counters["stats"]["unique_graphs"], "frames_compiled": counters["frames"]["ok"],
            "frames_total": counters["frames"]["total"]}


# --------------------------------------------------------------------------- DDP

@contextlib.contextmanager
def one_process_group(device, folder: Path):
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{folder / 'rendezvous'}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def ddp_step(task, module, params, inputs, device, dtype, with_accuracy) -> tuple:
    """Two trainer steps (engine.loop.train_epoch) of `module` with an lr-0 SGD over `params`,
    as the trainer runs a stage (DDP reports a parameter it wrongly expected a gradient for at
    the second step); (means, flat gradient of the second step)."""
    module.train()
    task.keep_frozen_in_eval()
    optimizer = torch.optim.SGD(params, lr=0.0)
    means = train_epoch(module, [inputs] * 2, optimizer, grad_scaler(device, dtype), device=device, amp_dtype=dtype,
                        channels_last=False, print_freq=10**9, desc="ddp", show_progress=False,
                        with_accuracy=with_accuracy)
    return means, torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params])


def ddp_row(method, dtype, device) -> dict:
    """Each stage of `method` (init stages, then the main one), one step unwrapped and one under
    the trainer's DDP wrapper, from the same weights."""
    task, inputs = method_inputs(method, "resnet8x4", "resnet8", 8, device)
    rows = []
    for index in range(len(task.init_stages()) + 1):
        (plain, plain_grad), (wrapped, ddp_grad) = [ddp_stage(copy.deepcopy(task), index, wrap, inputs, device, dtype)
                                                    for wrap in (False, True)]
        rows.append({"stage": wrapped["stage"], "find_unused_parameters": wrapped["find_unused_parameters"],
                     "loss": wrapped["train_loss"],
                     "loss_rel_diff": abs(wrapped["train_loss"] - plain["train_loss"])
                     / max(abs(plain["train_loss"]), 1e-12),
                     "grad_max_abs_diff": (ddp_grad - plain_grad).abs().max().item()})
    return {"method": method, "amp": "fp16" if dtype == torch.float16 else "fp32", "stages": rows}


def ddp_stage(task, index, wrap, inputs, device, dtype):
    stage = (task.init_stages() + [Stage(MAIN_STAGE, 1, task, task.main_parameters())])[index]
    unused = task.has_unused_parameters(stage.module, stage.params)
    module = wrap_ddp(stage.module, device, find_unused_parameters=unused) if wrap else stage.module
    means, grad = ddp_step(task, module, stage.params, inputs, device, dtype, stage.evaluate)
    return {**means, "stage": stage.name, "find_unused_parameters": unused}, grad


def check_ddp(opts, work) -> dict:
    device = torch.device(opts.device)
    with one_process_group(device, work["tmp"]) as backend:
        rows = [ddp_row(m, dtype, device) for m, dtype in DDP_CASES]
    if opts.small:  # a second process would read the whole digits set (tests/test_torchrun.py runs torchrun)
        return {"backend": backend, "steps": rows, "torchrun_kd": None}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    flags = [word for flag, value in student_flags(opts, work["save"], work["teacher"], "kd", trial="torchrun").items()
             for word in ((f"--{'' if value else 'no-'}{flag}",) if isinstance(value, bool) else (f"--{flag}", str(value)))]
    start = time.perf_counter()
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                               str(ROOT / "train_student.py"), *flags], env=env, capture_output=True, text=True)
    torchrun = {"exit_status": launched.returncode, "wall_s": time.perf_counter() - start,
                "tail": launched.stdout[-400:] + launched.stderr[-400:]}
    return {"backend": backend, "steps": rows, "torchrun_kd": torchrun}


# --------------------------------------------------------------------------- JPEG, benchmark, latency

def odd_files(folder: Path) -> None:
    """A CMYK JPEG and a PNG named .JPEG, as ImageNet holds them."""
    image = Image.frombytes("RGB", (64, 48), bytes(range(256)) * 36)
    image.convert("CMYK").save(folder / "cmyk.JPEG", "JPEG")
    image.save(folder / "png.JPEG", "PNG")


def check_jpeg(opts, work) -> dict:
    tree = benchmark.write_jpeg_tree(work["tmp"] / "imagenet", opts.jpeg_images, 0)
    folder = next((tree / "train").iterdir())
    odd_files(folder)
    files = [read_bytes(p) for p in sorted(folder.iterdir())]
    device = torch.device(opts.device)
    on_device, on_cpu = decode_rgb(files, device), decode_rgb(files, torch.device("cpu"))
    diffs = [(a.cpu().int() - b.int()).abs().max().item() for a, b in zip(on_device, on_cpu)]
    train, _, _ = build_loaders("imagenet", tree, opts.jpeg_batch, loader="jpeg", device=device,
                                num_workers=opts.workers, seed=0)
    train.set_epoch(1)
    start, n = time.perf_counter(), 0
    for images, *_ in train:
        n += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"files": len(files), "max_pixel_diff_device_vs_cpu": max(diffs), "loader_images": n,
            "loader_images_per_s": n / (time.perf_counter() - start)}


def check_benchmark(opts, work) -> dict:
    out = work["tmp"] / "bench.json"
    configs = "crd:resnet8-resnet8:8" if opts.small else "kd:resnet32x4-resnet8x4:64,crd:resnet32x4-resnet8x4:64"
    benchmark.main(["--device", opts.device, "--configs", configs, "--steps", str(opts.bench_steps),
                    "--warmup", str(opts.bench_warmup), "--n_images", str(opts.bench_images),
                    "--num_workers", str(opts.workers), "--data_folder", str(work["tmp"] / "none"),
                    "--json", str(out)])
    return json.loads(out.read_text())


def check_latency(opts, work) -> dict:
    """evaluate.py's latency figures of the digits teacher (deploy/metrics.cost_metrics, full
    precision as evaluate.py's default), on the CPU and the device."""
    device = torch.device(opts.device)
    info = get_info("digits")
    model, _ = load_network(work["teacher"], None, info.num_classes, "digits")
    runs, warmup = (3, 1) if opts.small else (50, 10)
    result = cost_metrics(model.to(device), device, (3, info.image_size, info.image_size), None, runs, warmup)
    return {k: v for k, v in result.items() if "latency" in k}


# --------------------------------------------------------------------------- the report

SECTIONS = (("precision", lambda opts, work: check_precision(opts, torch.device(opts.device))),
            ("epochs", check_epochs), ("compile", check_compile), ("ddp", check_ddp), ("jpeg", check_jpeg),
            ("benchmark", check_benchmark), ("latency", check_latency))


def run_section(name, check, opts, work) -> dict:
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
        result, error = check(opts, work), None
    except Exception as err:  # a failing path is a finding: record it and check the next one
        result, error = None, "".join(traceback.format_exception_only(type(err), err)).strip()
        traceback.print_exc()
    seconds = time.perf_counter() - start
    print(f"== {name}: {'ok' if error is None else 'FAILED'} in {seconds:.1f} s", flush=True)
    return {"ok": error is None, "seconds": seconds, "error": error, "result": result}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="the CPU dry run's sizes (see above)")
    parser.add_argument("--methods", default=None, help="comma-separated; default every registered method "
                        f"({', '.join(SMALL_METHODS)} with --small)")
    parser.add_argument("--sections", default=",".join(n for n, _ in SECTIONS))
    parser.add_argument("--json", default="gpu_check.json", metavar="PATH")
    opts = parser.parse_args(argv)
    opts.methods = opts.methods.split(",") if opts.methods else (
        list(SMALL_METHODS) if opts.small else sorted(distiller_zoo.METHODS))
    if opts.device == "cuda":  # DDP and NCCL need the device's index
        opts.device = "cuda:0"
    opts.sections = opts.sections.split(",")
    unknown = set(opts.sections) - {n for n, _ in SECTIONS}
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}")
    if opts.small:
        opts.sections = [s for s in opts.sections if s != "compile"]
    opts.precision_batch, opts.jpeg_images, opts.jpeg_batch = (4, 8, 4) if opts.small else (16, 256, 64)
    opts.workers = 0 if opts.small else 4
    opts.bench_steps, opts.bench_warmup, opts.bench_images = (1, 0, 64) if opts.small else (50, 10, 50_000)
    return opts


@contextlib.contextmanager
def digits_every(step: int):
    """Every `step`-th digit only (the dry run's sizes); the real loader on the real images."""
    full = dataset.digits.load_digits_split
    dataset.digits.load_digits_split = lambda train: tuple(t[::step] for t in full(train))
    try:
        yield
    finally:
        dataset.digits.load_digits_split = full


def main(argv=None) -> dict:
    opts = parse_args(argv)
    device = torch.device(opts.device)
    meta = {"device": opts.device, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else cpu_name(), "torch": torch.__version__, "small": opts.small, "methods": opts.methods,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    report = {"meta": meta, "complete": False, "ok": None, "sections": {}}
    total = time.perf_counter()
    print(f"gpu_check on {opts.device} ({meta['device_name']}), sections {', '.join(opts.sections)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp, digits_every(8 if opts.small else 1):
        work = {"tmp": Path(tmp), "save": Path(tmp) / "save"}
        work["teacher"] = train_digits_teacher(opts, work["save"])
        for name, check in SECTIONS:
            if name in opts.sections:
                report["sections"][name] = run_section(name, check, opts, work)
                write_report(report, opts.json, total)  # a check stopped by its time limit keeps what ran
    report["complete"] = True
    report["ok"] = all(s["ok"] for s in report["sections"].values())
    write_report(report, opts.json, total)
    print(f"gpu_check: {'all ok' if report['ok'] else 'FAILURES'} in {report['meta']['total_s']:.0f} s; "
          f"report {opts.json}", flush=True)
    return report


def write_report(report: dict, path, start: float) -> None:
    report["meta"]["total_s"] = time.perf_counter() - start
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
