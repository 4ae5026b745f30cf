"""Sobolev, LwM and BSS: the methods that run their own training step (input gradients, Grad-CAM,
an attack on the teacher), on small real networks.

Expected values are recomputed in float64 on copies of the networks, the gradients by a separate
autograd pass (itself checked against finite differences) and the formulas in numpy with explicit
loops, never through kd_losses' own helpers."""
import copy

import numpy as np
import pytest
import torch

from engine import Teacher
from kd_losses import feature_shapes
from kd_losses.bss import BSS, bss_schedule
from kd_losses.lwm import LwM
from kd_losses.sobolev import Sobolev
from models import build_model

CLASSES = 10
BSS_DEFAULTS = {"T": 3.0, "bss_attack_size": 32, "bss_steps": 10, "bss_step_size": 0.3}


def batch(n=4, seed=0):
    """Images in the range of normalised CIFAR pixels (about -2 to 2) and labels."""
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.rand(n, 3, 32, 32, generator=g) - 2, torch.randint(0, CLASSES, (n,), generator=g)


def pair(student_arch="resnet8", teacher_arch="resnet8", seed=0):
    """A student in train mode and a teacher network in eval mode, frozen."""
    torch.manual_seed(seed)
    student, teacher = build_model(student_arch, CLASSES), build_model(teacher_arch, CLASSES)
    student.train()
    teacher.eval()
    teacher.requires_grad_(False)
    return student, teacher


def build(cls, student, teacher, **hparams):
    """The method as train_kd.py makes it: built from feature shapes, attached to the student and
    the Teacher (which runs the network BN-folded)."""
    method = cls(feature_shapes(student), feature_shapes(teacher), **hparams)
    method.attach(student, Teacher(teacher), torch.zeros(1, dtype=torch.long))
    return method


def teacher_outputs(teacher, images):
    with torch.inference_mode():
        logits = teacher(images)
    return {"logits": logits.clone()}


def float64_copy(model):
    return copy.deepcopy(model).double()


def as64(tensor):
    return tensor.detach().double().numpy()


def close(got, expected):
    return got.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def summed_target_logits(model, images, targets):
    return model(images).gather(1, targets[:, None]).sum()


# ---------------------------------------------------------------------------------- defaults

def test_defaults_match_the_seed_zoo():
    assert (Sobolev.default_weight, LwM.default_weight, BSS.default_weight) == (20.0, 0.4, 2.0)
    assert Sobolev.hyperparameters == {} and LwM.hyperparameters == {}
    assert {k: v for k, (v, _) in BSS.hyperparameters.items()} == BSS_DEFAULTS
    assert isinstance(BSS.hyperparameters["bss_attack_size"][0], int)
    assert not (Sobolev.compilable or LwM.compilable or BSS.compilable)


# ---------------------------------------------------------------------------------- Sobolev

def input_gradients64(model, images, targets):
    """d (sum over the batch of the target logits) / d images, float64; checked against a central
    finite difference along a random direction."""
    x = images.double().requires_grad_()
    (grad,) = torch.autograd.grad(summed_target_logits(model, x, targets), x)
    direction = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    h = 1e-8  # small: some ReLU inputs lie within 1e-6 of their kink here
    with torch.no_grad():
        numeric = (summed_target_logits(model, images.double() + h * direction, targets)
                   - summed_target_logits(model, images.double() - h * direction, targets)) / (2 * h)
    assert numeric.item() == pytest.approx((grad * direction).sum().item(), rel=1e-5)
    return grad.numpy().reshape(len(images), -1)


@pytest.mark.parametrize("teacher_arch", ["resnet8", "wrn_16_2"])
def test_sobolev_golden(teacher_arch):
    student, teacher = pair(teacher_arch=teacher_arch)
    images, targets = batch()
    student64 = float64_copy(student)  # train mode: BN uses the batch, as in the step
    method = build(Sobolev, student, teacher)
    _, loss = method.step(student, images, targets, None, teacher_outputs(teacher, images))

    def unit_rows(g):
        return np.stack([row / np.sqrt((row ** 2).sum()) for row in g])

    g_s = unit_rows(input_gradients64(student64, images, targets))
    g_t = unit_rows(input_gradients64(float64_copy(method.teacher.folded), images, targets))
    expected = sum(((g_s[n] - g_t[n]) ** 2).sum() for n in range(len(images))) / g_s.size
    assert close(loss, expected)


def test_sobolev_trains_the_student_through_its_input_gradient():
    student, teacher = pair()
    images, targets = batch()
    method = build(Sobolev, student, teacher)
    logits, loss = method.step(student, images, targets, None, teacher_outputs(teacher, images))
    # the logits are the student's on these very images: the trainer's CE uses them
    assert torch.allclose(logits, copy.deepcopy(student)(images), atol=1e-5)
    loss.backward()
    # the loss depends on the student's weights only through d logit / d image: a double backward
    assert student.stages[2][0].conv1.weight.grad.abs().sum() > 0
    assert student.fc.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- LwM

