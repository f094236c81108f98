"""Temperatures of the logit losses: schedules and logit standardisation.

Schedules (`--kd_T_schedule`): the temperature moves from `--kd_T` at the first epoch to
`--kd_T_end` at the last,

    constant:  T(e) = T0
    linear:    T(e) = T0 + (T1 - T0) * q
    cosine:    T(e) = T1 + (T0 - T1) * (1 + cos(pi * q)) / 2,   q = (e - 1) / (epochs - 1)

One `Temperature` object is shared by every temperature-based loss of a run (KD, DKD, DIST,
MLKD's base temperature); a loss reads `float(temperature)` on each call.

Logit standardisation: Sun et al., "Logit Standardization in Knowledge Distillation",
CVPR 2024. Each logit vector is z-scored, (z - mean(z)) / (std(z) + 1e-7) with the unbiased
standard deviation of the official code, before the temperature softmax, so the student
matches the teacher's logit relations rather than their scale. With `--logit_stand` the
base temperature defaults to 2 and plain KD to -r 0.1 -a 9 (the paper's CIFAR-100 setting).
"""
import math

from torch import Tensor

SCHEDULES = ("constant", "linear", "cosine")
LOGIT_STAND_T = 2.0


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (std + eps)


def prepare_logits(logits_s: Tensor, logits_t: Tensor, stand: bool):
    """Both logit tensors in float32, z-scored when logit standardisation is on."""
    logits_s, logits_t = logits_s.float(), logits_t.float()
    if stand:
        return standardize(logits_s), standardize(logits_t)
    return logits_s, logits_t


class Temperature:
    def __init__(self, start: float, end: float = None, schedule: str = "constant", epochs: int = 1):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown temperature schedule {schedule!r}; choose one of {SCHEDULES}")
        self.start = float(start)
        self.end = self.start if end is None else float(end)
        self.schedule = schedule
        self.epochs = max(int(epochs), 1)
        self.value = self.start

    def at(self, epoch: int) -> float:
        q = min(max(epoch - 1, 0) / max(self.epochs - 1, 1), 1.0)
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * q
        if self.schedule == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * q)) / 2
        return self.start

    def set_epoch(self, epoch: int) -> None:
        self.value = self.at(epoch)

    def __float__(self) -> float:
        return self.value

    def __repr__(self) -> str:
        if self.schedule == "constant":
            return f"{self.start:g}"
        return f"{self.schedule} {self.start:g}->{self.end:g}"


def temperature_from_args(args) -> Temperature:
    return Temperature(args.kd_T, getattr(args, "kd_T_end", None), getattr(args, "kd_T_schedule", "constant"),
                       args.epochs)

