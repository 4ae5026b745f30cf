"""The six KD losses against DESIGN.md section 5.

Golden values are recomputed here in float64 numpy with explicit loops, never through kd_losses'
own helpers; the methods work in float32, hence the 1e-5 relative tolerance."""
import numpy as np
import pytest
import torch

from data import DeviceLoader
from engine import Distiller, Teacher
from golden import as64, close, fake_outputs
from kd_losses import METHODS, KDMethod, build_method, default_hyperparameters
from kd_losses.base import as_float
from models import build_model

BATCH, CLASSES = 5, 10
# three stages with different spatial sizes, as AT averages over all three; the stem and the
# pre-ReLU outputs come last so that the draws of the keys before them stay as they were
SHAPES = {"stage1": (4, 8, 8), "stage2": (6, 6, 6), "stage3": (8, 4, 4), "pool": (8,), "stem": (4, 8, 8),
          "stage1_pre": (4, 8, 8), "stage2_pre": (6, 6, 6), "stage3_pre": (8, 4, 4)}
# a wider teacher: every method must cope with student and teacher widths that differ
WIDE = {**SHAPES, "stage3": (16, 4, 4), "pool": (16,), "stage3_pre": (16, 4, 4)}


def defaults(name):
    return default_hyperparameters(name)


def outputs(shapes, seed):
    return fake_outputs(shapes, seed, BATCH, CLASSES)


def targets():
    return torch.arange(BATCH) % CLASSES


def total(loss):
    """RKD returns named terms that the trainer sums; the others a scalar."""
    return sum(loss.values()) if isinstance(loss, dict) else loss


def smooth_l1(a, b):
    """Smooth-L1 with beta 1, averaged over every entry."""
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()


# ---------------------------------------------------------------------------------- golden values

def z_scored(logits):
    """Logit standardisation recomputed: per sample, minus the mean, over 1e-7 + the unbiased std."""
    z = as64(logits)
    return (z - z.mean(1, keepdims=True)) / (1e-7 + z.std(1, ddof=1, keepdims=True))


@pytest.mark.parametrize("T, logit_stand", [(1.0, False), (4.0, False), (2.0, True)])  # two T pin the T^2 factor
def test_st_golden(T, logit_stand):
    s, t = outputs({}, 0), outputs({}, 1)
    z_s, z_t = (z_scored(o["logits"]) if logit_stand else as64(o["logits"]) for o in (s, t))
    z_s, z_t = z_s / T, z_t / T
    kl_sum = 0.0
    for n in range(BATCH):
        p_t = np.exp(z_t[n]) / np.exp(z_t[n]).sum()
        log_p_s = z_s[n] - np.log(np.exp(z_s[n]).sum())
        kl_sum += sum(p_t[c] * (np.log(p_t[c]) - log_p_s[c]) for c in range(CLASSES))
    expected = T ** 2 * kl_sum / BATCH
    method = METHODS["st"]({}, {}, T=T, logit_stand=logit_stand)
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
    assert defaults("st") == {"T": 4.0, "logit_stand": False}
    assert defaults("at") == {"p": 2.0}
    assert defaults("ft")["ft_k"] == 0.5
    assert defaults("rkd") == {"w_dist": 25.0, "w_angle": 50.0}


# ------------------------------------------------------------------------------------- properties
# Methods that keep the base step are checked here on synthetic outputs; those with a step of
# their own (input gradients, adversarial samples, a peer, memory banks) on real networks below.
FORWARD_METHODS = sorted(name for name in METHODS if METHODS[name].step is KDMethod.step)
STEP_METHODS = sorted(name for name in METHODS if METHODS[name].step is not KDMethod.step)
# learnable parts: always, or only where the teacher is wider (a connector); none for the others
ALWAYS_LEARNS = {"ft", "vid", "ofd", "afd", "reviewkd", "ctkd"}
CONNECTS_WIDER = {"fitnet", "ab"}
# not zero for equal outputs, by definition: VID's likelihood keeps its variance term, OFD's
# connector always transforms the student, AB's hinge still charges |s| < margin, ReviewKD's fusion transforms
# the student, DIST's correlations carry an epsilon, NKD's target term and non-target cross-entropy stay
NOT_ZERO = {"vid", "ofd", "ab", "reviewkd", "dist", "nkd"}
# FSP compares Gram matrices between stages: the channel counts must match, and it has no connector
NEEDS_EQUAL_WIDTHS = {"fsp"}


