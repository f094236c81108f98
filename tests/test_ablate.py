"""scripts/ablate.py and scripts/ablate_cifar.py: the grid's command lines, the table's
mean ± std and n against a hand computation on fake runs, the published numbers beside them, bad
inputs, and on digits an end-to-end 2-axis ablation over flags that change nothing (equal cells)."""
import json
import shlex
import statistics
import subprocess

import pandas as pd
import pytest

import scripts.ablate as ablate
import scripts.ablate_cifar as ablate_cifar
import train_student
from conftest import read_json
from method_helpers import quarter_digits
from scripts import slurm
from test_table_scripts import departures, weights


def write_run(save, name, args, results):
    run = save / "students" / name
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(args))
    (run / "results.json").write_text(json.dumps(results))


TEACHER = "/t/resnet8_digits_trial0/ckpt_last.pth"
# (nce_k, nce_t) -> last-epoch top-1 of trials 1, 2, 3 (None: the run has not finished)
FAKE = {(256, 0.05): [50.0, 52.0, 57.0], (256, 0.1): [61.0, 60.0, None],
        (1024, 0.05): [70.5, None, None], (1024, 0.1): [40.0, 44.0, 42.0]}


@pytest.fixture
def fake_grid(tmp_path):
    """Fake finished runs of a 2 x 2 grid over nce_k x nce_t, 3 trials (some missing)."""
    save = tmp_path / "abl"
    for (k, t), tops in FAKE.items():
        for trial, top in enumerate(tops, 1):
            if top is None:
                continue
            name = f"g_resnet8_digits_trial0-resnet8_nce_k-{k}_nce_t-{'0.10' if t == 0.1 else t}_trial{trial}"
            write_run(save, name, {"nce_k": k, "nce_t": t, "trial": str(trial)},
                      {"dataset": "digits", "model": "resnet8", "teacher": "resnet8", "method": "crd",
                       "trial": str(trial), "last_top1": top, "best_top1": top + 1})
    return save


def grid_argv(save, *extra):
    return ["--name", "g", "--save", str(save), "--pair", f"{TEACHER}:resnet8", "--trials", "3",
            "--vary", "nce_k=256,1024", "--vary", "nce_t=0.05,0.10", *extra, "--", "--distill", "crd",
            "--dataset", "digits"]


def test_the_table_is_the_mean_std_and_n_of_each_grid_point(fake_grid, capsys):
    assert ablate.main(grid_argv(fake_grid, "--table_only")) == 0
    table = pd.read_csv(fake_grid / "table.csv")
    assert list(table.columns[:2]) == ["nce_k", "nce_t"]
    for (k, t), tops in FAKE.items():
        done = [top for top in tops if top is not None]
        row = table[(table["nce_k"] == k) & (table["nce_t"] == t)].iloc[0]
        assert row["n"] == len(done)
        assert row["mean"] == pytest.approx(sum(done) / len(done), abs=1e-4)
        if len(done) > 1:
            assert row["std"] == pytest.approx(statistics.stdev(done), abs=1e-4)
        else:
            assert pd.isna(row["std"])
    markdown = (fake_grid / "table.md").read_text()
    # rows nce_k, columns nce_t, in the command's order; 0.10 on the command line is the stored 0.1
    assert "| nce_t = 0.05" in markdown and "nce_t = 0.1 " in markdown
    assert "| 53.00 ± 3.61 (3) " in markdown and "| 60.50 ± 0.71 (2) " in markdown and "| 70.50 (1) " in markdown
    assert markdown.index(" 256 |") < markdown.index(" 1024 |")
    latex = (fake_grid / "table.tex").read_text()
    assert r"53.00 $\pm$ 3.61 (3)" in latex and r"nce\_t = 0.05" in latex
    assert (fake_grid / "figure.png").stat().st_size > 0 and (fake_grid / "figure.pdf").stat().st_size > 0
    assert "53.00 ± 3.61 (3)" in capsys.readouterr().out


def test_the_best_epoch_metric_and_the_published_number(fake_grid, tmp_path, monkeypatch):
    reference = tmp_path / "published.csv"
    reference.write_text("study,teacher,student,setting,top1,source\n"
                         "g,resnet8,resnet8,nce_k=1024 nce_t=0.1,40.0,a test\n"
                         "g,resnet8,resnet20,nce_k=256 nce_t=0.05,99.0,another pair\n")
    monkeypatch.setattr(ablate, "PUBLISHED", reference)
    assert ablate.main(grid_argv(fake_grid, "--table_only", "--metric", "best", "--published", "g")) == 0
    table = pd.read_csv(fake_grid / "table.csv").set_index(["nce_k", "nce_t"])
    assert table.loc[(1024, 0.1), "mean"] == pytest.approx(43.0)   # best_top1 = last + 1
    assert table.loc[(1024, 0.1), "published"] == 40.0 and table.loc[(1024, 0.1), "diff"] == pytest.approx(3.0)
    assert table["published"].notna().sum() == 1   # the other row is another pair's
    assert "43.00 ± 2.00 (3) [40.00, +3.00]" in (fake_grid / "table.md").read_text()


