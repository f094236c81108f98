"""The training driver every program shares (teachers, students, mutual learning, self-
distillation, QAT), in two steps: `prepare` (resume state, execution choice, channels_last,
compile, gradient scaler, DistributedDataParallel wrapping) and `Trainer(...).fit()` (stages,
epochs, evaluation, checkpoints, logging and the final results file). Both read the run's
configuration (engine/config.py).

A *task* is an nn.Module whose forward(images, targets, indices, ...) returns
(loss terms, logits); terms['loss'] is what is minimised. It owns the trained
network as `task.model` and may declare init stages (e.g. FT's paraphraser)
that run before the main training. The trainer knows no method by name.

A task may also train *side networks* besides `task.model` (the peers of mutual learning):
each is evaluated every epoch (metrics `test_top1_<name>`, ...) and keeps its own best
checkpoint, `<run>/<name>/best.pth`, in the format of `best.pth`.

What is evaluated and counted is `task.deployed_network()`: `task.model`, or, when a method's
head replaces the student's classifier (SimKD), the student with that head; the checkpoints
then hold the head under 'head' beside the student's weights under 'model', and
engine/teacher.py's `build_teacher` rebuilds the same network from them.

Every epoch starts by reseeding the global random generators (Python's, numpy's, torch's on the
CPU and CUDA) from (seed, epoch, rank) alone, so what the networks draw in training (dropout,
drop-path) does not depend on the epochs before: a resumed run draws what the uninterrupted one
drew, and each rank draws its own masks (docs/design.md, "Epoch seeds").
"""
import inspect
import shlex
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from core.distributed import average_buffers, broadcast_from_main
from core.errors import RunStopped
from core.seeding import determinism_line, seed_generators
from dataset.order import NETWORK_STREAM, mix_seed
from engine import programs, runs
from engine.checkpoint import save_checkpoint
from engine.loop import NonFiniteLoss, evaluate, train_epoch
from engine.metrics_log import MAIN_STAGE, MetricsLog
from engine.optim import build_optimizer, lr_at, set_lr
from engine.precision import Execution, grad_scaler, resolve_execution
from engine.progress import run_line
from engine.resume import EPOCH_SEEDED, load_resume_state
from engine.signals import Interrupted, stop_on_signals


@dataclass
class Stage:
    """A phase of training with its own optimiser over its own parameters."""

    name: str
    epochs: int
    module: nn.Module          # forward(images, targets, indices, ...) -> (terms, logits or None)
    params: List[nn.Parameter]
    evaluate: bool = True      # evaluate task.deployed_network() after every epoch
    constant_lr: Optional[float] = None  # None: the step-decay schedule; init stages use a constant lr
    lr_milestones: Tuple[int, ...] = ()  # with constant_lr: x0.1 after each of these epochs

    def lr(self, epoch: int, config) -> float:
        if self.constant_lr is None:
            return lr_at(epoch, config)
        return self.constant_lr * 0.1 ** sum(epoch > m for m in self.lr_milestones)


@dataclass
class Prepared:
    """How a task runs, chosen once before training (`prepare`): the precision and memory
    format, the gradient scaler, the resume state, and the DistributedDataParallel wrappers."""

    execution: Execution
    scaler: torch.amp.GradScaler
    ctx: object
    resume_state: Optional[dict] = None
    _ddp: dict = field(default_factory=dict)

    @property
    def amp_dtype(self):
        return self.execution.amp_dtype

    @property
    def channels_last(self) -> bool:
        return self.execution.channels_last

    def wrap(self, task, module: nn.Module, params) -> nn.Module:
        """`module` under DistributedDataParallel when running under torchrun; one wrapper per
        module, kept here (as a submodule of what it wraps it would form a cycle). DDP looks for
        unused parameters only where the stage has some (the task says). A stage's wrapper is
        made when it starts, not before: an init stage shares the student's parameters with the
        main stage, and two live wrappers would both hook them."""
        if not self.ctx.distributed:
            return module
        if id(module) not in self._ddp:
            unused = task.has_unused_parameters(module, params)
            self._ddp[id(module)] = wrap_ddp(module, self.ctx.device, find_unused_parameters=unused)
        return self._ddp[id(module)]

    def unwrap(self, module: nn.Module) -> None:
        """Drop a finished stage's wrapper, its gradient buckets and its hooks on the parameters."""
        self._ddp.pop(id(module), None)