def test_every_method_is_in_one_of_the_groups():
    assert set(FORWARD_METHODS) | set(STEP_METHODS) == set(METHODS)
    assert set(STEP_METHODS) == {"sobolev", "lwm", "bss", "crd", "dml", "catkd", "simkd", "mlkd"}


@pytest.mark.parametrize("name", sorted(set(FORWARD_METHODS) - NOT_ZERO))
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
@pytest.mark.parametrize("name", FORWARD_METHODS)
def test_finite_and_gradients_reach_student_only(name, teacher_shapes):
    if name in NEEDS_EQUAL_WIDTHS and teacher_shapes is WIDE:
        with pytest.raises(ValueError):
            METHODS[name](SHAPES, teacher_shapes, **defaults(name))
        return
    method = METHODS[name](SHAPES, teacher_shapes, **defaults(name)).train()
    s = {key: value.requires_grad_() for key, value in outputs(SHAPES, 0).items()}
    t = outputs(teacher_shapes, 1)
    t_before = {key: value.clone() for key, value in t.items()}
    frozen_before = {key: value.clone() for key, value in method.state_dict().items()}

    loss = method(s, t, targets())
    for term in (loss.values() if isinstance(loss, dict) else [loss]):
        assert term.dim() == 0 and torch.isfinite(term)
    total(loss).backward()

    # a method without features distils the logits; ReviewKD reads the pre-ReLU stages of the teacher only
    for key in [k for k in method.features if not (name == "reviewkd" and k.endswith("_pre"))] or ["logits"]:
        grad = s[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key
    for key, value in t.items():
        assert value.grad is None and torch.equal(value, t_before[key]), key

    learnable = [p for p in method.parameters() if p.requires_grad]
    assert bool(learnable) == (name in ALWAYS_LEARNS or (name in CONNECTS_WIDER and teacher_shapes is WIDE))
    for p in learnable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if name == "ft":
        # the paraphraser is frozen after its stage: no gradients, and its BN statistics must not move
        assert all(p.grad is None for p in method.paraphraser.parameters())
        for key, value in method.paraphraser.state_dict().items():
            assert torch.equal(value, frozen_before[f"paraphraser.{key}"]), key


@pytest.mark.parametrize("name", FORWARD_METHODS)
def test_loss_is_float32_under_bf16_autocast(name):
    """Under bf16 autocast the networks' outputs are bf16; the base step computes the loss, connectors
    included, in fp32 from them: the same value as without autocast, matrix products included."""
    teacher_shapes = SHAPES if name in NEEDS_EQUAL_WIDTHS else WIDE
    method = METHODS[name](SHAPES, teacher_shapes, **defaults(name)).eval()
    s, t = outputs(SHAPES, 0), outputs(teacher_shapes, 1)
    s_bf16, t_bf16 = ({k: v.bfloat16() for k, v in d.items()} for d in (s, t))

    def student(images, features=False):
        return (s_bf16["logits"], s_bf16) if features else s_bf16["logits"]

    plain = method(as_float(s_bf16), as_float(t_bf16), targets())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mixed = method.step(student, torch.zeros(BATCH, 3, 32, 32), targets(), torch.arange(BATCH), t_bf16)
    plain, mixed = (x if isinstance(x, dict) else {"kd": x} for x in (plain, mixed))
    for term in plain:
        assert mixed[term].dtype == torch.float32 and close(mixed[term], plain[term].item()), term


# ------------------------------------------------------------------------------------ real models

def training_batch(labels, method, n=8):
    """The first training batch, as train_kd.py's loader gives it to `method`."""
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    loader = DeviceLoader(images, labels, n, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), train=True, seed=0)
    loader.add_negatives(method.negatives_per_sample)
    loader.strong_view = method.strong_view
    return next(iter(loader))


PAIRS = [("resnet8", "resnet8"), ("resnet8x4", "resnet8"), ("wrn_16_2", "wrn_16_2")]


