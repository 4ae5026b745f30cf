"""CTKD: golden value, the reversed and scheduled gradient of the learned temperature, finite values
where the official form gives NaN (CTKD issue 9), one real training step and exact resume.

Golden values are recomputed here in float64 numpy with plain formulas, never through kd_losses'
own helpers; the method works in float32, hence the 1e-5 relative tolerance."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, EXACT, run_script
from engine import Teacher
from golden import as64, close, fake_outputs
from kd_losses.ctkd import INITIAL_RAW_T, CurriculumTemperatureKD as CTKD  # registers "ctkd"
from models import build_model
from test_losses import train_one_step
from test_resume import assert_same_run

BATCH, CLASSES = 5, 10
DEFAULTS = {"ctkd_t_start": 1.0, "ctkd_t_range": 20.0, "ctkd_lambda_max": 1.0, "ctkd_lambda_loops": 10,
            "logit_stand": False}


def method(**changes):
    return CTKD({}, {}, **{**DEFAULTS, **changes})


def set_raw_T(m, value):
    with torch.no_grad():
        m.raw_T.fill_(value)


def paper_lambda(epoch, lambda_min=0.0, lambda_max=1.0, loops=10):
    """The paper's schedule: lambda_min + (lambda_max - lambda_min) (1 + cos((1 + min(E, loops) / loops) pi)) / 2."""
    return lambda_min + 0.5 * (lambda_max - lambda_min) * (1 + math.cos((1 + min(epoch, loops) / loops) * math.pi))


