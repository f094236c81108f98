import math

import pytest
import torch

import train_student
from conftest import fast_args
from distiller_zoo.multi_teacher import TeacherEnsemble, ensemble_log_probs, ensemble_weights
from engine.build import build_model
from engine.checkpoint import save_checkpoint


def softmax_list(row, T):
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def kl_list(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def fixed(shape, phase, scale):
    """Logits that do not depend on a random generator: scale * sin(0.37 i + phase)."""
    return scale * torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 0.37 + phase).reshape(shape)


def test_average_is_kd_against_the_mean_probabilities_by_hand():
    rows_t, row_s, T = [[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], [0.5, 0.0, -0.5], 4.0
    mean = [(a + b) / 2 for a, b in zip(*(softmax_list(r, T) for r in rows_t))]
    want = T * T * kl_list(mean, softmax_list(row_s, T))
    got = TeacherEnsemble(T, "average")(torch.tensor([row_s]), [torch.tensor([r]) for r in rows_t], torch.tensor([0]))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_camkd_by_hand():
    rows, row_s, label, T = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]], [0.3, -0.2, 0.1], 0, 2.0
    ce = [-math.log(softmax_list(r, 1.0)[label]) for r in rows]
    e = [math.exp(c) for c in ce]
    w = [(1 - x / sum(e)) / 2 for x in e]
    assert sum(w) == pytest.approx(1.0)
    p_s = softmax_list(row_s, T)
    want = T * T * sum(w[k] * kl_list(softmax_list(rows[k], T), p_s) for k in range(3)) / 3  # B = 1, K = 3
    got = TeacherEnsemble(T, "camkd")(torch.tensor([row_s]), [torch.tensor([r]) for r in rows], torch.tensor([label]))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_ensemble_target_is_the_mixture_of_the_teachers_probabilities_by_hand():
    rows, label, T = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]], 1, 2.0
    e = [math.exp(-math.log(softmax_list(r, 1.0)[label])) for r in rows]  # exp(CE_k), CE at T = 1
    weights = {"average": [1 / 3] * 3, "camkd": [(1 - x / sum(e)) / 2 for x in e]}
    for mode, w in weights.items():
        want = [sum(w[k] * softmax_list(rows[k], T)[c] for k in range(3)) for c in range(3)]
        got = ensemble_log_probs(mode, [torch.tensor([r], dtype=torch.float64) for r in rows], torch.tensor([label]), T)
        assert got.exp()[0].tolist() == pytest.approx(want, rel=1e-12)


def test_camkd_loss_has_the_gradient_of_kl_to_its_mixture():
    """What scripts/analyze.py compares a camkd student with: sum_k w_k KL(p_k || q) and
    KL(sum_k w_k p_k || q) differ by a term without q, so their gradients agree."""
    logits_t, targets, T = [fixed((4, 6), phase, 3.0) for phase in (0.0, 1.0, 2.5)], torch.tensor([0, 3, 5, 1]), 4.0
    grads = []
    for loss_of in (lambda s: TeacherEnsemble(T, "camkd")(s, logits_t, targets),
                    lambda s: T * T / (4 * 3) * torch.nn.functional.kl_div(
                        torch.log_softmax(s / T, 1), ensemble_log_probs("camkd", logits_t, targets, T),
                        reduction="sum", log_target=True)):
        student = fixed((4, 6), 0.7, 2.0).requires_grad_()
        loss_of(student).backward()
        grads.append(student.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-12) and grads[0].abs().max() > 1e-3


# Rorozhl/CA-MKD at c2f39a9f13c1998e9971815760364587222581ce, run offline in float64:
# helper/loops.py train_distill_multi_teacher (ensemble_method CAMKD, distill kd, epoch 1, -r 0 -a 1)
# with its distiller_zoo/KD.py DistillKL(4) on one batch of the fixed logits below (B 4, C 6, the
# first K teachers); SGD at lr 1 without momentum, so the student's logits moved by minus the gradient.
OFFICIAL = {
    2: (0.6312298522043005,
        [-0.07027987365180055, -0.04123803306948726, -0.006765652681698375, 0.02334913189806742,
         0.04324641442130783, 0.05168801308361126],
        [0.022243258737928207, 0.011468210504967047, 0.0003697163599805098, -0.009312641780221842,
         -0.014198865718111797, -0.010569678104541791]),
    3: (0.6305119895214636,
        [-0.0591581850758221, -0.026221595250102148, 0.0008552740128142666, 0.020157488151933745,
         0.030891822256401413, 0.03347519590477499],
        [0.014114732157496812, 0.005807697550691104, -0.0021330343205772095, -0.007810372309928315,
         -0.008380274564142254, -0.001598748513540249]),
}


@pytest.mark.parametrize("teachers", [2, 3])
def test_camkd_equals_the_official_loss_and_gradient(teachers):
    loss_want, row0, row2 = OFFICIAL[teachers]
    z_s = fixed((4, 6), 0.2, 2.0).requires_grad_()
    logits_t = [fixed((4, 6), 0.9 + k, 3.0 + k) for k in range(teachers)]
    ensemble = TeacherEnsemble(4.0, "camkd")
    loss = ensemble(z_s, logits_t, torch.tensor([0, 3, 5, 2]))
    loss.backward()
    assert loss.item() == pytest.approx(loss_want, rel=1e-12)
    assert z_s.grad[0].tolist() == pytest.approx(row0, rel=1e-10)
    assert z_s.grad[2].tolist() == pytest.approx(row2, rel=1e-10)


def test_several_teacher_weights():
    assert ensemble_weights("camkd", None, None) == (1.0, 1.0)          # CA-MKD's README: -r 1 -a 1
    assert ensemble_weights("camkd", 0.5, None) == (0.5, 1.0)
    assert ensemble_weights("average", None, None) == (None, None)      # the method's own


def test_one_digits_epoch_with_two_teachers(tmp_path, digits_teacher):
    _, teacher_dir = digits_teacher
    second = tmp_path / "resnet14.pth"  # another architecture; untrained weights are enough here
    save_checkpoint({"model": build_model("resnet14", 10).state_dict(), "arch": "resnet14", "dataset": "digits",
                     "num_classes": 10}, second)
    results = train_student.main(fast_args(
        tmp_path, "--model_s", "resnet8", "--epochs", "1", "--batch_size", "128", "--distill", "at",
        "--multi_teacher", "camkd", "--feature_teacher", "1", "--path_t", f"{teacher_dir / 'best.pth'},{second}"))
    assert results["method"] == "at+kd+camkd" and results["teacher"] == "resnet8,resnet14"
    assert (results["gamma"], results["alpha"]) == (1.0, 1.0)   # CA-MKD's -r 1 -a 1 (at alone: -a 0)
    [run] = (tmp_path / "students").iterdir()
    assert run.name.startswith("S-resnet8_T-resnet8+resnet14_digits_at+kd+camkd_")
    assert (run / "best.pth").is_file()


def test_feature_teacher_out_of_range_is_a_user_error(tmp_path, digits_teacher):
    _, teacher_dir = digits_teacher
    with pytest.raises(SystemExit) as stop:
        train_student.main(fast_args(tmp_path, "--path_t", f"{teacher_dir / 'best.pth'}", "--feature_teacher", "1"))
    assert stop.value.code == 2
