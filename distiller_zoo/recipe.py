"""Recipe files: the `distiller:` block of a --config file, the suite's counterpart of MMRazor's
ConfigurableDistiller (OpenMMLab, mmrazor/models/distillers/configurable_distiller.py).

    distiller:
      recorders:                       # module outputs of a torchvision:/timm: network, by path
        s4: {student: layer4}
        t4: {teacher: layer4}
      losses:                          # the suite's methods, in this order
        hint: {type: fitnet, weight: 100, student: s4, teacher: t4}
        kd:   {type: kd, weight: 0.9}

MMRazor's parts in the suite's terms. Its `student_recorders`/`teacher_recorders` (ModuleOutputs
of a module path) are the student's and the teacher's recorders, in their order: --feat_s and
--feat_t. Its `distill_losses` (name -> loss type, loss_weight) are the losses: `type` is a
registered method (or `kd`, the -a term), `weight` its weight (left out: the method's published
default, as `--distill NAME`), every other key one of the method's options (`hint_layer: 1`).
Its `loss_forward_mappings` are a loss's `student:`/`teacher:` recorder names (one or a list,
shallow to deep): the stages the method sees. Its `connectors` are the method's own (FitNet's
regressor, AT's none), built as with --distill. A method that reads stages (Distiller.stage_sides)
must be given them where the recipe records that network (a network it records nothing of gives
every loss its own stages: the suite's networks, a library network's default ones); one that
reads logits or the pooled embedding must be given none.

The recipe compiles into the flags it stands for (`Compiled.flags`: distill in the losses'
order, alpha the kd loss's weight or 0 without one, beta unset, feat_s, feat_t, the losses'
options) and each method's stage
selection (`Compiled.stages`: None where a loss sees every recorder of a side in order), so a
recipe and the equivalent command line build the same objective. Limits: each method is one
loss (its options are one set of flags), and a recorder records a module's output.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from core.errors import UserError
from core.ranges import NON_NEGATIVE, check_value
from distiller_zoo.base import MethodSpec, resolve
from models.features import StageSelection

ROLES = ("student", "teacher")
SECTIONS = ("recorders", "losses")
# the recipe's own keys of a loss; any other key is one of its method's options
LOSS_KEYS = ("type", "weight", *ROLES)
KD = "kd"  # the -a term: a loss of type kd is --distill's kd:WEIGHT


@dataclass(frozen=True)
class Compiled:
    recipe: dict                                 # the block as the run stores it: its order in lists
    flags: Dict[str, object]                     # flag name -> value
    stages: Dict[str, StageSelection] = field(default_factory=dict)  # method name -> what it sees


def compile_recipe(block) -> Compiled:
    """The flags and stage selections of a `distiller:` block; one UserError line for the first
    thing wrong in it."""
    block = _mapping(block, "distiller", f"a mapping with {' and '.join(SECTIONS)}")
    _known_keys(block, SECTIONS, "distiller")
    recorders = _recorders(_ordered(block.get("recorders") or {}, "distiller.recorders"))
    losses = _ordered(block.get("losses"), "distiller.losses")
    if not losses:
        raise UserError("distiller.losses is empty; give at least one loss, e.g. kd: {type: kd, weight: 0.9}")
    flags = {"beta": None, "alpha": 0.0}  # no kd loss: no KD term (as in MMRazor, the losses are all there is)
    entries, stages, used, methods = [], {}, set(), set()
    for name, loss in losses.items():
        spec, weight, mapped, options = _loss(name, loss, recorders)
        if spec.name in methods:
            raise UserError(f"distiller.losses.{name}: a second {spec.name} loss; a recipe uses each method once "
                            "(its options are one set of flags)")
        methods.add(spec.name)
        if spec.name == KD:  # KD's own default weight wherever it stands (--distill's is the first method's)
            weight = spec.alpha if weight is None else weight
            flags["alpha"] = float(weight)
        entries.append(spec.name if weight is None else f"{spec.name}:{weight!r}")
        used.update(n for names in mapped.values() for n in names)
        if spec.cls is not None and mapped:
            implied = spec.cls.mapped_options(len(mapped.get("student", ())), len(mapped.get("teacher", ())))
            options = {**implied, **options}
            stages[spec.name] = StageSelection(*(_indices(recorders, role, mapped.get(role)) for role in ROLES))
        for option, value in options.items():
            if flags.setdefault(option, value) != value:
                raise UserError(f"distiller.losses.{name}: {option} is {value!r} here but {flags[option]!r} in "
                                "another loss; the losses share the flag, give it one value")
    unused = [n for n in recorders if n not in used]
    if unused:
        raise UserError(f"distiller.recorders: {', '.join(unused)} feed{'s' if len(unused) == 1 else ''} no loss; "
                        "map it to a loss (student:/teacher:) or drop it")
    paths = {role: [path for r, path in recorders.values() if r == role] for role in ROLES}
    flags.update(distill=",".join(entries), feat_s=",".join(paths["student"]) or None,
                 feat_t=",".join(paths["teacher"]) or None)
    stored = {"recorders": [{name: {role: path}} for name, (role, path) in recorders.items()],
              "losses": [{name: dict(loss)} for name, loss in losses.items()]}
    return Compiled(stored, flags, {k: v for k, v in stages.items() if not v.everything})


def _mapping(value, where: str, wanted: str) -> dict:
    if not isinstance(value, Mapping):
        raise UserError(f"{where} must be {wanted}, got {value!r}")
    return dict(value)


def _ordered(value, where: str) -> dict:
    """A section's entries in order, from a mapping (a YAML file's) or a list of one-entry
    mappings (args.json's, whose writer sorts a mapping's keys)."""
    if isinstance(value, list) and all(isinstance(v, Mapping) and len(v) == 1 for v in value):
        entries = [next(iter(v.items())) for v in value]
        if len({str(k) for k, _ in entries}) != len(entries):
            raise UserError(f"{where} names an entry twice")
        return {str(k): v for k, v in entries}
    return {str(k): v for k, v in _mapping(value, where, "a mapping of names to entries").items()}


def _known_keys(values: Mapping, allowed, where: str) -> None:
    unknown = [str(k) for k in values if k not in allowed]
    if unknown:
        raise UserError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                        f"it takes {', '.join(allowed)}")


def _recorders(block: Mapping) -> Dict[str, Tuple[str, str]]:
    """name -> (role, module path), in the file's order."""
    out, seen = {}, {}
    for name, value in block.items():
        where = f"distiller.recorders.{name}"
        value = _mapping(value, where, "{student: MODULE_PATH} or {teacher: MODULE_PATH}")
        if len(value) != 1 or next(iter(value)) not in ROLES:
            raise UserError(f"{where} must name one network and a module path, as {{student: layer4}} or "
                            f"{{teacher: layer4}}; got {value!r}")
        (role, path), = value.items()
        if not isinstance(path, str) or not path.strip() or "," in path:
            raise UserError(f"{where}: the {role}'s module path must be one name such as layer4, got {path!r}")
        if (role, path) in seen:
            raise UserError(f"{where} records the {role}'s {path} as {seen[role, path]} does; use one recorder")
        seen[role, path] = name
        out[name] = (role, path)
    return out


