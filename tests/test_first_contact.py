"""What a new user meets first: speed settings chosen by measurement, logs a file can hold,
HParams that compare runs, --help, evaluation of a digits checkpoint, the table's figure."""
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import backend_context, plugin_data_pb2

import evaluate
import train_student
import train_teacher
from conftest import ROOT, fast_args
from core.errors import UserError
from engine import precision, session, teacher_run
from engine.config import TeacherConfig
from models import model_dict

CPU = torch.device("cpu")


# --- speed settings ---------------------------------------------------------------------------
def fake_timings(**ms):
    return {key.replace("__", "/"): value / 1000 for key, value in ms.items()}


def test_pick_fastest_keeps_the_reference_unless_clearly_faster():
    candidates = [(None, False), (None, True), (torch.bfloat16, False), (torch.bfloat16, True)]
    timings = fake_timings(fp32__NCHW=100, fp32__channels_last=90, bfloat16__NCHW=60, bfloat16__channels_last=50)
    assert precision.pick_fastest(timings, candidates) == (torch.bfloat16, True)
    close = fake_timings(fp32__NCHW=100, fp32__channels_last=98, bfloat16__NCHW=99, bfloat16__channels_last=97)
    assert precision.pick_fastest(close, candidates) == (None, False)


@pytest.fixture
def probe_log(monkeypatch, tmp_path):
    """Records the candidates each probe times; bf16 + channels_last comes out fastest."""
    monkeypatch.setenv("DISTILLBENCH_CACHE", str(tmp_path))
    calls = []

    def fake(trained, frozen, shape, candidates):
        calls.append(list(candidates))
        return {precision._candidate(d, cl): (0.05 if d is not None else 0.1) - (0.01 if cl else 0)
                for d, cl in candidates}

    monkeypatch.setattr(precision, "time_candidates", fake)
    return calls


def resolve(amp="auto", channels_last=None):
    net = model_dict["resnet8"](num_classes=10)
    return precision.resolve_execution(amp, channels_last, CPU, net, [], lambda: (2, 3, 32, 32))


def test_cpu_without_native_bf16_never_tries_bf16(monkeypatch, probe_log):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    execution = resolve()
    assert execution.amp_dtype is None and execution.channels_last
    assert probe_log == [[(None, False), (None, True)]]
    assert "no native bf16" in execution.reason


def test_an_isa_cap_below_bf16_counts_as_no_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    assert precision.native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert not precision.native_bf16()


def test_native_bf16_is_measured_once_then_cached(monkeypatch, probe_log):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    first, second = resolve(), resolve()
    assert (first.amp_dtype, first.channels_last) == (torch.bfloat16, True)
    assert (second.amp_dtype, second.channels_last) == (torch.bfloat16, True)
    assert len(probe_log) == 1 and len(probe_log[0]) == 4
    assert "cached" in second.reason and "cached" not in first.reason


def test_explicit_flags_are_not_measured(probe_log):
    execution = resolve("off", False)
    assert (execution.amp_dtype, execution.channels_last, execution.reason) == (None, False, "as asked")
    assert probe_log == []
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve("fp16")


