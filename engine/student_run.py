"""A student distilled from one or more trained teachers with any registered method: its
configuration built from the flags (the teachers read, the weights, temperature, method label
and method options resolved), its task, and the run: what train_student.py runs.

    run = configure({**StudentConfig.defaults(), "model_s": "resnet8", "dataset": "digits", "epochs": 2})
    results = run.train()

Total loss: r * CE + a * KD + b * method (RepDistiller's -r/-a/-b); omitted weights take the
method's published defaults. Without path_t the best teacher of the data set under save_dir/
teachers is used. Several teachers (path_t a.pth,b.pth, any architectures) are loaded once; KD
(-a) learns from their ensemble (multi_teacher average, or camkd), the methods (-b) from the
teacher feature_teacher names.
"""
import argparse
from dataclasses import dataclass
from typing import Mapping

import distiller_zoo
from core.errors import UserError
from distiller_zoo.base import BuildContext
from distiller_zoo.multi_teacher import TeacherEnsemble, ensemble_weights
from distiller_zoo.objective import Objective, parse_objective
from distiller_zoo.recipe import compile_recipe
from distiller_zoo.temperature import LOGIT_STAND_T, temperature_from_args
from engine.args import split_paths
from engine.build import build_model, check_fits_dataset, check_model_name
from engine.config import StudentConfig, world_size
from engine.distill_task import DistillTask
from engine.programs import STUDENT
from engine.session import build_data, create_run_dir, sample_features, start
from engine.teacher import build_teacher, find_best_teacher, read_teacher
from engine.trainer import fit_task
from models.external import FeaturePaths


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """One argument group per method with options, from the registry. A flag declared by
    several methods (with the same type, default and help) is added once, under the first."""
    declared = {}
    for name, spec in sorted(distiller_zoo.METHODS.items()):
        new = [opt for opt in spec.options if opt.name not in declared]
        for opt in spec.options:
            if opt.name in declared and not opt.same_flag(declared[opt.name]):
                raise ValueError(f"--{opt.name} is declared differently by two methods")
        if not new:
            continue
        group = parser.add_argument_group(f"{name} ({spec.paper})")
        for opt in new:
            declared[opt.name] = opt
            help_text = opt.describe().replace("%(default)s", str(opt.default)) + f" (default: {opt.default})"
            kind = argparse.BooleanOptionalAction if opt.type is bool else None
            extra = {"action": kind} if kind else {"type": opt.type, "choices": opt.choices, "valid": opt.valid}
            group.add_argument(f"--{opt.name}", default=None, help=help_text, **extra)


@dataclass
class StudentRun:
    """A configured distillation: the configuration, its objective (the methods with their
    resolved weights and options) and the teachers' checkpoints, read once (in path_t's order)."""

    config: StudentConfig
    objective: Objective
    teacher_states: list

    def name(self) -> str:
        return run_name(self.config)

    def train(self, resume=False) -> dict:
        return train(self, resume)


def configure(flags: Mapping) -> StudentRun:
    """The run of a student's flag values (the parser's, or a run's args.json): every value the
    flags leave to the teachers, the methods or the other flags is resolved here, once."""
    flags, selections = apply_recipe(dict(flags))
    parse_objective(flags["distill"], flags["gamma"], flags["alpha"], flags["beta"], flags["logit_stand"])  # an unknown method first
    check_model_name(flags["model_s"], "--model_s")
    if flags["path_t"] is None:
        flags["path_t"] = str(find_best_teacher(flags["save_dir"], flags["dataset"]))
        print(f"no --path_t given: using the best {flags['dataset']} teacher, {flags['path_t']}")
    states, archs = read_teachers(flags)
    check_fits_dataset(flags["model_s"], flags["dataset"], "--model_s")
    kd_T = flags["kd_T"]
    if kd_T is None:
        kd_T = LOGIT_STAND_T if flags["logit_stand"] else 4.0
    if flags["kd_T_schedule"] != "constant" and flags["kd_T_end"] is None:
        raise UserError(f"--kd_T_schedule {flags['kd_T_schedule']} needs --kd_T_end, the temperature at the last epoch")
    check_dot(flags)
    gamma, alpha = flags["gamma"], flags["alpha"]
    if len(states) > 1:
        gamma, alpha = ensemble_weights(flags["multi_teacher"], gamma, alpha)
    pair = (archs[flags["feature_teacher"]], flags["model_s"])
    objective = parse_objective(flags["distill"], gamma, alpha, flags["beta"], flags["logit_stand"], pair, selections)
    options, sources = objective.resolve_options(flags, pair, flags.get("option_sources"))
    ensemble = f"+{flags['multi_teacher']}" if len(states) > 1 and objective.alpha else ""
    config = StudentConfig.from_dict({
        **flags, **options, "model_t": ",".join(archs), "gamma": objective.gamma, "alpha": objective.alpha,
        "kd_T": kd_T, "method": objective.name + ensemble + optimizer_label(flags),  # its own table row
        "beta_label": objective.beta_label, "option_sources": sources})
    return StudentRun(config, objective, states)


