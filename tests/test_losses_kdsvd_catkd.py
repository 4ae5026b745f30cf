"""KDSVD and CAT-KD: golden values recomputed in float64 with plain loops (never through kd_losses'
own helpers; the methods work in float32, hence the 1e-5 relative tolerance), CAT-KD's per-pair
settings and the map it reads (the one each network pools, caught by a hook), and one training step of each."""
import numpy as np
import pytest
import torch

from engine import Teacher
from conftest import resolved_settings
from golden import as64, close
from kd_losses import build_method, default_hyperparameters
# importing the two files registers the methods
from kd_losses.catkd import DEFAULT_SETTINGS, SETTINGS_BY_PAIR, ClassAttentionTransfer
from kd_losses.kdsvd import KDSVD
from models import build_model
from test_losses import train_one_step

BATCH = 3
# a narrower student whose stage 1 is larger than the teacher's (pooled to 4x4) and whose stage 3 is
# smaller (the teacher's pooled to 2x2, fewer than k + 3 singular vectors)
STUDENT = {"stage1": (3, 8, 8), "stage2": (5, 4, 4), "stage3": (6, 2, 2)}
TEACHER = {"stage1": (4, 4, 4), "stage2": (7, 4, 4), "stage3": (8, 4, 4)}


def stage_outputs(shapes, seed):
    """Non-negative maps, as after a ReLU."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(BATCH, *shape, generator=g).clamp(min=0) for name, shape in shapes.items()}


def block_mean(f, size):
    """C x H x W -> C x size x size, each output the mean of its block (H a multiple of size)."""
    c, h, w = f.shape
    return f.reshape(c, size, h // size, size, w // size).mean(axis=(2, 4))


# ------------------------------------------------------------------------------------------ KDSVD

def right_singular_vectors(f, n):
    """One sample's map (C x H x W) as a C*H x W matrix: first n right singular vectors (W x n) and
    the first n singular values divided by their norm. torch's float64 SVD, whose signs (arbitrary,
    and the loss depends on the teacher's) follow the same LAPACK convention as the method's."""
    _, s, vh = torch.linalg.svd(torch.from_numpy(f.reshape(-1, f.shape[2])), full_matrices=False)
    v, s = vh.numpy().T[:, :n], s.numpy()[:n]
    return v / np.linalg.norm(v, axis=0), s / np.linalg.norm(s)


def kdsvd_reference(s_out, t_out, k):
    total = 0.0
    for n in range(BATCH):
        before = None
        for name in ("stage1", "stage2", "stage3"):
            f_s, f_t = as64(s_out[name][n]), as64(t_out[name][n])
            size = min(f_s.shape[1], f_t.shape[1])
            v_s, _ = right_singular_vectors(block_mean(f_s, size), k + 3)
            v_t, s_t = right_singular_vectors(block_mean(f_t, size), k)
            aligned = np.zeros_like(v_t)
            for j in range(k):
                cosines = [v_s[:, i] @ v_t[:, j] for i in range(v_s.shape[1])]
                best = int(np.argmax(np.abs(cosines)))
                aligned[:, j] = np.sign(cosines[best]) * v_s[:, best]
            now = aligned * s_t, v_t * s_t
            if before is not None:
                for a in range(now[0].shape[0]):
                    for b in range(before[0].shape[0]):
                        for j in range(k):
                            rbf_s = np.exp(-(now[0][a, j] - before[0][b, j]) ** 2 / 8)
                            rbf_t = np.exp(-(now[1][a, j] - before[1][b, j]) ** 2 / 8)
                            total += (rbf_s - rbf_t) ** 2
            before = now
    return total / BATCH


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_golden(k):
    s_out, t_out = stage_outputs(STUDENT, 0), stage_outputs(TEACHER, 1)
    method = KDSVD(STUDENT, TEACHER, kdsvd_k=k)
    assert close(method(s_out, t_out, None), kdsvd_reference(s_out, t_out, k))


def test_kdsvd_is_zero_for_equal_outputs_and_has_gradients():
    t_out = stage_outputs(TEACHER, 1)
    s_out = {name: value.clone().requires_grad_() for name, value in t_out.items()}
    method = KDSVD(TEACHER, TEACHER, kdsvd_k=1)
    assert abs(method(s_out, t_out, None).item()) < 1e-10
    loss = method(stage_outputs(TEACHER, 0) | {"stage1": s_out["stage1"]}, t_out, None)
    loss.backward()
    assert torch.isfinite(s_out["stage1"].grad).all() and s_out["stage1"].grad.abs().sum() > 0


def test_kdsvd_defaults():
    assert default_hyperparameters("kdsvd") == {"kdsvd_k": 1}  # mdistiller's cfg.py, RepDistiller's KDSVD(k=1)
    assert KDSVD.default_weight == 1.0  # mdistiller's KDSVD.LOSS.FEAT_WEIGHT
    assert not list(KDSVD(STUDENT, TEACHER, kdsvd_k=1).parameters())


# ----------------------------------------------------------------------------------------- CAT-KD

def randomize_fc(network, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        network.fc.weight.copy_(torch.randn(network.fc.weight.shape, generator=g))


def pooled_map(network, images):
    """The map the network's own forward average-pools, caught at the input of that pooling: the
    head's output where there is one, else the last stage output."""
    caught = {}
    module = getattr(network, "head", None)
    if module is None or isinstance(module, torch.nn.Identity):
        _, feats = network(images, features=True)
        return feats[sorted(k for k in feats if k[5:].isdigit())[-1]]
    handle = module.register_forward_hook(lambda m, i, out: caught.update(map=out))
    network(images)
    handle.remove()
    return caught["map"]


