"""Mixed precision, memory format, threads and reproducibility switches.

On CUDA, `--amp auto` means bf16 and channels_last is on. On a CPU neither is assumed: bf16
is a speed-up only where the CPU computes it natively (AVX512-BF16 or AMX on x86, the BF16
extension on Arm) and a large slow-down where it is emulated (about 10x on AVX2-only CPUs), and
channels_last helps some convolution kernels and hurts others. So on a CPU, `auto` runs a short
timed probe of the run's own networks at the run's batch shape — forward and backward of the
trained network, forward of the frozen ones — over the candidates the CPU can run fast, keeps
the fastest, and caches the choice per machine, torch version, thread count, networks and
shape (~/.cache/distillbench/cpu_settings.json, or $DISTILLBENCH_CACHE), so later runs start
at once. bf16 is probed only on CPUs with native bf16 and kept only when it is at least
MIN_GAIN faster than fp32.
"""
import copy
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from core.errors import UserError

MIN_GAIN = 1.05           # bf16 or channels_last must beat the alternative by 5% to be chosen
PROBE_STEPS = 3           # timed steps per candidate, after one untimed warm-up round
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# Instruction-set caps a user (or a test of an older CPU) may set: oneDNN's below its bf16 level,
# or ATen's below AVX-512, leave bf16 emulated even on a CPU that has it.
NO_BF16_ONEDNN_ISAS = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni")
NO_BF16_ATEN_CAPABILITIES = ("default", "avx2")


@dataclass
class Execution:
    """How the step runs: the autocast dtype (None: fp32), the memory format, and why."""

    amp_dtype: Optional[torch.dtype]
    channels_last: bool
    reason: str

    @property
    def amp_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def describe(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.amp_name}, {layout} ({self.reason})"

    def record(self) -> dict:
        """What a checkpoint keeps, so that a resumed run computes exactly as it started."""
        return {"amp": self.amp_name, "channels_last": self.channels_last}

    @classmethod
    def recorded(cls, record: dict) -> "Execution":
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[record["amp"]]
        return cls(dtype, bool(record["channels_last"]), "as the run started")


def parse_amp(flag: str, device: torch.device):
    """The autocast dtype for an explicit --amp, or 'auto' (also for no --amp)."""
    if flag is None:
        return "auto"
    if flag == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    if flag == "auto":
        return "auto"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[flag]


def resolve_amp(flag: str, device: torch.device):
    """The autocast dtype where nothing is measured (evaluation): auto = bf16 on CUDA, fp32 on a CPU."""
    amp = parse_amp(flag, device)
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return amp


def resolve_execution(amp_flag: str, channels_last_flag, device: torch.device, trained: torch.nn.Module,
                      frozen: Sequence[torch.nn.Module], batch_shape: Callable[[], tuple]) -> Execution:
    """The run's precision and memory format: explicit flags win; CUDA defaults to bf16 and
    channels_last; a CPU measures (see the module docstring) at the shape `batch_shape()` gives."""
    amp = parse_amp(amp_flag, device)
    if device.type == "cuda":
        dtype = torch.bfloat16 if amp == "auto" else amp
        channels_last = True if channels_last_flag is None else bool(channels_last_flag)
        return Execution(dtype, channels_last, "CUDA defaults" if amp == "auto" else "as asked")
    if amp != "auto" and channels_last_flag is not None:
        return Execution(amp, bool(channels_last_flag), "as asked")
    native = native_bf16()
    dtypes = [amp] if amp != "auto" else ([None, torch.bfloat16] if native else [None])
    layouts = [bool(channels_last_flag)] if channels_last_flag is not None else [False, True]
    note = "" if amp != "auto" or native else \
        f"fp32: no native bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()})"
    return probe_cpu(trained, frozen, batch_shape(), dtypes, layouts, amp_note=note)


def cpuinfo_field(*keys: str):
    """The value of the first /proc/cpuinfo line starting with one of `keys` (None off Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cpu_flags() -> set:
    return set((cpuinfo_field("flags", "Features") or "").split())


def native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (not emulated through fp32) and neither
    oneDNN (ONEDNN_MAX_CPU_ISA) nor ATen (ATEN_CPU_CAPABILITY) is capped below it."""
    onednn = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").lower()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if onednn in NO_BF16_ONEDNN_ISAS or aten in NO_BF16_ATEN_CAPABILITIES:
        return False
    return bool(cpu_flags() & set(NATIVE_BF16_FLAGS))


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine() or "cpu"


