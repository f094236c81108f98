"""The run configuration: what a run computes, typed and frozen, built once by each program from
its flags, a --config file or a run's args.json, and exactly what args.json stores.

    config = TeacherConfig(model="resnet8", dataset="digits", epochs=2)    # no argparse needed
    config.learning_rate, config.lr_decay_epochs     # 0.05, [1, 2, 2]: resolved when built
    TeacherConfig.from_dict(config.to_dict()) == config

A field left at None where the flag's default depends on other flags (epochs, batch size,
learning rate, milestones, weight decay: RepDistiller's defaults, or the ImageNet recipe of
engine/recipe.py; the seed from the trial) is resolved when the configuration is built, never
written in later. So are the values derived from the process group (world_size,
effective_batch). A program's own derived values (a student's teacher architectures, loss
weights, method label and method options: engine/student_run.py) are resolved by its builder
before it constructs the configuration.

Method options stay declared by each method (distiller_zoo/options.py); a student's
configuration holds every registered option's resolved value (`options`, flat in args.json as
the flags are) and where each came from (`option_sources`). Flags a configuration does not
declare (a flag added to a program's parser, a run's key from a newer version) are kept in
`extra`, read as attributes and stored flat, so args.json keeps every key it had.
"""
import os
import zlib
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional, Tuple

from core.errors import UserError
from distiller_zoo import METHODS
from distiller_zoo.objective import DEFAULT_DISTILL
from distiller_zoo.tf_kd import CORRECT_PROB
from distiller_zoo.uskd import DEFAULT_ALPHA as USKD_ALPHA
from distiller_zoo.uskd import DEFAULT_BETA as USKD_BETA
from distiller_zoo.uskd import DEFAULT_MU as USKD_MU
from engine.build import check_fits_dataset, check_model_name, default_lr
from engine.recipe import imagenet_defaults

REFERENCE_EPOCHS = 240
REFERENCE_DECAY_EPOCHS = (150, 180, 210)
REFERENCE_BATCH_SIZE = 64
REFERENCE_WEIGHT_DECAY = 5e-4
# what args.json records besides the flags: computed again whenever a configuration is built
DERIVED = ("method", "beta_label", "world_size", "effective_batch", "option_sources")
# what a command line says about the parsing itself (engine/args.py), never part of a configuration
NOT_STORED = ("resume", "command_line")
# mapping fields stored as args.json's keys themselves rather than under their own name
FLAT = ("options", "extra")