def kd64(s, t, T):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), summed over classes, averaged over the rows, in float64."""
    total = 0.0
    for z_s, z_t in zip(s / T, t / T):
        p_t = np.exp(z_t - z_t.max()) / np.exp(z_t - z_t.max()).sum()
        log_p_s = z_s - z_s.max() - np.log(np.exp(z_s - z_s.max()).sum())
        total += sum(p_t[c] * (np.log(p_t[c]) - log_p_s[c]) for c in range(len(p_t)))
    return T ** 2 * total / len(s)


def test_defaults_are_the_official_ones():
    # t_start 1, t_end 20 (train_student.py), cosine 0 -> -1 over 10 epochs, KD 0.9 (run_cifar_distill.sh)
    assert {k: v for k, (v, _) in CTKD.hyperparameters.items()} == DEFAULTS
    assert CTKD.default_weight == 0.9
    m = method()
    assert m.temperature().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))  # 15.6212, issue 9's first value
    assert [name for name, _ in m.named_parameters()] == ["raw_T"] and "lam" not in m.state_dict()


@pytest.mark.parametrize("raw_T, t_start, t_range", [(1.0, 1.0, 20.0), (-0.7, 2.0, 5.0)])
def test_ctkd_golden(raw_T, t_start, t_range):
    s, t = fake_outputs({}, 0, BATCH, CLASSES), fake_outputs({}, 1, BATCH, CLASSES)
    m = method(ctkd_t_start=t_start, ctkd_t_range=t_range)
    set_raw_T(m, raw_T)
    T = t_start + t_range / (1 + math.exp(-raw_T))
    assert close(m(s, t, torch.arange(BATCH) % CLASSES), kd64(as64(s["logits"]), as64(t["logits"]), T))


def test_ctkd_golden_with_logit_standardisation():
    s, t = fake_outputs({}, 4, BATCH, CLASSES), fake_outputs({}, 5, BATCH, CLASSES)
    m = method(logit_stand=True)
    set_raw_T(m, 0.3)

    def z_scored(z):  # per sample, minus the mean, over 1e-7 + the unbiased std
        return (z - z.mean(1, keepdims=True)) / (1e-7 + z.std(1, ddof=1, keepdims=True))
    expected = kd64(z_scored(as64(s["logits"])), z_scored(as64(t["logits"])), 1 + 20 / (1 + math.exp(-0.3)))
    assert close(m(s, t, None), expected)
    assert CTKD.logit_stand_defaults("resnet32x4", "resnet8x4") == {"kd_weight": 9.0, "ce_weight": 0.1}


@pytest.mark.parametrize("epoch", [1, 3, 10, 240])
def test_temperature_gradient_is_reversed_and_scaled_by_the_schedule(epoch):
    s, t = fake_outputs({}, 2, BATCH, CLASSES), fake_outputs({}, 3, BATCH, CLASSES)
    m = method().double()
    set_raw_T(m, 0.4)
    m.start_epoch(epoch, 240)
    lam = paper_lambda(epoch)
    assert m.lam.item() == pytest.approx(lam, rel=1e-12, abs=1e-15)
    z_s = s["logits"].double().requires_grad_()
    m({"logits": z_s}, {"logits": t["logits"].double()}, None).backward()

    def kd_at(theta):
        return kd64(as64(s["logits"]), as64(t["logits"]), 1 + 20 / (1 + math.exp(-theta)))

    h = 1e-5
    d_kd = (kd_at(0.4 + h) - kd_at(0.4 - h)) / (2 * h)
    assert m.raw_T.grad.item() == pytest.approx(-lam * d_kd, rel=1e-6, abs=1e-12)
    # the student's gradient is not reversed: that of the plain loss at the same temperature
    z_plain = s["logits"].double().requires_grad_()
    T = 1 + 20 * torch.sigmoid(torch.tensor(0.4, dtype=torch.float64))
    (F.kl_div(F.log_softmax(z_plain / T, 1), F.softmax(t["logits"].double() / T, 1), reduction="batchmean")
     * T ** 2).backward()
    assert torch.allclose(z_s.grad, z_plain.grad, rtol=1e-12, atol=1e-15)


def test_schedule_rises_from_zero_and_stays_at_its_maximum():
    m = method(ctkd_lambda_max=0.5, ctkd_lambda_loops=4)
    assert m.lam.item() == 0.5  # before the first start_epoch: full strength
    for epoch, expected in [(1, 0.5 * (1 - math.cos(math.pi / 4)) / 2), (2, 0.25), (4, 0.5), (9, 0.5)]:
        m.start_epoch(epoch, 9)
        assert m.lam.item() == pytest.approx(expected, rel=1e-6)
        assert m.lam.item() == pytest.approx(paper_lambda(epoch, 0.0, 0.5, 4), rel=1e-6)


@pytest.mark.parametrize("raw_T", [-30.0, 0.0, 30.0], ids=["T_at_t_start", "T_mid", "T_at_top"])
def test_stays_finite_where_teacher_probabilities_underflow(raw_T):
    """CTKD issue 9: very confident logits leave teacher probabilities of exactly 0 in float32, where
    the official KLDivLoss(log p_s, p_t) gives the temperature a NaN gradient."""
    g = torch.Generator().manual_seed(4)
    s, t = 1e4 * torch.randn(BATCH, CLASSES, generator=g), 1e4 * torch.randn(BATCH, CLASSES, generator=g)
    m = method()
    set_raw_T(m, raw_T)
    assert (F.softmax(t / m.temperature().detach(), dim=1) == 0).any()  # the case of the issue
    z_s = s.requires_grad_()
    loss = m({"logits": z_s}, {"logits": t}, None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z_s.grad).all() and torch.isfinite(m.raw_T.grad)


@pytest.mark.parametrize("teacher_arch, student_arch, classes",
                         [("resnet8x4", "resnet8", 10), ("resnet32x4", "ShuffleV1", 100)])
def test_trains_a_step_on_real_networks(teacher_arch, student_arch, classes):
    torch.manual_seed(0)
    train_one_step("ctkd", build_model(student_arch, classes), Teacher(build_model(teacher_arch, classes)), classes)


def test_resume_equals_the_uninterrupted_run(teacher, cifar10_root, tmp_path):
    """As tests/test_resume.py, in this process, where importing kd_losses.ctkd has registered the
    method: the temperature comes back from last.pt and start_epoch sets lambda again."""
    common = ("--teacher", teacher, "--method", "ctkd", "--data-root", cifar10_root, "--student", "resnet8",
              "--batch-size", 32, "--lr-milestones", 1, "--device", DEVICE, *EXACT)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script("train_kd.py", *common, "--epochs", 2, "--output-dir", straight)
    run_script("train_kd.py", *common, "--epochs", 1, "--output-dir", split)
    run_script("train_kd.py", *common, "--epochs", 2, "--output-dir", split, "--resume", os.path.join(split, "last.pt"))
    assert_same_run(straight, split)
    raw_T = torch.load(os.path.join(straight, "last.pt"), weights_only=True)["method"]["method.raw_T"]
    assert raw_T.item() != INITIAL_RAW_T  # the temperature did train
