"""Logits, PKT, SP, CC, IRG and DKD against their definitions (see each class's docstring).

Golden values are recomputed here in float64 numpy with explicit loops, never through kd_losses'
own helpers; the methods work in float32, hence the 1e-5 relative tolerance. The modules are
imported directly so that these tests do not depend on kd_losses/__init__.py listing them."""
import math

import numpy as np
import pytest
import torch

from conftest import resolved_settings
from golden import as64, close, fake_outputs
from kd_losses.cc import CorrelationCongruence
from kd_losses.dkd import DecoupledKD
from kd_losses.irg import InstanceRelationshipGraph
from kd_losses.logits import Logits
from kd_losses.pkt import ProbabilisticKT
from kd_losses.sp import SimilarityPreserving

BATCH, CLASSES = 6, 10
STUDENT = {"stage1": (4, 8, 8), "stage2": (6, 6, 6), "stage3": (8, 4, 4), "pool": (8,)}
# wider everywhere, and other spatial sizes, for the methods that compare only N x N relations
TEACHER = {"stage1": (8, 6, 6), "stage2": (12, 6, 6), "stage3": (16, 3, 3), "pool": (16,)}


def defaults(cls):
    return {key: entry[0] for key, entry in cls.hyperparameters.items()}


def outputs(shapes, seed):
    return fake_outputs(shapes, seed, BATCH, CLASSES)


def targets():
    return torch.arange(BATCH) % CLASSES


def mean_squared(a, b):
    return float(((np.asarray(a) - np.asarray(b)) ** 2).mean())


def unit(v):
    return v / np.sqrt((v ** 2).sum())


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p, q):
    return sum(p[i] * math.log(p[i] / q[i]) for i in range(len(p)))


# ------------------------------------------------------------------------------------------ logits

def test_logits_golden():
    s, t = outputs({}, 0), outputs({}, 1)
    z_s, z_t = as64(s["logits"]), as64(t["logits"])
    expected = sum((z_s[n, c] - z_t[n, c]) ** 2 for n in range(BATCH) for c in range(CLASSES)) / (BATCH * CLASSES)
    assert close(Logits({}, {})(s, t, targets()), expected)


# --------------------------------------------------------------------------------------------- PKT

def test_pkt_golden():
    s, t = outputs(STUDENT, 0), outputs(TEACHER, 1)  # 8 against 16 dimensions
    eps = 1e-6

    def probabilities(x):
        v = [row / (np.sqrt((row ** 2).sum()) + eps) for row in x]
        k = np.array([[(np.dot(v[i], v[j]) + 1) / 2 for j in range(BATCH)] for i in range(BATCH)])
        return np.array([k[i] / k[i].sum() for i in range(BATCH)])

    p_s, p_t = probabilities(as64(s["pool"])), probabilities(as64(t["pool"]))
    expected = sum(p_t[i, j] * math.log((p_t[i, j] + eps) / (p_s[i, j] + eps))
                   for i in range(BATCH) for j in range(BATCH)) / BATCH ** 2
    assert close(ProbabilisticKT(STUDENT, TEACHER)(s, t, targets()), expected)


def test_pkt_rows_are_distributions_and_zero_vector_is_finite():
    """A zero pooled vector (a sample whose last stage is all dead ReLUs) stays finite, with finite
    gradients, as the norm is offset by eps rather than divided by alone."""
    s, t = outputs(STUDENT, 0), outputs(TEACHER, 1)
    s["pool"][0] = 0
    s["pool"].requires_grad_()
    loss = ProbabilisticKT(STUDENT, TEACHER)(s, t, targets())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s["pool"].grad).all()


# ---------------------------------------------------------------------------------------------- SP