def test_one_axis_and_several_pairs(tmp_path):
    """With several pairs the pair is the first axis; one --vary is then the columns."""
    save = tmp_path / "abl"
    for teacher in ("resnet20", "resnet56"):
        for k, top in ((256, 60.0), (1024, 70.0)):
            write_run(save, f"p_{teacher}-resnet8_nce_k-{k}_trial1", {"nce_k": k},
                      {"dataset": "digits", "model": "resnet8", "teacher": teacher, "method": "crd", "trial": "1",
                       "last_top1": top + (teacher == "resnet56"), "best_top1": top})
    assert ablate.main(["--name", "p", "--save", str(save), "--teachers", "/t", "--pair", "resnet56:resnet8",
                        "--pair", "resnet20:resnet8", "--vary", "nce_k=256,1024", "--table_only", "--",
                        "--distill", "crd", "--dataset", "digits"]) == 0
    markdown = (save / "table.md").read_text()
    assert "| pair " in markdown and "| nce_k = 256 " in markdown
    assert markdown.index("resnet56 → resnet8") < markdown.index("resnet20 → resnet8")   # --pair's order
    assert "| 61.00 (1) " in markdown


def test_three_axes_are_rows_of_two_and_panels_of_heatmaps(fake_grid):
    """With two pairs and two --vary axes, the rows are (pair, nce_k) and the figure one heatmap
    per pair."""
    for run in list((fake_grid / "students").iterdir()):
        other = fake_grid / "students" / run.name.replace("resnet8_digits_trial0-", "resnet20-")
        other.mkdir()
        (other / "args.json").write_text((run / "args.json").read_text())
        results = json.loads((run / "results.json").read_text())
        (other / "results.json").write_text(json.dumps({**results, "teacher": "resnet20",
                                                        "last_top1": results["last_top1"] + 5}))
    assert ablate.main(["--name", "g", "--save", str(fake_grid), "--teachers", "/t", "--pair", f"{TEACHER}:resnet8",
                        "--pair", "resnet20:resnet8", "--trials", "3", "--vary", "nce_k=256,1024", "--vary",
                        "nce_t=0.05,0.10", "--table_only", "--", "--distill", "crd", "--dataset", "digits"]) == 0
    markdown = (fake_grid / "table.md").read_text()
    assert "| pair " in markdown and "| resnet20 → resnet8 |     256 | 58.00 ± 3.61 (3) " in markdown
    assert "| resnet8 → resnet8  |     256 | 53.00 ± 3.61 (3) " in markdown
    assert (fake_grid / "figure.png").stat().st_size > 0


def test_a_trainer_without_a_teacher(tmp_path):
    """--entry train_teacher.py: runs under teachers/, a figure titled by the network alone."""
    save = tmp_path / "abl"
    for lr, top in (("0.05", 40.0), ("0.1", 50.0)):
        run = save / "teachers" / f"lr_learning_rate-{lr}_trial1"
        run.mkdir(parents=True)
        (run / "args.json").write_text(json.dumps({"learning_rate": float(lr)}))
        (run / "results.json").write_text(json.dumps({"dataset": "digits", "model": "resnet8", "method": "vanilla",
                                                      "trial": "1", "last_top1": top, "best_top1": top}))
    assert ablate.main(["--entry", "train_teacher.py", "--name", "lr", "--save", str(save), "--table_only",
                        "--vary", "learning_rate=0.05,0.1", "--", "--model", "resnet8", "--dataset", "digits"]) == 0
    assert "|            0.1  | 50.00 (1) |" in (save / "table.md").read_text()
    assert (save / "figure.png").stat().st_size > 0