def prepare(config, ctx, task, train_loader, run_dir: Optional[Path] = None, resume=False,
            model_name: Optional[str] = None) -> Prepared:
    """Make `task` ready to train under `config` (engine/config.py) on `ctx`'s device: on a
    resume, the run's last good checkpoint is read first (`run_dir`, `model_name`); the precision
    and memory format are the run's recorded ones, else chosen (every rank runs rank 0's
    choice, a measurement on a CPU); channels_last and torch.compile are applied, and the
    gradient scaler made. What the benchmark scripts time is this preparation's result."""
    resume_state = (load_resume_state(run_dir, ctx.world_size, config.batch_size, task.model, model_name)
                    if resume else None)
    recorded = (resume_state or {}).get("execution")
    execution = Execution.recorded(recorded) if recorded else broadcast_from_main(resolve_execution(
        config.amp, config.channels_last, ctx.device, task.model, task.frozen_networks(),
        lambda: first_batch_shape(train_loader)))
    if ctx.is_main and run_dir is not None:
        run_line(Path(run_dir).name, f"execution: {ctx.device}, {torch.get_num_threads()} threads, "
                                     f"{execution.describe()}")
        if config.deterministic:
            run_line(Path(run_dir).name, determinism_line())
    if execution.channels_last:
        task.to(memory_format=torch.channels_last)
    if config.compile:
        task.compile_networks()
    return Prepared(execution, grad_scaler(ctx.device, execution.amp_dtype), ctx, resume_state)


