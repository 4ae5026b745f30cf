"""VID, OFD, AFD, AB and FSP: golden values, their learnable or stored parts, and the stage that AB
and FSP run before training.

Golden values are recomputed here in float64 numpy with explicit loops or plain formulas, never
through kd_losses' own helpers; the methods work in float32, hence the 1e-5 relative tolerance.
The modules are imported directly so that the tests do not depend on kd_losses/__init__.py."""
import math

import numpy as np
import pytest
import torch

from kd_losses.ab import ActivationBoundaries
from kd_losses.afd import AttentiveFeatureDistillation
from kd_losses.fsp import FlowOfSolutionProcedure
from kd_losses.ofd import OverhaulFeatureDistillation
from kd_losses.stage import stage_lr
from kd_losses.vid import VariationalInformation
from engine import Teacher
from golden import batchnorm_train, randomize
from models import build_model

BATCH = 3
POST = {"stage1": (4, 4, 4), "stage2": (6, 2, 2), "stage3": (8, 2, 2)}
POST_WIDE = {**POST, "stage3": (12, 2, 2)}  # a wider teacher at stage 3
PRE = {"stage1_pre": (4, 4, 4), "stage2_pre": (6, 2, 2), "stage3_pre": (8, 2, 2)}
PRE_WIDE = {**PRE, "stage3_pre": (12, 2, 2)}


def defaults(cls):
    return {key: default for key, (default, _) in cls.hyperparameters.items()}


def outputs(shapes, seed, scale=1.0, relu=False):
    g = torch.Generator().manual_seed(seed)
    out = {"logits": torch.randn(BATCH, 10, generator=g)}
    for name, shape in shapes.items():
        f = scale * torch.randn(BATCH, *shape, generator=g)
        out[name] = f.clamp(min=0) if relu else f
    return out


def as64(tensor):
    return tensor.detach().double().numpy()


def close(got, expected):
    return got.item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def conv1x1(x, conv):
    """x: N x C_in x H x W; a bias-free 1x1 convolution."""
    return np.einsum("oc,nchw->nohw", as64(conv.weight[:, :, 0, 0]), x)


def connected(x, module):
    """The student's side: as is where the method has no connector, else conv1x1 + BN (training)."""
    if isinstance(module, torch.nn.Identity):
        return x
    return batchnorm_train(conv1x1(x, module[0]), module[1])


# ------------------------------------------------------------------------------------------- VID

@pytest.mark.parametrize("teacher_shapes", [POST, POST_WIDE], ids=["same_width", "wider_teacher"])
def test_vid_golden(teacher_shapes):
    method = VariationalInformation(POST, teacher_shapes, **defaults(VariationalInformation)).train()
    randomize(method, 7)  # the alphas too: each channel gets its own variance
    s, t = outputs(POST, 0, relu=True), outputs(teacher_shapes, 1, relu=True)
    per_stage = []
    for name in ("stage1", "stage2", "stage3"):
        x, target = as64(s[name]), as64(t[name])
        w1, w2, w3 = (as64(method.regressors[name][i].weight[:, :, 0, 0]) for i in (0, 2, 4))
        var = np.log1p(np.exp(as64(method.alphas[name]))) + 1e-6
        terms = []
        for n in range(BATCH):
            for h in range(x.shape[2]):
                for w in range(x.shape[3]):
                    mu = w3 @ np.maximum(w2 @ np.maximum(w1 @ x[n, :, h, w], 0), 0)
                    for c in range(len(var)):
                        terms.append(0.5 * (np.log(var[c]) + (mu[c] - target[n, c, h, w]) ** 2 / var[c]))
        per_stage.append(np.mean(terms))
    assert close(method(s, t, None), np.mean(per_stage))


def test_vid_shapes_and_initial_variance():
    method = VariationalInformation(POST, POST_WIDE, vid_scale=0.5, vid_init_var=3.0)
    assert method.regressors["stage3"][0].out_channels == 6  # hidden = 0.5 x 12 teacher channels
    assert method.regressors["stage3"][4].out_channels == 12
    assert all(m.bias is None for m in method.regressors["stage3"] if isinstance(m, torch.nn.Conv2d))
    for name in ("stage1", "stage2", "stage3"):
        variance = np.log1p(np.exp(as64(method.alphas[name]))) + 1e-6
        assert np.allclose(variance, 3.0, rtol=1e-6)