def catkd_reference(s_map, s_weight, t_map, t_weight, beta, size, normalize):
    """beta * mean over samples, classes and positions of the squared difference of the CAMs pooled to
    size x size (each per-class map L2-normalised over the positions where normalize)."""
    squares = []
    for n in range(s_map.shape[0]):
        for c in range(s_weight.shape[0]):
            cams = []
            for f, w in ((s_map[n], s_weight[c]), (t_map[n], t_weight[c])):
                cam = block_mean(np.einsum("c,chw->hw", w, f)[None], size)[0]
                cams.append(cam / np.sqrt((cam ** 2).sum()) if normalize else cam)
            squares += list(((cams[0] - cams[1]) ** 2).ravel())
    return beta * np.mean(squares)


# (teacher, student, (beta, size, normalise)): no normalisation at size 2; a head (ShuffleV2), normalised, at size 4
CATKD_CASES = [("resnet8x4", "resnet8", (15.0, 2, False)), ("resnet8x4", "ShuffleV2", (600.0, 4, True))]


@pytest.mark.parametrize("teacher_arch, student_arch, settings", CATKD_CASES, ids=["resnet8", "ShuffleV2"])
def test_catkd_golden(teacher_arch, student_arch, settings):
    torch.manual_seed(0)
    student, network = build_model(student_arch, 10).eval(), build_model(teacher_arch, 10)
    randomize_fc(student, 1)
    randomize_fc(network, 2)
    teacher = Teacher(network)
    beta, size, normalize = settings
    method = build_method("catkd", {"catkd_beta": beta, "catkd_size": size}, student, teacher, torch.arange(10))
    method.normalize = normalize
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    teacher_out = teacher.outputs(images, method.features)
    _, loss = method.step(student, images, None, None, teacher_out)
    expected = catkd_reference(as64(pooled_map(student, images)), as64(student.fc.weight),
                               as64(pooled_map(network.eval(), images)), as64(network.fc.weight), beta, size, normalize)
    assert close(loss, expected)
    loss.backward()  # the student's CAMs use its own classifier: the CAM loss trains it
    assert student.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("teacher_arch, student_arch, settings", [
    ("resnet56", "resnet20", (0.7, 2, False)), ("wrn_40_2", "ShuffleV1", (80.0, 4, True)),
    ("resnet110", "resnet20", DEFAULT_SETTINGS)])
def test_catkd_settings_by_pair(teacher_arch, student_arch, settings):
    teacher = Teacher(build_model(teacher_arch, 100))
    student = build_model(student_arch, 100)
    resolved = resolved_settings("catkd", teacher_arch, student_arch)
    method = build_method("catkd", {k: resolved[k] for k in ("catkd_beta", "catkd_size")}, student, teacher,
                          torch.arange(100))
    assert (method.beta, method.size, method.normalize) == settings
    given = build_method("catkd", {"catkd_beta": 3.0, "catkd_size": 1}, student, teacher, torch.arange(100))
    assert (given.beta, given.size, given.normalize) == (3.0, 1, settings[2])
    assert resolved_settings("catkd", teacher_arch, student_arch, catkd_size=1)["catkd_size"] == 1
    assert torch.equal(method.teacher_fc, teacher.network.fc.weight)


def test_catkd_defaults():
    assert DEFAULT_SETTINGS == (400.0, 2, True)  # CAT-KD's mdistiller/engine/cfg.py
    assert default_hyperparameters("catkd") == {"catkd_beta": 400.0, "catkd_size": 2}
    assert ClassAttentionTransfer.default_weight == 1.0
    assert len(SETTINGS_BY_PAIR) == 11


# ------------------------------------------------------------------------------------ real models

@pytest.mark.parametrize("name", ["kdsvd", "catkd"])
@pytest.mark.parametrize("teacher_arch, student_arch, classes",
                         [("resnet8x4", "resnet8", 10), ("vgg13", "MobileNetV2", 100)],
                         ids=["resnet8x4-resnet8", "vgg13-MobileNetV2"])
def test_one_training_step(name, teacher_arch, student_arch, classes):
    torch.manual_seed(0)
    train_one_step(name, build_model(student_arch, classes), Teacher(build_model(teacher_arch, classes)), classes,
                   batch=4)
