"""Start-up shared by the entry points: arguments (restored on --resume), device,
seeds, the run directory and its args.json."""
import argparse
import sys
from pathlib import Path

import torch

from core.distributed import barrier, setup
from core.seeding import seed_everything
from dataset.loaders import build_loaders
from distiller_zoo.options import DataNeeds
from engine import programs, runs
from engine.args import finalize_common_args
from engine.lock import lock_run_dir
from engine.loop import move_batch
from engine.precision import set_threads

# Flags that say how to run, not what to compute: on --resume the command line's values win,
# those of KEPT_UNLESS_GIVEN only where the command line gives them (else the run keeps its own).
# Any other flag the command line gives is ignored on --resume, and named in a warning.
EXECUTION_FLAGS = ("device", "num_workers", "print_freq", "data_folder", "download", "resume", "save_dir",
                   "auto_resume", "amp", "channels_last", "compile", "threads", "skip_bad_images")
KEPT_UNLESS_GIVEN = ("amp", "channels_last", "compile", "threads", "data_folder", "skip_bad_images")
# derived at start-up, never stored in args.json
UNSTORED = ("resume", "command_line")
# what a run cannot be resumed without; a flag added to the code after a run started takes its default
REQUIRED = ("dataset", "epochs", "batch_size", "learning_rate", "lr_decay_epochs", "seed", "trial")


def restore_args(args: argparse.Namespace, kind: str, default_name) -> argparse.Namespace:
    """On --resume, the run's stored arguments win over the command line, except how to run."""
    by_directory = isinstance(args.resume, str)  # a run directory needs no name
    run_dir = runs.locate_run_dir(args, kind, "" if by_directory else default_name(args))
    stored = runs.load_run_args(run_dir, REQUIRED + (programs.BY_KIND[kind].trained,))
    command_line = set(getattr(args, "command_line", vars(args)))
    warn_ignored(args, stored, command_line, run_dir)
    given = {k: getattr(args, k) for k in EXECUTION_FLAGS if k not in KEPT_UNLESS_GIVEN or k in command_line}
    merged = argparse.Namespace(**{**vars(args), **stored, **given})
    merged.run_name = run_dir.name
    merged.save_dir = str(run_dir.parent.parent)
    return merged


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


def start(args: argparse.Namespace, kind: str, trained_model, default_name):
    """Returns (args, ctx, run_dir). `default_name(args)` names a new run's directory, which
    `create_run_dir` makes once the data and networks are known to be usable."""
    if args.auto_resume and not args.resume:
        args.resume = resume_if_interrupted(Path(args.save_dir) / kind / (args.run_name or runs.dir_name(default_name(args))))
    if args.resume:
        args = restore_args(args, kind, default_name)
        args.resume = args.resume if runs.checkpoints(resumed_dir(args, kind)) else False
    else:
        args = finalize_common_args(args, trained_model(args))
    set_threads(args.threads)
    ctx = setup(args.device)
    seed_everything(args.seed, args.deterministic)
    run_dir = runs.locate_run_dir(args, kind, default_name(args))
    if not args.resume and (run_dir / runs.ARGS_FILE).exists() and ctx.is_main:
        print(f"{run_dir} never reached its first checkpoint: starting it again from scratch")
    args.world_size, args.effective_batch = ctx.world_size, ctx.world_size * args.batch_size
    return args, ctx, run_dir


def resumed_dir(args, kind: str) -> Path:
    """The directory of a restored run (restore_args names it by save_dir and run_name)."""
    return Path(args.save_dir) / kind / args.run_name


def create_run_dir(args, ctx, run_dir: Path) -> None:
    """Take the run directory for this process (rank 0), check it again now that no other
    process can change it, and give a new run its args.json; a run that never checkpointed
    first loses what its earlier start logged."""
    barrier()
    if ctx.is_main:
        lock_run_dir(run_dir)
        runs.tell_launcher(run_dir)
        runs.check_run_dir(run_dir, bool(args.resume))
    if ctx.is_main and not args.resume:
        runs.clear_unfinished(run_dir)
        runs.write_json(Path(run_dir) / runs.ARGS_FILE, {k: v for k, v in vars(args).items() if k not in UNSTORED})


def build_data(args, ctx, needs: DataNeeds = DataNeeds()):
    """(train_loader, test_loader, info), the training batches carrying what `needs` asks
    (the active methods' data needs: contrastive negatives, a strong second view, rotated views)."""
    return build_loaders(args.dataset, args.data_folder, args.batch_size, loader=args.loader,
                         device=ctx.device, num_workers=args.num_workers, seed=args.seed,
                         download=args.download, contrast=needs.contrast, rank=ctx.rank,
                         world_size=ctx.world_size, channels_last=False, strong_view=needs.strong_view,
                         rotations=needs.rotations, skip_bad_images=bool(args.skip_bad_images))


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