def test_vid_pools_a_larger_teacher_map_to_the_students_size():
    larger = {**POST, "stage2": (6, 4, 4)}
    method = VariationalInformation(POST, larger, **defaults(VariationalInformation))
    s, t = outputs(POST, 0, relu=True), outputs(larger, 1, relu=True)
    pooled = {**t, "stage2": torch.nn.functional.avg_pool2d(t["stage2"], 2)}
    assert torch.equal(method(s, t, None), method(s, pooled, None))


def test_vid_variance_is_learned():
    method = VariationalInformation(POST, POST, **defaults(VariationalInformation)).train()
    assert all(any(p is alpha for p in method.parameters()) for alpha in method.alphas.values())
    before = {k: v.detach().clone() for k, v in method.alphas.items()}
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    loss = method(outputs(POST, 0, relu=True), outputs(POST, 1, relu=True), None)
    loss.backward()
    for name, alpha in method.alphas.items():
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0, name
    optimizer.step()
    for name, alpha in method.alphas.items():
        assert not torch.equal(alpha.detach(), before[name]), name


def test_vid_defaults():
    assert defaults(VariationalInformation) == {"vid_scale": 1.0, "vid_init_var": 5.0}
    assert VariationalInformation.default_weight == 1.0


# ------------------------------------------------------------------------------------------- OFD

def reference_margin(gamma, beta):
    """E[x | x < 0] for x ~ N(beta, gamma^2) in closed form; -3|gamma| where P(x < 0) <= 0.001."""
    s = abs(gamma)
    negative_mass = 0.5 * (1 + math.erf(-beta / s / math.sqrt(2)))
    if negative_mass <= 0.001:
        return -3 * s
    return beta - s * math.exp(-(beta / s) ** 2 / 2) / math.sqrt(2 * math.pi) / negative_mass


def integrated_margin(gamma, beta):
    """The same expectation by numerical integration of x times the normal density over x < 0."""
    x = np.linspace(beta - 12 * abs(gamma), 0.0, 400001)
    density = np.exp(-((x - beta) / gamma) ** 2 / 2)
    return np.trapezoid(x * density, x) / np.trapezoid(density, x)


# (gamma, beta) per stage-3 channel: typical, negative gamma (its |gamma| counts), mostly negative,
# mostly positive, and one beyond the 0.001 cut-off that takes -3 |gamma|
BN_CASES = [(1.0, 0.0), (-0.7, 0.3), (0.5, -1.0), (2.0, 3.0), (0.4, 0.8), (1.3, -0.2), (0.2, 0.5), (1.0, 3.2)]


def attached_ofd(student_shapes=None):
    teacher = build_model("resnet8", 10)
    with torch.no_grad():
        for name, bn in teacher.pre_relu_batchnorms().items():
            g = torch.Generator().manual_seed(len(name) + bn.num_features)
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
        last = teacher.pre_relu_batchnorms()["stage3_pre"]
        last.weight[:len(BN_CASES)] = torch.tensor([g for g, _ in BN_CASES])
        last.bias[:len(BN_CASES)] = torch.tensor([b for _, b in BN_CASES])
    shapes = {"stage1_pre": (16, 32, 32), "stage2_pre": (32, 16, 16), "stage3_pre": (64, 8, 8)}
    method = OverhaulFeatureDistillation(student_shapes or shapes, shapes)
    method.attach(build_model("resnet8", 10), Teacher(teacher), None)
    return method, teacher


def test_ofd_margin_from_teacher_batchnorm():
    method, teacher = attached_ofd()
    for name, bn in teacher.pre_relu_batchnorms().items():
        got = as64(getattr(method, f"margin_{name}"))
        expected = [reference_margin(g, b) for g, b in zip(as64(bn.weight), as64(bn.bias))]
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-6), name
        assert (got < 0).all()
    got = as64(method.margin_stage3_pre)
    for c, (gamma, beta) in enumerate(BN_CASES):
        if c == len(BN_CASES) - 1:  # P(x < 0) = cdf(-3.2) < 0.001
            assert got[c] == pytest.approx(-3.0, rel=1e-6)
        else:
            assert got[c] == pytest.approx(integrated_margin(gamma, beta), rel=1e-4)
    # buffers, so that a checkpoint keeps them
    assert {f"margin_stage{k}_pre" for k in (1, 2, 3)} <= set(method.state_dict())