def _loss(name: str, loss, recorders: Mapping) -> Tuple[MethodSpec, Optional[float], Dict[str, List[str]], dict]:
    """(method, weight or None, role -> recorder names, options) of one loss."""
    where = f"distiller.losses.{name}"
    loss = _mapping(loss, where, "{type: METHOD, weight: W, ...}")
    if not isinstance(loss.get("type"), str):
        raise UserError(f"{where} needs a type: a method of --distill (fitnet, at, crd, ...) or kd")
    try:
        spec = resolve(loss["type"])
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    weight = loss.get("weight")
    if weight is not None:
        check_value(f"{where}.weight", weight, NON_NEGATIVE)
    mapped = {role: _recorder_names(where, role, loss[role], recorders) for role in ROLES if role in loss}
    sides = spec.cls.stage_sides if spec.cls is not None else ()
    for role in ROLES:
        recorded = any(r == role for r, _ in recorders.values())  # else the network's own stages, for all
        if role in sides and recorded and not mapped.get(role):
            raise UserError(f"{where}: {spec.name} reads the {role}'s stages, given none; map recorders to it "
                            f"({role}: [NAME, ...], shallow to deep)")
        if role not in sides and role in mapped:
            raise UserError(f"{where}: {spec.name} reads no recorded stage of the {role} (it reads logits or the "
                            f"pooled embedding); drop its {role}:")
    return spec, weight, mapped, _options(where, spec, {k: v for k, v in loss.items() if k not in LOSS_KEYS})


def _recorder_names(where: str, role: str, value, recorders: Mapping) -> List[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{where}.{role} must be a recorder name or a list of them, got {value!r}")
    for n in names:
        if n not in recorders:
            known = ", ".join(k for k, (r, _) in recorders.items() if r == role) or "none"
            raise UserError(f"{where}.{role}: no recorder '{n}' (the {role}'s recorders: {known})")
        if recorders[n][0] != role:
            raise UserError(f"{where}.{role}: recorder '{n}' records the {recorders[n][0]}, not the {role}")
    if len(set(names)) != len(names):
        raise UserError(f"{where}.{role} names a recorder twice: {', '.join(names)}")
    return names


def _options(where: str, spec: MethodSpec, given: Mapping) -> dict:
    """The loss's option values, typed as their flags and checked against their ranges."""
    declared = {opt.name: opt for opt in spec.options}
    _known_keys(given, (*LOSS_KEYS, *declared), where)
    out = {}
    for key, value in given.items():
        opt = declared[key]
        kinds = {bool: bool, int: int, float: (int, float), str: str}.get(opt.type, opt.type)
        if not isinstance(value, kinds) or (isinstance(value, bool) and opt.type is not bool):
            raise UserError(f"{where}.{key} must be {opt.type.__name__}, got {value!r}")
        value = opt.type(value)
        check_value(f"{where}.{key}", value, opt.valid, opt.choices, opt.type)
        out[key] = value
    return out


def _indices(recorders: Mapping, role: str, names: Optional[List[str]]) -> Optional[Tuple[int, ...]]:
    """The positions of `names` among the role's recorders; None where they are all of them, in order."""
    if names is None:
        return None
    order = [n for n, (r, _) in recorders.items() if r == role]
    picked = tuple(order.index(n) for n in names)
    return None if picked == tuple(range(len(order))) else picked
