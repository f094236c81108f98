"""Recipe files (distiller_zoo/recipe.py): a --config file's `distiller:` block compiles into the
configuration and objective of the equivalent flags, a loss sees only the recorders mapped to it,
args.json keeps the recipe so the run builds again from it, and every mistake in a recipe is one
line and status 2 before anything is written. End to end: the digits recipe of configs/ and its
flags train the same epoch, row for row."""
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import train_student
from conftest import fast_args
from core.errors import UserError
from distiller_zoo.base import BuildContext, InitStage
from distiller_zoo.fitnet import FitNet
from distiller_zoo.options import DataNeeds, defaults
from distiller_zoo.recipe import compile_recipe
from distiller_zoo.temperature import Temperature
from engine.build import build_model
from engine.checkpoint import save_checkpoint
from engine.config import NOT_STORED
from engine.distill_task import DistillTask
from engine.student_run import configure
from method_helpers import quarter_digits
from models.external import FeaturePaths
from models.features import Features, StageSelection

DIGITS_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "recipes" / "digits_resnet18_mobilenet_v3_small.yaml"
IMAGENET_RECIPE = DIGITS_RECIPE.with_name("resnet50_resnet18_fitnet_kd.yaml")
# the digits recipe as flags: FitNet's hint, the deepest of the two recorded stages, is --hint_layer 2
DIGITS_FLAGS = ("--model_s", "torchvision:mobilenet_v3_small", "--distill", "at:1000,fitnet:100,crd:0.8,kd:0.9",
                "--feat_s", "features.3,features.8", "--feat_t", "layer2,layer3", "--hint_layer", "2",
                "--nce_k", "256")
RUN_FLAGS = ("--epochs", "1", "--batch_size", "128", "--amp", "off", "--no-channels_last", "--deterministic",
             "--threads", "1")


@pytest.fixture(scope="module")
def resnet18_teacher(tmp_path_factory):
    """A randomly initialised torchvision ResNet-18 for digits, saved as this suite's checkpoint."""
    path = tmp_path_factory.mktemp("teacher") / "resnet18.pth"
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", 10, "digits")
    save_checkpoint({"model": model.state_dict(), "arch": "torchvision:resnet18", "dataset": "digits"}, path)
    return path


def _run(argv):
    """train_student.py's run of a command line, configured but not trained."""
    args = train_student.parse_args(argv)
    return configure({k: v for k, v in vars(args).items() if k not in NOT_STORED})


def _terms(run):
    return [(t.spec.name, t.weight, t.weight_source, vars(t.options), t.option_sources, t.stages)
            for t in run.objective.methods]


def _without(config, *keys):
    return {k: v for k, v in config.to_dict().items() if k not in keys}