def test_slurm_gets_the_lines_and_lib_sh_settings(tmp_path, monkeypatch, capsys):
    """--launcher slurm hands the command lines to scripts/slurm.py submit with the table scripts'
    environment settings, writes commands.txt, and makes no table (the jobs have not run)."""
    submitted = {}

    def submit(argv, input, text):
        submitted.update(argv=argv, lines=input.splitlines())
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(ablate.subprocess, "run", submit)
    for key, value in {"PARTITION": "gpu", "TIME_LIMIT": "30", "AFTER": "41", "MEM_GB": "16"}.items():
        monkeypatch.setenv(key, value)
    save = tmp_path / "abl"
    assert ablate.main(grid_argv(save, "--launcher", "slurm")) == 0
    argv = submitted["argv"]
    assert argv[1].endswith("scripts/slurm.py") and argv[2:5] == ["submit", "--launcher", "slurm"]
    options = slurm.parse_args(argv[2:])  # as the submitting process reads them, environment included
    assert (options.partition, options.time_limit, options.after, options.mem_gb) == ("gpu", 30, "41", 16.0)
    assert options.folder == str(save / "slurm")
    assert submitted["lines"] == (save / "commands.txt").read_text().splitlines() and len(submitted["lines"]) == 12
    assert not (save / "table.md").exists() and "--table_only" in capsys.readouterr().out


