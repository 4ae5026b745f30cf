"""DIST and NKD: golden values, their defaults against the official code, and one training step.

Golden values are recomputed here in float64 numpy with explicit loops, never through kd_losses'
own helpers; the methods work in float32, hence the 1e-5 relative tolerance. The modules are
imported directly so that the tests do not depend on kd_losses/__init__.py."""
import numpy as np
import pytest
import torch

from engine import Teacher
from golden import as64, close, fake_outputs
from kd_losses.dist import DIST  # importing registers 'dist' (train_one_step builds it by name)
from kd_losses.nkd import NormalizedKD  # and 'nkd'
from models import build_model
from test_losses import train_one_step

BATCH, CLASSES = 6, 7


def outputs(seed):
    return fake_outputs({}, seed, BATCH, CLASSES)


def targets():
    return torch.tensor([0, 3, 6, 2, 3, 5])


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / (np.sqrt((a ** 2).sum()) * np.sqrt((b ** 2).sum()) + 1e-8)


# --------------------------------------------------------------------------------------------- DIST

@pytest.mark.parametrize("T, beta, gamma", [(1.0, 1.0, 1.0), (4.0, 0.5, 2.0)])
def test_dist_golden(T, beta, gamma):
    s, t = outputs(0), outputs(1)
    p_s = np.stack([softmax(row / T) for row in as64(s["logits"])])
    p_t = np.stack([softmax(row / T) for row in as64(t["logits"])])
    inter = 1 - sum(pearson(p_s[n], p_t[n]) for n in range(BATCH)) / BATCH
    intra = 1 - sum(pearson(p_s[:, c], p_t[:, c]) for c in range(CLASSES)) / CLASSES
    loss = DIST({}, {}, T=T, dist_beta=beta, dist_gamma=gamma)(s, t, targets())
    assert close(loss["inter"], T ** 2 * beta * inter)
    assert close(loss["intra"], T ** 2 * gamma * intra)


def test_dist_is_zero_when_the_student_matches_the_teacher():
    s = outputs(0)
    loss = DIST({}, {}, T=4.0, dist_beta=1.0, dist_gamma=1.0)(s, {"logits": s["logits"].clone()}, targets())
    assert all(abs(term.item()) < 16 * 1e-6 for term in loss.values())  # fp32 rounding, times T^2


def test_dist_batch_of_one_is_finite():
    """One sample: every class's column is constant, and the eps turns 0 / 0 into a correlation of 0."""
    z_s = torch.randn(1, CLASSES, requires_grad=True)
    loss = DIST({}, {}, T=4.0, dist_beta=1.0, dist_gamma=1.0)({"logits": z_s}, {"logits": torch.randn(1, CLASSES)},
                                                              torch.tensor([0]))
    assert loss["intra"].item() == pytest.approx(16.0)
    sum(loss.values()).backward()
    assert torch.isfinite(z_s.grad).all()


def test_dist_defaults_are_the_official_cifar_ones():
    """dist_cifar.yaml: kd 'dist_t4' (tau 4, beta = gamma = 1), kd_loss_weight 2, ori_loss_weight 1."""
    assert {k: v for k, (v, _) in DIST.hyperparameters.items()} == {"T": 4.0, "dist_beta": 1.0, "dist_gamma": 1.0}
    assert DIST.default_weight == 2.0


# ---------------------------------------------------------------------------------------------- NKD

@pytest.mark.parametrize("T, gamma", [(1.0, 1.5), (3.0, 3.5)])
def test_nkd_golden(T, gamma):
    s, t, y = outputs(0), outputs(1), targets().numpy()
    z_s, z_t = as64(s["logits"]), as64(t["logits"])
    target_sum = nontarget_sum = 0.0
    for n in range(BATCH):
        target_sum += softmax(z_t[n])[y[n]] * np.log(softmax(z_s[n])[y[n]])
        others = [c for c in range(CLASSES) if c != y[n]]  # the target column removed, as the official code
        q_s, q_t = softmax(z_s[n, others] / T), softmax(z_t[n, others] / T)
        nontarget_sum += sum(q_t[i] * np.log(q_s[i]) for i in range(CLASSES - 1))
    loss = NormalizedKD({}, {}, T=T, nkd_gamma=gamma)(s, t, targets())
    assert close(loss["target"], -target_sum / BATCH)
    assert close(loss["nontarget"], -gamma * T ** 2 * nontarget_sum / BATCH)


def test_nkd_nontarget_term_ignores_the_target_logits():
    """The non-target distributions are renormalised: moving either network's target logit changes
    only the target term."""
    s, t, y = outputs(0), outputs(1), targets()
    method = NormalizedKD({}, {}, T=3.0, nkd_gamma=3.5)
    before = method(s, t, y)
    rows = torch.arange(BATCH)
    s["logits"][rows, y] += 5.0
    t["logits"][rows, y] -= 2.0
    after = method(s, t, y)
    assert after["nontarget"].item() == pytest.approx(before["nontarget"].item(), rel=1e-6)
    assert after["target"].item() != pytest.approx(before["target"].item(), rel=1e-3)


def test_nkd_gradient_on_the_target_logit_comes_from_the_target_term_alone():
    z_s = outputs(0)["logits"].requires_grad_(True)
    loss = NormalizedKD({}, {}, T=3.0, nkd_gamma=3.5)({"logits": z_s}, outputs(1), targets())
    loss["nontarget"].backward()
    assert torch.all(z_s.grad[torch.arange(BATCH), targets()] == 0)


def test_nkd_defaults_are_the_official_cifar_ones():
    """configs/distillers/cifar100/res34_distill_res18_cifar.py: temp 3, gamma 3.5; the loss added with
    weight 1 next to the CE (mmcls/models/classifiers/distiller.py)."""
    assert {k: v for k, (v, _) in NormalizedKD.hyperparameters.items()} == {"T": 3.0, "nkd_gamma": 3.5}
    assert NormalizedKD.default_weight == 1.0


# ------------------------------------------------------------------------------------ training steps

@pytest.mark.parametrize("name", ["dist", "nkd"])
@pytest.mark.parametrize("teacher_arch, student_arch, classes", [("resnet8x4", "resnet8", 10),
                                                                 ("vgg13", "MobileNetV2", 100)])
def test_training_step(name, teacher_arch, student_arch, classes):
    torch.manual_seed(0)
    train_one_step(name, build_model(student_arch, classes), Teacher(build_model(teacher_arch, classes)), classes)