def apply_recipe(flags: dict):
    """(flags, stage selections by method) of a run with a recipe (`distiller`): the flags it
    compiles into, which the flags themselves may only repeat (a resumed run's args.json holds
    both); without one, the flags and no selection."""
    if flags.get("distiller") is None:
        return flags, {}
    compiled = compile_recipe(flags["distiller"])
    defaults = StudentConfig.defaults()
    for key, value in compiled.flags.items():
        given = flags.get(key)
        if given is not None and given != defaults.get(key) and given != value:
            raise UserError(f"--{key} {given} contradicts the recipe (--config's distiller:), which sets "
                            f"{key} to {value}; drop --{key}")
    return {**flags, **compiled.flags, "distiller": compiled.recipe}, compiled.stages


def read_teachers(flags: Mapping):
    """(checkpoints, architectures) of path_t's teachers, in order."""
    paths = split_paths(flags["path_t"])
    given = flags["model_t"].split(",") if flags["model_t"] else [None] * len(paths)
    if len(given) != len(paths):
        raise UserError(f"--model_t names {len(given)} architectures for {len(paths)} --path_t checkpoints; "
                        "give one per checkpoint, or none")
    if not 0 <= flags["feature_teacher"] < len(paths):
        raise UserError(f"--feature_teacher {flags['feature_teacher']} is not one of the {len(paths)} teachers "
                        f"(0 to {len(paths) - 1})")
    if len(paths) > 1 and flags["logit_stand"]:
        raise UserError("--logit_stand works with one teacher (the ensemble's soft targets are probabilities); "
                        "drop it or give one --path_t")
    read = [read_teacher(path, arch) for path, arch in zip(paths, given)]
    for _, arch in read:
        check_model_name(arch, "--model_t")
        check_fits_dataset(arch, flags["dataset"], "--model_t")
    return [state for state, _ in read], [arch for _, arch in read]


def optimizer_label(flags: Mapping) -> str:
    """What the method label says of an optimiser other than SGD: a run of its own (directory,
    table row), never mistaken for the SGD run of the same pair and trial."""
    if flags["dot"]:
        return "+dot"
    return "" if flags.get("optimizer", "sgd") == "sgd" else f"+{flags['optimizer']}"


def check_dot(flags: Mapping) -> None:
    """DOT differentiates the two shares of the loss itself (engine/dot.py), so fp16's loss
    scaling and DistributedDataParallel's gradient averaging, which hook into backward(), never
    see its gradients."""
    if not flags["dot"]:
        return
    if flags.get("optimizer", "sgd") != "sgd":
        raise UserError(f"--dot is a variant of SGD with momentum; drop --optimizer {flags['optimizer']} or --dot")
    if flags.get("clip_grad") is not None:
        raise UserError("--dot steps its two gradient shares itself and does not clip them; drop --clip_grad or --dot")
    if flags["amp"] == "fp16":
        raise UserError("--dot does not work with --amp fp16 (no loss scaling for DOT's gradients); "
                        "use --amp bf16 or --amp off")
    if world_size() > 1:
        raise UserError("--dot runs on one process (DDP would not average DOT's gradients); run it without torchrun")
    momentum, delta = flags["momentum"], flags["dot_delta"]
    if not (0 <= momentum - delta and momentum + delta < 1):
        raise UserError(f"--dot needs 0 <= --momentum - --dot_delta and --momentum + --dot_delta < 1 "
                        f"(got {momentum:g} and {delta:g})")