def test_the_command_lines(tmp_path, capsys):
    assert ablate.main(grid_argv(tmp_path / "abl", "--dry-run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 2 * 3
    parsed = [train_student.parse_args(shlex.split(line)[2:]) for line in lines]
    assert {(a.nce_k, a.nce_t, a.trial) for a in parsed} == {(k, t, str(n)) for k in (256, 1024)
                                                            for t in (0.05, 0.1) for n in (1, 2, 3)}
    assert all(a.auto_resume and a.save_dir == str(tmp_path / "abl") and a.distill == "crd" for a in parsed)
    assert parsed[0].run_name == "g_resnet8_digits_trial0-resnet8_nce_k-256_nce_t-0.05_trial1"
    assert not (tmp_path / "abl").exists()


def test_values_holding_commas_are_separated_by_semicolons(tmp_path, capsys):
    assert ablate.main(["--name", "m", "--save", str(tmp_path), "--pair", f"{TEACHER}:resnet8", "--dry-run",
                        "--vary", "lr_decay_epochs=150,180,210;100,150", "--", "--distill", "kd"]) == 0
    parsed = [train_student.parse_args(shlex.split(line)[2:]) for line in capsys.readouterr().out.splitlines()]
    assert [a.lr_decay_epochs for a in parsed] == [[150, 180, 210], [100, 150]]
    assert parsed[1].run_name == "m_resnet8_digits_trial0-resnet8_lr_decay_epochs-100-150_trial1"
    assert ablate.label([100, 150]) == ablate.label("100,150")   # args.json's list is the command's cell


@pytest.mark.parametrize("argv, message", [
    (["--vary", "nce_k"], "is not FLAG=V1,V2"),
    (["--vary", "nce_k="], "empty value"),
    (["--vary", "nce_k=1,,2"], "empty value"),
    (["--vary", "nce_k=1,1"], "repeats a value"),
    (["--vary", "nce_k=1", "--vary", "nce_k=2"], "given twice"),
    (["--vary", "no_such_flag=1,2"], "unrecognized arguments: --no_such_flag"),
    (["--vary", "nce_t=-1"], "--nce_t"),
    (["--vary", "trial=1,2"], "sets --trial itself"),
    (["--vary", "kd_T=1", "--", "--kd_T", "4"], "both fixed after '--' and varied"),
    (["--vary", "kd_T=1", "--", "--save_dir", "x"], "--save_dir after '--'"),
    (["--vary", "kd_T=1", "--pair", "resnet8"], "is not TEACHER:STUDENT"),
    (["--vary", "kd_T=1", "--published", "no_such_study"], "no such study"),
    (["--pair", "resnet8:resnet8"], "nothing to ablate"),
    (["--vary", "kd_T=1,2", "--table_only"], "no finished run of ablation 'bad'"),
    (["--vary", "kd_T=1", "--entry", "train_teacher.py", "--pair", "a:b"], "--pair is for train_student.py"),
])
def test_a_bad_input_is_one_line_and_status_2_before_anything_is_written(tmp_path, capsys, argv, message):
    save = tmp_path / "abl"
    with pytest.raises(SystemExit) as stop:
        ablate.main(["--name", "bad", "--save", str(save), *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not save.exists()


def cifar_lines(capsys) -> list:
    assert ablate_cifar.main(["--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def test_the_cifar_ablations_print_valid_command_lines(capsys, monkeypatch):
    monkeypatch.setenv("TRIALS", "2")
    lines = cifar_lines(capsys)
    parsed = [train_student.parse_args(shlex.split(line)[2:]) for line in lines]
    assert len({a.run_name for a in parsed}) == len(lines) == 2 * (4 * 3 + 5 * 3 + 5 + 4 * 3)
    by_study = {}
    for args in parsed:
        assert args.auto_resume and args.epochs == 240 and args.data_folder.endswith("data")
        by_study.setdefault(args.save_dir.rsplit("/", 1)[1], []).append(args)
    assert {(a.nce_k, a.nce_t) for a in by_study["crd_nce"]} == {(k, t) for k in (256, 1024, 4096, 16384)
                                                                for t in (0.05, 0.07, 0.1)}
    assert {(a.kd_T, a.alpha) for a in by_study["kd_temperature_weight"]} == {
        (t, w) for t in (1, 2, 4, 8, 16) for w in (0.1, 0.5, 0.9)}
    assert {a.dkd_beta for a in by_study["dkd_beta"]} == {1, 2, 4, 8, 16}
    # DKD's Table 11 ladder (Zhao et al., CVPR 2022; its teachers named in mdistiller issues 8 and 54)
    teachers = {a.path_t.split("/")[-2] for a in by_study["capacity_gap"]}
    assert teachers == {f"{t}_cifar100_trial0" for t in ("wrn_28_2", "wrn_40_2", "wrn_16_4", "wrn_28_4")}
    assert {(a.model_s, a.dkd_beta) for a in by_study["capacity_gap"]} == {("wrn_16_2", 6)}
    assert {a.distill for a in by_study["capacity_gap"]} == {"kd", "dkd", "crd"}
    assert all(a.trial in ("1", "2") for a in parsed)


def test_an_unknown_cifar_study_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as stop:
        ablate_cifar.main(["--study", "nce_k", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "invalid choice: 'nce_k'" in err and len(err.splitlines()) == 1


def test_the_cifar_ablations_take_the_registrys_weights_or_say_why_not(capsys):
    departed = set()
    for line in cifar_lines(capsys):
        args = train_student.parse_args(shlex.split(line)[2:])
        if weights(args, given=True) != weights(args, given=False):
            departed.add(args.distill)
    assert departed == departures("ablate_cifar.py") == {"kd"}


def test_every_published_ablation_number_has_its_grid_point(capsys):
    """Each row of published_ablations.csv names a pair and a setting that its study runs."""
    points = {}
    for line in cifar_lines(capsys):
        args = train_student.parse_args(shlex.split(line)[2:])
        study = args.save_dir.rsplit("/", 1)[1]
        teacher = args.path_t.split("/")[-2].split("_cifar100_")[0]
        points.setdefault(study, []).append((teacher, args.model_s, vars(args)))
    published = pd.read_csv(ablate.PUBLISHED, dtype=str)
    assert set(published["study"]) == set(ablate_cifar.STUDIES)
    for row in published.itertuples():
        setting = ablate.setting(row.setting)
        assert any((t, s) == (row.teacher, row.student) and all(ablate.label(a[k]) == v for k, v in setting.items())
                   for t, s, a in points[row.study]), row


@pytest.mark.e2e
def test_on_digits_flags_that_change_nothing_give_equal_cells(digits_teacher, tmp_path, monkeypatch, capsys):
    """A 2-axis ablation end to end: 4 one-epoch students on a quarter of the digits, the table
    and the heatmap; the axes (progress-line and TensorBoard frequencies) change nothing, so with
    --deterministic every cell is the same. Run again, every run is finished and skipped."""
    quarter_digits(monkeypatch)
    _, teacher = digits_teacher
    save = tmp_path / "abl"
    argv = ["--name", "same", "--save", str(save), "--pair", f"{teacher / 'best.pth'}:resnet8",
            "--vary", "print_freq=1,2", "--vary", "tb_freq=1,3", "--", "--distill", "kd", "--dataset", "digits",
            "--epochs", "1", "--batch_size", "128", "--deterministic", "--amp", "off", "--no-channels_last"]
    assert ablate.main(argv) == 0
    table = pd.read_csv(save / "table.csv")
    assert len(table) == 4 and set(table["n"]) == {1}
    assert table["mean"].nunique() == 1, table
    assert sorted(zip(table["print_freq"], table["tb_freq"])) == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert (save / "figure.png").stat().st_size > 0 and (save / "figure.pdf").stat().st_size > 0
    assert len((save / "commands.txt").read_text().splitlines()) == 4
    first = {p: read_json(p) for p in save.glob("students/*/results.json")}
    capsys.readouterr()
    assert ablate.main(argv) == 0
    assert {p: read_json(p) for p in save.glob("students/*/results.json")} == first
    assert "4 of 4 runs succeeded" in capsys.readouterr().out
