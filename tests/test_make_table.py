import json
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import make_table  # noqa: E402


def write_run(root, name, **results):
    run = root / name
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))


@pytest.fixture()
def grid(tmp_path):
    """Teacher, vanilla, KD x3 and CRD x2 on resnet32x4 -> resnet8x4, and KD x1 on another pair."""
    for trial, acc in enumerate([79.0, 79.5]):
        write_run(tmp_path, f"teachers/t{trial}", dataset="cifar100", model="resnet32x4", method="teacher",
                  trial=str(trial), best_top1=acc + 0.5, last_top1=acc)
    write_run(tmp_path, "teachers/v0", dataset="cifar100", model="resnet8x4", method="teacher",
              trial="0", best_top1=72.9, last_top1=72.4)
    for trial, acc in enumerate([73.0, 73.6, 74.1]):
        write_run(tmp_path, f"students/kd{trial}", dataset="cifar100", model="resnet8x4", teacher="resnet32x4",
                  method="kd", trial=str(trial), best_top1=acc + 1, last_top1=acc)
    for trial, acc in enumerate([75.2, 75.8]):
        write_run(tmp_path, f"students/crd{trial}", dataset="cifar100", model="resnet8x4", teacher="resnet32x4",
                  method="crd", trial=str(trial), best_top1=acc + 1, last_top1=acc)
    write_run(tmp_path, "students/other", dataset="cifar100", model="resnet20", teacher="resnet56",
              method="kd", trial="0", best_top1=70.0, last_top1=69.5)
    return tmp_path


def row(summary, teacher, student, method):
    match = summary[(summary.teacher == teacher) & (summary.student == student) & (summary.method == method)]
    assert len(match) == 1
    return match.iloc[0]


def test_summary_matches_hand_computation(grid):
    summary = make_table.summarise(make_table.load_runs([grid]), "last")
    kd = row(summary, "resnet32x4", "resnet8x4", "kd")
    assert kd["n"] == 3
    assert kd["mean"] == pytest.approx((73.0 + 73.6 + 74.1) / 3)
    assert kd["std"] == pytest.approx(statistics.stdev([73.0, 73.6, 74.1]))
    assert kd["published"] == pytest.approx(73.33)
    assert kd["diff"] == pytest.approx(kd["mean"] - 73.33)
    teacher = row(summary, "resnet32x4", "resnet8x4", "teacher")
    assert (teacher["n"], teacher["mean"]) == (2, pytest.approx(79.25))
    vanilla = row(summary, "resnet32x4", "resnet8x4", "vanilla")
    assert (vanilla["n"], vanilla["mean"], vanilla["published"]) == (1, 72.4, 72.5)
    best = make_table.summarise(make_table.load_runs([grid]), "best")
    assert row(best, "resnet32x4", "resnet8x4", "crd")["mean"] == pytest.approx(76.5)


def test_markdown_prints_every_cell(grid, capsys):
    assert make_table.main([str(grid)]) == 0
    out = capsys.readouterr().out
    assert "last-epoch top-1" in out
    assert f"73.57 ± {statistics.stdev([73.0, 73.6, 74.1]):.2f} (3) [73.33, +0.24]" in out
    assert f"75.50 ± {statistics.stdev([75.2, 75.8]):.2f} (2) [75.51, -0.01]" in out
    assert "79.25 ± 0.35 (2) [79.42, -0.17]" in out
    assert "69.50 (1) [70.66, -1.16]" in out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["teacher", "vanilla", "kd", "crd"]


def test_csv_and_latex_and_figure(grid, tmp_path):
    csv_out, tex_out, png = tmp_path / "t.csv", tmp_path / "t.tex", tmp_path / "t.png"
    assert make_table.main([str(grid), "--format", "csv", "--out", str(csv_out), "--figure", str(png)]) == 0
    import pandas as pd
    table = pd.read_csv(csv_out)
    crd = table[(table.method == "crd")].iloc[0]
    assert crd["mean"] == pytest.approx(75.5) and crd["n"] == 2
    assert png.stat().st_size > 1000
    assert make_table.main([str(grid), "--format", "latex", "--out", str(tex_out)]) == 0
    tex = tex_out.read_text()
    assert r"\begin{tabular}" in tex and r"75.50 $\pm$ 0.42 (2)" in tex


def test_missing_folder_is_one_line_and_status_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_table.py"), str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_runs_of_one_method_at_two_weights_get_a_row_each(grid):
    for trial, (beta, acc) in enumerate([("15", 10.0), ("1.5", 95.0), ("1.5", 96.0)]):
        write_run(grid, f"students/cat{trial}", dataset="cifar100", model="resnet8x4", teacher="resnet32x4",
                  method="cat_kd", beta=beta, trial=str(trial), best_top1=acc, last_top1=acc)
    summary = make_table.summarise(make_table.load_runs([grid]), "last")
    assert row(summary, "resnet32x4", "resnet8x4", "cat_kd (b 15)")["mean"] == 10.0
    assert row(summary, "resnet32x4", "resnet8x4", "cat_kd (b 1.5)")["mean"] == pytest.approx(95.5)
    assert row(summary, "resnet32x4", "resnet8x4", "kd")["n"] == 3  # one weight: the plain label
    assert make_table.method_family("cat_kd (b 1.5)") == "feature"