@pytest.mark.parametrize("teacher_arch, student_arch", PAIRS, ids=["-".join(p) for p in PAIRS])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_a_step_on_real_networks(name, teacher_arch, student_arch):
    torch.manual_seed(0)
    student, teacher = build_model(student_arch, CLASSES), Teacher(build_model(teacher_arch, CLASSES))
    if name in NEEDS_EQUAL_WIDTHS and teacher_arch != student_arch:
        with pytest.raises(ValueError):
            build_method(name, defaults(name), student, teacher, torch.arange(32) % CLASSES)
        return
    train_one_step(name, student, teacher, CLASSES)


def train_one_step(name, student, teacher, classes, batch=8):
    """One training step through the Distiller: finite terms, gradients on the student (and the
    method's parts), none on the teacher, whose weights and buffers stay as they were. Raises the
    ValueError of a method that refuses the pair."""
    labels = torch.arange(32) % classes
    hparams = {**defaults(name), **({"crd_negatives": 6} if name == "crd" else {})}
    method = build_method(name, hparams, student, teacher, labels)
    task = Distiller(student, teacher, method, ce_weight=1.0, kd_weight=1.0).train()
    nets = (teacher.network, teacher.folded)
    teacher_before = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
    _, terms = task(*training_batch(labels, method, batch))
    assert all(value.dim() == 0 and torch.isfinite(value) for value in terms.values()), terms
    sum(terms.values()).backward()
    trained = [p for p in student.parameters() if p.requires_grad]  # SimKD freezes the unused classifier
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained)
    for net, before in zip(nets, teacher_before):
        assert all(p.grad is None and not p.requires_grad for p in net.parameters())
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    for p in method.parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", ["sobolev", "lwm", "bss", "dml"])
def test_own_step_is_zero_for_identical_networks(name):
    """The student a copy of the teacher (of the peer, for DML), both in eval mode: nothing to distil."""
    torch.manual_seed(0)
    student, network = build_model("resnet8", CLASSES), build_model("resnet8", CLASSES)
    student.load_state_dict(network.state_dict())
    teacher = Teacher(network)
    labels = torch.arange(32) % CLASSES
    method = build_method(name, defaults(name), student, teacher, labels)
    if name == "dml":
        method.peer.load_state_dict(student.state_dict())
    task = Distiller(student, teacher, method, ce_weight=1.0, kd_weight=1.0).eval()
    _, terms = task(*training_batch(labels, method))
    kd = terms["kd_kl"] if name == "dml" else terms["kd"]
    assert abs(kd.item()) < 1e-6


def test_stage_names_resolve_per_pair():
    """'every stage', 'the last stage' and 'the stage before the last' name each pair's own stages:
    four in a VGG or MobileNetV2, three in a ResNet."""
    four = Teacher(build_model("vgg13", CLASSES))
    student = build_model("MobileNetV2", CLASSES)
    labels = torch.arange(32) % CLASSES
    assert build_method("at", defaults("at"), student, four, labels).features == (
        "stage1", "stage2", "stage3", "stage4")
    assert build_method("ab", defaults("ab"), student, four, labels).stages == (
        "stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre")
    assert build_method("ft", defaults("ft"), student, four, labels).features == ("stage4",)
    assert build_method("irg", defaults("irg"), student, four, labels).features == ("stage3", "stage4", "pool")
    three = Teacher(build_model("resnet20", CLASSES))
    assert build_method("irg", defaults("irg"), build_model("resnet8", CLASSES), three, labels).features == (
        "stage2", "stage3", "pool")


def test_a_method_that_compares_stages_one_to_one_refuses_unequal_stage_counts():
    teacher, student = Teacher(build_model("resnet20", CLASSES)), build_model("vgg8", CLASSES)
    labels = torch.arange(32) % CLASSES
    with pytest.raises(ValueError, match="^at compares the two networks stage by stage, and the student has 4 "
                                         "stages where the teacher has 3$"):
        build_method("at", defaults("at"), student, teacher, labels)
    for name in ("st", "crd", "rkd", "pkt", "lwm"):  # logits, the pooled vector or one stage of each: any pair
        build_method(name, defaults(name), student, teacher, labels)