def run_name(config: StudentConfig) -> str:
    return (f"S-{config.model_s}_T-{config.model_t.replace(',', '+')}_{config.dataset}_{config.method}"
            f"_r{config.gamma:g}_a{config.alpha:g}_b{config.beta_label}_trial{config.trial}")


def build_task(run: StudentRun, ctx, train_loader, info) -> DistillTask:
    """The teachers, the student and every method's connectors (built on the first batch's features)."""
    config = run.config
    recipe = config.distiller is not None  # the module paths are its recorders (in error messages)
    features_t = FeaturePaths(config.feat_t, config.head_t, "t", recipe=recipe)  # the feature teacher's alone
    teachers = [build_teacher(state, arch, info.num_classes, path, config.dataset,
                              features_t if k == config.feature_teacher else None).to(ctx.device)
                for k, (state, arch, path) in enumerate(zip(run.teacher_states, config.teacher_archs,
                                                            split_paths(config.path_t)))]
    teacher = teachers.pop(config.feature_teacher)
    teacher_name = config.feature_pair[0]
    student = build_model(config.model_s, info.num_classes, config.dataset,
                          FeaturePaths(config.feat_s, config.head_s, "s", recipe=recipe), "--model_s").to(ctx.device)
    feat_s, feat_t = sample_features([student, teacher], train_loader, ctx.device)
    temperature = temperature_from_args(config)
    methods = []
    for term in run.objective.methods:
        seen_s, seen_t = term.stages(feat_s, feat_t)
        build = BuildContext(student=student, teacher=teacher, feat_s=seen_s, feat_t=seen_t, options=term.options,
                             n_train=info.n_train, num_classes=info.num_classes, student_name=config.model_s,
                             teacher_name=teacher_name, temperature=temperature, logit_stand=config.logit_stand,
                             weight_given=term.weight_source == "given", epochs=config.epochs)
        methods.append((term.spec.name, term.weight, term.spec.cls(build)))
    task = DistillTask(student, teacher, methods, config.gamma, config.alpha, run.objective.kd_term(temperature),
                       temperature, info.num_classes, init_lr=config.init_lr, base_lr=config.learning_rate,
                       kd_teachers=teachers, combine=TeacherEnsemble(temperature, config.multi_teacher),
                       stages={term.spec.name: term.stages for term in run.objective.methods})
    return task.to(ctx.device)


def build_run(run: StudentRun, ctx):
    """(train_loader, test_loader, info, task): the loaders the methods' data needs ask for, the
    networks and connectors."""
    train_loader, test_loader, info = build_data(run.config, ctx, run.objective.needs)
    return train_loader, test_loader, info, build_task(run, ctx, train_loader, info)


def describe(run: StudentRun) -> dict:
    """The run's record in results.json and TensorBoard's HParams."""
    c = run.config
    return {"method": c.method, "teacher": c.model_t, "path_t": c.path_t, "gamma": c.gamma,
            "alpha": c.alpha, "beta": c.beta_label, "kd_T": c.kd_T, "kd_T_schedule": c.kd_T_schedule,
            "logit_stand": c.logit_stand, "dot": c.dot, "multi_teacher": c.multi_teacher,
            "feature_teacher": c.feature_teacher,
            "methods": {term.spec.name: term.describe() for term in run.objective.methods}}


def train(run: StudentRun, resume=False) -> dict:
    """Distil the configured student; `resume` is the run directory to go on with (or False)."""
    config = run.config
    ctx, run_dir = start(config, STUDENT.kind, run_name, resume)
    train_loader, test_loader, info, task = build_run(run, ctx)
    if ctx.is_main:
        for term in run.objective.methods:
            print(term.describe(), flush=True)
    create_run_dir(config, ctx, run_dir, resume)
    results = fit_task(config, ctx, run_dir, resume, task, config.model_s, train_loader, test_loader,
                       describe=describe(run))
    if ctx.is_main:
        print(f"{config.method}: {config.model_t} -> {config.model_s} on {config.dataset}: best top-1 "
              f"{results['best_top1']:.2f} (epoch {results['best_epoch']}), last {results['last_top1']:.2f}; "
              f"run directory {run_dir}")
    return results
