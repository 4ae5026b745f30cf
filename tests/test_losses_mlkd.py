"""MLKD: golden values against a float64 transcription of the official loss, its defaults, the two
views through the Distiller and the loader, and one training step.

The golden values follow the official forward_train term by term in float64 numpy (explicit loops,
numpy's percentile for the masks), never through kd_losses' own helpers; the method works in
float32, hence the 1e-5 relative tolerance. The module is imported directly so that the tests do
not depend on kd_losses/__init__.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import DeviceLoader
from ddp_worker import synthetic
from engine import Distiller, Teacher
from golden import as64, close, fake_outputs
from kd_losses.mlkd import MultiLevelKD  # importing registers 'mlkd' (train_one_step builds it by name)
from models import build_model
from test_losses import train_one_step

# odd sizes, so that the share of samples (4 of 7) and of classes (3 of 5) at or below the median is not 1/2
BATCH, CLASSES = 7, 5


def views(seed):
    """A network's logits on the weak and the strong view."""
    return {"logits": fake_outputs({}, seed, BATCH, CLASSES)["logits"],
            "strong_logits": fake_outputs({}, seed + 10, BATCH, CLASSES)["logits"]}


def softmax(z, T=1.0):
    e = np.exp(z / T - (z / T).max())
    return e / e.sum()


def standardized(z):
    return np.stack([(row - row.mean()) / (1e-7 + row.std(ddof=1)) for row in z])


def kd(z_s, z_t, T):
    """The official kd_loss: T^2 times the KL summed over classes, averaged over the batch."""
    total = 0.0
    for row_s, row_t in zip(z_s, z_t):
        p_s, p_t = softmax(row_s, T), softmax(row_t, T)
        total += sum(p_t[c] * (np.log(p_t[c]) - np.log(p_s[c])) for c in range(len(row_t)))
    return T ** 2 * total / len(z_s)


def correlation_distance(z_s, z_t, T, over_classes):
    """The official cc_loss (over_classes) or bc_loss: the squared distance of P^T P (of P P^T), over C (over N)."""
    p_s = np.stack([softmax(row, T) for row in z_s])
    p_t = np.stack([softmax(row, T) for row in z_t])
    if over_classes:
        return ((p_t.T @ p_t - p_s.T @ p_s) ** 2).sum() / z_s.shape[1]
    return ((p_t @ p_t.T - p_s @ p_s.T) ** 2).sum() / z_s.shape[0]


def official_terms(s, t, T, logit_stand):
    """loss_kd, loss_cc and loss_bc of the official forward_train before the KD weight, written as it
    is: every mask multiplies a batch mean, then is averaged; the strong term's last two temperatures
    read the weak logits."""
    s_w, s_s, t_w, t_s = as64(s["logits"]), as64(s["strong_logits"]), as64(t["logits"]), as64(t["strong_logits"])
    confidence = np.array([softmax(row).max() for row in t_w])
    mask = confidence <= np.percentile(confidence, 50)
    class_confidence = np.stack([softmax(row) for row in t_w]).sum(0)
    class_mask = class_confidence <= np.percentile(class_confidence, 50)
    ls = standardized if logit_stand else (lambda z: z)
    temperatures = [T, 3.0, 5.0, 2.0, 6.0]
    kd_weak = sum((kd(ls(s_w), ls(t_w), temp) * mask).mean() for temp in temperatures)
    kd_strong = (kd(ls(s_s), ls(t_s), T) + kd(ls(s_s), ls(t_s), 3.0) + kd(ls(s_s), ls(t_s), 5.0)
                 + kd(ls(s_w), ls(t_w), 2.0) + kd(ls(s_w), ls(t_w), 6.0))
    cc_weak = sum((correlation_distance(s_w, t_w, temp, True) * class_mask).mean() for temp in temperatures)
    bc_weak = sum((correlation_distance(s_w, t_w, temp, False) * mask).mean() for temp in temperatures)
    return {"instance": kd_weak + kd_strong, "class": cc_weak, "batch": bc_weak}


@pytest.mark.parametrize("T, logit_stand", [(4.0, False), (2.0, True), (3.0, False)])
def test_mlkd_golden(T, logit_stand):
    s, t = views(0), views(1)
    loss = MultiLevelKD({}, {}, T=T, logit_stand=logit_stand)(s, t, torch.arange(BATCH) % CLASSES)
    expected = official_terms(s, t, T, logit_stand)
    assert set(loss) == set(expected)
    for name in expected:
        assert close(loss[name], expected[name]), name


