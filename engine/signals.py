"""SIGTERM (a scheduler's notice before preemption or a time limit), SIGUSR1 and SIGUSR2
(Slurm's --signal notices; USR2 is submitit's) and SIGINT (Ctrl-C) during training: the first
finishes the current step and stops the run cleanly; the same signal a second time exits at
once. A different signal does not: a scheduler may send several notices of one stop (Slurm
signals every process of a job, and the submitit launcher also forwards its own notice).

A stop keeps the state of the last completed epoch, which is already on disk
(ckpt_last.pth is written at the end of every epoch): resuming from it replays the
interrupted epoch from its start and ends bit-identical to an uninterrupted run, where a
checkpoint in mid-epoch would also need the data order's and augmentation's position.
"""
import os
import signal
import sys
import threading
from contextlib import contextmanager

import torch

from core.distributed import all_reduce_sum

CAUGHT = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Records the first signal; the training loop asks `requested()` between steps."""

    def __init__(self):
        self.signal = None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal == name:
            print(f"\n{name} again: exiting now; the last completed epoch's checkpoint stays", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        if self.signal is not None:
            print(f"\n{name}: already stopping after the current step ({self.signal})", file=sys.stderr, flush=True)
            return
        self.signal = name
        print(f"\n{name}: finishing the current step, then stopping (send it again to exit at once)",
              file=sys.stderr, flush=True)

    def requested(self, device=None) -> bool:
        """Whether to stop. Under torchrun (a `device` given) every rank must stop at the same
        step, so the flag is summed over the ranks: a collective, asked at the same step on
        every rank."""
        if device is None:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)], device=device)
        return all_reduce_sum(flag).item() > 0

    def interrupted(self, where: str) -> "Interrupted":
        return Interrupted(f"{self.signal} {where}", 128 + signal.Signals[self.signal].value)


class Interrupted(Exception):
    """Raised between steps after a stop signal; the trainer turns it into RunStopped."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def stop_on_signals():
    """A StopRequest fed by the CAUGHT signals for the duration (handlers can only
    be installed from the main thread; elsewhere the signals keep their default action)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {signum: signal.signal(signum, request.handle) for signum in CAUGHT}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
