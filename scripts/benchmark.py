"""Training speed: images per second of a whole training step — data loading, forward,
backward and the optimizer step — on the plain path and on our fast path, measured in one
process for each configuration.

    python scripts/benchmark.py                                   # every configuration below
    python scripts/benchmark.py --device cpu --steps 2 --configs kd:resnet32x4-resnet8x4:64
    python scripts/benchmark.py --device cuda --warmup 20 --steps 100 --compile --json bench.json
    python scripts/benchmark.py --data cifar100 --data_folder ./data --configs crd:vgg13-MobileNetV2

Configurations (`--configs`, comma-separated; the batch size may be left out for both):
    teacher:resnet32x4:<batch>                         supervised training of the teacher
    <method>:<teacher>-<student>:<batch>               distillation, method in kd, crd, at, fitnet, ofd
with the pairs resnet32x4-resnet8x4 and vgg13-MobileNetV2 and batch sizes 64 and 128 by default.

The two paths:
- plain (the reference design): `--loader torch`, torchvision's DataLoader with RepDistiller's PIL
  transforms and `--num_workers` workers; fp32; NCHW; SGD looping over its tensors
  (foreach=False); no compilation.
- fast (what training runs by default): `--loader memory`, the uint8 split on the device,
  augmented there in batches; `--amp auto`: bf16 autocast and channels_last where they are faster
  (always on CUDA; on a CPU as engine.precision measures them, fp32 on CPUs without native bf16); engine.optim's
  SGD (fused on CUDA, foreach elsewhere); loss terms accumulated on the device, read once;
  `--compile` adds torch.compile of the networks.

Both paths are built by the trainers' own code — the run configurations (engine/config.py,
engine.student_run.configure), engine.session.build_data, engine.student_run.build_task (the
method registry, BuildContext, DistillTask) and engine.trainer.prepare — and each timed step is
engine.loop.train_epoch's step (move_batch, autocast, backward, optimizer step, on-device
meter). The teacher of a distillation configuration is a randomly initialised network saved as
a checkpoint in a temporary folder: its speed is a trained teacher's. Steps run over one
continuing stream of batches (`--warmup` untimed, then `--steps` timed), crossing epochs when
the data set is small, so the DataLoader's worker start-up is not counted in the timed steps.

Data (`--data`): `cifar100` reads CIFAR-100 from `--data_folder`; `synthetic` (the default when
there is no cifar-100-python/ there) writes `--n_images` random uint8 32x32 RGB images with random
labels into a temporary folder in CIFAR-100's own on-disk format (Python 2 pickles), so both paths
read it through the real loaders. The default, 50,000 images, is CIFAR-100's training set, so CRD
runs with its real memory bank and its default 16,384 negatives; on a smaller set CRD draws
`--nce_k` negatives, by default as many as the set allows (its size - 1), and the header says so. torchvision checks each CIFAR file's md5 against the real
archive's; for that temporary folder only, the check is replaced by an existence check.

Printed per configuration: plain and fast images/s, their ratio, the peak memory of each path
(host: the peak resident set of this process, imported libraries included, reset before each
path — after freed memory is handed back with malloc_trim — through /proc/self/clear_refs where
Linux allows it, else the process's lifetime peak from resource.getrusage; DataLoader workers
are separate processes and not included; CUDA:
torch.cuda.max_memory_allocated) and the wall time 240 CIFAR-100 epochs of 50,000 images would
take at the fast rate (training steps only: no evaluation, no init stage). `--json PATH` writes
the same figures with the settings they were measured under.
"""
import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import pickle
import resource
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.distributed import setup  # noqa: E402
from core.errors import exits_cleanly  # noqa: E402
from core.seeding import seed_everything  # noqa: E402
from dataset.loaders import build_loaders  # noqa: E402
from distiller_zoo.crd import CRD  # noqa: E402
from engine import student_run  # noqa: E402
from engine.build import build_model  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.config import StudentConfig, TeacherConfig  # noqa: E402
from engine.loop import train_epoch  # noqa: E402
from engine.optim import build_sgd  # noqa: E402
from engine.precision import cpu_name  # noqa: E402
from engine.session import build_data  # noqa: E402
from engine.task import SupervisedTask  # noqa: E402
from engine.trainer import prepare  # noqa: E402