class Trainer:
    """Runs a prepared task: `Trainer(config, ctx, run_dir, task, model_name, loaders,
    prepare(...)).fit()` trains the stages, evaluates, checkpoints and writes results.json."""

    def __init__(self, config, ctx, run_dir: Path, task, model_name: str, train_loader, test_loader,
                 prepared: Prepared, describe: Optional[dict] = None):
        self.config, self.ctx, self.run_dir, self.task = config, ctx, Path(run_dir), task
        self.model_name = model_name
        self.train_loader, self.test_loader = train_loader, test_loader
        self.describe = describe or {}
        self.prepared, self.resume_state, self.execution = prepared, prepared.resume_state, prepared.execution
        self.amp_dtype, self.channels_last, self.scaler = prepared.amp_dtype, prepared.channels_last, prepared.scaler
        self.best_acc, self.best_epoch, self.elapsed = 0.0, 0, 0.0
        self.side = task.side_networks()  # name -> (architecture, network)
        self.side_best = {name: 0.0 for name in self.side}
        self.position = {"stage": None, "epoch": 0, "rows": 0}
        self.saved = None  # (stage, epoch) of the checkpoint on disk
        if self.resume_state is not None:
            self._restore(self.resume_state)
        self.log = MetricsLog(self.run_dir, self.position if self.resume_state is not None else None,
                              enabled=ctx.is_main)

    # --- resume -----------------------------------------------------------------------------
    def _restore(self, state: dict) -> None:
        self.task.model.load_state_dict(state["model"])
        self.task.load_extra_state(state.get("extra", {}))
        self.best_acc, self.best_epoch = state["best_acc"], state.get("best_epoch", 0)
        self.elapsed = state.get("elapsed", 0.0)
        self.side_best.update(state.get("side_best", {}))
        self.position = {"stage": state["stage"], "epoch": state["epoch"], "rows": state["rows"]}
        self.saved = (state["stage"], state["epoch"])
        if self.ctx.is_main:
            run_line(self.run_dir.name, f"resuming {self.run_dir} after {state['stage']} epoch {state['epoch']}")

    def _start_epoch(self, stage_index: int, stages: List[Stage], optimizer) -> int:
        """First epoch to run in this stage (0 past the end means skip it)."""
        if self.resume_state is None:
            return 1
        names = [s.name for s in stages]
        resumed = names.index(self.resume_state["stage"])
        if stage_index < resumed:
            return stages[stage_index].epochs + 1
        if stage_index == resumed:
            optimizer.load_state_dict(self.resume_state["optimizer"])
            if "scaler" in self.resume_state:
                self.scaler.load_state_dict(self.resume_state["scaler"])
            return self.resume_state["epoch"] + 1
        return 1

    # --- the run ----------------------------------------------------------------------------
    def fit(self) -> dict:
        with stop_on_signals() as self.stop, self._stopping_cleanly():
            self._train_stages()
        return self._finish()

    def _train_stages(self) -> None:
        stages = self.task.init_stages() + [
            Stage(MAIN_STAGE, self.config.epochs, self.task, self.task.main_parameters(),
                  constant_lr=self.task.main_constant_lr())]
        epoch_offset = 0
        for index, stage in enumerate(stages):
            optimizer = build_optimizer(stage.params, self.config, self.ctx.device, stage.name == MAIN_STAGE)
            first = self._start_epoch(index, stages, optimizer)
            for epoch in range(first, stage.epochs + 1):
                self._run_epoch(stage, epoch, epoch_offset + epoch, optimizer)
            self.prepared.unwrap(stage.module)
            epoch_offset += stage.epochs

    def _run_epoch(self, stage: Stage, epoch: int, global_epoch: int, optimizer) -> None:
        seed_epoch(self.config.seed, global_epoch, self.ctx.rank)
        lr = stage.lr(epoch, self.config)
        set_lr(optimizer, lr)
        self.train_loader.set_epoch(global_epoch)
        if stage.name == MAIN_STAGE:
            self.task.set_epoch(epoch)
        module = self.prepared.wrap(self.task, stage.module, stage.params)
        module.train()
        self.task.keep_frozen_in_eval()
        desc = f"{stage.name} {epoch}/{stage.epochs}"
        metrics = train_epoch(module, self.train_loader, optimizer, self.scaler, device=self.ctx.device,
                              amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                              print_freq=self.config.print_freq, desc=desc,
                              show_progress=self.ctx.is_main, with_accuracy=stage.evaluate, run=self.run_dir.name,
                              stop=self.stop, clip_grad=self.config.clip_grad if stage.name == MAIN_STAGE else None)
        average_buffers(self.task.deployed_network())
        for _, network in self.side.values():
            average_buffers(network)
        improved_side = []
        if stage.evaluate:
            metrics.update(self._evaluate(self.task.deployed_network()))
            improved_side = self._evaluate_side(metrics)
        metrics["lr"] = lr
        metrics.update(self.task.epoch_metrics())
        self.elapsed += metrics["epoch_time"]
        improved = stage.name == MAIN_STAGE and metrics["test_top1"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = metrics["test_top1"], epoch
        self.last_metrics = metrics
        if self.ctx.is_main:
            self.log.log_epoch(stage.name, epoch, metrics)
            run_line(self.run_dir.name, summary_line(desc, metrics, self.best_acc if stage.name == MAIN_STAGE else None))
            self._save(stage, epoch, optimizer, improved)
            self._save_side(epoch, improved_side if stage.name == MAIN_STAGE else [])
        if self.stop.requested(self.ctx.device if self.ctx.distributed else None):
            raise self.stop.interrupted(f"during {desc}, after its checkpoint")

    def _evaluate(self, network: nn.Module) -> dict:
        # in full precision whatever the training precision, so the accuracy recorded is the
        # one evaluate.py (and RepDistiller) measure on the saved weights
        with self.task.evaluating():
            return evaluate(network, self.test_loader, device=self.ctx.device, amp_dtype=None,
                            channels_last=self.channels_last)

    def _evaluate_side(self, metrics: dict) -> list:
        """Adds each side network's test figures to `metrics`; returns the names whose top-1
        improved on their best. A side network that is task.model reuses its figures."""
        improved = []
        for name, (_, network) in self.side.items():
            scores = metrics if network is self.task.model else self._evaluate(network)
            metrics.update({f"{key}_{name}": scores[key] for key in ("test_top1", "test_top5", "test_loss")})
            if scores["test_top1"] > self.side_best[name]:
                self.side_best[name] = scores["test_top1"]
                improved.append(name)
        return improved

    # --- stopping early ----------------------------------------------------------------------
    @contextmanager
    def _stopping_cleanly(self):
        """A stop signal or a non-finite loss ends the run with one line: what is on disk
        and the command that goes on."""
        try:
            yield
        except Interrupted as stop:
            raise RunStopped(f"{stop}; {self._kept()}; go on with: {self._resume_command()}",
                             stop.exit_code) from None
        except NonFiniteLoss as err:
            raise RunStopped(f"{err}; {self._kept()}", 1) from None

    def _kept(self) -> str:
        if self.saved is None:
            return f"no checkpoint was written yet, so {self.run_dir} can start again from scratch"
        stage, epoch = self.saved
        return f"{self.run_dir / runs.LAST_CKPT} keeps {stage} epoch {epoch}, later steps are redone"

    def _resume_command(self) -> str:
        entry = programs.BY_KIND.get(self.run_dir.parent.name, programs.STUDENT).script
        launcher = f"torchrun --nproc_per_node {self.ctx.world_size}" if self.ctx.distributed else "python"
        return f"{launcher} {entry} --resume {shlex.quote(str(self.run_dir))}"

    # --- files ------------------------------------------------------------------------------
    def _identity(self) -> dict:
        identity = {"arch": self.model_name, "num_classes": self.task.num_classes, "dataset": self.config.dataset}
        head = self.task.deployed_record()
        return identity if head is None else {**identity, "head": head}

    def _save(self, stage: Stage, epoch: int, optimizer, improved: bool) -> None:
        state = {"model": self.task.model_state(), "epoch": epoch, "stage": stage.name,
                 "best_acc": self.best_acc, "best_epoch": self.best_epoch, "optimizer": optimizer.state_dict(),
                 "extra": self.task.extra_state(), "rows": self.log.rows, "elapsed": self.elapsed,
                 "seed": self.config.seed, "world_size": self.ctx.world_size, "side_best": self.side_best,
                 "execution": self.execution.record(), "skipped_images": self._skipped_images(),
                 EPOCH_SEEDED: True, **self._identity()}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        save_checkpoint(state, self.run_dir / runs.LAST_CKPT)
        self.saved = (stage.name, epoch)
        if improved:
            save_checkpoint({"model": state["model"], "epoch": epoch, "best_acc": self.best_acc,
                             **self._identity()}, self.run_dir / runs.BEST_CKPT)
        if stage.name == MAIN_STAGE and self.config.save_freq > 0 and epoch % self.config.save_freq == 0:
            # the full state, so a run whose ckpt_last.pth is damaged can resume from it
            save_checkpoint({**state, "accuracy": self.last_metrics["test_top1"]},
                            self.run_dir / f"ckpt_epoch_{epoch}.pth")

    def _skipped_images(self) -> list:
        """The unreadable image files skipped so far (--skip_bad_images), this start's and, on a
        resume, those the checkpoint records."""
        skipped = set(self.resume_state.get("skipped_images", [])) if self.resume_state else set()
        for loader in (self.train_loader, self.test_loader):
            bad_images = getattr(loader, "bad_images", None)
            skipped.update(bad_images.seen if bad_images is not None else ())
        return sorted(skipped)

    def _save_side(self, epoch: int, improved: list) -> None:
        for name in improved:
            arch, network = self.side[name]
            (self.run_dir / name).mkdir(exist_ok=True)
            save_checkpoint({"model": network.state_dict(), "epoch": epoch, "best_acc": self.side_best[name],
                             "arch": arch, "num_classes": self.task.num_classes, "dataset": self.config.dataset},
                            self.run_dir / name / runs.BEST_CKPT)

    def _finish(self) -> dict:
        last = getattr(self, "last_metrics", None) or self.log.last_evaluation()
        results = {
            "run_name": self.run_dir.name, "model": self.model_name, "dataset": self.config.dataset,
            "trial": self.config.trial,
            "seed": self.config.seed, "epochs": self.config.epochs,
            "best_top1": self.best_acc, "best_epoch": self.best_epoch,
            "last_top1": last["test_top1"], "last_top5": last["test_top5"],
            "params": sum(p.numel() for p in self.task.deployed_network().parameters()),
            "wall_time_s": round(self.elapsed, 2), "code_version": runs.code_version(),
            "world_size": self.ctx.world_size, "effective_batch": self.ctx.world_size * self.config.batch_size,
            "skipped_images": len(self._skipped_images()),
            **{f"best_top1_{name}": best for name, best in self.side_best.items()},
            **self.describe,
        }
        if self.ctx.is_main:
            runs.write_json(self.run_dir / runs.RESULTS_FILE, results)
            self.log.log_hparams(hparam_record(self.config, self.model_name, self.describe),
                                 {"best_top1": results["best_top1"], "last_top1": results["last_top1"]})
            self.log.close()
        return results


def hparam_record(config, model_name: str, describe: dict) -> dict:
    """The same columns for every run, teacher or student, so TensorBoard's HParams view (which
    takes its columns from one run) compares them all: a network trained from labels alone is a
    'vanilla' student with no teacher and no KD temperature."""
    return {"student": model_name, "teacher": str(describe.get("teacher", "none")),
            "method": str(describe.get("method", "vanilla")), "gamma": float(describe.get("gamma", 1.0)),
            "alpha": float(describe.get("alpha", 0.0)), "beta": str(describe.get("beta", "0")),
            "kd_T": float(describe.get("kd_T", float("nan"))), "dataset": config.dataset,
            "epochs": config.epochs, "seed": config.seed, "trial": str(config.trial), "batch_size": config.batch_size,
            "lr": config.learning_rate}


def seed_epoch(seed: int, global_epoch: int, rank: int) -> None:
    """The global generators for one epoch of one rank (init stages count in `global_epoch`)."""
    seed_generators(mix_seed(seed, global_epoch, rank, NETWORK_STREAM))


def first_batch_shape(loader) -> tuple:
    """The image shape of the first training batch (what the speed probe times)."""
    loader.set_epoch(0)
    with torch.random.fork_rng(devices=[]):
        return tuple(next(iter(loader))[0].shape)


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = True) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    # Buffers (BN statistics, CRD's memory bank) start equal (every rank builds them from the
    # same seed) and are not synchronised before every forward: every rank applies the same
    # gathered updates to the memory bank, so that would only cost time, and the trainer
    # averages BN statistics before evaluating. Newer torch calls this forward_sync_buffers and
    # deprecates broadcast_buffers.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        no_forward_sync = {"forward_sync_buffers": False}
    else:
        no_forward_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters,
                                   **no_forward_sync)


def summary_line(desc: str, metrics: dict, best: Optional[float]) -> str:
    terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in metrics.items()
                     if k.startswith("train_") and k not in ("train_top1", "train_top5"))
    parts = [desc, f"lr {metrics['lr']:.4g}", terms]
    if "train_top1" in metrics:
        parts.append(f"train top1 {metrics['train_top1']:.2f}")
    if "test_top1" in metrics:
        parts.append(f"test top1 {metrics['test_top1']:.2f} top5 {metrics['test_top5']:.2f}")
    if best is not None:
        parts.append(f"best {best:.2f}")
    parts.append(f"{metrics['epoch_time']:.1f}s {metrics['images_per_s']:.0f} img/s")
    return " | ".join(parts)


def fit_task(config, ctx, run_dir: Path, resume, task, model_name: str, train_loader, test_loader,
             describe: Optional[dict] = None) -> dict:
    """How every training program runs its task: `prepare`, then the trainer's `fit`; the results."""
    prepared = prepare(config, ctx, task, train_loader, run_dir, resume, model_name)
    return Trainer(config, ctx, run_dir, task, model_name, train_loader, test_loader, prepared,
                   describe=describe).fit()