@pytest.mark.parametrize("teacher_shapes", [PRE, PRE_WIDE], ids=["same_width", "wider_teacher"])
def test_ofd_golden(teacher_shapes):
    method = OverhaulFeatureDistillation(PRE, teacher_shapes).train()
    randomize(method, 3)
    with torch.no_grad():
        for k, shape in teacher_shapes.items():
            getattr(method, f"margin_{k}").copy_(-0.2 - torch.rand(shape[0]))
    s, t = outputs(PRE, 0), outputs(teacher_shapes, 1)
    per_stage = []
    for name in ("stage1_pre", "stage2_pre", "stage3_pre"):
        x = connected(as64(s[name]), method.connectors[name])
        teacher, margin = as64(t[name]), as64(getattr(method, f"margin_{name}"))
        total, count = 0.0, 0
        for n, c, h, w in np.ndindex(*teacher.shape):
            target = max(teacher[n, c, h, w], margin[c])
            if x[n, c, h, w] > target or target > 0:
                total += (x[n, c, h, w] - target) ** 2
            count += 1
        per_stage.append(total / count)
    assert close(method(s, t, None), np.mean(per_stage))


def test_ofd_connector_always_and_defaults():
    method = OverhaulFeatureDistillation(PRE, PRE)
    for connector in method.connectors.values():
        assert isinstance(connector[0], torch.nn.Conv2d) and isinstance(connector[1], torch.nn.BatchNorm2d)
    assert OverhaulFeatureDistillation.default_weight == 0.5
    assert OverhaulFeatureDistillation.hyperparameters == {}
    # across sizes (a cross-family pair) the connector rule's layer: here a transposed conv from half the size
    method = OverhaulFeatureDistillation(PRE, {**PRE, "stage1_pre": (4, 8, 8)})
    assert isinstance(method.connectors["stage1_pre"][0], torch.nn.ConvTranspose2d)
    assert method.connectors["stage1_pre"](torch.randn(BATCH, *PRE["stage1_pre"])).shape == (BATCH, 4, 8, 8)


def test_ofd_narrower_student():
    student_shapes = {"stage1_pre": (8, 32, 32), "stage2_pre": (16, 16, 16), "stage3_pre": (32, 8, 8)}
    method, _ = attached_ofd(student_shapes)
    assert method.connectors["stage3_pre"][0].weight.shape == (64, 32, 1, 1)
    teacher_shapes = {k: (2 * c, h, w) for k, (c, h, w) in student_shapes.items()}
    loss = method(outputs(student_shapes, 0), outputs(teacher_shapes, 1), None)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------- AFD

@pytest.mark.parametrize("teacher_shapes", [POST, POST_WIDE], ids=["same_width", "wider_teacher"])
def test_afd_golden(teacher_shapes):
    method = AttentiveFeatureDistillation(POST, teacher_shapes, afd_att_f=0.5).train()
    randomize(method, 5)
    s, t = outputs(POST, 0, relu=True), outputs(teacher_shapes, 1, relu=True)
    per_stage = []
    for name in ("stage1", "stage2", "stage3"):
        x = connected(as64(s[name]), method.connectors[name])
        y = as64(t[name])
        first, second = method.attentions[name][0], method.attentions[name][2]
        w1, b1 = as64(first.weight[:, :, 0, 0]), as64(first.bias)
        w2, b2 = as64(second.weight[:, :, 0, 0]), as64(second.bias)
        per_sample = []
        for n in range(BATCH):
            pooled = y[n].mean(axis=(1, 2))
            rho = 1 / (1 + np.exp(-(w2 @ np.maximum(w1 @ pooled + b1, 0) + b2)))
            rho = rho / rho.sum()
            loss = 0.0
            for c in range(y.shape[1]):
                a = x[n, c] / (np.sqrt((x[n, c] ** 2).sum()) + 1e-6)
                b = y[n, c] / (np.sqrt((y[n, c] ** 2).sum()) + 1e-6)
                loss += rho[c] * ((a - b) ** 2).mean()
            per_sample.append(loss)
        per_stage.append(np.mean(per_sample))
    assert close(method(s, t, None), np.mean(per_stage))


