"""The interface every distillation method implements, the method registry, and the
stage-pairing rule shared by the methods that match student and teacher stages.

A method is two layers: its loss as a plain nn.Module on tensors, and a
`Distiller` that picks the features it needs from `Features` by name, builds its
connectors from one sample batch, and may declare an init stage. The training
loop only sees the registry.
"""
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import UserError
from core.ranges import at_least
from distiller_zoo.options import DataNeeds, Option, Pair, check_options, lower_keys
from models.features import Features


@dataclass
class BuildContext:
    """Everything a distiller may need to build its connectors."""

    student: nn.Module
    teacher: nn.Module
    feat_s: Features           # features of one sample batch (no gradient)
    feat_t: Features
    options: object            # the method's own options, typed (distiller_zoo/options.py)
    n_train: int               # size of the training set (CRD's memory bank)
    num_classes: int
    student_name: str = ""
    teacher_name: str = ""
    temperature: object = 4.0  # the run's shared Temperature (float() gives the current value)
    logit_stand: bool = False  # z-score logits before the temperature softmax (--logit_stand)
    weight_given: bool = False  # the method's weight came from -b or `name:w`, not from the registry
    epochs: int = 240          # the main stage's length (--epochs; RepDistiller's 240 outside a run)


@dataclass
class InitStage:
    """Training that runs before the main stage (FT's paraphraser, AB, FSP).

    `loss(feat_s, feat_t)` returns a dict of named terms whose key 'loss' is
    minimised over `params` for `epochs` epochs at the base learning rate.
    `needs_student` is False when the student takes no part (FT's paraphraser),
    which saves its forward pass. `lr` is the stage's learning rate where the method's reference
    prescribes one (None: the base learning rate); --init_lr overrides it. It is multiplied by
    0.1 after each epoch in `lr_milestones` (SSKD's 30 and 45 of 60). `all_views`: the loss
    receives the Features of every view a batch carries (SSKD's four rotations), not the first
    B rows alone."""

    epochs: int
    params: List[nn.Parameter]
    loss: Callable[[Features, Features], Dict[str, Tensor]]
    needs_student: bool = True
    lr: Optional[float] = None
    lr_milestones: Tuple[int, ...] = ()
    all_views: bool = False


@dataclass
class Batch:
    """What a training batch carries besides its images, as the methods' data needs ask."""

    targets: Optional[Tensor] = None
    indices: Optional[Tensor] = None   # each sample's index in the training set
    contrast: Optional[Tensor] = None  # B x (K + 1) contrastive indices, the sample's own first


class Distiller(nn.Module):
    """Base class of a registered method. A subclass declares its `options` (a tuple of
    `Option`), may override `data_needs`, builds its connectors in __init__(ctx: BuildContext)
    from `ctx.options` and one sample batch's features, and defines

        forward(feat_s, feat_t, batch: Batch) -> (loss, parts)

    where `loss` is the method's term (weighted by -b) and `parts` a dict of named
    sub-terms to log (empty when the loss has a single term).

    A method whose data needs include a strong view (MLKD) is trained on batches of 2B images
    (weak views, then strong views of the same samples) and receives the Features of all 2B
    rows for student and teacher (targets, indices: B); the task's cross-entropy covers both
    views, KD and every other distiller the weak half. One whose needs include rotations (SSKD)
    is trained on batches of 4B images (the four rotated views in blocks of B) and receives the
    Features of all 4B rows; cross-entropy, KD and every other distiller see the upright block."""

    options: Tuple[Option, ...] = ()
    head_class: Optional[type] = None  # the DeployedHead subclass `deployed_head` returns, if any
    # the networks whose recorded stages (`stages`, `preact`, `stem`) the method reads: what a
    # recipe's loss must map (distiller_zoo/recipe.py); logits and `pooled` need no recorder
    stage_sides: Tuple[str, ...] = ()

    @classmethod
    def data_needs(cls, options) -> DataNeeds:
        return DataNeeds()

    @classmethod
    def mapped_options(cls, n_student: int, n_teacher: int) -> Dict[str, object]:
        """Option values a recipe's mapping implies where its loss does not give them (FitNet:
        the hint is the deepest mapped layer), for `n_student`/`n_teacher` mapped stages (0: that
        network is not recorded, its own stages stand)."""
        return {}

    def __init__(self, ctx: BuildContext):
        super().__init__()
        check_options(type(self).options, ctx.options)  # the declared ranges, for use outside train_student.py too
        self.needs = type(self).data_needs(ctx.options)

    def init_stage(self) -> Optional[InitStage]:
        return None

    def deployed_head(self) -> Optional["DeployedHead"]:
        """The head that replaces the student's classifier in the network the run deploys
        (SimKD: its projector and the teacher's classifier), or None: the student alone is
        deployed. A method with a head returns that head's logits on the batch under
        `parts[DEPLOYED_LOGITS]`: the training accuracy counts them."""
        return None

    def set_epoch(self, epoch: int) -> None:
        """Called before each main epoch (DKD's warm-up)."""

    def epoch_metrics(self) -> Dict[str, float]:
        return {}