def test_sp_golden():
    s, t = outputs(STUDENT, 0), outputs(TEACHER, 1)  # other widths and spatial sizes at every stage

    def similarity(f):
        flat = f.reshape(BATCH, -1)
        gram = np.array([[np.dot(flat[i], flat[j]) for j in range(BATCH)] for i in range(BATCH)])
        return np.array([unit(gram[i]) for i in range(BATCH)])

    per_stage = []
    for stage in ("stage1", "stage2", "stage3"):
        g_s, g_t = similarity(as64(s[stage])), similarity(as64(t[stage]))
        frobenius_squared = sum((g_t[i, j] - g_s[i, j]) ** 2 for i in range(BATCH) for j in range(BATCH))
        per_stage.append(frobenius_squared / BATCH ** 2)
    expected = sum(per_stage) / 3
    assert close(SimilarityPreserving(STUDENT, TEACHER)(s, t, targets()), expected)


# ---------------------------------------------------------------------------------------------- CC

@pytest.mark.parametrize("gamma, order", [(0.4, 2), (0.7, 3)])
def test_cc_golden(gamma, order):
    s, t = outputs(STUDENT, 0), outputs(TEACHER, 1)

    def correlation(x):
        v = [unit(row) for row in x]
        return np.array([[sum(math.exp(-2 * gamma) * (2 * gamma * np.dot(v[i], v[j])) ** p / math.factorial(p)
                              for p in range(order + 1)) for j in range(BATCH)] for i in range(BATCH)])

    expected = mean_squared(correlation(as64(s["pool"])), correlation(as64(t["pool"])))
    method = CorrelationCongruence(STUDENT, TEACHER, cc_gamma=gamma, cc_order=order)
    assert close(method(s, t, targets()), expected)


def test_cc_high_order_is_the_gaussian_rbf_of_unit_vectors():
    """The expansion is of exp(-gamma |a - b|^2) with a, b L2-normalised: at a high order the
    loss is that of the exact kernel."""
    s, t = outputs(STUDENT, 0), outputs(TEACHER, 1)
    gamma = 0.4

    def rbf(x):
        v = [unit(row) for row in x]
        return np.array([[math.exp(-gamma * ((v[i] - v[j]) ** 2).sum()) for j in range(BATCH)] for i in range(BATCH)])

    expected = mean_squared(rbf(as64(s["pool"])), rbf(as64(t["pool"])))
    method = CorrelationCongruence(STUDENT, TEACHER, cc_gamma=gamma, cc_order=20)
    assert close(method(s, t, targets()), expected)


# --------------------------------------------------------------------------------------------- IRG