def world_size() -> int:
    """The processes of the run's group (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def seed_from_trial(trial: str) -> int:
    return int(trial) if str(trial).isdigit() else zlib.crc32(str(trial).encode()) % (2**31)


def frozen_map(value) -> Mapping:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The flags every program shares (engine/args.py's add_common_args), resolved."""

    print_freq: int = 100
    tb_freq: int = 500
    save_freq: int = 40
    batch_size: Optional[int] = None
    num_workers: int = 8
    epochs: Optional[int] = None
    learning_rate: Optional[float] = None
    lr_decay_epochs: Optional[Tuple[int, ...]] = None
    lr_decay_rate: float = 0.1
    lr_schedule: str = "step"            # step: the milestones above; cosine: down to min_lr (engine/optim.py)
    warmup_epochs: int = 0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    weight_decay: Optional[float] = None
    momentum: float = 0.9
    optimizer: str = "sgd"               # the main stage's: sgd or adamw (engine/optim.py)
    clip_grad: Optional[float] = None    # the main stage's total gradient norm bound; None: no clipping
    dataset: str = "cifar100"
    trial: str = "0"
    seed: Optional[int] = None
    deterministic: bool = False
    auto_resume: bool = False
    data_folder: str = "./data"
    download: bool = False
    save_dir: str = "./save"
    run_name: Optional[str] = None
    skip_bad_images: Optional[bool] = None  # resolved: False unless given
    device: str = "auto"
    loader: str = "auto"
    amp: Optional[str] = None            # None: "auto", or on a resume the run's
    channels_last: Optional[bool] = None
    compile: Optional[bool] = None
    threads: Optional[int] = None
    config: Optional[str] = None         # the --config file the flags came from, if any
    world_size: int = 1                  # derived: the process group's size
    effective_batch: int = 0             # derived: world_size x batch_size
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._set("extra", frozen_map(self.extra))
        for key in ("data_folder", "save_dir"):
            self._set(key, os.path.abspath(getattr(self, key)))
        self._check()
        for key, value in self._resolved_defaults().items():
            self._set(key, value)
        self._check_schedule()

    def _set(self, key: str, value) -> None:
        object.__setattr__(self, key, value)

    def _check(self) -> None:
        """A program's checks of its own fields (one clear line each), before anything is resolved."""

    def _check_schedule(self) -> None:
        """The warm-up and the cosine's floor against the resolved epochs and learning rate."""
        if self.warmup_epochs >= self.epochs:
            raise UserError(f"--warmup_epochs {self.warmup_epochs} leaves no epoch of the schedule "
                            f"(--epochs {self.epochs}); give fewer")
        if self.lr_schedule == "cosine" and self.min_lr >= self.learning_rate:
            raise UserError(f"--min_lr {self.min_lr:g} must be below --learning_rate {self.learning_rate:g}")

    @property
    def trained_model(self) -> str:
        """The network whose registry entry gives the default learning rate."""
        raise NotImplementedError

    @property
    def main_optimizer(self) -> str:
        """The main stage's optimiser: the --optimizer flag's, or "dot" (engine/dot.py) where a
        program offers it."""
        return self.optimizer

    def _resolved_defaults(self) -> dict:
        """The defaults that depend on other fields: RepDistiller's, the ImageNet recipe's."""
        size = world_size()
        values = {k: getattr(self, k) for k in ("epochs", "batch_size", "learning_rate", "lr_decay_epochs",
                                                "weight_decay")}
        if self.dataset == "imagenet":
            values.update(imagenet_defaults(values, size))
        if values["epochs"] is None:
            values["epochs"] = REFERENCE_EPOCHS
        if values["batch_size"] is None:
            values["batch_size"] = REFERENCE_BATCH_SIZE
        if values["weight_decay"] is None:
            values["weight_decay"] = REFERENCE_WEIGHT_DECAY
        if values["learning_rate"] is None:
            values["learning_rate"] = default_lr(self.trained_model)
        if values["lr_decay_epochs"] is None:
            values["lr_decay_epochs"] = [round(m * values["epochs"] / REFERENCE_EPOCHS) for m in REFERENCE_DECAY_EPOCHS]
        values["lr_decay_epochs"] = tuple(values["lr_decay_epochs"])
        return {**values, "seed": seed_from_trial(self.trial) if self.seed is None else self.seed,
                "skip_bad_images": bool(self.skip_bad_images), "world_size": size,
                "effective_batch": size * values["batch_size"]}

    def __getattr__(self, name: str):
        # only reached for names that are not fields: a flag kept in a flat mapping
        if not name.startswith("_"):
            for key in FLAT:
                mapping = self.__dict__.get(key)
                if mapping is not None and name in mapping:
                    return mapping[name]
        raise AttributeError(f"{type(self).__name__} has no {name!r}")

    # --- args.json ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """args.json's content: every field, the flat mappings' keys at the top level; a derived
        value the program does not compute (a QAT run's beta_label) is left out."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in DERIVED and value is None:
                continue
            if f.name in FLAT:
                out.update(value)
            else:
                out[f.name] = dict(value) if isinstance(value, Mapping) else \
                    list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def defaults(cls) -> dict:
        """The flags' defaults, as the program's parser declares them (None where the value is
        resolved when a configuration is built)."""
        return {f.name: f.default_factory() if f.default is MISSING else f.default
                for f in fields(cls) if f.name not in FLAT}

    @classmethod
    def from_dict(cls, values: Mapping) -> "RunConfig":
        """The configuration of flag values (a parser's, a --config file's, an args.json's): keys
        that are not fields go to `extra`, but for NOT_STORED's."""
        return cls(**cls.split(values))

    @classmethod
    def split(cls, values: Mapping) -> dict:
        names = {f.name for f in fields(cls)} - set(FLAT)
        known = {k: v for k, v in values.items() if k in names}
        known["extra"] = {k: v for k, v in values.items() if k not in names | set(FLAT) | set(NOT_STORED)}
        return known


@dataclass(frozen=True, kw_only=True)
class OneNetworkConfig(RunConfig):
    """A run that trains the one network `model` names (a teacher, a self-distilled network)."""

    model: str = "resnet110"

    def _check(self) -> None:
        check_model_name(self.model)
        check_fits_dataset(self.model, self.dataset)

    @property
    def trained_model(self) -> str:
        return self.model


@dataclass(frozen=True, kw_only=True)
class TeacherConfig(OneNetworkConfig):
    """train_teacher.py: a network trained from labels alone."""


@dataclass(frozen=True, kw_only=True)
class StudentConfig(RunConfig):
    """train_student.py: a student distilled from one or more teachers (engine/student_run.py
    builds it), or the QAT run after distillation (deploy/qat_run.py)."""

    trial: str = "1"
    path_t: Optional[str] = None
    model_t: Optional[str] = None        # derived: the teachers' architectures, comma-separated
    multi_teacher: str = "average"
    feature_teacher: int = 0
    model_s: str = "resnet8"
    feat_s: Optional[str] = None         # module paths of a torchvision:/timm: network (models/external.py)
    head_s: Optional[str] = None
    feat_t: Optional[str] = None
    head_t: Optional[str] = None
    distill: str = DEFAULT_DISTILL
    distiller: Optional[Mapping[str, Any]] = None  # a recipe (distiller_zoo/recipe.py), whose flags are the ones above
    gamma: Optional[float] = None        # derived: the resolved weights
    alpha: Optional[float] = None
    beta: Optional[float] = None         # as given; the resolved weights are beta_label's
    kd_T: Optional[float] = None         # derived: 4, or 2 with logit_stand
    kd_T_schedule: str = "constant"
    kd_T_end: Optional[float] = None
    logit_stand: bool = False
    init_lr: Optional[float] = None
    qat_epochs: Optional[int] = None
    init_student: Optional[str] = None
    qat_lr: float = 1e-3
    dot: bool = False
    dot_delta: float = 0.075
    method: Optional[str] = None         # derived: the run's label in names and tables
    beta_label: Optional[str] = None     # derived: the methods' weights, '+'-joined
    option_sources: Optional[Mapping[str, str]] = None  # derived: where each option's value came from
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self._set("options", frozen_map(self.options))
        if self.option_sources is not None:
            self._set("option_sources", frozen_map(self.option_sources))
        super().__post_init__()

    @property
    def trained_model(self) -> str:
        return self.model_s

    @property
    def teacher_archs(self) -> list:
        return self.model_t.split(",")

    @property
    def feature_pair(self) -> tuple:
        """(teacher, student) names of the pair the methods see: the feature teacher's."""
        return self.teacher_archs[self.feature_teacher], self.model_s

    @property
    def main_optimizer(self) -> str:
        """DOT (engine/dot.py) with --dot, else the --optimizer flag's."""
        return "dot" if self.dot else self.optimizer

    @classmethod
    def split(cls, values: Mapping) -> dict:
        option_names = {opt.name for spec in METHODS.values() for opt in spec.options}
        known = super().split({k: v for k, v in values.items() if k not in option_names})
        known["options"] = {k: values.get(k) for k in sorted(option_names)}
        return known


@dataclass(frozen=True, kw_only=True)
class MutualConfig(RunConfig):
    """train_mutual.py: two or more peers trained together (deep mutual learning)."""

    trial: str = "1"
    models: str = "resnet32,resnet32"

    def _check(self) -> None:
        if len(self.peers) < 2:
            raise UserError(f"--models needs two or more comma-separated architectures, got {self.models!r}")
        for arch in self.peers:
            check_model_name(arch, "--models")
            check_fits_dataset(arch, self.dataset, "--models")

    @property
    def peers(self) -> list:
        return [name.strip() for name in self.models.split(",")]  # an empty entry is an unknown model, not skipped

    @property
    def trained_model(self) -> str:
        """The peer whose registry learning rate is smallest: the default rate must suit every
        peer (RepDistiller gives MobileNetV2 and ShuffleNets 0.01, the others 0.05)."""
        return min(self.peers, key=default_lr)


@dataclass(frozen=True, kw_only=True)
class SelfConfig(OneNetworkConfig):
    """train_self.py: self-distillation (BYOT, Tf-KD's virtual teacher, USKD)."""

    trial: str = "1"
    model: str = "resnet32x4"
    method: str = "byot"
    loss_coefficient: float = 0.3
    kd_T: float = 3.0
    feature_loss_coefficient: float = 0.03
    reg_alpha: Optional[float] = None      # derived for tf_kd_reg: the architecture's published value
    reg_temperature: Optional[float] = None
    multiplier: Optional[float] = None
    correct_prob: float = CORRECT_PROB
    uskd_alpha: float = USKD_ALPHA
    uskd_beta: float = USKD_BETA
    uskd_mu: float = USKD_MU

