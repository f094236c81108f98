"""scripts/method_cost.py builds each method as train_student.py does and times its step."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import method_cost  # noqa: E402


def test_method_cost_times_each_method_against_kd(capsys):
    rows = method_cost.main(["--teacher", "resnet8", "--student", "resnet8", "--batch", "4", "--steps", "1",
                             "--methods", "kd,wttm,dkd,at"])
    assert [method for method, _ in rows] == ["kd", "wttm", "dkd", "at"]
    assert all(ms > 0 for _, ms in rows)
    assert "x1.00 of kd" in capsys.readouterr().out