def grad_cams64(model, images, targets):
    """Grad-CAM on stage2 by a separate float64 pass: the stage2 tensor's .grad after backward of the
    summed target logits; then channel weights, weighted sum, ReLU and L2 normalisation in numpy."""
    logits, feats = model(images.double().requires_grad_(), features=True)  # the teacher's weights are frozen
    stage2 = feats["stage2"]
    stage2.retain_grad()
    logits.gather(1, targets[:, None]).sum().backward()
    a, g = as64(stage2), stage2.grad.numpy()
    maps = []
    for n in range(len(images)):
        cam = np.zeros(a.shape[2:])
        for c in range(a.shape[1]):
            cam += g[n, c].mean() * a[n, c]
        cam = np.maximum(cam, 0).ravel()
        maps.append(cam / np.sqrt((cam ** 2).sum()))
    return np.stack(maps)


@pytest.mark.parametrize("teacher_arch", ["resnet8", "wrn_16_2"])  # wrn: twice the student's channels
def test_lwm_golden(teacher_arch):
    student, teacher = pair(teacher_arch=teacher_arch)
    images, targets = batch()
    student64 = float64_copy(student)
    method = build(LwM, student, teacher)
    _, loss = method.step(student, images, targets, None, teacher_outputs(teacher, images))
    cam_s = grad_cams64(student64, images, targets)
    cam_t = grad_cams64(float64_copy(method.teacher.folded), images, targets)
    assert cam_s.shape == (len(images), 16 * 16)
    expected = sum(np.abs(cam_s[n] - cam_t[n]).sum() for n in range(len(images))) / cam_s.size
    assert close(loss, expected)


def test_lwm_trains_the_student_through_its_grad_cam():
    student, teacher = pair()
    images, targets = batch()
    method = build(LwM, student, teacher)
    _, loss = method.step(student, images, targets, None, teacher_outputs(teacher, images))
    loss.backward()
    # the channel weights are gradients of stage3 and the head: they are trained by the double backward
    assert student.stages[2][0].conv1.weight.grad.abs().sum() > 0
    assert student.stages[0][0].conv1.weight.grad.abs().sum() > 0


def test_lwm_reads_each_networks_stage_before_the_last():
    three = {"stage1": (16, 32, 32), "stage2": (32, 16, 16), "stage3": (64, 8, 8)}
    four = {**three, "stage4": (128, 4, 4)}
    method = LwM(three, four)  # its maps are compared at the smaller size, so sizes and widths may differ
    assert (method.student_stage, method.teacher_stage) == ("stage2", "stage3")


# ---------------------------------------------------------------------------------- BSS

def test_bss_schedule():
    # epochs 10: no warm-up (10 // 20 = 0), 1 - 1.25 (e - 1) / 10, zero from 80% on
    assert [bss_schedule(e, 10) for e in (1, 5, 8, 9, 10)] == pytest.approx([1.0, 0.5, 0.125, 0.0, 0.0])
    # the seed zoo's 200 epochs: warm-up 1..10, on for 11..160, CE alone from 161
    assert [bss_schedule(e, 200) for e in (1, 10, 11, 160, 161, 200)] == pytest.approx(
        [0.0, 0.0, 0.9375, 0.00625, 0.0, 0.0])
    method = BSS({}, {}, **BSS_DEFAULTS)
    method.start_epoch(5, 10)
    assert method.factor.item() == 0.5 and method.attacking
    method.start_epoch(9, 10)
    assert method.factor.item() == 0.0 and not method.attacking
    assert "factor" not in method.state_dict()  # a function of the epoch: not checkpointed


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_bss_kl_golden(T):
    g = torch.Generator().manual_seed(3)
    s, t = 3 * torch.randn(5, CLASSES, generator=g), 3 * torch.randn(5, CLASSES, generator=g)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    z_s, z_t = as64(s) / T, as64(t) / T
    kls = []
    for n in (0, 2, 3):
        p_t = np.exp(z_t[n]) / np.exp(z_t[n]).sum()
        log_p_s = z_s[n] - np.log(np.exp(z_s[n]).sum())
        kls.append(sum(p_t[c] * (np.log(p_t[c]) - log_p_s[c]) for c in range(CLASSES)))
    method = BSS({}, {}, **{**BSS_DEFAULTS, "T": T})
    assert close(method.boundary_loss(s, t, keep), sum(kls) / 3)  # no T^2 factor
    assert method.boundary_loss(s, t, torch.zeros(5)).item() == 0.0


