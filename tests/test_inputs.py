"""Every value a user can give is checked against its declared range before anything is written
(core/ranges.py): each entry point's every flag, discovered from its parser, given NaN, inf, a
negative, zero and a wrong type, ends in one UserError line or is an acceptance listed below with
its reason. The walk calls the parsing layer in-process; a few subprocesses check the exit status
and that no run directory appears."""
import math
import subprocess
import sys

import pytest
import yaml

import train_mutual
import train_self
import train_student
import train_teacher
from conftest import ROOT
from core.errors import UserError
from core.ranges import NAME, NON_NEGATIVE, POSITIVE, at_least, check_value, within
from distiller_zoo import METHODS
from distiller_zoo.crd import CRD
from distiller_zoo.options import lower_keys
from engine.args import milestones, parse_with_config
from method_helpers import make_ctx

ENTRY_POINTS = {"train_teacher": train_teacher, "train_student": train_student, "train_mutual": train_mutual,
                "train_self": train_self}
CASES = {"nan": "nan", "inf": "inf", "negative": "-1", "zero": "0"}
ALL = frozenset(CASES)

# (flag -> the cases the parsing layer accepts, and why); a flag absent accepts none of them.
_NAMES_CHECKED_LATER = "a name the entry point looks up in its registry before anything is written"
_PATH = "a path: any string names one; what it holds is read and checked before anything is written"
_MODULE_PATHS = ("module paths, checked against the network when it is built, before anything is written "
                 "(tests/test_library_networks.py)")