def _cache_path() -> Path:
    root = os.environ.get("DISTILLBENCH_CACHE") or Path.home() / ".cache" / "distillbench"
    return Path(root) / "cpu_settings.json"


def _network_name(module: torch.nn.Module) -> str:
    params = sum(p.numel() for p in module.parameters())
    return f"{type(module).__name__}:{params}"


def _cache_key(trained, frozen, batch_shape, dtypes, layouts) -> str:
    names = ",".join(_network_name(m) for m in (trained, *frozen))
    options = ",".join(str(d).replace("torch.", "") for d in dtypes) + "|" + ",".join(map(str, layouts))
    return (f"{cpu_name()}|torch {torch.__version__}|{torch.get_num_threads()} threads|{names}|"
            f"{tuple(batch_shape)}|{options}")


def _read_cache() -> dict:
    try:
        with open(_cache_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs the probe again next time


def probe_cpu(trained, frozen, batch_shape, dtypes, layouts, amp_note: str = "") -> Execution:
    """Time every (dtype, layout) candidate once per machine and keep the fastest."""
    candidates = [(d, cl) for d in dtypes for cl in layouts]
    key = _cache_key(trained, frozen, batch_shape, dtypes, layouts)
    cache = _read_cache()
    source = "measured earlier, cached"
    if key not in cache:
        cache[key] = time_candidates(trained, frozen, batch_shape, candidates)
        _write_cache(cache)
        source = "measured"
    timings = cache[key]
    dtype, channels_last = pick_fastest(timings, candidates)
    detail = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in sorted(timings.items()))
    reason = "; ".join(filter(None, [amp_note, f"{source}: {detail} per step"]))
    return Execution(dtype, channels_last, reason)


def _candidate(dtype, channels_last: bool) -> str:
    return f"{'fp32' if dtype is None else str(dtype).replace('torch.', '')}/{'channels_last' if channels_last else 'NCHW'}"


def pick_fastest(timings: dict, candidates):
    """The fastest (dtype, channels_last); the first candidate (fp32 and NCHW, the reference
    settings, when both are left to auto) unless another is at least MIN_GAIN faster."""
    reference = candidates[0]
    best = min(candidates, key=lambda c: timings[_candidate(*c)])
    return best if timings[_candidate(*best)] * MIN_GAIN <= timings[_candidate(*reference)] else reference


def time_candidates(trained, frozen, batch_shape, candidates) -> dict:
    """Seconds of one training step's network work per candidate: the fastest of PROBE_STEPS
    steps, after an untimed warm-up round, the candidates taking turns so that a burst of load
    from another process does not fall on one of them only. Copies of the networks are timed,
    so no weight or BatchNorm statistic of the run moves and no random number is drawn from it."""
    with torch.random.fork_rng(devices=[]):
        steps = {_candidate(*c): _step_function(trained, frozen, batch_shape, *c) for c in candidates}
        times = {key: [] for key in steps}
        for _ in range(PROBE_STEPS + 1):
            for key, step in steps.items():
                times[key].append(step())
    return {key: min(values[1:]) for key, values in times.items()}


def _step_function(trained, frozen, batch_shape, dtype, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = copy.deepcopy(trained).train().to(memory_format=fmt)
    others = [copy.deepcopy(m).eval().to(memory_format=fmt) for m in frozen]
    images = torch.randn(*batch_shape).contiguous(memory_format=fmt)
    targets = torch.zeros(len(images), dtype=torch.long)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad():
                for m in others:
                    m(images)
            logits = net(images)
        F.cross_entropy(logits.float(), targets).backward()
        return time.perf_counter() - start

    return step


def grad_scaler(device: torch.device, dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its gradients underflow without it); a disabled scaler otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def autocast(device: torch.device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def set_threads(threads: Optional[int]) -> None:
    if threads is not None:  # --threads' range (>= 1) is declared with the flag
        torch.set_num_threads(threads)
