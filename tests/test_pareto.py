"""scripts/pareto.py on hand-made run directories (untrained digits networks, written results.json):
latency timed once per architecture, the roles (teacher, vanilla student, distilled student),
the tables' --metric, and the latency spread in the table, the JSON and the figure."""
import json
import sys

import pytest
import torch

from conftest import ROOT, read_json
from deploy import metrics
from engine.build import build_model

sys.path.insert(0, str(ROOT / "scripts"))
import pareto  # noqa: E402


def make_run(folder, name, model="resnet8", last=50.0, best=60.0, **fields):
    run_dir = folder / name
    run_dir.mkdir(parents=True)
    torch.save({"model": build_model(model, 10).state_dict()}, run_dir / "best.pth")
    results = {"model": model, "dataset": "digits", "last_top1": last, "best_top1": best, **fields}
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def save(tmp_path):
    """A teacher (resnet20), the vanilla resnet8 and eight identical KD resnet8 students of it."""
    teacher = make_run(tmp_path / "teachers", "resnet20_digits_trial0", "resnet20", 70.0, 72.0, method="vanilla")
    make_run(tmp_path / "teachers", "resnet8_digits_trial1", last=40.0, best=45.0, method="vanilla")
    for trial in range(8):
        make_run(tmp_path / "students", f"S-resnet8_T-resnet20_digits_kd_r-0.1_a-0.9_b-0_{trial}",
                 last=50.0 + trial, best=60.0 - trial, method="kd", teacher="resnet20",
                 path_t=str(teacher / "best.pth"))
    return tmp_path


@pytest.fixture
def timings(monkeypatch):
    """A stub in place of the library's PyTorch timer (resnet8: 1.0 ms, IQR 0.8-1.4; anything
    else 2.0 ms, IQR 1.5-3.0): the parameter counts of the networks it was asked to time."""
    calls, resnet8 = [], sum(p.numel() for p in build_model("resnet8", 10).parameters())

    def stub(model, batch, shape, runs, warmup, amp_dtype=None):
        calls.append(sum(p.numel() for p in model.parameters()))
        return (1.0, 0.8, 1.4) if calls[-1] == resnet8 else (2.0, 1.5, 3.0)

    monkeypatch.setattr(metrics, "torch_latency", stub)
    return calls


def by_name(points):
    return {p["run"].rsplit("/", 1)[-1]: p for p in points}


def test_latency_is_timed_once_per_architecture(save, timings, tmp_path):
    points = pareto.main([str(save), "--json", str(tmp_path / "p.json")])
    assert len(points) == 10 and len(timings) == 2 and len(set(timings)) == 2
    resnet8 = {tuple(p["latency_iqr_ms"]) + (p["latency_ms"],) for p in points if p["model"] == "resnet8"}
    assert resnet8 == {(0.8, 1.4, 1.0)}  # the nine resnet8 runs share one timing, spread included
    written = read_json(tmp_path / "p.json")
    assert written["points"][0]["latency_iqr_ms"] and written["metric"] == "last"


def test_roles_vanilla_is_a_student_and_only_the_teacher_a_star(save, timings):
    roles = {name: p["role"] for name, p in by_name(pareto.main([str(save)])).items()}
    assert roles.pop("resnet20_digits_trial0") == "teacher"
    assert roles.pop("resnet8_digits_trial1") == "vanilla"
    assert set(roles.values()) == {"student"}


def test_roles_decided_by_path_t_when_the_teacher_is_the_students_architecture(tmp_path):
    # resnet8 -> resnet8: the run named by path_t is the teacher, the other resnet8 run the vanilla student
    teacher = make_run(tmp_path / "teachers", "resnet8_digits_trial0", method="vanilla")
    vanilla = make_run(tmp_path / "teachers", "resnet8_digits_trial1", method="vanilla")
    student = make_run(tmp_path / "students", "kd", method="kd", teacher="resnet8", path_t=str(teacher / "best.pth"))
    found = [(d, read_json(d / "results.json")) for d in (teacher, vanilla, student)]
    assert pareto.roles(found) == ["teacher", "vanilla", "student"]
    # a run trained from labels under students/, and one no pair names (under teachers/)
    alone = make_run(tmp_path / "more" / "teachers", "wrn_16_1", "wrn_16_1", method="vanilla")
    under_students = make_run(tmp_path / "more" / "students", "plain", method="vanilla")
    found = [(d, read_json(d / "results.json")) for d in (alone, under_students)]
    assert pareto.roles(found) == ["teacher", "vanilla"]


@pytest.mark.parametrize("flags, key", [([], "last_top1"), (["--metric", "best"], "best_top1"),
                                        (["--metric", "last"], "last_top1")])
def test_metric_flag_picks_the_tables_top1(save, timings, flags, key, capsys):
    points = pareto.main([str(save), *flags])
    for p in points:
        assert p["top1"] == read_json(f"{p['run']}/results.json")[key]
    # last: the eighth student (57%) is the best resnet8 run; best: the first (60%)
    front = {p["run"].rsplit("_", 1)[-1] for p in points if p["pareto"] and p["model"] == "resnet8"}
    assert front == ({"7"} if key == "last_top1" else {"0"})
    assert f"{key.split('_')[0]}-epoch top-1 (%)" in capsys.readouterr().out


def test_table_and_figure_carry_the_spread(save, timings, tmp_path, capsys, monkeypatch):
    drawn = []
    real = pareto.plt.Axes.errorbar
    monkeypatch.setattr(pareto.plt.Axes, "errorbar",
                        lambda ax, x, y, **kw: drawn.append((kw["label"], kw["xerr"])) or real(ax, x, y, **kw))
    pareto.main([str(save), "--figure", str(tmp_path / "p.png")])
    assert "| 1.000 | 0.800–1.400 |" in capsys.readouterr().out
    spreads = dict(drawn)
    assert set(spreads) == {"distilled student", "vanilla student (labels only)", "teacher"}
    assert spreads["teacher"] == [[pytest.approx(0.5)], [pytest.approx(1.0)]]  # median 2.0, IQR 1.5-3.0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_run_without_the_metric_is_skipped_with_a_warning(tmp_path, timings, capsys):
    make_run(tmp_path / "teachers", "old", method="vanilla")
    results = tmp_path / "teachers" / "old" / "results.json"
    results.write_text(json.dumps({k: v for k, v in read_json(results).items() if k != "last_top1"}))
    make_run(tmp_path / "teachers", "new", method="vanilla")
    points = pareto.main([str(tmp_path)])
    assert [p["run"] for p in points] == [str(tmp_path / "teachers" / "new")]
    assert "no last_top1" in capsys.readouterr().err


@pytest.mark.e2e  # exports to ONNX: seconds, not milliseconds
def test_onnxruntime_latency_through_the_library(tmp_path):
    make_run(tmp_path / "teachers", "resnet8_digits_trial0", method="vanilla")
    point, = pareto.main([str(tmp_path), "--runtime", "onnxruntime", "--runs", "3", "--warmup", "0",
                          "--cpu_threads", "1"])
    q1, q3 = point["latency_iqr_ms"]
    assert 0 < q1 <= point["latency_ms"] <= q3 and point["role"] == "teacher"