_PLAIN_NAME = "any plain name is a valid name; NAME refuses only separators and '..'"
ACCEPTED = {
    "--model": (ALL, _NAMES_CHECKED_LATER + " (tests/test_train_teacher.py: unknown model)"),
    "--model_s": (ALL, _NAMES_CHECKED_LATER),
    "--models": (ALL, _NAMES_CHECKED_LATER + " (tests/test_train_mutual.py)"),
    "--model_t": (ALL, _NAMES_CHECKED_LATER + ", with the architecture --path_t's checkpoint records"),
    "--feat_s": (ALL, _MODULE_PATHS),
    "--feat_t": (ALL, _MODULE_PATHS),
    "--head_s": (ALL, _MODULE_PATHS),
    "--head_t": (ALL, _MODULE_PATHS),
    "--dataset": (ALL, _NAMES_CHECKED_LATER + " (tests/test_train_teacher.py: unknown dataset)"),
    "--device": (ALL, "core.distributed.setup names an unknown device before anything is written"),
    "-t/--trial": (ALL, _PLAIN_NAME),
    "--run_name": (ALL, _PLAIN_NAME),
    "--data_folder": (ALL, _PATH),
    "--save_dir": (ALL, _PATH),
    "--path_t": (ALL, _PATH),
    "--init_student": (ALL, _PATH),
    "--wkd_cost_matrix": (ALL, _PATH + " (tests/test_method_wkd.py)"),
    "--resume": (ALL, _PATH + " (a RUN_DIR)"),
    # zero is in range where it means "none" or "off"
    "-r/--gamma": ({"zero"}, "a zero weight drops the cross-entropy term"),
    "-a/--alpha": ({"zero"}, "a zero weight drops the KD term (most methods' default)"),
    "-b/--beta": ({"zero"}, "a zero weight drops the method's term"),
    "--seed": ({"zero"}, "0 is a seed"),
    "--num_workers": ({"zero"}, "0 loads in the main process"),
    "--weight_decay": ({"zero"}, "no weight decay"),
    "--momentum": ({"zero"}, "plain SGD"),
    "--dot_delta": ({"zero"}, "DOT with equal momenta"),
    "--warmup_epochs": ({"zero"}, "no warm-up"),
    "--warmup_lr": ({"zero"}, "the warm-up starts from 0 (timm's default is 1e-4, OFA-KD's ViT recipe 5e-7)"),
    "--min_lr": ({"zero"}, "the cosine decays to 0"),
    "--feature_teacher": ({"zero"}, "the first teacher (0-based)"),
    "--hint_layer": ({"zero"}, "FitNet's hint on the stem (one of its choices)"),
    "--init_epochs": ({"zero"}, "no init stage"),
    "--dkd_warmup": ({"zero"}, "no warm-up"),
    "--reviewkd_warmup": ({"zero"}, "no warm-up"),
    "--wkd_decay_start": ({"zero"}, "decay from the first epoch"),
    "--ctkd_lambda_epochs": ({"zero"}, "no curriculum: lambda_max from the start"),
    "--ctkd_t_range": ({"zero"}, "a fixed temperature t_min"),
    "--ctkd_lambda_min": ({"zero"}, "the official curriculum starts at 0"),
    "--ctkd_lambda_max": ({"zero"}, "no gradient reversal"),
    "--dkd_alpha": ({"zero"}, "a zero weight drops TCKD"),
    "--dkd_beta": ({"zero"}, "a zero weight drops NCKD"),
    "--wkd_logit_weight": ({"zero"}, "a zero weight drops the Wasserstein term"),
    "--wkd_sharpen": ({"zero"}, "kappa 0 keeps the distance as the cost"),
    "--wkd_mean_weight": ({"zero"}, "a zero weight drops the mean term"),
    "--sdd_weight": ({"zero"}, "a zero weight drops the complementary cells"),
    "--loss_coefficient": ({"zero"}, "BYOT's auxiliaries on labels alone"),
    "--itrd_lambda_corr": ({"zero"}, "a zero weight drops ITRD's correlation term"),
    "--itrd_lambda_mutual": ({"zero"}, "a zero weight drops ITRD's mutual-information term"),
    "--nkd_gamma": ({"zero"}, "a zero weight drops NKD's non-target term"),
    "--ofa_logit_weight": ({"zero"}, "a zero weight drops OFA's term on the student's own logits"),
    "--reg_alpha": ({"zero"}, "Tf-KD_reg at alpha 0 is plain cross-entropy"),
    "--multiplier": ({"zero"}, "a zero multiplier drops the virtual teacher's KL"),
    "--uskd_alpha": ({"zero"}, "a zero weight drops USKD's soft-target term"),
    "--uskd_beta": ({"zero"}, "a zero weight drops USKD's Zipf term"),
    "--uskd_mu": ({"zero"}, "a zero weight drops USKD's weak classifier"),
    "--srd_feat_weight": ({"zero"}, "a zero weight drops SRD's feature term"),
    "--srd_kl_weight": ({"zero"}, "a zero weight drops SRD's KD term"),
    "--dist_plus_channel_weight": ({"zero"}, "a zero weight drops DIST+'s channel relation"),
    "--dist_plus_spatial_weight": ({"zero"}, "a zero weight drops DIST+'s spatial relation"),
    "--feature_loss_coefficient": ({"zero"}, "no feature hint"),
    "--nce_m": ({"zero"}, "a memory bank replaced by the newest features"),
}
# flags that take no value on the command line (switches, --help) or name the config itself
NO_VALUE = {"-h/--help", "--config"}


def flag_name(action) -> str:
    return "/".join(action.option_strings)


def value_flags(entry):
    """(flag, the option string to give it by) of every flag of `entry` that takes a value."""
    for action in entry.build_parser()._actions:
        if action.option_strings and action.nargs != 0 and flag_name(action) not in NO_VALUE:
            yield flag_name(action), action.option_strings[-1]


def outcome(parse, argv) -> str:
    """'accepted', or the one-line error; an error of several lines fails the test."""
    try:
        parse(argv)
    except UserError as err:
        message = str(err)
        assert "\n" not in message, message
        return message
    return "accepted"


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_flag_refuses_nan_inf_negative_zero_unless_documented(name):
    entry, unexpected, walked = ENTRY_POINTS[name], [], 0
    for flag, option in value_flags(entry):
        accepted = ACCEPTED.get(flag, (frozenset(), ""))[0]
        for case, text in CASES.items():
            walked += 1
            got = outcome(entry.parse_args, [f"{option}={text}"])
            if (got == "accepted") != (case in accepted):
                unexpected.append(f"{flag} {text}: {got}")
    assert walked > 40 and not unexpected, "\n".join(unexpected)


