"""The README's "use it as a library" loop, run as written there: a zoo model, a teacher
checkpoint, a loss from the zoo."""
import re

import torch

from conftest import ROOT


def readme_loop() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Use it as a library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_loop_trains_a_student(digits_teacher, tmp_path, monkeypatch):
    _, run_dir = digits_teacher
    teacher_ckpt = tmp_path / "save/teachers/resnet8x4_digits_trial0/best.pth"
    teacher_ckpt.parent.mkdir(parents=True)
    teacher_ckpt.write_bytes((run_dir / "best.pth").read_bytes())
    code = readme_loop().replace('"resnet8x4"', '"resnet8"')  # the session's digits teacher is a resnet8
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    monkeypatch.chdir(tmp_path)
    scope = {"batches": batches}
    exec(compile(code, "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["loss"].requires_grad
    assert any(p.grad is not None for p in scope["student"].parameters())
