"""One training epoch and one evaluation pass.

Loss terms and accuracy counts accumulate on the device; the host reads them
only every `print_freq` steps and at the end of the epoch, so the step itself
never waits for the device.
"""
import math
import time

import torch
import torch.nn.functional as F

from core.distributed import all_reduce_sum, world_size
from engine.optim import minimise
from engine.precision import autocast
from engine.progress import epoch_bar


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or infinite; the run stops and keeps its last good checkpoint."""


def move_batch(batch, device, channels_last: bool):
    images, *rest = batch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=fmt)
    return (images, *(t.to(device, non_blocking=True) for t in rest))


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k predictions, for each k."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(targets.unsqueeze(1))
    return torch.stack([hits[:, :min(k, kmax)].any(1).sum() for k in ks])


class EpochMeter:
    """Sample-weighted sums of named loss terms and top-1/top-5 hits, kept on the device."""

    def __init__(self, device):
        self.device = device
        self.sums = {}
        self.hits = torch.zeros(2, device=device)
        self.count = 0

    def add(self, terms: dict, logits, targets) -> None:
        n = targets.shape[0]
        for name, value in terms.items():
            value = value.detach().float() * n
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        if logits is not None:
            self.hits += topk_correct(logits.detach(), targets)
        self.count += n

    def means(self, with_accuracy: bool, prefix: str) -> dict:
        """Reduce over ranks and read once: {prefix+term: mean, prefix+top1, prefix+top5}."""
        names = list(self.sums)
        packed = torch.stack([self.sums[k] for k in names] + list(self.hits)
                             + [torch.tensor(float(self.count), device=self.device)])
        values = all_reduce_sum(packed).tolist()
        count = max(values[-1], 1.0)
        out = {prefix + k: v / count for k, v in zip(names, values)}
        if with_accuracy:
            out[prefix + "top1"] = 100.0 * values[len(names)] / count
            out[prefix + "top5"] = 100.0 * values[len(names) + 1] / count
        return out


def check_finite(means: dict, where: str) -> None:
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(f"{', '.join(bad)} became non-finite {where}")


def train_epoch(step_module, loader, optimizer, scaler, *, device, amp_dtype, channels_last,
                print_freq: int, desc: str, show_progress: bool, with_accuracy: bool = True, run: str = "",
                stop=None, clip_grad=None) -> dict:
    """Optimise over one pass of `loader`. `step_module(*batch)` returns (terms, logits);
    terms['loss'] is minimised (engine/optim.py's `minimise`: the optimiser may step shares of it
    apart, as DOT does), every term is reported. `clip_grad` bounds the gradients' total norm
    (None: unclipped). `stop` (engine.signals.StopRequest) ends the epoch between steps with
    Interrupted. Returns means, seconds, images/s."""
    meter = EpochMeter(device)
    start = time.perf_counter()
    bar = epoch_bar(len(loader), run, desc, enabled=show_progress)
    for step, batch in enumerate(loader, 1):
        images, targets, *rest = move_batch(batch, device, channels_last)
        with autocast(device, amp_dtype):
            terms, logits = step_module(images, targets, *rest)
        optimizer.zero_grad(set_to_none=True)
        minimise(optimizer, scaler, terms, clip_grad)
        meter.add(terms, logits, targets)
        bar.update(1)
        if step % print_freq == 0:
            running = meter.means(with_accuracy, "")
            check_finite(running, f"at step {step} of {desc}")
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        if stop is not None and stop_now(stop, step, print_freq, device):
            bar.close()
            raise stop.interrupted(f"at step {step} of {desc}")
    bar.close()
    means = meter.means(with_accuracy, "train_")
    seconds = time.perf_counter() - start
    check_finite(means, f"in {desc}")
    means["epoch_time"] = seconds
    means["images_per_s"] = meter.count * _world(loader) / seconds
    return means


def stop_now(stop, step: int, print_freq: int, device) -> bool:
    """One process asks its own flag after every step; under torchrun the ranks agree every
    `print_freq` steps, where the loop reads the device anyway."""
    if world_size() == 1:
        return stop.requested()
    return step % print_freq == 0 and stop.requested(device)


def _world(loader) -> int:
    return getattr(loader, "world_size", 1)


@torch.inference_mode()
def evaluate(model, loader, *, device, amp_dtype, channels_last) -> dict:
    """Cross-entropy, top-1 and top-5 (%) of `model` over `loader`."""
    was_training = model.training
    model.eval()
    meter = EpochMeter(device)
    for batch in loader:
        images, targets, *_ = move_batch(batch, device, channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), targets)
        meter.add({"loss": loss}, logits, targets)
    model.train(was_training)
    return meter.means(True, "test_")