# (in a config file, on the command line); a string flag has no wrong type on the command line
WRONG_TYPES = {int: (1.7, "1.5"), float: ("abc", "abc"), milestones: ([1.5], "1.5"), None: ([1, 2], None)}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_flag_refuses_a_wrong_type_on_the_command_line_and_in_a_config_file(name, tmp_path):
    entry, unexpected = ENTRY_POINTS[name], []
    for action in entry.build_parser()._actions:
        flag = flag_name(action)
        if not action.option_strings or flag in NO_VALUE or action.dest == "resume":
            continue
        in_yaml, on_line = ("yes", None) if action.nargs == 0 else WRONG_TYPES.get(action.type, WRONG_TYPES[None])
        config = tmp_path / f"{action.dest}.yaml"
        config.write_text(yaml.safe_dump({action.dest: in_yaml}))
        tries = [["--config", str(config)]] + ([[f"{action.option_strings[-1]}={on_line}"]] if on_line else [])
        unexpected += [f"{flag} {argv}" for argv in tries if outcome(entry.parse_args, argv) == "accepted"]
    assert not unexpected, "\n".join(unexpected)


def test_every_acceptance_names_a_real_flag():
    flags = {flag for entry in ENTRY_POINTS.values() for flag, _ in value_flags(entry)}
    assert set(ACCEPTED) <= flags, set(ACCEPTED) - flags


# --- the cases of issue 26, each named ----------------------------------------------------------