def test_afd_architecture_and_defaults():
    method = AttentiveFeatureDistillation(POST, POST_WIDE, **defaults(AttentiveFeatureDistillation))
    attention = method.attentions["stage3"]
    assert (attention[0].in_channels, attention[0].out_channels, attention[2].out_channels) == (12, 12, 12)
    assert attention[0].bias is not None and attention[2].bias is not None
    assert isinstance(method.connectors["stage1"], torch.nn.Identity)
    assert isinstance(method.connectors["stage3"][0], torch.nn.Conv2d)
    assert defaults(AttentiveFeatureDistillation) == {"afd_att_f": 1.0}
    assert AttentiveFeatureDistillation.default_weight == 500.0


def test_afd_zero_when_student_equals_teacher():
    method = AttentiveFeatureDistillation(POST, POST, afd_att_f=1.0).train()
    t = outputs(POST, 0, relu=True)
    assert abs(method({k: v.clone() for k, v in t.items()}, t, None).item()) < 1e-6


# -------------------------------------------------------------------------------------------- AB

def ab_reference(s, t, m):
    total, count = 0.0, 0
    for index in np.ndindex(*t.shape):
        if t[index] <= 0 and s[index] > -m:
            total += (s[index] + m) ** 2
        elif t[index] > 0 and s[index] <= m:
            total += (s[index] - m) ** 2
        count += 1
    return total / count


def test_ab_hinge_cases():
    method = ActivationBoundaries({k: (1, 1, 5) for k in PRE}, {k: (1, 1, 5) for k in PRE},
                                  **defaults(ActivationBoundaries))
    # teacher off: s = -3 beyond the margin (0), s = -1 (1), s = 0 at t = 0 (4);
    # teacher on:  s = 1 inside the margin (1), s = 3 beyond it (0)
    s = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    t = torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 5)
    same = {k: s for k in PRE}
    assert close(method(same, {k: t for k in PRE}, None), (0 + 1 + 4 + 1 + 0) / 5)


@pytest.mark.parametrize("teacher_shapes", [PRE, PRE_WIDE], ids=["same_width", "wider_teacher"])
@pytest.mark.parametrize("margin", [2.0, 0.5])
def test_ab_golden(teacher_shapes, margin):
    hparams = {**defaults(ActivationBoundaries), "ab_margin": margin}
    method = ActivationBoundaries(PRE, teacher_shapes, **hparams).train()
    randomize(method, 9)
    s, t = outputs(PRE, 0, scale=3.0), outputs(teacher_shapes, 1)
    expected = np.mean([ab_reference(connected(as64(s[k]), method.connectors[k]), as64(t[k]), margin)
                        for k in ("stage1_pre", "stage2_pre", "stage3_pre")])
    assert close(method(s, t, None), expected)


def test_ab_defaults():
    assert defaults(ActivationBoundaries) == {"ab_margin": 2.0, "ab_epochs": 50, "ab_lr": 0.01,
                                              "ab_stage_weight": 10.0}
    assert ActivationBoundaries.default_weight == 0.0 and ActivationBoundaries.has_stage
    assert ActivationBoundaries(PRE, PRE, **defaults(ActivationBoundaries)).features == (
        "stage1_pre", "stage2_pre", "stage3_pre")


# ------------------------------------------------------------------------------------------- FSP

FSP_SHAPES = {"stem": (3, 8, 8), "stage1": (4, 8, 8), "stage2": (5, 4, 4), "stage3": (6, 2, 2)}


