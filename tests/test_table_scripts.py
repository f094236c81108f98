"""The reproduction scripts: every command their --dry-run prints parses with the entry
point's own parser and names real models and methods, takes the method registry's published
weights (or says where it departs from them), and together they cover every cell of the
published tables."""
import functools
import os
import re
import shlex
import subprocess

import pandas as pd
import pytest

import train_student
import train_teacher
from conftest import ROOT
from distiller_zoo.objective import parse_objective
from engine.build import check_model_name

ENTRY_POINTS = {"train_student.py": train_student, "train_teacher.py": train_teacher}
SCRIPTS = ("run_cifar_vanilla.sh", "run_cifar_distill.sh", "run_cifar_dkd.sh", "run_digits_table.sh",
           "run_imagenet.sh")


@functools.lru_cache(maxsize=None)   # a dry run takes seconds (the digits script asks Python for its methods)
def dry_run(script, **env):
    done = subprocess.run(["bash", str(ROOT / "scripts" / script), "--dry-run"], capture_output=True, text=True,
                          env={**os.environ, "TRIALS": "2", **env}, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(line for line in done.stdout.splitlines() if line.strip())


def parse(line):
    """(entry point name, parsed args) of one printed command."""
    words = shlex.split(line)
    while "=" in words[0]:
        words.pop(0)  # environment assignments
    script = next(k for k, word in enumerate(words) if word.endswith(".py"))  # after python or a launcher
    entry, argv = os.path.basename(words[script]), words[script + 1:]
    return entry, ENTRY_POINTS[entry].parse_args(argv)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_printed_command_parses(script):
    lines = dry_run(script)
    assert lines
    for line in lines:
        if not ("train_teacher.py" in line or "train_student.py" in line):
            continue
        entry, args = parse(line)
        assert args.auto_resume, line
        if entry == "train_student.py":
            check_model_name(args.model_s)
            parse_objective(args.distill, args.gamma, args.alpha, args.beta, args.logit_stand)
        else:
            check_model_name(args.model)


def teacher_name(args) -> str:
    """The teacher architecture a printed command names, as train_student.py will read it."""
    if args.path_t.startswith("torchvision:"):
        return "imagenet_" + args.path_t.split(":")[1]
    return os.path.basename(os.path.dirname(args.path_t)).rsplit(f"_{args.dataset}_", 1)[0]


def weights(args, given: bool):
    """(r, a, [b per method]) of a printed command: with its -r/-a/-b, or the registry's for its pair."""
    flags = (args.gamma, args.alpha, args.beta) if given else (None, None, None)
    objective = parse_objective(args.distill, *flags, args.logit_stand, pair=(teacher_name(args), args.model_s))
    return objective.gamma, objective.alpha, [term.weight for term in objective.methods]


def departures(script) -> set:
    """The method labels whose weights the script departs from the registry for, each said in a
    `registry departure (label)` comment."""
    return set(re.findall(r"registry departure \(([^)]+)\)", (ROOT / "scripts" / script).read_text()))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_take_the_registrys_weights_or_say_why_not(script):
    """Published weights live in the registry (distiller_zoo/): a command that gives -r/-a/-b
    other than the registry's for its pair is a deliberate departure, commented in the script."""
    departed = set()
    for line in dry_run(script):
        entry, args = parse(line)
        if entry != "train_student.py":
            continue
        if weights(args, given=True) != weights(args, given=False):
            label = parse_objective(args.distill, args.gamma, args.alpha, args.beta, args.logit_stand).name
            assert label in departures(script), f"{script}: weights differ from the registry's, uncommented: {line}"
            departed.add(label)
    assert departed == departures(script)   # no stale departure comment


def test_a_weight_that_differs_from_the_registry_is_caught():
    args = train_student.parse_args(["--path_t", "save/teachers/resnet56_cifar100_trial0/ckpt_last.pth",
                                     "--model_s", "resnet20", "--distill", "crd", "-b", "0.5"])
    assert weights(args, given=True) != weights(args, given=False)
    args.beta = 0.8
    assert weights(args, given=True) == weights(args, given=False)


def cells(lines):
    """Table cells (teacher, student, method label) with their trials."""
    found = {}
    for line in lines:
        entry, args = parse(line)
        teacher = os.path.basename(os.path.dirname(args.path_t)).rsplit("_cifar100_", 1)[0]
        objective = parse_objective(args.distill, args.gamma, args.alpha, args.beta, args.logit_stand)
        found.setdefault((teacher, args.model_s, objective.name), set()).add(args.trial)
    return found


def test_the_distill_script_covers_both_crd_tables_with_published_weights():
    found = cells(dry_run("run_cifar_distill.sh"))
    published = pd.read_csv(ROOT / "scripts" / "published_cifar100.csv")
    crd_tables = published[published["method"].isin(
        ["kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd"])]
    expected = {(r.teacher, r.student, r.method) for r in crd_tables.itertuples()}
    crd_kd = {(t, s, "crd+kd") for t, s, _ in expected}
    assert set(found) == expected | crd_kd
    assert len(found) == 7 * 14 - 1 + 6 * 13  # no FSP for wrn_40_2 -> wrn_40_1 (unequal channels)
    assert all(trials == {"1", "2"} for trials in found.values())


def test_the_vanilla_script_trains_every_network_of_the_tables():
    lines = dry_run("run_cifar_vanilla.sh")
    published = pd.read_csv(ROOT / "scripts" / "published_cifar100.csv")
    trained = {parse(line)[1].model for line in lines}
    assert trained == set(published["teacher"]) | set(published["student"])


def test_the_dkd_script_covers_the_dkd_tables():
    found = cells(dry_run("run_cifar_dkd.sh"))
    published = pd.read_csv(ROOT / "scripts" / "published_cifar100.csv")
    dkd = published[published["method"] == "dkd"]
    assert {(r.teacher, r.student, "dkd") for r in dkd.itertuples()} <= set(found)
    assert ("resnet32x4", "resnet8x4", "kd+ls") in found


def test_the_imagenet_script_runs_both_published_pairs_under_torchrun():
    lines = dry_run("run_imagenet.sh", GPUS="4")
    assert all("torch.distributed.run --nproc_per_node 4" in line and "CUDA_VISIBLE_DEVICES=0,1,2,3" in line
               for line in lines)
    found = {(parse(line)[1].path_t, parse(line)[1].model_s, parse(line)[1].distill) for line in lines}
    methods = {"kd", "at", "ofd", "crd", "reviewkd", "dkd", "dist"}
    assert found == {(f"torchvision:{t}", s, m) for t, s in (("resnet34", "imagenet_resnet18"),
                                                           ("resnet50", "imagenet_mobilenet_v1")) for m in methods}
    published = pd.read_csv(ROOT / "scripts" / "published_imagenet.csv")
    assert set(published["student"]) <= {"imagenet_resnet18", "imagenet_mobilenet_v1"}


def test_an_unknown_option_is_refused():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "run_cifar_distill.sh"), "--fast"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "unknown argument '--fast'" in done.stderr