def adaptive_windows(size_in, size_out):
    """Adaptive average pooling's windows: [floor(i * in / out), ceil((i + 1) * in / out))."""
    return [(i * size_in // size_out, -(-(i + 1) * size_in // size_out)) for i in range(size_out)]


def irg_expected(s, t, w_vertex, w_edge, w_transform):
    def edges(f):
        flat = f.reshape(BATCH, -1)
        d = np.array([[((flat[i] - flat[j]) ** 2).sum() if i != j else 0.0 for j in range(BATCH)]
                      for i in range(BATCH)])
        return d / d.max()

    def transform(early, late):
        (c_e, h_e, w_e), (c_l, h_l, w_l) = early.shape[1:], late.shape[1:]
        h, w, c = min(h_e, h_l), min(w_e, w_l), min(c_e, c_l)

        def pooled(f):  # one sample: channels to c, spatial size to h x w, by window means
            c_in, h_in, w_in = f.shape
            return np.array([[[f[c0:c1, h0:h1, w0:w1].mean()
                               for (w0, w1) in adaptive_windows(w_in, w)]
                              for (h0, h1) in adaptive_windows(h_in, h)]
                             for (c0, c1) in adaptive_windows(c_in, c)])

        d = np.array([((pooled(early[n]) - pooled(late[n])) ** 2).sum() for n in range(BATCH)])
        return d / d.max()

    x_s = {k: as64(v) for k, v in s.items()}
    x_t = {k: as64(v) for k, v in t.items()}
    edge = sum(mean_squared(edges(x_s[k]), edges(x_t[k])) for k in ("stage2", "stage3", "pool")) / 3
    return {"vertex": w_vertex * mean_squared(x_s["logits"], x_t["logits"]),
            "edge": w_edge * edge,
            "transform": w_transform * mean_squared(transform(x_s["stage2"], x_s["stage3"]),
                                                    transform(x_t["stage2"], x_t["stage3"]))}


# student: stage3 = 2 x stage2 channels (the ResNets' case: the seed zoo's pair means);
# teacher: equal channel counts, and a non-multiple (6 -> 8 channels, 6 -> 4 pixels) case
IRG_PAIRS = {
    "resnet_like": ({"stage2": (4, 6, 6), "stage3": (8, 3, 3), "pool": (8,)},
                    {"stage2": (16, 6, 6), "stage3": (16, 3, 3), "pool": (16,)}),
    "non_multiple": (STUDENT, TEACHER),
}


@pytest.mark.parametrize("pair", sorted(IRG_PAIRS))
def test_irg_golden(pair):
    student_shapes, teacher_shapes = IRG_PAIRS[pair]
    s, t = outputs(student_shapes, 0), outputs(teacher_shapes, 1)
    weights = {"irg_w_vertex": 0.3, "irg_w_edge": 2.0, "irg_w_transform": 7.0}  # unequal: each term pinned
    loss = InstanceRelationshipGraph(student_shapes, teacher_shapes, **weights)(s, t, targets())
    expected = irg_expected(s, t, *weights.values())
    assert set(loss) == {"vertex", "edge", "transform"}
    for name in loss:
        assert loss[name].dim() == 0 and close(loss[name], expected[name]), name
        assert expected[name] > 0, name


def test_irg_is_width_independent_without_learnable_parts():
    """The vertex term reads the logits (as the seed zoo's), so no connector is needed."""
    method = InstanceRelationshipGraph(STUDENT, TEACHER, **defaults(InstanceRelationshipGraph))
    assert not list(method.parameters())


# --------------------------------------------------------------------------------------------- DKD

def dkd_expected(s, t, y, alpha, beta, T):
    z_s, z_t = as64(s) / T, as64(t) / T
    tckd = nckd = 0.0
    for n in range(len(y)):
        p_s, p_t = softmax(z_s[n]), softmax(z_t[n])
        tckd += kl([p_t[y[n]], 1 - p_t[y[n]]], [p_s[y[n]], 1 - p_s[y[n]]])
        others = [c for c in range(z_s.shape[1]) if c != y[n]]
        nckd += kl(softmax(z_t[n, others]), softmax(z_s[n, others]))
    return T ** 2 * alpha * tckd / len(y), T ** 2 * beta * nckd / len(y)


@pytest.mark.parametrize("alpha, beta, T, logit_stand", [(1.0, 8.0, 4.0, False), (2.0, 3.0, 1.0, False),
                                                        (1.0, 2.0, 2.0, True)])
def test_dkd_golden(alpha, beta, T, logit_stand):
    s, t = outputs({}, 0), outputs({}, 1)
    s["logits"][0, targets()[0]] += 20  # a confident student: P(others) small but not 0
    method = DecoupledKD({}, {}, dkd_alpha=alpha, dkd_beta=beta, T=T, dkd_warmup=20, logit_stand=logit_stand)
    loss = method(s, t, targets())
    z_s, z_t = s["logits"], t["logits"]
    if logit_stand:  # recomputed: per sample, minus the mean, over 1e-7 + the unbiased std
        z_s, z_t = ((z - z.mean(1, keepdims=True)) / (1e-7 + z.std(1, ddof=1, keepdims=True))
                    for z in (as64(z_s), as64(z_t)))
        z_s, z_t = torch.from_numpy(z_s), torch.from_numpy(z_t)
    tckd, nckd = dkd_expected(z_s, z_t, targets().tolist(), alpha, beta, T)
    assert set(loss) == {"tckd", "nckd"}
    assert close(loss["tckd"], tckd) and close(loss["nckd"], nckd)


def test_dkd_warmup_factor_across_epochs():
    s, t = outputs({}, 0), outputs({}, 1)
    method = DecoupledKD({}, {}, **{**defaults(DecoupledKD), "dkd_beta": 8.0})
    full = {name: value.item() for name, value in method(s, t, targets()).items()}
    assert method.warmup_factor.item() == 1.0  # before any start_epoch call (documented)
    for epoch, factor in [(1, 1 / 20), (10, 0.5), (19, 19 / 20), (20, 1.0), (21, 1.0), (240, 1.0)]:
        method.start_epoch(epoch, 240)
        assert method.warmup_factor.item() == pytest.approx(factor)
        loss = method(s, t, targets())
        for name, value in loss.items():
            assert value.item() == pytest.approx(factor * full[name], rel=1e-6)
    # a buffer (a tensor input for torch.compile) that a checkpoint does not carry
    assert "warmup_factor" in dict(method.named_buffers()) and "warmup_factor" not in method.state_dict()


@pytest.mark.parametrize("teacher, student, given, expected", [
    # mdistiller's configs/cifar100/dkd/*.yaml
    ("resnet56", "resnet20", None, 2.0),
    ("resnet110", "resnet32", None, 2.0),
    ("wrn_40_2", "wrn_16_2", None, 6.0),
    ("wrn_40_2", "wrn_40_1", None, 6.0),
    ("vgg13", "vgg8", None, 6.0),
    ("vgg13", "MobileNetV2", None, 6.0),
    ("resnet32x4", "resnet8x4", None, 8.0),
    ("ResNet50", "MobileNetV2", None, 8.0),
    ("resnet32x4", "ShuffleV1", None, 8.0),
    ("resnet32x4", "ShuffleV2", None, 8.0),
    ("wrn_40_2", "ShuffleV1", None, 8.0),
    # pairs without a config keep the default
    ("resnet110", "resnet20", None, 8.0),
    ("resnet56", "resnet32", None, 8.0),
    ("resnet110", "resnet20", 5.0, 5.0),  # a given value is kept
    ("resnet56", "resnet20", 5.0, 5.0),
])
def test_dkd_beta_resolution(teacher, student, given, expected):
    settings = resolved_settings("dkd", teacher, student, **({} if given is None else {"dkd_beta": given}))
    assert settings["dkd_beta"] == expected  # resolved in the config, so args.json and last.pt hold it
    method = DecoupledKD({}, {}, **{key: settings[key] for key in DecoupledKD.hyperparameters})
    assert method.beta == expected


def test_dkd_masks_only_the_target_class():
    """The non-target term does not change when only the target logits change."""
    s, t = outputs({}, 0), outputs({}, 1)
    method = DecoupledKD({}, {}, **{**defaults(DecoupledKD), "dkd_beta": 8.0})
    before = method(s, t, targets())["nckd"]
    s["logits"][torch.arange(BATCH), targets()] += 5.0
    assert close(method(s, t, targets())["nckd"], before.item())


# ---------------------------------------------------------------------------------------- defaults

def test_defaults_and_weights_match_the_notes():
    assert (Logits.default_weight, Logits.hyperparameters) == (0.1, {})
    assert (ProbabilisticKT.default_weight, ProbabilisticKT.features) == (10000.0, ("pool",))
    assert SimilarityPreserving.default_weight == 3000.0
    shapes = {"stage1": (4, 4, 4), "stage2": (6, 2, 2), "stage3": (8, 2, 2)}
    assert SimilarityPreserving(shapes, shapes).features == ("stage1", "stage2", "stage3")
    assert CorrelationCongruence.default_weight == 100.0
    assert defaults(CorrelationCongruence) == {"cc_gamma": 0.4, "cc_order": 2}
    assert isinstance(defaults(CorrelationCongruence)["cc_order"], int)
    assert InstanceRelationshipGraph.default_weight == 1.0
    assert InstanceRelationshipGraph(shapes, shapes, **defaults(InstanceRelationshipGraph)).features == (
        "stage2", "stage3", "pool")
    assert defaults(InstanceRelationshipGraph) == {"irg_w_vertex": 0.1, "irg_w_edge": 5.0, "irg_w_transform": 5.0}
    assert DecoupledKD.default_weight == 1.0
    assert defaults(DecoupledKD) == {"dkd_alpha": 1.0, "dkd_beta": 8.0, "T": 4.0, "dkd_warmup": 20,
                                     "logit_stand": False}
    assert isinstance(defaults(DecoupledKD)["dkd_warmup"], int)
    assert DecoupledKD({}, {}, **defaults(DecoupledKD)).beta == 8.0
