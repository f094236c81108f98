"""Choosing the checkpoint a run resumes from: ckpt_last.pth, or, when that is unreadable, not
a resume checkpoint (RepDistiller's format has no training position) or holds another
architecture, the newest good ckpt_epoch_<k>.pth, saying which. A resume with another number
of processes is allowed but said: the effective batch and the data order change. So is a
checkpoint written before the trainer reseeded the global generators every epoch: a network
that draws random numbers in training (dropout, drop-path) then resumes onto other draws."""
import sys
from pathlib import Path

from torch import nn

from core.errors import UserError
from engine import runs
from engine.checkpoint import load_checkpoint, misfit

RESUME_KEYS = ("model", "stage", "epoch", "rows", "optimizer", "best_acc")
EPOCH_SEEDED = "epoch_seeded"  # the checkpoint's epochs drew from generators seeded by (seed, epoch, rank)


def load_resume_state(run_dir: Path, world_size: int, batch_size: int, model: nn.Module,
                      model_name: str) -> dict:
    problems = []
    for path in runs.checkpoints(run_dir):
        try:
            state = load_checkpoint(path)
        except UserError as err:
            problems.append(str(err))
            continue
        missing = [k for k in RESUME_KEYS if k not in state]
        if missing:
            problems.append(f"{path.name} has no {', '.join(missing)} (not a resume checkpoint of this code, "
                            "e.g. RepDistiller's format)")
            continue
        wrong = misfit(model, state["model"])
        if wrong:
            problems.append(f"{path.name} does not fit architecture {model_name} ({wrong})")
            continue
        if problems:
            print(f"warning: {'; '.join(problems)}; resuming from {path.name} "
                  f"({state['stage']} epoch {state['epoch']}) instead", file=sys.stderr)
        warn_on_new_world_size(state.get("world_size", 1), world_size, batch_size)
        if not state.get(EPOCH_SEEDED, False):
            print(f"warning: {path.name} predates the per-epoch seeding of the random generators; if the network "
                  "draws random numbers in training (dropout, drop-path), the resumed run will not end bit-identical "
                  "to an uninterrupted one", file=sys.stderr)
        return state
    found = "; ".join(problems) or "no checkpoint"
    raise UserError(f"cannot resume {run_dir}: {found}; move the checkpoints away to start the run again")


def warn_on_new_world_size(before: int, now: int, batch_size: int) -> None:
    if before == now:
        return
    print(f"warning: this run was checkpointed with {before} process(es), effective batch {before * batch_size}; "
          f"resumed with {now}, it trains on with an effective batch of {now * batch_size} per step and another "
          "data order, so it will not end as the original would have", file=sys.stderr)