# The key of a distiller's parts under which a method with a deployed head returns its logits.
DEPLOYED_LOGITS = "deployed_logits"


class DeployedHead(nn.Module):
    """A method's module that maps the student's Features to the deployed network's logits.
    `config()` returns the JSON-able keyword arguments that rebuild it (`type(head)(**config)`),
    so that a checkpoint can hold it beside the student's weights."""

    def config(self) -> dict:
        raise NotImplementedError


class DeployedNetwork(nn.Module):
    """The student with a method's head in place of its classifier: what such a run evaluates,
    checkpoints (the student's weights under 'model', the head under 'head') and exports."""

    def __init__(self, student: nn.Module, head: DeployedHead):
        super().__init__()
        self.student = student
        self.head = head

    def forward_features(self, x: Tensor) -> Features:
        feat = self.student.forward_features(x)
        return replace(feat, logits=self.head(feat))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.student.forward_features(x))


def head_record(method: str, head: DeployedHead) -> dict:
    """What a checkpoint stores under 'head': the method, the head's config and its weights."""
    return {"method": method, "config": head.config(), "state": head.state_dict()}


def deployed_network(student: nn.Module, record: dict, path) -> DeployedNetwork:
    """The student of a checkpoint with its stored head (`head_record`) rebuilt and loaded."""
    head_class = resolve(record["method"]).cls.head_class
    head = head_class(**record["config"])
    try:
        head.load_state_dict(record["state"], strict=True)
    except RuntimeError:
        raise UserError(f"checkpoint {path}: its {record['method']} head does not fit its stored configuration; "
                        "the file is damaged or from another version") from None
    return DeployedNetwork(student, head).eval()


# Distiller.stage_sides of a method that reads both networks' stages.
BOTH = ("student", "teacher")

# The init-stage length shared by the methods that declare an init stage (AB, FT, FSP).
INIT_EPOCHS = Option("init_epochs", int, 30, "epochs of the method's init stage (AB, FT, FSP); 0 skips it",
                     valid=at_least(0))


class WarmupDistiller(Distiller):
    """A method whose term grows linearly to its full weight over its first `warmup` epochs
    (DKD, ReviewKD: min(epoch / warmup, 1)); logged per epoch as 'warmup'."""

    def __init__(self, ctx: BuildContext, warmup: int, flag: str):
        super().__init__(ctx)
        if warmup < 0:
            raise UserError(f"--{flag} must be >= 0 (got {warmup})")
        self.warmup = warmup
        self.epoch: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def warmup_factor(self) -> float:
        if self.epoch is None or self.warmup == 0:
            return 1.0
        return min(self.epoch / self.warmup, 1.0)

    def epoch_metrics(self) -> Dict[str, float]:
        return {"warmup": self.warmup_factor()}


@dataclass
class MethodSpec:
    name: str
    cls: type
    gamma: float                 # -r: weight of cross-entropy
    alpha: float                 # -a: weight of KD
    beta: float                  # -b: weight of the method's own loss
    paper: str
    aliases: Tuple[str, ...] = field(default_factory=tuple)
    family: str = "feature"      # logit, feature, relation or contrastive: how tables group methods
    beta_per_pair: Dict[Pair, float] = field(default_factory=dict)   # published -b by (teacher, student)

    @property
    def options(self) -> Tuple[Option, ...]:
        return self.cls.options if self.cls is not None else ()