NAMED = [
    (train_student, ["--distill", "kd:-1"], "the weight of kd in --distill must be a number >= 0, got -1.0"),
    (train_student, ["-r", "-1"], "-r/--gamma must be a number >= 0, got -1.0"),
    (train_student, ["--kd_T_schedule", "linear", "--kd_T_end", "-3"], "--kd_T_end must be a positive number"),
    (train_student, ["--init_lr", "-1"], "--init_lr must be a positive number"),
    (train_teacher, ["--lr_decay_rate", "-1"], "--lr_decay_rate must be in (0, 1], got -1.0"),
    (train_teacher, ["--run_name", "../../escape"], "--run_name must be a plain name"),
    (train_teacher, ["--trial", "../x"], "-t/--trial must be a plain name"),
    (train_student, ["--distill", "kd:nan"], "the weight of kd in --distill must be a number >= 0, got nan"),
    (train_student, ["-a", "nan"], "-a/--alpha must be a number >= 0, got nan"),
    (train_student, ["-b", "inf"], "-b/--beta must be a number >= 0, got inf"),
    (train_student, ["--nce_t", "0"], "--nce_t must be a positive number, got 0.0"),
    (train_student, ["--dkd_beta", "nan"], "--dkd_beta must be a number >= 0, got nan"),
    (train_mutual, ["--lr_decay_rate", "nan"], "--lr_decay_rate must be in (0, 1], got nan"),
    (train_student, ["--distill", "kd:"], "--distill 'kd:' has an empty weight"),
    (train_student, ["--distill", "crd:0.8,,at"], "--distill 'crd:0.8,,at' has an empty entry"),
    (train_student, ["--distill", "crd,"], "--distill 'crd,' has an empty entry"),
    (train_student, ["--init_epochs", "-1"], "--init_epochs must be an integer >= 0, got -1"),
    (train_self, ["--save_freq", "0"], "--save_freq must be an integer >= 1, got 0"),
    (train_teacher, ["--num_workers", "-1", "--loader", "torch"], "--num_workers must be an integer >= 0, got -1"),
    (train_teacher, ["--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'"),
    (train_mutual, ["--models", "resnet8,,resnet14"], "unknown model '' for --models"),
]


@pytest.mark.parametrize("entry, flags, message", NAMED, ids=[" ".join(f) for _, f, _ in NAMED])
def test_each_named_case_is_one_line_status_2_and_writes_nothing(entry, flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        entry.main(["--dataset", "digits", "--save_dir", str(tmp_path / "save"), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_float_for_an_integer_in_a_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 1.7\n")
    with pytest.raises(SystemExit) as stop:
        train_teacher.main(["--config", str(config), "--save_dir", str(tmp_path / "save")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == f"error: --config {config}: epochs must be an integer, got 1.7\n"
    assert not (tmp_path / "save").exists()


def test_a_config_file_takes_what_the_command_line_would(tmp_path):
    """YAML reads 1e-3 as a string and 2 for a float flag as an int: both are what the flag means;
    a stored args.json (lists of milestones, switches, per-method values) replays unchanged."""
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-3\nkd_T: 2\nlr_decay_epochs: [3, 4]\ntrial: 7\ndeterministic: true\n"
                      "nce_k: 8\nmode: relax\n")
    args = train_student.parse_args(["--config", str(config)])
    assert (args.learning_rate, args.kd_T, args.lr_decay_epochs, args.trial) == (1e-3, 2.0, [3, 4], "7")
    assert (args.deterministic, args.nce_k, args.mode) == (True, 8, "relax")
    config.write_text("mode: other\n")  # argparse checks choices on the command line only; the ranges everywhere
    with pytest.raises(UserError, match="--mode must be one of exact, relax, got 'other'"):
        train_student.parse_args(["--config", str(config)])


def test_the_command_line_still_wins_over_a_config_file_out_of_range(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 0\n")
    assert train_teacher.parse_args(["--config", str(config), "--epochs", "3"]).epochs == 3


@pytest.mark.parametrize("script, flags", [
    ("train_student.py", ["--distill", "kd:-1"]),
    ("train_teacher.py", ["--run_name", "../../escape"]),
])
def test_from_a_shell_status_2_one_line_and_no_run_directory(script, flags, tmp_path):
    save = tmp_path / "save"
    done = subprocess.run([sys.executable, str(ROOT / script), "--dataset", "digits", "--save_dir", str(save),
                           *flags], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --- the vocabulary and the methods' declarations -----------------------------------------------

def test_the_vocabulary_draws_its_boundaries_where_it_says():
    cases = [(POSITIVE, 1e-9, True), (POSITIVE, 0.0, False), (NON_NEGATIVE, 0, True), (NON_NEGATIVE, -1e-9, False),
             (at_least(1), 1, True), (at_least(1), 0, False), (at_least(0), 1.5, False), (at_least(0), True, False),
             (within(0, 1, "(]"), 1, True), (within(0, 1, "(]"), 0, False), (within(0, 1, "[)"), 0, True),
             (within(0, 1, "[)"), 1, False), (within(0, 1), math.inf, False), (POSITIVE, "3", False),
             (NAME, "run-1.b", True), (NAME, "a/b", False), (NAME, "..", False), (NAME, "a\\b", False),
             (NAME, "", False)]
    for valid, value, holds in cases:
        try:
            valid.check("--x", value)
            got = True
        except UserError:
            got = False
        assert got == holds, (valid, value)
    with pytest.raises(UserError, match="--x must be a finite number, got nan"):
        check_value("--x", math.nan, kind=float)  # a float with no declared range
    check_value("--x", None, POSITIVE)  # not given


def test_every_declared_default_and_published_value_lies_in_its_range():
    for spec in METHODS.values():
        for opt in spec.options:
            for value in (opt.default, *lower_keys(opt.per_pair).values()):
                opt.check(value)
    for entry in ENTRY_POINTS.values():
        parse_with_config(entry.build_parser(), [])


def test_a_method_built_outside_train_student_checks_its_declared_ranges():
    ctx, _ = make_ctx("resnet8", "resnet8", nce_t=0.0)
    with pytest.raises(UserError, match="--nce_t must be a positive number, got 0.0"):
        CRD(ctx)