METHODS = ("kd", "crd", "at", "fitnet", "ofd")
PAIRS = (("resnet32x4", "resnet8x4"), ("vgg13", "MobileNetV2"))
TEACHER = "resnet32x4"
BATCHES = (64, 128)
EPOCHS, EPOCH_IMAGES = 240, 50_000
NUM_CLASSES = 100
PATHS = ("plain", "fast")
CRD_NCE_K = next(o.default for o in CRD.options if o.name == "nce_k")


# --------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Config:
    method: str             # 'teacher' or a registered distillation method
    teacher: str            # the trained network for 'teacher', else the (frozen) teacher
    student: Optional[str]  # None for 'teacher'
    batch: int

    @property
    def name(self) -> str:
        nets = self.teacher if self.student is None else f"{self.teacher}-{self.student}"
        return f"{self.method}:{nets}:{self.batch}"


def default_configs() -> List[Config]:
    configs = [Config("teacher", TEACHER, None, b) for b in BATCHES]
    for teacher, student in PAIRS:
        for method in METHODS:
            configs += [Config(method, teacher, student, b) for b in BATCHES]
    return configs


def parse_configs(text: Optional[str]) -> List[Config]:
    """`None`/'all' -> every default configuration; else 'method:nets[:batch]', comma-separated."""
    if text is None or text.strip() == "all":
        return default_configs()
    configs = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise SystemExit(f"--configs: '{entry}' is not method:teacher-student[:batch] or teacher:model[:batch]")
        method, nets = parts[0].lower(), parts[1]
        try:
            batches = (int(parts[2]),) if len(parts) == 3 else BATCHES
        except ValueError:
            raise SystemExit(f"--configs: the batch size of '{entry}' is not an integer") from None
        if method == "teacher":
            configs += [Config("teacher", nets, None, b) for b in batches]
            continue
        teacher, sep, student = nets.partition("-")
        if not sep or not teacher or not student:
            raise SystemExit(f"--configs: '{nets}' in '{entry}' is not teacher-student, e.g. resnet32x4-resnet8x4")
        configs += [Config(method, teacher, student, b) for b in batches]
    return configs


