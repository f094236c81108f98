"""Networks of torchvision and timm by name, given the suite's feature contract by forward hooks.

A name `torchvision:NAME` or `timm:NAME` (timm's pretrained tags included: `timm:NAME.TAG`),
optionally followed by the builder's keyword arguments as `:KEY=VALUE` (`timm:vit_tiny_patch16_224:
patch_size=4:depth=6`), builds the library's own classification model with the data set's number
of classes and, where the library fixes the input size (timm's `fixed_input_size` networks,
torchvision's ViTs), the data set's image size. The network keeps the library's class and
parameter names, so its state dict loads with strict=True into the library's own model.

`with_features` gives such a network `forward_features` (models/features.py): forward hooks on the
modules that `stages` names record their outputs while the network's own forward runs (the hooks
return nothing, so the logits are the network's). The default stages come from the network's
stage structure: timm's `feature_info` (the library's own declaration of its stages: the last
module at each reduction; for a ViT, whose blocks share one, four evenly spaced blocks), else a
probe forward that takes the last module at each spatial resolution after the stem (torchvision's
`layer1..4`, `features.N`). `stem` is the input of the first stage unit, `pooled` the flattened
input of the classifier (timm's `get_classifier()`, torchvision's `fc`/`classifier`/`head`/`heads`,
else the last nn.Linear), `logits` the network's output. Token sequences (B x N x C) become maps
(B x C x H x W) with the class/distillation/register tokens dropped, so every method that reads
stages sees maps; `token_stages` says which stages were tokens, and `Features.tokens` carries it
(OFA-KD's branch follows it).
`preact` is the stage outputs themselves: a library network's pre-activations are not known
without its code.
"""
import ast
import difflib
import importlib
import math
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from core.errors import UserError

from .features import Features

LIBRARIES = ("torchvision", "timm")
HEAD_ATTRIBUTES = ("fc", "classifier", "head", "heads")  # torchvision's classifier modules
DEFAULT_IMAGE_SIZE = 224
INPUT = "input of "  # a recorded module input's key: its name after this
SPACED_STAGES = 4  # stages taken from a network whose units share one resolution (a ViT's blocks)


@dataclass(frozen=True)
class NetworkName:
    library: str
    name: str
    kwargs: Dict[str, object] = field(default_factory=dict)


def is_library_name(name) -> bool:
    return isinstance(name, str) and name.partition(":")[0] in LIBRARIES and ":" in name


def parse_name(spec: str, flag: str = "--model") -> NetworkName:
    """`library:NAME[:KEY=VALUE...]`; a value is a Python literal (4, 0.1, True) or else a string."""
    library, _, rest = spec.partition(":")
    name, *pairs = rest.split(":")
    kwargs = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise UserError(f"{flag} {spec}: '{pair}' is not KEY=VALUE; name a network as "
                            f"{library}:NAME or {library}:NAME:KEY=VALUE:...")
        kwargs[key] = _literal(value)
    if not name:
        raise UserError(f"{flag} {spec}: no network name after '{library}:'")
    return NetworkName(library, name, kwargs)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def import_library(library: str):
    try:
        return importlib.import_module(library)
    except ImportError:
        raise UserError(f"{library} is not installed; pip install '.[timm]' (or pip install {library})") from None


def library_models(library: str) -> List[str]:
    """The classification models the library builds."""
    if library == "timm":
        return import_library("timm").list_models()
    tv_models = import_library("torchvision").models
    return tv_models.list_models(module=tv_models)


def check_library_name(spec: str, flag: str = "--model") -> NetworkName:
    net = parse_name(spec, flag)
    if net.library == "timm":
        known = import_library("timm").is_model(net.name)
    else:
        known = net.name in library_models(net.library)
    if not known:
        close = difflib.get_close_matches(net.name.split(".")[0], library_models(net.library), n=3)
        hint = f"nearest: {', '.join(f'{net.library}:{c}' for c in close)}" if close else \
            f"see {net.library}'s list_models()"
        raise UserError(f"{flag} {spec}: {net.library} has no classification model '{net.name}'; {hint}")
    return net


