"""The six KD losses against DESIGN.md section 5.

Golden values are recomputed here in float64 numpy with explicit loops, never through kd_losses'
own helpers; the methods work in float32, hence the 1e-5 relative tolerance."""
import numpy as np
import pytest
import torch

from engine import Distiller
from kd_losses import METHODS, feature_shapes
from models import build_model

BATCH, CLASSES = 5, 10
# three stages with different spatial sizes, as AT averages over all three
SHAPES = {"stage1": (4, 8, 8), "stage2": (6, 6, 6), "stage3": (8, 4, 4), "pool": (8,)}
# a wider teacher: every method must cope with student and teacher widths that differ
WIDE = {**SHAPES, "stage3": (16, 4, 4), "pool": (16,)}


def defaults(name):
    return {key: default for key, (default, _) in METHODS[name].hyperparameters.items()}


def outputs(shapes, seed):
    """A fake network output: logits and every feature of `shapes`, signed so |f| matters."""
    g = torch.Generator().manual_seed(seed)
    out = {"logits": 3 * torch.randn(BATCH, CLASSES, generator=g)}
    out.update({name: torch.randn(BATCH, *shape, generator=g) for name, shape in shapes.items()})
    return out


def targets():
    return torch.arange(BATCH) % CLASSES


def as64(tensor):
    return tensor.detach().double().numpy()


def total(loss):
    """RKD returns named terms that the trainer sums; the others a scalar."""
    return sum(loss.values()) if isinstance(loss, dict) else loss


def close(got, expected):
    return got.item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def smooth_l1(a, b):
    """Smooth-L1 with beta 1, averaged over every entry."""
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


# ---------------------------------------------------------------------------------- golden values

@pytest.mark.parametrize("T", [1.0, 4.0])  # two temperatures pin the T^2 factor
def test_st_golden(T):
    s, t = outputs({}, 0), outputs({}, 1)
    z_s, z_t = as64(s["logits"]) / T, as64(t["logits"]) / T
    kl_sum = 0.0
    for n in range(BATCH):
        p_t = np.exp(z_t[n]) / np.exp(z_t[n]).sum()
        log_p_s = z_s[n] - np.log(np.exp(z_s[n]).sum())
        kl_sum += sum(p_t[c] * (np.log(p_t[c]) - log_p_s[c]) for c in range(CLASSES))
    expected = T ** 2 * kl_sum / BATCH
    method = METHODS["st"]({}, {}, T=T)
    assert close(method(s, t, targets()), expected)


@pytest.mark.parametrize("p", [2.0, 3.0])  # an odd power shows that |f| is taken, not f
def test_at_golden(p):
    s, t = outputs(SHAPES, 0), outputs(WIDE, 1)

    def attention(f):  # one sample, C x H x W -> unit vector over the H*W positions
        a = (np.abs(f) ** p).sum(axis=0).ravel()
        return a / np.sqrt((a ** 2).sum())

    per_stage = []
    for stage in ("stage1", "stage2", "stage3"):
        f_s, f_t = as64(s[stage]), as64(t[stage])
        squared = [((attention(f_s[n]) - attention(f_t[n])) ** 2).sum() for n in range(BATCH)]
        per_stage.append(sum(squared) / (BATCH * f_s[0, 0].size))
    expected = sum(per_stage) / 3
    method = METHODS["at"](SHAPES, WIDE, p=p)
    assert close(method(s, t, targets()), expected)


def test_fitnet_golden():
    s, t = outputs(SHAPES, 0), outputs(SHAPES, 1)
    expected = ((as64(s["stage3"]) - as64(t["stage3"])) ** 2).mean()
    method = METHODS["fitnet"](SHAPES, SHAPES)
    assert close(method(s, t, targets()), expected)


def test_nst_golden():
    s, t = outputs(SHAPES, 0), outputs(WIDE, 1)  # 8 student channels against 16

    def unit_channels(f):  # one sample, C x H x W -> C x HW with unit rows
        v = f.reshape(len(f), -1)
        return v / np.sqrt((v ** 2).sum(axis=1, keepdims=True))

    def kernel_mean(a, b):  # mean of (x.y)^2 over the batch and every channel pair
        values = [np.dot(x, y) ** 2 for n in range(BATCH) for x in a[n] for y in b[n]]
        return sum(values) / len(values)

    u_s = [unit_channels(f) for f in as64(s["stage3"])]
    u_t = [unit_channels(f) for f in as64(t["stage3"])]
    expected = kernel_mean(u_t, u_t) + kernel_mean(u_s, u_s) - 2 * kernel_mean(u_s, u_t)
    method = METHODS["nst"](SHAPES, WIDE)
    assert close(method(s, t, targets()), expected)


def test_ft_architecture():
    """Encoder C -> C -> kC -> kC, translator C_s -> C_s -> kC_t -> kC_t, decoder back to C."""
    method = METHODS["ft"](SHAPES, WIDE, **defaults("ft"))  # C_s = 8, C_t = 16, k = 0.5

    def widths(net):
        return [(layer[0].in_channels, layer[0].out_channels) for layer in net]

    assert widths(method.paraphraser["encoder"]) == [(16, 16), (16, 8), (8, 8)]
    assert widths(method.paraphraser["decoder"]) == [(8, 8), (8, 16), (16, 16)]
    assert widths(method.translator) == [(8, 8), (8, 8), (8, 8)]
    for layer in (*method.translator, *method.paraphraser["encoder"], *method.paraphraser["decoder"]):
        assert isinstance(layer[1], torch.nn.BatchNorm2d) and layer[2].negative_slope == 0.1