def test_bss_chooses_the_most_disputed_correct_samples():
    g = torch.Generator().manual_seed(4)
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    s, t = torch.randn(7, CLASSES, generator=g), torch.randn(7, CLASSES, generator=g)
    s[np.arange(7), targets] += 5.0
    t[np.arange(7), targets] += 5.0
    s[1, 9] = t[4, 9] = 10.0  # sample 1 wrong for the student, sample 4 for the teacher
    p_s, p_t = as64(torch.softmax(s, 1)), as64(torch.softmax(t, 1))
    score = {n: sum((p_t[n, c] - p_s[n, c]) ** 2 for c in range(CLASSES) if c != targets[n]) for n in range(7)}
    eligible = [0, 2, 3, 5, 6]
    method = BSS({}, {}, **{**BSS_DEFAULTS, "bss_attack_size": 3})
    chosen, keep = method.choose_samples(s, t, targets)
    assert sorted(chosen.tolist()) == sorted(sorted(eligible, key=score.get)[-3:])
    assert keep.tolist() == [1.0, 1.0, 1.0]
    # more slots than correct samples: every correct one is attacked, the others are masked out
    method = BSS({}, {}, **{**BSS_DEFAULTS, "bss_attack_size": 32})
    chosen, keep = method.choose_samples(s, t, targets)
    assert len(chosen) == 7
    assert sorted(n for n, k in zip(chosen.tolist(), keep.tolist()) if k == 1.0) == eligible


def test_bss_attack_classes_follow_the_teacher():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]]).repeat(20000, 1)
    method = BSS({}, {}, **BSS_DEFAULTS)
    torch.manual_seed(0)
    drawn = method.draw_attack_classes(logits)
    torch.manual_seed(0)
    assert torch.equal(drawn, method.draw_attack_classes(logits))  # the default generator decides
    p = np.exp(as64(logits[0]))
    p /= p.sum()
    counts = np.bincount(drawn.numpy(), minlength=5) / len(drawn)
    assert counts[0] == 0.0  # never the teacher's top class
    assert counts[1:] == pytest.approx(p[1:] / p[1:].sum(), abs=0.015)


def test_bss_attack_moves_the_teacher_towards_the_attack_class():
    student, teacher = pair()
    method = build(BSS, student, teacher, **BSS_DEFAULTS)
    images, _ = batch(6)
    with torch.no_grad():
        before = teacher(images)
    base = before.argmax(1)
    attack_class = before.argsort(1, descending=True)[:, 1]  # the runner-up: the boundary is near
    moved = method.attack(images, base, attack_class)
    with torch.no_grad():
        after = teacher(moved)
    rows = torch.arange(len(images))
    margin_before = before[rows, base] - before[rows, attack_class]
    margin_after = after[rows, base] - after[rows, attack_class]
    assert (margin_after < margin_before).all()
    assert moved.abs().max() <= BSS.PIXEL_BOUND
    # each of the 10 steps is at most step_size * (1 + overshoot) long in L2 norm
    assert ((moved - images).flatten(1).norm(dim=1) <= 10 * 0.3 * (1 + 1e-4) + 1e-5).all()


def test_bss_step_trains_the_student_on_boundary_samples():
    torch.manual_seed(0)
    teacher = build_model("resnet8", CLASSES).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():  # a student close to the teacher, so that both classify most samples alike
        student.fc.weight.add_(0.05 * torch.randn_like(student.fc.weight))
    images, _ = batch(8)
    with torch.no_grad():
        targets = teacher(images).argmax(1)
    method = build(BSS, student, teacher, **BSS_DEFAULTS)
    method.start_epoch(1, 10)
    _, loss = method.step(student, images, targets, None, teacher_outputs(teacher, images))
    assert loss.item() > 0
    loss.backward()
    assert student.fc.weight.grad.abs().sum() > 0
    # off (after 80% of the epochs): zero, and no attack
    method.start_epoch(10, 10)
    _, loss = method.step(student, images, targets, None, teacher_outputs(teacher, images))
    assert loss.item() == 0.0


# ---------------------------------------------------------------------------------- all three

@pytest.mark.parametrize("amp", [False, True])  # training may run under bf16 autocast
@pytest.mark.parametrize("cls, hparams", [(Sobolev, {}), (LwM, {}), (BSS, BSS_DEFAULTS)])
def test_step_is_finite_and_leaves_the_teacher_alone(cls, hparams, amp):
    student, teacher = pair()
    images, targets = batch()
    method = build(cls, student, teacher, **hparams)
    teacher_state = copy.deepcopy(teacher.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits, loss = method.step(student, images, targets, None, teacher_outputs(teacher, images))
    assert loss.dtype == torch.float32
    (torch.nn.functional.cross_entropy(logits.float(), targets) + loss).backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    # the teacher is held outside the module tree: not trained, not checkpointed
    assert not any(m is teacher or m is method.teacher.folded for m in method.modules())
    assert not list(method.state_dict())
