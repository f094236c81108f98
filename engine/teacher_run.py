"""A network trained from scratch with cross-entropy (a teacher, or a vanilla student of the
published tables), run from its configuration: what train_teacher.py runs.

    from engine.config import TeacherConfig
    from engine.teacher_run import train
    results = train(TeacherConfig(model="resnet8", dataset="digits", epochs=2))
"""
from engine.build import build_model
from engine.config import TeacherConfig
from engine.programs import TEACHER
from engine.session import build_data, create_run_dir, start
from engine.task import SupervisedTask
from engine.trainer import fit_task


def run_name(config: TeacherConfig) -> str:
    return f"{config.model}_{config.dataset}_trial{config.trial}"


def train(config: TeacherConfig, resume=False) -> dict:
    """Train the configured network; `resume` is the run directory to go on with (or False).
    Returns results.json's content."""
    ctx, run_dir = start(config, TEACHER.kind, run_name, resume)
    train_loader, test_loader, info = build_data(config, ctx)
    model = build_model(config.model, info.num_classes, config.dataset).to(ctx.device)
    task = SupervisedTask(model, info.num_classes)
    create_run_dir(config, ctx, run_dir, resume)
    results = fit_task(config, ctx, run_dir, resume, task, config.model, train_loader, test_loader,
                       describe={"method": "vanilla"})
    if ctx.is_main:
        print(f"{config.model} on {config.dataset}: best top-1 {results['best_top1']:.2f} "
              f"(epoch {results['best_epoch']}), last {results['last_top1']:.2f}; run directory {run_dir}")
    return results