def test_a_recipe_is_the_configuration_and_objective_of_its_flags(resnet18_teacher, tmp_path):
    """Mapping every recorder of a side to a loss, in order, is what --feat_s/--feat_t give every method."""
    recipe = yaml.safe_load(DIGITS_RECIPE.read_text())
    recipe["distiller"]["losses"]["hint"].update(student=["s_mid", "s_deep"], teacher=["t_mid", "t_deep"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    common = fast_args(tmp_path, "--path_t", str(resnet18_teacher))
    by_recipe, by_flags = _run([*common, "--config", str(path)]), _run([*common, *DIGITS_FLAGS])
    assert _without(by_recipe.config, "config", "distiller") == _without(by_flags.config, "config", "distiller")
    assert _terms(by_recipe) == _terms(by_flags)
    stored = by_recipe.config.to_dict()["distiller"]  # in lists: args.json's writer sorts a mapping's keys
    assert [next(iter(r)) for r in stored["recorders"]] == ["s_mid", "s_deep", "t_mid", "t_deep"]
    assert [next(iter(r)) for r in stored["losses"]] == ["attention", "hint", "contrast", "kd"]
    assert compile_recipe(stored) == compile_recipe(recipe["distiller"]) and by_flags.config.distiller is None
    assert (by_recipe.objective.alpha, by_recipe.objective.gamma, by_recipe.name()) == \
        (0.9, 1.0, by_flags.name())


def test_a_loss_sees_the_recorders_mapped_to_it(resnet18_teacher, tmp_path):
    """The digits recipe's hint reads the deeper recorder alone: its hint is layer 1 of that view,
    which is the flags' --hint_layer 2 of both stages; nothing else differs."""
    common = fast_args(tmp_path, "--path_t", str(resnet18_teacher))
    by_recipe, by_flags = _run([*common, "--config", str(DIGITS_RECIPE)]), _run([*common, *DIGITS_FLAGS])
    [fitnet] = [t for t in by_recipe.objective.methods if t.spec.name == "fitnet"]
    assert fitnet.stages == StageSelection(student=(1,), teacher=(1,)) and fitnet.options.hint_layer == 1
    others = [t for t in _terms(by_recipe) if t[0] != "fitnet"]
    assert others == [t for t in _terms(by_flags) if t[0] != "fitnet"]
    assert _without(by_recipe.config, "config", "distiller", "hint_layer") == \
        _without(by_flags.config, "config", "distiller", "hint_layer")
    # the run's args.json builds the same run again: what --resume and evaluate.py read
    again = configure(json.loads(json.dumps(by_recipe.config.to_dict(), sort_keys=True)))
    assert again.config == by_recipe.config and _terms(again) == _terms(by_recipe)


def test_the_recipe_is_no_flag_of_the_command_line():
    """A --config file's recipe is what the command line set (a resume names it among the flags it
    ignores); a plain --resume sets none."""
    assert "distiller" in train_student.parse_args(["--config", str(DIGITS_RECIPE)]).command_line
    assert "distiller" not in train_student.parse_args(["--resume", "somewhere"]).command_line


def test_features_select_the_mapped_stages():
    maps = [torch.full((1, 1, 1, 1), float(k)) for k in range(3)]
    feat = Features(stem=maps[0], stages=maps, preact=[m + 10 for m in maps], pooled=torch.zeros(1, 1),
                    logits=torch.zeros(1, 2))
    seen_s, seen_t = StageSelection(student=(2, 0))(feat, feat)
    assert [float(m) for m in seen_s.stages] == [2.0, 0.0] and [float(m) for m in seen_s.preact] == [12.0, 10.0]
    assert seen_t is feat and StageSelection()(None, feat) == (None, feat)
    mixed = Features(stem=maps[0], stages=maps, preact=maps, pooled=torch.zeros(1, 1), logits=torch.zeros(1, 2),
                     tokens=(False, False, True))  # which stages were tokens follows the selection (OFA-KD's branch)
    assert StageSelection(student=(2, 0))(mixed, feat)[0].tokens == (True, False)


class StagesSeen(nn.Module):
    """A stand-in method that records how many student and teacher stages its step and its init
    stage receive."""

    needs = DataNeeds()

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen = []

    def deployed_head(self):
        return None

    def init_stage(self):
        return InitStage(epochs=1, params=[self.weight], loss=lambda s, t: {"loss": self._record(s, t)})

    def forward(self, feat_s, feat_t, batch=None):
        return self._record(feat_s, feat_t), {}

    def _record(self, feat_s, feat_t):
        self.seen.append((len(feat_s.stages), len(feat_t.stages)))
        return self.weight * 0


class ThreeStages(nn.Module):
    def forward_features(self, x):
        maps = [x * k for k in range(3)]
        return Features(stem=x, stages=maps, preact=maps, pooled=x.flatten(1), logits=x.flatten(1)[:, :4])


def test_the_task_gives_a_method_its_selected_stages_in_its_step_and_init_stage():
    probe, other = StagesSeen(), StagesSeen()
    task = DistillTask(ThreeStages(), ThreeStages(), [("probe", 1.0, probe), ("other", 1.0, other)], 1.0, 0.0,
                       ("kd", nn.Identity()), Temperature(4.0), 4, stages={"probe": StageSelection(student=(2,))})
    images, targets = torch.randn(2, 1, 2, 2), torch.tensor([0, 1])
    task(images, targets)
    [init_probe, init_other] = task.init_stages()
    init_probe.module(images, targets)
    init_other.module(images, targets)
    assert probe.seen == [(1, 3), (1, 3)] and other.seen == [(3, 3), (3, 3)]


def test_the_imagenet_recipe_is_the_guides_command_line():
    """ResNet-50 -> ResNet-18 with a hint on layer4 through a 1x1 connector, plus KD: the flags of
    the guides' command line, and FitNet's regressor between the two layer4 maps (64x64 images
    here, 2x2 maps on both sides as 7x7 on ImageNet's 224x224) a 1x1 conv from 512 to 2048."""
    compiled = compile_recipe(yaml.safe_load(IMAGENET_RECIPE.read_text())["distiller"])
    assert compiled.flags == {"distill": "fitnet:100,kd:0.9", "alpha": 0.9, "beta": None, "hint_layer": 1,
                              "feat_s": "layer4", "feat_t": "layer4"}
    assert compiled.stages == {}
    nets = [build_model(f"torchvision:{arch}", 10, "tinyimagenet", FeaturePaths(compiled.flags[key], None, key[-1]))
            for arch, key in (("resnet18", "feat_s"), ("resnet50", "feat_t"))]
    with torch.no_grad():
        feat_s, feat_t = (net.eval().forward_features(torch.zeros(2, 3, 64, 64)) for net in nets)
    hint = FitNet(BuildContext(student=nets[0], teacher=nets[1], feat_s=feat_s, feat_t=feat_t, n_train=1,
                               num_classes=10, options=defaults(FitNet.options, hint_layer=1)))
    conv = hint.regressor.conv
    assert (conv.kernel_size, conv.in_channels, conv.out_channels) == ((1, 1), 512, 2048)


def test_a_network_without_recorders_gives_its_own_stages():
    """A timm ViT into the suite's resnet8 with OFA and KD: resnet8 has no module paths to record;
    OFA reads its own stages, as --distill ofa:1,kd:1 does."""
    compiled = compile_recipe({"losses": [{"ofa": {"type": "ofa", "weight": 1}}, {"kd": {"type": "kd", "weight": 1}}]})
    assert compiled.flags == {"distill": "ofa:1,kd:1", "alpha": 1.0, "beta": None, "feat_s": None, "feat_t": None}
    assert compiled.stages == {}
    # a FitNet hint from a recorded library teacher into the suite's resnet8 (its own stages)
    hint = compile_recipe({"recorders": {"t4": {"teacher": "layer4"}},
                           "losses": {"hint": {"type": "fitnet", "teacher": "t4"}}})
    assert (hint.flags["hint_layer"], hint.flags["feat_s"], hint.stages) == (1, None, {})
    unrecorded_teacher = compile_recipe({"recorders": {"s4": {"student": "layer4"}},
                                         "losses": {"hint": {"type": "fitnet", "student": "s4"}}})
    assert "hint_layer" not in unrecorded_teacher.flags


RECORDERS = {"s4": {"student": "layer4"}, "t4": {"teacher": "layer4"}}
HINT = {"type": "fitnet", "student": "s4", "teacher": "t4"}


@pytest.mark.parametrize("block, message", [
    ({"recorders": RECORDERS, "losses": {"hint": {**HINT, "student": "s5"}}},
     "distiller.losses.hint.student: no recorder 's5' (the student's recorders: s4)"),
    ({"recorders": RECORDERS, "losses": {"hint": {**HINT, "type": "fitnett"}}},
     "distiller.losses.hint: unknown distillation method 'fitnett'"),
    ({"recorders": RECORDERS, "losses": {"hint": {"type": "fitnet", "student": "s4"}}},
     "distiller.losses.hint: fitnet reads the teacher's stages, given none"),
    ({"recorders": RECORDERS, "losses": {"hint": HINT, "kd": {"type": "kd", "student": "s4"}}},
     "distiller.losses.kd: kd reads no recorded stage of the student"),
    ({"recorders": {**RECORDERS, "s3": {"student": "layer3"}}, "losses": {"hint": HINT}},
     "distiller.recorders: s3 feeds no loss"),
    ({"recorders": RECORDERS, "losses": {"hint": {**HINT, "teacher": "s4"}}},
     "distiller.losses.hint.teacher: recorder 's4' records the student, not the teacher"),
    ({"recorders": {"s4": {"student": "layer4", "teacher": "layer4"}}, "losses": {"hint": HINT}},
     "distiller.recorders.s4 must name one network and a module path"),
    ({"recorders": RECORDERS, "losses": {"hint": {**HINT, "hint_layr": 1}}},
     "distiller.losses.hint: unknown key hint_layr; it takes type, weight, student, teacher, hint_layer"),
    ({"recorders": RECORDERS, "losses": {"hint": {**HINT, "weight": -1}}},
     "distiller.losses.hint.weight must be"),
    ({"recorders": RECORDERS, "losses": {"hint": HINT, "again": {**HINT, "type": "hint"}}},
     "distiller.losses.again: a second fitnet loss"),
    ({"recorders": RECORDERS, "losses": {}}, "distiller.losses is empty"),
    ({"recorder": RECORDERS, "losses": {"hint": HINT}}, "distiller: unknown key recorder"),
])
def test_a_wrong_recipe_is_one_line(block, message):
    with pytest.raises(UserError) as err:
        compile_recipe(block)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def _wrong_run(tmp_path, capsys, teacher, block, *flags):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model_s": "torchvision:mobilenet_v3_small", "distiller": block}))
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(fast_args(tmp_path / "save", "--path_t", str(teacher), "--config", str(path), *RUN_FLAGS,
                                     *flags))
    assert exit_info.value.code == 2 and not (tmp_path / "save" / "students").exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    return err


def test_a_module_path_that_does_not_exist_stops_the_run_in_one_line(resnet18_teacher, tmp_path, capsys):
    block = {"recorders": {"s": {"student": "features.8"}, "t": {"teacher": "layr3"}},
             "losses": {"hint": {"type": "fitnet", "student": "s", "teacher": "t"}}}
    err = _wrong_run(tmp_path, capsys, resnet18_teacher, block)
    assert "the recipe's teacher recorders: torchvision:resnet18 has no module 'layr3'; nearest: layer3" in err


def test_a_flag_that_contradicts_the_recipe_stops_the_run(resnet18_teacher, tmp_path, capsys):
    block = {"losses": {"kd": {"type": "kd", "weight": 0.9}}}
    err = _wrong_run(tmp_path, capsys, resnet18_teacher, block, "-a", "0.5")
    assert "--alpha 0.5 contradicts the recipe (--config's distiller:), which sets alpha to 0.9; drop --alpha" in err


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("epoch_time", "images_per_s")}
                for row in csv.DictReader(f)]


@pytest.mark.e2e
def test_the_digits_recipe_trains_as_its_flags(resnet18_teacher, monkeypatch, tmp_path):
    quarter_digits(monkeypatch)
    common = ("--path_t", str(resnet18_teacher), *RUN_FLAGS)
    recipe = train_student.main(fast_args(tmp_path / "recipe", "--config", str(DIGITS_RECIPE), *common))
    flags = train_student.main(fast_args(tmp_path / "flags", *DIGITS_FLAGS, *common))
    assert recipe["run_name"] == flags["run_name"]
    rows = [_rows(tmp_path / which / "students" / recipe["run_name"]) for which in ("recipe", "flags")]
    assert rows[0] == rows[1] and len(rows[0]) == 1 and "train_fitnet" in rows[0][0]
