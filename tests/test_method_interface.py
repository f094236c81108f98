"""One method, one file: a method declared in a file outside the suite (tests/plugins/) gets its
flag, its data and a training run through train_student.py with no other file changed; per-pair
published values; a run resumed by its directory alone; a --config file and args.json replay."""
import csv
import importlib
import json
import sys
from types import SimpleNamespace

import pytest
import torch

import train_student
from conftest import ROOT, crash_after_checkpoint, fast_args, read_json
from distiller_zoo import ALIASES, METHODS
from distiller_zoo.options import DataNeeds, Option, resolve_options
from method_helpers import quarter_digits

sys.path.insert(0, str(ROOT / "tests" / "plugins"))


@pytest.fixture
def logit_l1():
    """The plugin method registered for one test, then taken out of the registry again."""
    module = importlib.import_module("logit_l1")
    importlib.reload(module)
    yield module
    METHODS.pop("logit_l1", None)
    ALIASES.pop("logit_l1", None)


def test_a_method_from_its_own_file_has_its_flag_and_trains(logit_l1, digits_teacher, capsys):
    save, teacher_dir = digits_teacher
    with pytest.raises(SystemExit):
        train_student.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "logit_l1 (DistillBench's documentation example)" in text and "--logit_l1_power" in text
    results = train_student.main(fast_args(save, "--path_t", str(teacher_dir / "best.pth"), "--distill", "logit_l1",
                                           "--logit_l1_power", "2", "--epochs", "1", "--trial", "plugin"))
    run = save / "students" / results["run_name"]
    assert read_json(run / "args.json")["logit_l1_power"] == 2.0
    row = (run / "metrics.csv").read_text().splitlines()
    assert "logit_l1_distance" in row[0] and len(row) == 2


def test_options_resolve_given_then_published_then_default():
    options = (Option("w", float, 8.0, "a weight", per_pair={("ResNet56", "resnet20"): 2.0}),
               Option("k", int, 3, "a count"))
    given = SimpleNamespace(w=None, k=None)
    values, sources = resolve_options(options, given, ("resnet56", "resnet20"))
    assert (values.w, values.k, sources) == (2.0, 3, {"w": "published for resnet56 -> resnet20", "k": "default"})
    assert (given.w, given.k) == (None, None)  # untouched: the run's configuration records the values
    # (engine/student_run.py; tests/test_config.py checks args.json holds them)
    values, sources = resolve_options(options, SimpleNamespace(w="5", k=None), ("resnet56", "resnet20"))
    assert (values.w, sources["w"]) == (5.0, "given")
    values, _ = resolve_options(options, SimpleNamespace(w=None, k=None), ("vgg13", "vgg8"))
    assert values.w == 8.0
    values, _ = resolve_options(options, SimpleNamespace(w=None, k=None), ("ResNet56", "Resnet20"))
    assert values.w == 2.0  # model names match in any case


def test_a_value_published_beside_another_method_comes_before_the_pairs():
    options = (Option("w", float, 8.0, "a weight", per_pair={("resnet56", "resnet20"): 2.0}, with_method={"m2": 4.0}),)
    pair = ("resnet56", "resnet20")
    values, sources = resolve_options(options, SimpleNamespace(w=None), pair, others=("m1", "m2"))
    assert (values.w, sources["w"]) == (4.0, "published with m2")
    values, sources = resolve_options(options, SimpleNamespace(w=None), pair, others=("m1",))
    assert (values.w, sources["w"]) == (2.0, "published for resnet56 -> resnet20")
    values, sources = resolve_options(options, SimpleNamespace(w=1.0), pair, others=("m2",))
    assert (values.w, sources["w"]) == (1.0, "given")
    assert "4.0 beside m2" in options[0].describe()


def test_data_needs_merge_and_conflict():
    merged = DataNeeds(indices=True).merge(DataNeeds(contrast=(16, "exact"))).merge(DataNeeds(strong_view=True))
    assert merged == DataNeeds(indices=True, contrast=(16, "exact"), strong_view=True)
    with pytest.raises(Exception, match="different contrastive negatives"):
        DataNeeds(contrast=(16, "exact")).merge(DataNeeds(contrast=(32, "exact")))


def test_every_method_option_is_one_flag_with_one_default():
    seen = {}
    for spec in METHODS.values():
        for opt in spec.options:
            assert opt.name not in seen or opt.same_flag(seen[opt.name]), opt.name
            seen[opt.name] = opt
    parser = train_student.build_parser()
    flags = {a.dest: a for a in parser._actions}
    for name, opt in seen.items():
        assert flags[name].default is None  # "not given", so per-pair values can apply
        assert f"(default: {opt.default})" in flags[name].help


def test_ctkd_flags_reach_the_method(digits_teacher):
    save, teacher_dir = digits_teacher
    results = train_student.main(fast_args(save, "--path_t", str(teacher_dir / "best.pth"), "--distill", "ctkd",
                                           "--ctkd_t_min", "2", "--ctkd_t_range", "3", "--epochs", "1",
                                           "--trial", "ctkd"))
    stored = read_json(save / "students" / results["run_name"] / "args.json")
    assert (stored["ctkd_t_min"], stored["ctkd_t_range"], stored["ctkd_mode"]) == (2.0, 3.0, "global")
    with open(save / "students" / results["run_name"] / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert 2.0 < float(row["ctkd_temperature"]) < 5.0


def test_resume_by_run_directory_alone(digits_teacher, tmp_path, monkeypatch):
    quarter_digits(monkeypatch)
    save, teacher_dir = digits_teacher
    flags = ["--path_t", str(teacher_dir / "best.pth"), "--distill", "crd", "--nce_k", "64", "--epochs", "2",
             "--deterministic", "--amp", "off", "--no-channels_last"]
    whole = train_student.main(fast_args(tmp_path / "whole", *flags))
    crash_after_checkpoint(train_student.main, fast_args(tmp_path / "cut", *flags), monkeypatch, epoch=1)
    run = tmp_path / "cut" / "students" / whole["run_name"]
    resumed = train_student.main(["--resume", str(run)])
    assert resumed["last_top1"] == whole["last_top1"]
    a = torch.load(tmp_path / "whole" / "students" / whole["run_name"] / "ckpt_last.pth", weights_only=False)
    b = torch.load(run / "ckpt_last.pth", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_config_file_sets_flags_and_args_json_replays_a_run(digits_teacher, tmp_path, capsys):
    save, teacher_dir = digits_teacher
    config = tmp_path / "recipe.yaml"
    config.write_text(f"distill: dkd\ndkd_beta: 3.0\nepochs: 1\npath_t: {teacher_dir / 'best.pth'}\n"
                      "deterministic: true\namp: 'off'\nchannels_last: false\n")
    args = train_student.parse_args(["--config", str(config), "--epochs", "2"])
    assert (args.distill, args.dkd_beta, args.epochs) == ("dkd", 3.0, 2)
    first = train_student.main(fast_args(tmp_path / "a", "--config", str(config), "--trial", "r"))
    replay = train_student.main(["--config", str(tmp_path / "a" / "students" / first["run_name"] / "args.json"),
                                 "--save_dir", str(tmp_path / "b")])
    assert replay["run_name"] == first["run_name"] and replay["last_top1"] == first["last_top1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(SystemExit) as stop:
        train_student.main(["--config", str(bad)])
    assert stop.value.code == 2 and "unknown flags: epochz" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "students" / first["run_name"] / "args.json").read_text())["dkd_beta"] == 3.0
