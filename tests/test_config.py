"""The run configuration (engine/config.py): the programs' parsers and the configurations declare
the same defaults, derived values are resolved when a configuration is built, it is frozen, and
it is exactly what args.json stores and reads back."""
import dataclasses
import os

import pytest

import distiller_zoo
import train_mutual
import train_self
import train_student
import train_teacher
from core.errors import UserError
from engine import self_distill, student_run
from engine.build import build_model
from engine.checkpoint import save_checkpoint
from engine.config import DERIVED, MutualConfig, SelfConfig, StudentConfig, TeacherConfig

PROGRAMS = [(train_teacher, TeacherConfig), (train_student, StudentConfig), (train_mutual, MutualConfig),
            (train_self, SelfConfig)]


@pytest.mark.parametrize("entry, config_class", PROGRAMS, ids=lambda p: getattr(p, "__name__", ""))
def test_each_field_has_its_flags_default(entry, config_class):
    parsed = vars(entry.parse_args([]))
    for name, default in config_class.defaults().items():
        if name not in DERIVED + ("world_size", "effective_batch"):
            paths = name in ("data_folder", "save_dir")  # made absolute by the parser and the configuration
            assert parsed[name] == (os.path.abspath(default) if paths else default), name
    # every flag is a field, or a method's option (the student's), or --config/--resume
    flat = {opt.name for spec in distiller_zoo.METHODS.values() for opt in spec.options}
    assert set(parsed) - set(config_class.defaults()) - flat <= {"resume", "command_line"}


def test_a_teacher_configuration_is_built_from_python_resolved_and_frozen(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = TeacherConfig(model="resnet8", dataset="digits", epochs=2, trial="3")
    assert (config.learning_rate, config.lr_decay_epochs, config.batch_size, config.weight_decay) == (
        0.05, (1, 2, 2), 64, 5e-4)  # 150, 180, 210 of 240 epochs, scaled to 2
    assert (config.seed, config.world_size, config.effective_batch) == (3, 1, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    assert TeacherConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="unknown model 'resnet9'"):
        TeacherConfig(model="resnet9")


def test_args_json_keys_are_the_parsed_flags_and_the_derived_values(tmp_path):
    """What args.json stores: the flags as before (the Namespace's keys) and the derived values;
    a configuration read back from it is the same configuration."""
    ckpt = tmp_path / "teacher.pth"
    save_checkpoint({"model": build_model("resnet8", 10).state_dict(), "arch": "resnet8"}, ckpt)
    args = train_student.parse_args(["--dataset", "digits", "--path_t", str(ckpt), "--distill", "crd:0.8,kd:0.5",
                                     "--nce_k", "64", "--save_dir", str(tmp_path)])
    run = student_run.configure(vars(args))
    stored = run.config.to_dict()
    assert set(stored) == set(vars(args)) - {"resume", "command_line"} | set(DERIVED)
    assert (stored["model_t"], stored["alpha"], stored["method"], stored["beta_label"]) == ("resnet8", 0.5,
                                                                                            "crd+kd", "0.8")
    assert (stored["nce_k"], stored["option_sources"]["nce_k"], stored["option_sources"]["nce_t"]) == (
        64, "given", "default")
    assert StudentConfig.from_dict(stored) == run.config
    again = student_run.configure(stored)  # a resume builds it again from args.json: nothing changes
    assert again.config == run.config and again.config.optimizer == "sgd"
    mutual = MutualConfig.from_dict(vars(train_mutual.parse_args(["--models", "resnet8,resnet14"])))
    assert MutualConfig.from_dict(mutual.to_dict()) == mutual and mutual.peers == ["resnet8", "resnet14"]


def test_tf_kd_reg_takes_the_architectures_published_setting_when_built(capsys):
    config = self_distill.configure_self(vars(train_self.parse_args(["--method", "tf_kd_reg", "--model", "resnet8"])))
    assert None not in (config.reg_alpha, config.reg_temperature, config.multiplier)
    assert "tf_kd_reg: alpha" in capsys.readouterr().out
    assert self_distill.configure_self(config.to_dict()) == config
