import json
import os
from pathlib import Path

import pytest
import torch

import engine.trainer
import train_teacher

ROOT = Path(__file__).resolve().parent.parent


def fast_args(save_dir, *extra):
    """Flags for a quick CPU run on the embedded digits data, in fp32 and NCHW: the speed probe
    (engine/precision.py, tested on its own in test_first_contact.py and test_fast_path.py) would
    otherwise time four candidates for every new pair of networks, the larger part of a short run."""
    return ["--dataset", "digits", "--save_dir", str(save_dir), "--print_freq", "5", "--amp", "off",
            "--no-channels_last", *extra]


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A resnet8 teacher trained for one epoch on digits: (save_dir, run_dir)."""
    save = tmp_path_factory.mktemp("save")
    train_teacher.main(fast_args(save, "--model", "resnet8", "--epochs", "1", "--trial", "0"))
    run_dir = save / "teachers" / "resnet8_digits_trial0"
    return save, run_dir


class Crash(Exception):
    """A simulated crash inside a run (not a signal, which the trainer turns into a clean stop)."""


def crash_after_checkpoint(main, argv, monkeypatch, epoch: int) -> None:
    """Run `main(argv)` until it has written `epoch`'s ckpt_last.pth, then crash it there."""
    real_save = engine.trainer.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        if str(path).endswith("ckpt_last.pth") and state["epoch"] == epoch:
            raise Crash

    monkeypatch.setattr(engine.trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        main(argv)
    monkeypatch.setattr(engine.trainer, "save_checkpoint", real_save)


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session", autouse=True)
def speed_probe_cache(tmp_path_factory):
    """The CPU speed probe's cache lives in the test session, not in the user's home."""
    folder = tmp_path_factory.mktemp("cpu_settings")
    previous = os.environ.get("DISTILLBENCH_CACHE")
    os.environ["DISTILLBENCH_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DISTILLBENCH_CACHE", None)
    else:
        os.environ["DISTILLBENCH_CACHE"] = previous


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device a device-generic test runs on: the CPU always, CUDA where there is one."""
    return torch.device(request.param)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


# Test modules whose every test trains networks, starts processes or builds the wheel. With the
# tests that use a digits teacher, they are marked e2e, which `make test-fast` leaves out.
E2E_MODULES = {
    "test_bad_images", "test_chaos", "test_damaged_runs", "test_deploy", "test_evaluate", "test_execution_record", "test_fast_path", "test_fetch_teachers",
    "test_first_contact", "test_gpu_check", "test_imagenet_training", "test_multi_teacher", "test_packaging",
    "test_reliability", "test_slurm", "test_table_scripts", "test_torchrun", "test_train_mutual", "test_train_self",
    "test_train_student", "test_train_teacher",
}
E2E_FIXTURES = {"digits_teacher"}


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    for item in items:
        if item.module.__name__ in E2E_MODULES or E2E_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