def test_ft_golden():
    s, t = outputs(SHAPES, 0), outputs(WIDE, 1)
    method = METHODS["ft"](SHAPES, WIDE, **defaults("ft")).train()
    # the factors come from the method's own nets (train-mode BN uses batch statistics, so this
    # extra pass gives the same translator output); normalisation and L1 are recomputed here
    with torch.no_grad():
        f_s = as64(method.translator(s["stage3"])).reshape(BATCH, -1)
        f_t = as64(method.paraphraser["encoder"](t["stage3"])).reshape(BATCH, -1)
    abs_sum = 0.0
    for n in range(BATCH):
        u_s = f_s[n] / np.sqrt((f_s[n] ** 2).sum())
        u_t = f_t[n] / np.sqrt((f_t[n] ** 2).sum())
        abs_sum += np.abs(u_s - u_t).sum()
    expected = abs_sum / f_s.size
    assert close(method(s, t, targets()), expected)


def test_rkd_golden():
    s, t = outputs(SHAPES, 0), outputs(WIDE, 1)
    t["pool"][0] *= 10  # one far teacher point, so some differences exceed smooth-L1's beta of 1

    def distances(x):
        n = len(x)
        d = np.array([[np.sqrt(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)])
        off_diagonal_mean = sum(d[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        return d / off_diagonal_mean

    def angles(x):  # cos of the angle at x_i; 0 where x_j or x_k coincides with x_i
        n = len(x)
        cos = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if i not in (j, k):
                        e_j, e_k = x[j] - x[i], x[k] - x[i]
                        cos[i, j, k] = np.dot(e_j, e_k) / np.sqrt(np.dot(e_j, e_j) * np.dot(e_k, e_k))
        return cos

    x_s, x_t = as64(s["pool"]), as64(t["pool"])
    d_s, d_t = distances(x_s), distances(x_t)
    assert (np.abs(d_s - d_t) > 1).any() and (np.abs(d_s - d_t) < 1).any()
    method = METHODS["rkd"](SHAPES, WIDE, w_dist=25.0, w_angle=50.0)
    loss = method(s, t, targets())
    assert set(loss) == {"dist", "angle"}
    assert close(loss["dist"], 25 * smooth_l1(d_s, d_t))
    assert close(loss["angle"], 50 * smooth_l1(angles(x_s), angles(x_t)))


def test_defaults_match_design():
    assert defaults("st") == {"T": 4.0}
    assert defaults("at") == {"p": 2.0}
    assert defaults("ft")["ft_k"] == 0.5
    assert defaults("rkd") == {"w_dist": 25.0, "w_angle": 50.0}


# ------------------------------------------------------------------------------------- properties

@pytest.mark.parametrize("name", sorted(METHODS))
def test_zero_when_student_equals_teacher(name):
    method = METHODS[name](SHAPES, SHAPES, **defaults(name)).train()
    if name == "ft":
        # FT compares translator(s) with encoder(t): equal only for equal nets, and in eval mode,
        # as the encoder is always in eval mode (frozen BN statistics) while a training
        # translator normalises with batch statistics
        method.translator.load_state_dict(method.paraphraser["encoder"].state_dict())
        method.eval()
    t = outputs(SHAPES, 0)
    s = {key: value.clone() for key, value in t.items()}
    assert abs(total(method(s, t, targets())).item()) < 1e-6


@pytest.mark.parametrize("teacher_shapes", [SHAPES, WIDE], ids=["same_width", "wider_teacher"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_finite_and_gradients_reach_student_only(name, teacher_shapes):
    method = METHODS[name](SHAPES, teacher_shapes, **defaults(name)).train()
    s = {key: value.requires_grad_() for key, value in outputs(SHAPES, 0).items()}
    t = outputs(teacher_shapes, 1)
    t_before = {key: value.clone() for key, value in t.items()}
    if name == "ft":
        paraphraser_before = {key: value.clone() for key, value in method.paraphraser.state_dict().items()}

    loss = method(s, t, targets())
    for term in (loss.values() if isinstance(loss, dict) else [loss]):
        assert term.dim() == 0 and torch.isfinite(term)
    total(loss).backward()

    for key in method.features or ("logits",):  # a method without features distils the logits
        grad = s[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key
    for key, value in t.items():
        assert value.grad is None and torch.equal(value, t_before[key]), key

    learnable = [p for p in method.parameters() if p.requires_grad]
    # FT's translator always learns; Fitnet has a connector only where the widths differ
    assert bool(learnable) == (name == "ft" or (name == "fitnet" and teacher_shapes is WIDE))
    for p in learnable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if name == "ft":
        # the paraphraser is frozen after its stage: no gradients, and its BN statistics must not move
        assert all(p.grad is None for p in method.paraphraser.parameters())
        for key, value in method.paraphraser.state_dict().items():
            assert torch.equal(value, paraphraser_before[key]), key


# ------------------------------------------------------------------------------------ real models

@pytest.fixture(scope="module")
def resnet8_pair():
    torch.manual_seed(0)
    return build_model("resnet8", 10), build_model("resnet8", 10)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_builds_and_runs_on_real_resnet8(name, resnet8_pair):
    student, teacher = resnet8_pair
    shapes = feature_shapes(student)
    assert shapes["stage3"] == (64, 8, 8) and shapes["pool"] == (64,)
    method = METHODS[name](shapes, feature_shapes(teacher), **defaults(name))
    task = Distiller(student, teacher, method, ce_weight=1.0, kd_weight=1.0).train()
    _, terms = task(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert all(torch.isfinite(value) for value in terms.values())
    # the teacher runs under inference mode: backward shows its outputs are usable in autograd
    sum(terms.values()).backward()