def test_mlkd_strong_logits_enter_the_instance_term_at_T_3_and_5_only():
    """The quirk kept: the strong view's instance terms at 2 and 6 read the weak logits, and its
    class and batch terms are left out, so the strong logits' gradient is that of three KD terms."""
    s, t = views(0), views(1)
    s["strong_logits"].requires_grad_(True)
    loss = MultiLevelKD({}, {}, T=4.0, logit_stand=False)(s, t, None)
    grad = torch.autograd.grad(sum(loss.values()), s["strong_logits"])[0]
    z = s["strong_logits"].detach().clone().requires_grad_(True)
    three = sum(F.kl_div(F.log_softmax(z / T, 1), F.softmax(t["strong_logits"] / T, 1), reduction="batchmean") * T ** 2
                for T in (4.0, 3.0, 5.0))
    assert torch.allclose(grad, torch.autograd.grad(three, z)[0], rtol=1e-5, atol=1e-7)


def test_mlkd_is_zero_when_the_student_matches_the_teacher():
    s = views(0)
    loss = MultiLevelKD({}, {}, T=4.0, logit_stand=False)(s, {k: v.clone() for k, v in s.items()}, None)
    assert all(abs(term.item()) < 1e-5 for term in loss.values())


def test_mlkd_defaults_are_the_official_ones():
    """mdistiller's KD defaults, which the official MLKD configs keep: T 4, KD 0.9, CE 0.1; under logit
    standardisation the log names' T 2 and KD 9, or 6 on three pairs."""
    assert {k: v for k, (v, *_) in MultiLevelKD.hyperparameters.items()} == {"T": 4.0, "logit_stand": False}
    assert (MultiLevelKD.default_weight, MultiLevelKD.default_ce_weight) == (0.9, 0.1)
    assert MultiLevelKD.logit_stand_defaults("resnet32x4", "resnet8x4") == {"T": 2.0, "kd_weight": 9.0}
    assert MultiLevelKD.logit_stand_defaults("vgg13", "vgg8") == {"T": 2.0, "kd_weight": 6.0}
    assert "strongly augmented" in MultiLevelKD.teacher_cache_refusal()


def strong_loader(images, labels, batch_size, **kwargs):
    loader = DeviceLoader(images, labels, batch_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=True, **kwargs)
    loader.strong_view = True
    return loader


def test_the_strong_view_is_seeded_and_leaves_the_weak_view_alone():
    images, labels = synthetic(24, 0)
    plain = DeviceLoader(images, labels, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=True, seed=3)
    weak, *_, nothing = next(iter(plain))
    assert nothing is None
    first, second = (next(iter(strong_loader(images, labels, 8, seed=3))) for _ in range(2))
    assert torch.equal(first[0], weak)  # the strong view is drawn after the weak one
    assert torch.equal(first[4], second[4]) and first[4].shape == weak.shape
    assert not torch.equal(first[4], weak)
    assert not torch.equal(next(iter(strong_loader(images, labels, 8, seed=4)))[4], first[4])


def test_the_strong_view_under_torchrun_is_the_single_process_one_sliced():
    images, labels = synthetic(24, 1)
    single = [batch[4] for batch in strong_loader(images, labels, 8, seed=5)]
    sliced = [[batch[4] for batch in strong_loader(images, labels, 8, seed=5, rank=rank, world_size=2)]
              for rank in range(2)]
    for step, whole in enumerate(single):
        assert torch.equal(torch.cat([sliced[0][step], sliced[1][step]]), whole)


def test_the_distiller_gives_mlkd_both_views_and_takes_the_cross_entropy_of_both():
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), Teacher(build_model("resnet8", 10))  # synthetic's 10 classes
    method = MultiLevelKD({}, {}, T=4.0, logit_stand=False)
    method.attach(student, teacher, None)
    task = Distiller(student, teacher, method, ce_weight=0.1, kd_weight=0.9).eval()  # BN on running statistics
    images, labels = synthetic(16, 2)
    batch = next(iter(strong_loader(images, labels, 8, seed=0)))
    weak, targets, _, _, strong = batch
    logits, terms = task(*batch)
    with torch.no_grad():
        s = {"logits": student(weak), "strong_logits": student(strong)}
        t = {"logits": teacher.network(weak), "strong_logits": teacher.network(strong)}
    assert torch.allclose(logits, s["logits"], atol=1e-5)
    ce = 0.1 * (F.cross_entropy(s["logits"], targets) + F.cross_entropy(s["strong_logits"], targets))
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    expected = method(s, t, targets)
    for name in ("instance", "class", "batch"):
        assert terms[f"kd_{name}"].item() == pytest.approx(0.9 * expected[name].item(), rel=1e-4), name


@pytest.mark.parametrize("teacher_arch, student_arch", [("resnet8x4", "resnet8"), ("wrn_16_2", "resnet8")])
def test_mlkd_trains_a_step(teacher_arch, student_arch):
    torch.manual_seed(0)
    train_one_step("mlkd", build_model(student_arch, CLASSES), Teacher(build_model(teacher_arch, CLASSES)), CLASSES)