# --------------------------------------------------------------------------- synthetic CIFAR-100

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as CIFAR's own pickles hold them: torchvision
    reads them with encoding='latin1' exactly as it reads the real files."""
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_bytes_as_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes_as_py2_str


def _write_pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_synthetic_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """cifar-100-python/{train,test,meta} under `root` with random images and labels, in the
    real files' layout: b'data' N x 3072 uint8 (R, G, B planes of 32 x 32), b'fine_labels',
    b'coarse_labels', b'filenames', b'batch_label'; meta with the label names."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, NUM_CLASSES, n)
        fine[:NUM_CLASSES] = np.arange(min(n, NUM_CLASSES))  # every class present (CRD samples per class)
        _write_pickle({b"filenames": [f"synthetic_{i}.png".encode() for i in range(n)],
                       b"batch_label": f"synthetic {split}".encode(),
                       b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                       b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)}, folder / split)
    _write_pickle({b"fine_label_names": [f"class{i}".encode() for i in range(NUM_CLASSES)],
                   b"coarse_label_names": [f"superclass{i}".encode() for i in range(NUM_CLASSES // 5)]},
                  folder / "meta")
    return folder


@contextlib.contextmanager
def existence_check_under(root: Path):
    """torchvision's CIFAR compares each file's md5 with the real archive's; under `root` (our
    synthetic folder) only, accept any file that exists. Everything else is checked as usual."""
    import torchvision.datasets.cifar as tv_cifar
    real = tv_cifar.check_integrity
    prefix = str(Path(root).resolve()) + os.sep

    def check(fpath, md5=None):
        if str(Path(fpath).resolve()).startswith(prefix):
            return os.path.isfile(fpath)
        return real(fpath, md5)

    tv_cifar.check_integrity = check
    try:
        yield
    finally:
        tv_cifar.check_integrity = real


# --------------------------------------------------------------------------- memory figures

def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system (glibc's
    malloc_trim), so the next path's peak is not the previous path's retained heap."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_host_peak() -> bool:
    """Reset the process's peak resident set (Linux's VmHWM); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_peak_mib(was_reset: bool) -> float:
    if was_reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# --------------------------------------------------------------------------- building a path

def path_flags(path: str, opts, config: Config, data_folder: str) -> dict:
    """The trainers' own flag values for one path of one configuration."""
    flags = {"dataset": "cifar100", "data_folder": data_folder, "batch_size": config.batch,
             "num_workers": opts.num_workers, "device": opts.device, "seed": opts.seed, "epochs": EPOCHS}
    if path == "plain":
        return {**flags, "loader": "torch", "amp": "off", "channels_last": False}
    return {**flags, "loader": "memory", "amp": "auto", **({"compile": True} if opts.compile else {})}


def random_teacher_checkpoint(arch: str, folder: Path, seed: int) -> Path:
    """A randomly initialised `arch` saved as a teacher checkpoint (once per architecture)."""
    path = folder / f"{arch}_random.pth"
    if not path.is_file():
        torch.manual_seed(seed)
        save_checkpoint({"model": build_model(arch, NUM_CLASSES).state_dict(), "arch": arch}, path)
    return path


def build_path(path: str, opts, config: Config, data_folder: str, work: Path):
    """(run configuration, ctx, train_loader, task), as train_teacher.py / train_student.py build them."""
    flags = path_flags(path, opts, config, data_folder)
    if config.method == "teacher":
        run_config = TeacherConfig.from_dict({**TeacherConfig.defaults(), **flags, "model": config.teacher})
    else:
        ckpt = random_teacher_checkpoint(config.teacher, work, opts.seed)
        method_flags = {"nce_k": opts.nce_k} if config.method == "crd" else {}
        run = student_run.configure({**StudentConfig.defaults(), **flags, "distill": config.method,
                                     "model_s": config.student, "path_t": str(ckpt.resolve()),
                                     "model_t": config.teacher, **method_flags})
        run_config = run.config
    ctx = setup(run_config.device)
    seed_everything(run_config.seed, run_config.deterministic)  # same seed on both paths: identical initial weights
    if config.method == "teacher":
        train_loader, _, info = build_data(run_config, ctx)
        model = build_model(run_config.model, info.num_classes).to(ctx.device)
        task = SupervisedTask(model, info.num_classes)
    else:
        train_loader, _, _, task = student_run.build_run(run, ctx)
    return run_config, ctx, train_loader, task


class Window:
    """The next `n` batches of a shared batch stream, as a loader train_epoch can iterate."""

    world_size = 1

    def __init__(self, stream, n: int):
        self.stream, self.n = stream, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return itertools.islice(self.stream, self.n)


def batch_stream(loader):
    """The loader's batches, epoch after epoch, as the trainer visits them (set_epoch first)."""
    for epoch in itertools.count(1):
        loader.set_epoch(epoch)
        yield from loader


def measure(path: str, opts, config: Config, data_folder: str, work: Path) -> dict:
    """Build one path, run `opts.warmup` steps, time `opts.steps` steps; images/s and memory."""
    release_free_memory()
    cuda = opts.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    was_reset = reset_host_peak()
    run_config, ctx, loader, task = build_path(path, opts, config, data_folder, work)
    prepared = prepare(run_config, ctx, task, loader)  # what the trainer does before training
    execution, scaler = prepared.execution, prepared.scaler
    amp_dtype, channels_last = execution.amp_dtype, execution.channels_last
    if path == "plain":
        optimizer = torch.optim.SGD(task.main_parameters(), lr=run_config.learning_rate, momentum=run_config.momentum,
                                    weight_decay=run_config.weight_decay, foreach=False)
    else:
        optimizer = build_sgd(task.main_parameters(), run_config, ctx.device)
    task.set_epoch(1)
    task.train()
    task.keep_frozen_in_eval()
    step = dict(device=ctx.device, amp_dtype=amp_dtype, channels_last=channels_last,
                print_freq=10**9, show_progress=False)
    stream = batch_stream(loader)
    try:
        if opts.warmup:
            train_epoch(task, Window(stream, opts.warmup), optimizer, scaler, desc="warm-up", **step)
        timed = train_epoch(task, Window(stream, opts.steps), optimizer, scaler, desc="timed", **step)
    finally:
        stream.close()  # ends the DataLoader's workers
    result = {"images_per_s": timed["images_per_s"], "seconds": timed["epoch_time"],
              "train_loss": timed["train_loss"], "peak_host_mib": host_peak_mib(was_reset),
              "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
              "channels_last": channels_last, "loader": run_config.loader, "optimizer": _optimizer_kind(optimizer),
              "execution": execution.describe()}
    if cuda:
        torch.cuda.synchronize()
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del task, loader, optimizer, stream
    gc.collect()
    return result


def _optimizer_kind(optimizer) -> str:
    group = optimizer.param_groups[0]
    return "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for-loop"


# --------------------------------------------------------------------------- report

def projected_hours(images_per_s: float) -> float:
    return EPOCHS * EPOCH_IMAGES / images_per_s / 3600


def header(cuda: bool) -> str:
    gpu = f"{'plain GPU':>10} {'fast GPU':>10} " if cuda else ""
    return (f"{'config':34s} {'plain img/s':>11} {'fast img/s':>11} {'ratio':>7} "
            f"{'plain RSS':>10} {'fast RSS':>10} {gpu}{'240 ep (fast)':>13}")


def line(row: dict, cuda: bool) -> str:
    plain, fast = row["plain"], row["fast"]
    gpu = f"{plain['peak_gpu_mib']:>6.0f} MiB {fast['peak_gpu_mib']:>6.0f} MiB " if cuda else ""
    return (f"{row['config']:34s} {plain['images_per_s']:>11.1f} {fast['images_per_s']:>11.1f} "
            f"{row['ratio']:>6.2f}x {plain['peak_host_mib']:>6.0f} MiB {fast['peak_host_mib']:>6.0f} MiB "
            f"{gpu}{row['projected_240_epochs_h']:>11.1f} h")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:<k>; default cuda when available")
    parser.add_argument("--configs", default=None,
                        help="comma-separated, e.g. kd:resnet32x4-resnet8x4:64,teacher:resnet32x4:128; default all")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (compilation, cuDNN tuning)")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers of the plain path")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks on the fast path")
    parser.add_argument("--data", choices=("synthetic", "cifar100"), default=None,
                        help="default: cifar100 when --data_folder holds cifar-100-python/, else synthetic")
    parser.add_argument("--data_folder", default="./data")
    parser.add_argument("--n_images", type=int, default=50_000,
                        help="training images of the synthetic data set (default: CIFAR-100's 50,000)")
    parser.add_argument("--nce_k", type=int, default=None,
                        help=f"CRD's negatives; default {CRD_NCE_K}, or the training set's size - 1 when smaller")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--imagenet_loader", action="store_true",
                        help="time ImageNet's training loader alone instead: the PIL path against decode_jpeg on "
                             "--device, over --n_images synthetic 500x375 JPEGs, batch 64, --num_workers workers")
    opts = parser.parse_args(argv)
    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.data is None:
        opts.data = "cifar100" if (Path(opts.data_folder) / "cifar-100-python").is_dir() else "synthetic"
    if opts.steps < 1 or opts.warmup < 0 or opts.n_images < 2:
        parser.error("--steps must be >= 1, --warmup >= 0 and --n_images >= 2")
    return opts


def default_nce_k(n_train: int) -> int:
    """CRD's default negatives where the training set holds more, else all the other samples."""
    return min(CRD_NCE_K, n_train - 1)


def training_set_size(opts) -> int:
    """Samples of the training split the runs will read (torchvision's CIFAR-100 reader)."""
    if opts.data == "synthetic":
        return opts.n_images
    return len(torchvision.datasets.CIFAR100(opts.data_folder, train=True, download=False))


def write_jpeg_tree(root: Path, n_images: int, seed: int) -> Path:
    """ImageNet's layout with n_images 500x375 JPEGs (ImageNet's most common size) over 10 classes."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500]
    for k in range(n_images):
        for split in ("train", "val"):
            (root / split / f"n{k % 10:08d}").mkdir(parents=True, exist_ok=True)
        phase = rng.uniform(0, 6.3, 3)
        pixels = 127 + 100 * np.sin(np.stack([x / 23 + phase[0], y / 17 + phase[1], (x + y) / 31 + phase[2]], -1))
        pixels += rng.normal(0, 10, pixels.shape)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        image.save(root / "train" / f"n{k % 10:08d}" / f"{k}.JPEG", quality=90)
        if k < 10:
            image.save(root / "val" / f"n{k % 10:08d}" / f"{k}.JPEG", quality=90)
    return root


def measure_imagenet_loader(opts, work: Path) -> List[dict]:
    """Images/s of one pass over the training loader (after one untimed batch), per path."""
    tree = write_jpeg_tree(work / "imagenet", opts.n_images, opts.seed)
    rows = []
    for kind in ("torch", "jpeg"):
        train, _, _ = build_loaders("imagenet", tree, 64, loader=kind, device=opts.device,
                                    num_workers=opts.num_workers, seed=opts.seed)
        batches = iter(train)
        next(batches)
        start, n = time.perf_counter(), 0
        for images, *_ in batches:
            n += images.shape[0]
        if opts.device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append({"loader": "PIL" if kind == "torch" else f"decode_jpeg ({opts.device})",
                     "images_per_s": n / (time.perf_counter() - start), "images": n})
        print(f"{rows[-1]['loader']:>24}: {rows[-1]['images_per_s']:8.1f} images/s ({n} images)", flush=True)
    return rows


@exits_cleanly
def main(argv=None) -> List[dict]:
    opts = parse_args(argv)
    if opts.imagenet_loader:
        with tempfile.TemporaryDirectory(prefix="distillbench-") as tmp:
            device_name = torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda") else cpu_name()
            print(f"ImageNet training loader alone on {opts.device} ({device_name}), {opts.num_workers} workers, "
                  f"{torch.get_num_threads()} threads, {opts.n_images} synthetic 500x375 JPEGs, batch 64", flush=True)
            return measure_imagenet_loader(opts, Path(tmp))
    configs = parse_configs(opts.configs)
    cuda = opts.device.startswith("cuda")
    rows = []
    with tempfile.TemporaryDirectory(prefix="distillbench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if opts.data == "synthetic":
            write_synthetic_cifar100(work, opts.n_images, max(opts.n_images // 5, 100), opts.seed)
            stack.enter_context(existence_check_under(work))
            data_folder, data_desc = str(work), f"synthetic CIFAR-100 format, {opts.n_images} images"
        else:
            data_folder, data_desc = opts.data_folder, f"CIFAR-100 from {opts.data_folder}"
        if any(c.method == "crd" for c in configs) and opts.nce_k is None:
            opts.nce_k = default_nce_k(training_set_size(opts))
            if opts.nce_k < CRD_NCE_K:
                data_desc += f"; crd with --nce_k {opts.nce_k} (the set is smaller than {CRD_NCE_K} + 1)"
        device_name = torch.cuda.get_device_name(opts.device) if cuda else cpu_name()
        print(f"device {opts.device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{data_desc}; {opts.warmup} warm-up + {opts.steps} timed steps per path; "
              f"plain: torch loader ({opts.num_workers} workers), fp32, NCHW; "
              f"fast: memory loader, precision and layout as training chooses them (--amp auto)"
              f"{', compiled' if opts.compile else ''}", flush=True)
        print(header(cuda), flush=True)
        for config in configs:
            row = {"config": config.name, "method": config.method, "teacher": config.teacher,
                   "student": config.student, "batch": config.batch}
            for path in PATHS:
                row[path] = measure(path, opts, config, data_folder, work)
            row["ratio"] = row["fast"]["images_per_s"] / row["plain"]["images_per_s"]
            row["projected_240_epochs_h"] = projected_hours(row["fast"]["images_per_s"])
            rows.append(row)
            print(line(row, cuda), flush=True)
            print(f"  fast path: {row['fast']['execution']}", flush=True)
    if opts.json:
        meta = {"device": opts.device, "device_name": device_name, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "data": data_desc, "steps": opts.steps, "warmup": opts.warmup,
                "num_workers": opts.num_workers, "compile": opts.compile, "seed": opts.seed, "nce_k": opts.nce_k,
                "projection": f"{EPOCHS} epochs x {EPOCH_IMAGES} images at the fast rate, training steps only",
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