METHODS: Dict[str, MethodSpec] = {}
ALIASES: Dict[str, str] = {}


def register(name: str, *, gamma: float, alpha: float, beta: float, paper: str, aliases=(), family="feature",
             beta_per_pair=None):
    """Class decorator adding a Distiller to the registry with its published default weights
    (and, where its paper publishes them, the -b weights of particular pairs)."""

    def add(cls):
        METHODS[name] = MethodSpec(name, cls, gamma, alpha, beta, paper, tuple(aliases), family,
                                   lower_keys(beta_per_pair or {}))
        for key in (name, *aliases):
            ALIASES[key.lower()] = name
        return cls

    return add


def resolve(name: str) -> MethodSpec:
    key = ALIASES.get(name.lower())
    if key is None:
        raise UserError(f"unknown distillation method '{name}'; choose one of: "
                        + ", ".join(sorted(set(ALIASES))))
    return METHODS[key]


# --- pairing student and teacher stages ------------------------------------------------------

def pair_from_deepest(student: Sequence, teacher: Sequence) -> List[Tuple[int, int]]:
    """Index pairs (student stage, teacher stage) matched by position from the deepest stage.

    With equal stage counts this pairs stage i with stage i; otherwise the extra shallow
    stages of the deeper network are left out, which `describe_pairing` reports."""
    n = min(len(student), len(teacher))
    return [(len(student) - n + i, len(teacher) - n + i) for i in range(n)]


def avg_pool_to(x: Tensor, size) -> Tensor:
    """Adaptive average pooling of the last two axes to `size` (an int or (h, w)). Where each
    input size is a multiple of the output's, adaptive pooling's windows are the fixed
    non-overlapping ones of avg_pool2d, which gives the same values and, unlike adaptive
    pooling, has a deterministic CUDA backward (for --deterministic)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-2:]
    if h % out_h or w % out_w:
        return F.adaptive_avg_pool2d(x, (out_h, out_w))
    return F.avg_pool2d(x, (h // out_h, w // out_w))


def match_spatial(f_s: Tensor, f_t: Tensor) -> Tuple[Tensor, Tensor]:
    """Adaptive average pooling of the larger map down to the smaller one's size
    (RepDistiller's rule for AT, NST and VID, applied here to every spatial method)."""
    hs, ws = f_s.shape[-2:]
    ht, wt = f_t.shape[-2:]
    if (hs, ws) == (ht, wt):
        return f_s, f_t
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        f_s = avg_pool_to(f_s, size)
    if (ht, wt) != size:
        f_t = avg_pool_to(f_t, size)
    return f_s, f_t


def describe_pairing(method: str, pairs, feat_s: Sequence[Tensor], feat_t: Sequence[Tensor]) -> str:
    shapes = ", ".join(f"s{i}{tuple(feat_s[i].shape[1:])}->t{j}{tuple(feat_t[j].shape[1:])}" for i, j in pairs)
    return f"{method}: stages paired from the deepest: {shapes}"


class StagePairDistiller(Distiller):
    """A connector-free loss over the stages paired from the deepest (AT, NST): the criterion
    maps the paired lists of student and teacher maps to one term per pair, logged as
    'stage<k>' by the teacher's stage number."""

    stage_sides = BOTH

    def __init__(self, ctx: BuildContext, method: str, criterion: nn.Module):
        super().__init__(ctx)
        self.pairs = pair_from_deepest(ctx.feat_s.stages, ctx.feat_t.stages)
        self.criterion = criterion
        print(describe_pairing(method, self.pairs, ctx.feat_s.stages, ctx.feat_t.stages))

    def forward(self, feat_s, feat_t, batch=None) -> Tuple[Tensor, Dict[str, Tensor]]:
        g_s = [feat_s.stages[i] for i, _ in self.pairs]
        g_t = [feat_t.stages[j].detach() for _, j in self.pairs]
        terms = self.criterion(g_s, g_t)
        parts = {f"stage{j + 1}": term for (_, j), term in zip(self.pairs, terms)}
        return sum(terms), parts


def feature_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The student's parameters except its final classifier (AB's and FSP's init stage)."""
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    skip = {id(p) for p in last_linear.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]