def build_library_network(spec: str, num_classes: int, image_size: Optional[int] = None,
                          flag: str = "--model") -> nn.Module:
    """The library's model, randomly initialised, for `num_classes` classes and `image_size` inputs."""
    net = check_library_name(spec, flag)
    kwargs = dict(net.kwargs, num_classes=num_classes)
    size = image_size or DEFAULT_IMAGE_SIZE
    try:
        if net.library == "timm":
            timm = import_library("timm")
            if getattr(timm.models.get_pretrained_cfg(net.name), "fixed_input_size", False):
                kwargs.setdefault("img_size", size)
            return timm.create_model(net.name, pretrained=False, **kwargs)
        tv_models = import_library("torchvision").models
        if net.name.startswith("vit_"):
            kwargs.setdefault("image_size", size)
        return tv_models.get_model(net.name, weights=None, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:  # the builder refuses an argument
        raise UserError(f"{flag} {spec}: {net.library} cannot build it ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------- features by forward hooks

@dataclass
class FeaturePaths:
    """The modules named by --feat_X and --head_X (None: found automatically)."""

    stages: Optional[str] = None   # comma-separated module paths, shallow to deep
    head: Optional[str] = None     # the classifier: its input is `pooled`
    role: str = "s"                # names the flags in error messages
    recipe: bool = False           # the stages are a recipe's recorders (distiller_zoo/recipe.py)

    def flag(self, what: str) -> str:
        if self.recipe and what == "feat":
            return f"the recipe's {'student' if self.role == 's' else 'teacher'} recorders"
        return f"--{what}_{self.role}"


class Recorder:
    """What the hooks capture during one forward_features call (nothing outside it)."""

    def __init__(self):
        self.active = False
        self.captured: Dict[str, Tensor] = {}
        self.depth = 0  # > 0 while the network's own forward runs

    def enter(self, module, inputs) -> None:
        self.depth += 1

    def leave(self, module, inputs, output) -> None:
        self.depth -= 1

    def output(self, key: str, module, inputs, output) -> None:
        if self.active:
            tensor = output if torch.is_tensor(output) else output[0]
            self.captured[key] = tensor.clone()  # a later in-place op (ReLU(inplace=True)) must not change it

    def input(self, key: str, module, inputs) -> None:
        if self.active:
            self.captured[INPUT + key] = inputs[0].clone()

    def missing(self, stages: List[str], stem: str, head: str) -> List[str]:
        """The modules of the last call whose hooks did not fire."""
        wanted = [*stages, INPUT + stem, INPUT + head]
        return [key.removeprefix(INPUT) for key in wanted if key not in self.captured]


class LibraryFeatures:
    """Mixed into a library network's own class by `with_features`: `forward_features` runs the
    network's forward once with the recorder on."""

    def forward_features(self, x: Tensor, *args, **kwargs) -> Features:
        recorder = self._feature_recorder
        if recorder.depth:  # timm's forward calls its own forward_features
            return super().forward_features(x, *args, **kwargs)
        recorder.active, recorder.captured = True, {}
        try:
            out = self(x)
        finally:
            recorder.active = False
        got, recorder.captured = recorder.captured, {}  # the network holds no tensor between calls
        logits = out if torch.is_tensor(out) else out[0]  # (logits, aux) of Inception/GoogLeNet in training
        stages = [self._as_map(got[name], channels) for name, channels in zip(self.feature_stages, self._declared_channels)]
        return Features(stem=self._as_map(got[INPUT + self.feature_stem], None), stages=stages, preact=list(stages),
                        pooled=got[INPUT + self.feature_head].flatten(1), logits=logits,
                        tokens=tuple(getattr(self, "token_stages", ())))

    def _as_map(self, t: Tensor, channels: Optional[int]) -> Tensor:
        if t.ndim == 3:
            return tokens_to_map(t, *self._token_layout(t.shape[1]))
        if is_token_layout(t, channels):
            return t.permute(0, 3, 1, 2)  # channels-last maps (timm's Swin)
        return t

    def _token_layout(self, n_tokens: int) -> Tuple[int, Tuple[int, int]]:
        """(prefix tokens, grid): timm's own figures where they fit, else the largest square grid."""
        prefix = getattr(self, "num_prefix_tokens", None)
        grid = getattr(getattr(self, "patch_embed", None), "grid_size", None)
        if isinstance(prefix, int) and grid is not None and prefix + grid[0] * grid[1] == n_tokens:
            return prefix, tuple(grid)
        side = math.isqrt(n_tokens)
        return n_tokens - side * side, (side, side)

    def bn_before_relu(self) -> List[nn.BatchNorm2d]:
        """The last BatchNorm2d of each stage (OFD's margins)."""
        modules = dict(self.named_modules())
        bns = []
        for name in self.feature_stages:
            found = [m for m in modules[name].modules() if isinstance(m, nn.BatchNorm2d)]
            if not found:
                raise UserError(f"stage {name} of {type(self).__name__} holds no BatchNorm2d, which OFD's margins need; "
                                "name stages that end in one with --feat_t, or choose another method")
            bns.append(found[-1])
        return bns

    def get_bn_before_relu(self) -> List[nn.BatchNorm2d]:
        return self.bn_before_relu()


def is_token_layout(t: Tensor, channels: Optional[int]) -> bool:
    """Whether a stage output is a transformer's or an MLP's tokens: B x N x C, or timm's
    channels-last B x H x W x C grid (its Swin), where `channels` is the declared width."""
    return t.ndim == 3 or (t.ndim == 4 and channels is not None and t.shape[1] != channels
                           and t.shape[-1] == channels)


def tokens_to_map(tokens: Tensor, prefix: int, grid: Tuple[int, int]) -> Tensor:
    """B x (prefix + H*W) x C tokens -> B x C x H x W, the prefix (class, distillation) tokens dropped."""
    b, _, c = tokens.shape
    return tokens[:, prefix:].transpose(1, 2).reshape(b, c, *grid)


_FEATURED_CLASSES: Dict[type, type] = {}


def featured_class(cls: type) -> type:
    """The library class with LibraryFeatures mixed in (one per class): isinstance, parameter
    names and forward stay the library's."""
    if cls not in _FEATURED_CLASSES:
        _FEATURED_CLASSES[cls] = type(cls.__name__, (LibraryFeatures, cls), {"__module__": cls.__module__})
    return _FEATURED_CLASSES[cls]


def with_features(model: nn.Module, image_size: int, paths: FeaturePaths = FeaturePaths(),
                  name: str = "") -> nn.Module:
    """`model` (changed in place and returned) with forward_features, stage_channels and
    bn_before_relu; a module path that does not exist is one line naming the nearest ones."""
    modules = dict(model.named_modules())
    label = name or type(model).__name__
    head = _find(modules, paths.head, paths.flag("head"), label) if paths.head else default_head(model, modules)
    if paths.stages:
        stages = [_find(modules, p.strip(), paths.flag("feat"), label) for p in paths.stages.split(",")]
        stem = stages[0]
    else:
        units = timm_units(model) or probe_units(model, modules, head, image_size)
        if not units:
            raise UserError(f"cannot find the stages of {label}; name them with {paths.flag('feat')} "
                            "(module paths, e.g. layer3,layer4)")
        stages, stem = default_stages(units)
    recorder = Recorder()
    model.register_forward_pre_hook(recorder.enter)
    model.register_forward_hook(recorder.leave, always_call=True)
    for key in stages:
        modules[key].register_forward_hook(partial(recorder.output, key))
    modules[stem].register_forward_pre_hook(partial(recorder.input, stem))
    modules[head].register_forward_pre_hook(partial(recorder.input, head))
    model.__class__ = featured_class(type(model))
    model._feature_recorder = recorder
    model.feature_stages, model.feature_stem, model.feature_head = stages, stem, head
    model._declared_channels = [_channels(model, key) for key in stages]
    _check_runs(model, image_size, label)
    return model


def _find(modules: dict, path: str, flag: str, label: str) -> str:
    if path not in modules or not path:
        close = difflib.get_close_matches(path, [n for n in modules if n], n=3, cutoff=0.5)
        hint = f"nearest: {', '.join(close)}" if close else f"top-level modules: {', '.join(_children(modules))}"
        raise UserError(f"{flag}: {label} has no module '{path}'; {hint}")
    return path


def _children(modules: dict) -> List[str]:
    return [n for n in modules if n and "." not in n]


def default_head(model: nn.Module, modules: dict) -> str:
    """timm's get_classifier(), torchvision's classifier attribute, else the last nn.Linear."""
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        for name, module in modules.items():
            if module is classifier and name:
                return name
    for name in HEAD_ATTRIBUTES:
        if name in modules:
            return name
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"cannot find the classifier of {type(model).__name__}; name it with --head_s/--head_t")
    return linears[-1]


def timm_units(model: nn.Module) -> List[Tuple[str, object]]:
    """(module, reduction) of timm's feature_info."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list):
        return []
    return [(entry["module"], entry["reduction"]) for entry in info]


def probe_units(model: nn.Module, modules: dict, head: str, image_size: int) -> List[Tuple[str, object]]:
    """(module, resolution) of the children of the network's trunk, in the order they ran: the
    container whose children's outputs span the most resolutions (a ResNet itself, a MobileNet's
    `features`); in a token network, the container with the most children (a ViT's blocks)."""
    records = _record_outputs(model, modules, head, image_size)
    by_parent: Dict[str, Dict[str, object]] = {}
    for name, resolution in records:  # a module that runs twice counts at its last run
        parent = name.rpartition(".")[0]
        by_parent.setdefault(parent, {}).pop(name, None)
        by_parent[parent][name] = resolution
    if not by_parent:
        return []
    tokens = any(r[0] == "tokens" for _, r in records)
    score = (lambda c: len(c)) if tokens else (lambda c: len(set(c.values())))
    trunk = max(by_parent.values(), key=score)
    return list(trunk.items())


def _record_outputs(model, modules, head, image_size) -> List[Tuple[str, tuple]]:
    """(name, resolution of the output) per module call until the head runs; a parameter-free
    module with a 1x1 output (a global pooling) is not recorded: it starts the head."""
    records, done = [], []

    def hook(name, module, inputs, output):
        if done or not torch.is_tensor(output) or output.ndim not in (3, 4):
            return
        if output.ndim == 3:
            records.append((name, ("tokens", output.shape[1])))
        elif output.shape[2:].numel() > 1 or next(module.parameters(), None) is not None:
            records.append((name, tuple(output.shape[2:])))

    handles = [m.register_forward_hook(partial(hook, n)) for n, m in modules.items()
               if n and n != head and not n.startswith(head + ".")]
    handles.append(modules[head].register_forward_pre_hook(lambda *_: done.append(True)))
    try:
        _dry_run(model, image_size)
    finally:
        for h in handles:
            h.remove()
    return records


def default_stages(units: List[Tuple[str, object]]) -> Tuple[List[str], str]:
    """(stages, stem module): the last unit at each resolution, the deepest four (the four stages of
    a ResNet); where all units share one resolution (a ViT's blocks), four evenly spaced. The stem
    is the input of the first stage, or of the first block."""
    last = [list(g)[-1][0] for _, g in groupby(units, key=lambda u: u[1])]
    if len(last) > 1:
        stages = last[-SPACED_STAGES:]
        return stages, stages[0]
    n, m = len(units), min(SPACED_STAGES, len(units))
    return [units[n * (k + 1) // m - 1][0] for k in range(m)], units[0][0]


def _channels(model: nn.Module, key: str) -> Optional[int]:
    """The channels timm's feature_info declares for a stage (None where it says nothing)."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        for entry in info:
            if entry.get("module") == key:
                return entry.get("num_chs")
    return None


@torch.no_grad()
def _dry_run(model: nn.Module, image_size: int):
    was_training = model.training
    try:
        return model.eval()(torch.zeros(2, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as err:
        raise UserError(f"{type(model).__name__} does not run on {image_size}x{image_size} images "
                        f"({str(err).splitlines()[0]}); choose another network or data set") from None
    finally:
        model.train(was_training)


def _check_runs(model: nn.Module, image_size: int, label: str) -> None:
    """One forward pass on a dummy batch with the recorder on: every hook fired; the stage channels."""
    recorder = model._feature_recorder
    recorder.active, recorder.captured = True, {}
    try:
        _dry_run(model, image_size)
    finally:
        recorder.active = False
    missing = recorder.missing(model.feature_stages, model.feature_stem, model.feature_head)
    if missing:
        raise UserError(f"module {', '.join(missing)} of {label} does not run in its forward pass; name another")
    model.stage_channels = [model._as_map(recorder.captured[k], c).shape[1]
                            for k, c in zip(model.feature_stages, model._declared_channels)]
    model.token_stages = [is_token_layout(recorder.captured[k], c)
                          for k, c in zip(model.feature_stages, model._declared_channels)]
    recorder.captured = {}