def block_mean(f, size):
    """Average pooling of C x H x W to C x size x size over equal blocks."""
    c, h, _ = f.shape
    k = h // size
    out = np.zeros((c, size, size))
    for i in range(size):
        for j in range(size):
            out[:, i, j] = f[:, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(axis=(1, 2))
    return out


def gram(a, b):
    """One sample: the larger map pooled to the smaller, then (1/HW) sum over positions of a b^T."""
    if a.shape[1] > b.shape[1]:
        a = block_mean(a, b.shape[1])
    elif b.shape[1] > a.shape[1]:
        b = block_mean(b, a.shape[1])
    g = np.zeros((a.shape[0], b.shape[0]))
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            g[i, j] = (a[i] * b[j]).sum() / (a.shape[1] * a.shape[2])
    return g


@pytest.mark.parametrize("teacher_shapes", [
    FSP_SHAPES,
    {**FSP_SHAPES, "stage3": (6, 4, 4)},    # teacher's stage 3 as large as its stage 2: no pooling there
    {**FSP_SHAPES, "stage3": (6, 8, 8)},    # the later map larger than the earlier: that one is pooled
], ids=["same", "teacher_no_pool", "later_map_larger"])
def test_fsp_golden(teacher_shapes):
    method = FlowOfSolutionProcedure(FSP_SHAPES, teacher_shapes, **defaults(FlowOfSolutionProcedure))
    s, t = outputs(FSP_SHAPES, 0, relu=True), outputs(teacher_shapes, 1, relu=True)
    per_pair = []
    for a, b in (("stem", "stage1"), ("stage1", "stage2"), ("stage2", "stage3")):
        sq = [(gram(as64(s[a][n]), as64(s[b][n])) - gram(as64(t[a][n]), as64(t[b][n]))) ** 2
              for n in range(BATCH)]
        per_pair.append(np.mean(sq))
    assert close(method(s, t, None), np.mean(per_pair))


def test_fsp_refuses_different_channels_and_defaults():
    with pytest.raises(ValueError, match="channel"):
        FlowOfSolutionProcedure(FSP_SHAPES, {**FSP_SHAPES, "stage2": (7, 4, 4)}, **defaults(FlowOfSolutionProcedure))
    assert defaults(FlowOfSolutionProcedure) == {"fsp_epochs": 50, "fsp_lr": 0.01, "fsp_stage_weight": 1.0}
    assert FlowOfSolutionProcedure.default_weight == 0.0 and FlowOfSolutionProcedure.has_stage


def test_fsp_zero_when_student_equals_teacher():
    method = FlowOfSolutionProcedure(FSP_SHAPES, FSP_SHAPES, **defaults(FlowOfSolutionProcedure))
    t = outputs(FSP_SHAPES, 0, relu=True)
    assert abs(method({k: v.clone() for k, v in t.items()}, t, None).item()) < 1e-6


# ----------------------------------------------------------------------------------------- stage

def test_stage_learning_rate_follows_the_seed_zoo():
    rates = [stage_lr(0.01, epoch, 50) for epoch in range(1, 51)]
    assert rates[:30] == [0.01] * 30
    assert rates[30:40] == pytest.approx([0.001] * 10) and rates[40:] == pytest.approx([0.0001] * 10)


@pytest.mark.parametrize("cls,hparams", [
    (ActivationBoundaries, {"ab_margin": 2.0, "ab_epochs": 1, "ab_lr": 0.01, "ab_stage_weight": 10.0}),
    (FlowOfSolutionProcedure, {"fsp_epochs": 1, "fsp_lr": 0.01, "fsp_stage_weight": 1.0}),
], ids=["ab", "fsp"])
def test_stage_trains_the_student_alone(cls, hparams, capsys):
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet8", 10)
    teacher.eval().requires_grad_(False)
    student.eval()  # the stage must put it in training mode itself
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}

    with torch.no_grad():
        _, feats = student(torch.zeros(2, 3, 32, 32), features=True)
    shapes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    method = cls(shapes, shapes, **hparams)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.arange(4), torch.arange(4) + 4 * i) for i in range(2)]
    method.train_stage(student, Teacher(teacher), batches)

    assert student.training
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert any(k.endswith("conv1.weight") for k in changed) and any("running_mean" in k for k in changed)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    printed = capsys.readouterr().out
    assert f"{cls.name} stage epoch 1/1" in printed
    loss = float(printed.strip().split()[-1])
    assert math.isfinite(loss) and loss > 0


def test_ab_stage_trains_its_connectors_though_training_proper_will_not():
    """AB's KD weight is 0 after its stage, so the Distiller freezes the method; the stage still
    trains the connectors (a resnet8 student under a wider wrn_16_2 teacher has real ones), and
    they stay frozen afterwards."""
    from engine import Distiller
    from kd_losses import build_method, default_hyperparameters
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), Teacher(build_model("wrn_16_2", 10))
    hparams = {**default_hyperparameters("ab"), "ab_epochs": 1}
    method = build_method("ab", hparams, student, teacher, torch.arange(8) % 10)
    Distiller(student, teacher, method, 1.0, 0.0)
    connectors = [p for p in method.parameters()]
    assert connectors and not any(p.requires_grad for p in connectors)
    before = [p.detach().clone() for p in connectors]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.arange(4), torch.arange(4)) for _ in range(2)]
    method.train_stage(student, teacher, batches)
    assert all(not torch.equal(a, b) for a, b in zip(before, connectors) if a.dim() > 1)
    assert not any(p.requires_grad for p in connectors)