def test_probe_times_copies_and_leaves_the_run_untouched():
    torch.manual_seed(0)
    net, frozen = model_dict["resnet8"](num_classes=10), model_dict["resnet8"](num_classes=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    timings = precision.time_candidates(net, [frozen], (2, 3, 32, 32), [(None, False), (None, True)])
    assert set(timings) == {"fp32/NCHW", "fp32/channels_last"} and all(t > 0 for t in timings.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_resume_takes_speed_flags_given_on_the_command_line_else_the_runs(digits_teacher):
    save, run_dir = digits_teacher
    args = train_teacher.parse_args(["--resume", str(run_dir), "--amp", "bf16", "--channels_last", "--compile",
                                     "--threads", "1"])
    merged, resume = session.configure(args, "teachers", TeacherConfig.from_dict, teacher_run.run_name)
    stored = session.runs.load_run_args(run_dir)
    assert (stored["amp"], stored["channels_last"], stored["compile"], stored["threads"]) == ("off", False, None, None)
    assert (merged.amp, merged.channels_last, merged.compile, merged.threads) == ("bf16", True, True, 1)
    assert resume == run_dir
    kept, _ = session.configure(train_teacher.parse_args(["--resume", str(run_dir), "--print_freq", "7"]),
                                "teachers", TeacherConfig.from_dict, teacher_run.run_name)
    assert (kept.amp, kept.channels_last, kept.compile, kept.print_freq) == ("off", False, None, 7)


# --- logs and HParams ------------------------------------------------------------------------
def test_parallel_runs_log_named_lines_without_carriage_returns(tmp_path):
    lines = [f"python train_teacher.py --model resnet8 --dataset digits --epochs 2 --amp off --no-channels_last --trial {t} "
             f"--save_dir {tmp_path} --print_freq 1" for t in ("a", "b")]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_commands.py"), "--jobs", "2"],
                          input="\n".join(lines), capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "DISTILLBENCH_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout and "\r" not in done.stderr
    epoch_lines = [line for line in done.stdout.splitlines() if " | lr " in line]
    assert len(epoch_lines) == 4
    for trial in ("a", "b"):
        named = [line for line in epoch_lines if line.startswith(f"[resnet8_digits_trial{trial}] main ")]
        assert [line.split(" | ")[0].split()[-1] for line in named] == ["1/2", "2/2"]


def hparams_record(run_dir, field: str):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField(field):
            return getattr(data, field)
    raise AssertionError(f"no HParams {field} in {run_dir}")


def session_hparams(run_dir) -> dict:
    start = hparams_record(run_dir, "session_start_info")
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def test_hparams_compare_runs_on_different_pairs(digits_teacher):
    save, teacher_dir = digits_teacher
    for student, method in (("resnet8", "kd"), ("resnet14", "at")):
        train_student.main(fast_args(save, "--path_t", str(teacher_dir / "best.pth"), "--model_s", student,
                                     "--distill", method, "--epochs", "1", "--trial", "hp"))
    kd = session_hparams(save / "students" / "S-resnet8_T-resnet8_digits_kd_r0.1_a0.9_b0_trialhp")
    at = session_hparams(save / "students" / "S-resnet14_T-resnet8_digits_at_r1_a0_b1000_trialhp")
    teacher = session_hparams(teacher_dir)
    assert set(kd) == set(at) == set(teacher)
    assert (kd["teacher"], kd["student"], kd["method"], kd["alpha"], kd["beta"], kd["kd_T"]) == \
        ("resnet8", "resnet8", "kd", 0.9, "0", 4.0)
    assert (at["teacher"], at["student"], at["method"], at["alpha"], at["beta"], at["gamma"]) == \
        ("resnet8", "resnet14", "at", 0.0, "1000", 1.0)
    assert (teacher["method"], teacher["teacher"], teacher["student"]) == ("vanilla", "none", "resnet8")
    # TensorBoard's own column order (it ticks the first five): the pair, the method, its weights
    experiment = hparams_record(teacher_dir, "experiment")
    backend_context._sort_and_reduce_to_hparams_limit(experiment, 5)
    assert [info.name for info in experiment.hparam_infos] == ["alpha", "beta", "method", "student", "teacher"]


# --- --help and first mistakes ----------------------------------------------------------------
def test_help_shows_defaults_methods_and_examples(capsys):
    with pytest.raises(SystemExit):
        train_student.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: resnet8)" in text and "default 64" in text and "(default: 16384)" in text
    assert "fitnet (hint)" in text and "crd: Tian" in text and "examples:" in text


def test_unknown_method_is_named_before_the_teacher_is_looked_for(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_student.main(["--distill", "foo", "--save_dir", str(tmp_path), "--dataset", "digits"])
    assert stop.value.code == 2
    assert "unknown distillation method 'foo'" in capsys.readouterr().err


def test_evaluate_takes_the_data_set_from_the_run(digits_teacher, capsys):
    _, run_dir = digits_teacher
    report = evaluate.main([str(run_dir / "best.pth"), "--latency_runs", "1", "--latency_warmup", "0",
                            "--cpu_threads", "1"])
    assert report["dataset"] == "digits" and report["n_test"] == 360
    with pytest.raises(SystemExit) as stop:
        evaluate.main([str(run_dir / "best.pth"), "--dataset", "cifar10"])
    assert stop.value.code == 2
    assert "was trained on digits, not cifar10" in capsys.readouterr().err
