"""Start-up shared by the programs: the run configuration (restored on --resume), device,
seeds, the run directory and its args.json."""
import argparse
import sys
from pathlib import Path
from typing import Callable, Tuple

import torch

from core.distributed import barrier, setup
from core.seeding import seed_everything
from dataset.loaders import build_loaders
from distiller_zoo.options import DataNeeds
from engine import programs, runs
from engine.config import NOT_STORED, RunConfig
from engine.lock import lock_run_dir
from engine.loop import move_batch
from engine.precision import set_threads

# Flags that say how to run, not what to compute: on --resume the command line's values win,
# those of KEPT_UNLESS_GIVEN only where the command line gives them (else the run keeps its own).
# Any other flag the command line gives is ignored on --resume, and named in a warning.
EXECUTION_FLAGS = ("device", "num_workers", "print_freq", "data_folder", "download", "save_dir",
                   "auto_resume", "amp", "channels_last", "compile", "threads", "skip_bad_images")
KEPT_UNLESS_GIVEN = ("amp", "channels_last", "compile", "threads", "data_folder", "skip_bad_images")
# what a run cannot be resumed without; a flag added to the code after a run started takes its default
REQUIRED = ("dataset", "epochs", "batch_size", "learning_rate", "lr_decay_epochs", "seed", "trial")


def configure(args: argparse.Namespace, kind: str, build: Callable[[dict], RunConfig],
              default_name: Callable[[RunConfig], str]) -> Tuple[RunConfig, object]:
    """(configuration, resume) of a parsed command line: `build(flags)` makes the configuration
    of flag values, `default_name(config)` names a new run's directory. On --resume (or
    --auto_resume of an interrupted run) the run's stored flags win over the command line's,
    except how to run; `resume` is then the run's directory, or False where it has no checkpoint
    to go on from (it starts again from scratch)."""
    flags = {k: v for k, v in vars(args).items() if k not in NOT_STORED}
    resume = args.resume
    if args.auto_resume and not resume:
        resume = resume_if_interrupted(Path(args.save_dir) / kind / (args.run_name or runs.dir_name(default_name(build(flags)))))
    if not resume:
        return build(flags), False
    by_directory = isinstance(resume, str)  # a run directory needs no name
    run_dir = runs.locate_run_dir(kind, "" if by_directory else default_name(build(flags)),
                                  args.save_dir, args.run_name, resume)
    config = build(restored_flags(args, flags, kind, run_dir))
    return config, run_dir if runs.checkpoints(run_dir) else False


def restored_flags(args: argparse.Namespace, flags: dict, kind: str, run_dir: Path) -> dict:
    """The run's stored flags, with the command line's execution flags."""
    stored = runs.load_run_args(run_dir, REQUIRED + (programs.BY_KIND[kind].trained,))
    command_line = set(getattr(args, "command_line", flags))
    warn_ignored(args, stored, command_line, run_dir)
    given = {k: flags[k] for k in EXECUTION_FLAGS if k not in KEPT_UNLESS_GIVEN or k in command_line}
    return {**flags, **stored, **given, "run_name": run_dir.name, "save_dir": str(run_dir.parent.parent)}


def warn_ignored(args, stored: dict, command_line: set, run_dir: Path) -> None:
    """One warning line naming the flags given with --resume that the run's stored values
    override (what a resume computes is the run's, not the command line's)."""
    ignored = [f"--{k} {getattr(args, k)} (the run's: {stored[k]})" for k in sorted(command_line)
               if k not in EXECUTION_FLAGS and k in stored and getattr(args, k) != stored[k]]
    if ignored:
        print(f"warning: resuming {run_dir} with its own arguments; ignored: {', '.join(ignored)}; "
              "start a new run (another --trial or --run_name) to change them", file=sys.stderr)


def resume_if_interrupted(run_dir: Path) -> bool:
    """--auto_resume: True when the run has a checkpoint to continue from; a finished run
    ends the process here with status 0, so a table script moves on. A finished run whose
    results.json is unreadable is resumed: its last checkpoint and metrics.csv write it again."""
    results = run_dir / runs.RESULTS_FILE
    if results.is_file() and runs.read_results(results) is not None:
        runs.tell_launcher(run_dir)
        print(f"finished already, skipped: {run_dir}")
        sys.exit(0)
    return bool(runs.checkpoints(run_dir))


def start(config: RunConfig, kind: str, default_name: Callable[[RunConfig], str], resume=False):
    """Returns (ctx, run_dir): threads, the process group, the seeds, and the run's directory
    (`resume`'s, else named by `default_name(config)`), which `create_run_dir` makes once the
    data and networks are known to be usable."""
    set_threads(config.threads)
    ctx = setup(config.device)
    seed_everything(config.seed, config.deterministic)
    run_dir = runs.locate_run_dir(kind, default_name(config), config.save_dir, config.run_name, resume)
    if not resume and (run_dir / runs.ARGS_FILE).exists() and ctx.is_main:
        print(f"{run_dir} never reached its first checkpoint: starting it again from scratch")
    return ctx, run_dir


def create_run_dir(config: RunConfig, ctx, run_dir: Path, resume=False) -> None:
    """Take the run directory for this process (rank 0), check it again now that no other
    process can change it, and give a new run its args.json (the configuration); a run that
    never checkpointed first loses what its earlier start logged."""
    barrier()
    if ctx.is_main:
        lock_run_dir(run_dir)
        runs.tell_launcher(run_dir)
        runs.check_run_dir(run_dir, bool(resume))
    if ctx.is_main and not resume:
        runs.clear_unfinished(run_dir)
        runs.write_json(Path(run_dir) / runs.ARGS_FILE, config.to_dict())


def build_data(config: RunConfig, ctx, needs: DataNeeds = DataNeeds()):
    """(train_loader, test_loader, info), the training batches carrying what `needs` asks
    (the active methods' data needs: contrastive negatives, a strong second view, rotated views)."""
    return build_loaders(config.dataset, config.data_folder, config.batch_size, loader=config.loader,
                         device=ctx.device, num_workers=config.num_workers, seed=config.seed,
                         download=config.download, contrast=needs.contrast, rank=ctx.rank,
                         world_size=ctx.world_size, channels_last=False, strong_view=needs.strong_view,
                         rotations=needs.rotations, skip_bad_images=config.skip_bad_images)


@torch.no_grad()
def sample_features(networks, loader, device) -> list:
    """Each network's Features of the first training batch (its weak views, when the batch also
    carries strong ones), taken in eval mode so that no BatchNorm statistic moves: what the
    methods build their connectors from."""
    loader.set_epoch(0)
    images, targets, *_ = move_batch(next(iter(loader)), device, False)
    images = images[:targets.shape[0]]
    feats = []
    for network in networks:
        was_training = network.training
        feats.append(network.eval().forward_features(images))
        network.train(was_training)
    return feats
