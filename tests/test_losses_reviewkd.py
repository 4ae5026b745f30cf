"""ReviewKD: the HCL and the whole loss (attention-based fusion included) against float64 numpy
recomputations written here, the warm-up and the per-pair weight, the fusion blocks in the
checkpoint, and one training step on three pairs (cross-family and four-stage ones included).

The module is imported directly, which registers it, so that the tests do not depend on
kd_losses/__init__.py."""

import numpy as np
import pytest
import torch

from engine import Teacher
from conftest import resolved_settings
from golden import as64, batchnorm_train, close, randomize
from kd_losses.reviewkd import ReviewKD, hcl
from models import build_model
from test_losses import train_one_step

BATCH = 3
# a student narrower and half the teacher's spatial size at every stage, as ShuffleV1 under resnet32x4
STUDENT = {"stage1": (3, 4, 4), "stage2": (4, 2, 2), "pool": (4,)}
TEACHER = {"stage1_pre": (5, 8, 8), "stage2_pre": (6, 4, 4), "pool": (6,)}


def draw(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {"logits": torch.randn(BATCH, 10, generator=g)}
    out.update({name: torch.randn(BATCH, *shape, generator=g) for name, shape in shapes.items()})
    return out


def method(weight=2.5, warmup=20):
    return ReviewKD(STUDENT, TEACHER, reviewkd_weight=weight, reviewkd_warmup=warmup, reviewkd_max_mid=512)


# ------------------------------------------------------------------------- numpy recomputation

def mse(a, b):
    return ((a - b) ** 2).mean()


def block_mean(x, size):
    """Adaptive average pooling to size x size where the map's side is a multiple of it."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


# side of the map -> the weights of the MSE at full size and after pooling to 4, 2, 1 (pooled sizes
# smaller than the map only), halving from 1
HCL_WEIGHTS = {8: (1, 0.5, 0.25, 0.125), 4: (1, 0.5, 0.25), 2: (1, 0.5), 1: (1,)}


def hcl64(s, t):
    sizes = [s.shape[-1]] + [size for size in (4, 2, 1) if size < s.shape[-1]]
    weights = HCL_WEIGHTS[s.shape[-1]]
    terms = [mse(block_mean(s, size), block_mean(t, size)) for size in sizes]
    return sum(w * term for w, term in zip(weights, terms)) / sum(weights)


def conv1x1(x, conv):
    out = np.einsum("oc,nchw->nohw", as64(conv.weight[:, :, 0, 0]), x)
    return out if conv.bias is None else out + as64(conv.bias).reshape(1, -1, 1, 1)


def conv3x3(x, conv):
    """Stride 1, zero padding 1, no bias."""
    weight, (h, w) = as64(conv.weight), x.shape[-2:]
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return sum(np.einsum("oc,nchw->nohw", weight[:, :, i, j], padded[:, :, i:i + h, j:j + w])
               for i in range(3) for j in range(3))


def upsample(x, side):
    """Nearest upsampling by a whole factor: each value repeated."""
    k = side // x.shape[-1]
    return np.repeat(np.repeat(x, k, axis=2), k, axis=3)


def review_loss64(m, student, teacher):
    """Deepest level first: 1x1 conv + BN; below the deepest, fused with the upsampled residual by
    sigmoid(1x1 conv) weights; upsampled to the teacher's size; 3x3 conv + BN; HCL against the teacher."""
    s_maps = [as64(student["stage1"]), as64(student["stage2"]), as64(student["pool"])[:, :, None, None]]
    t_maps = [as64(teacher["stage1_pre"]), as64(teacher["stage2_pre"]), as64(teacher["pool"])[:, :, None, None]]
    total, residual = 0.0, None
    for level in (2, 1, 0):
        abf = m.abfs[level]
        x = batchnorm_train(conv1x1(s_maps[level], abf.reduce[0]), abf.reduce[1])
        if residual is not None:
            residual = upsample(residual, x.shape[-1])
            a = 1 / (1 + np.exp(-conv1x1(np.concatenate([x, residual], axis=1), abf.attention[0])))
            x = x * a[:, :1] + residual * a[:, 1:]
        x = upsample(x, t_maps[level].shape[-1])
        residual = x
        total += hcl64(batchnorm_train(conv3x3(x, abf.expand[0]), abf.expand[1]), t_maps[level])
    return total


# ---------------------------------------------------------------------------------- golden values

@pytest.mark.parametrize("side", [8, 4, 2, 1])
def test_hcl_golden(side):
    g = torch.Generator().manual_seed(side)
    s, t = torch.randn(BATCH, 3, side, side, generator=g), torch.randn(BATCH, 3, side, side, generator=g)
    assert close(hcl(s, t), hcl64(as64(s), as64(t)))


def test_whole_loss_golden():
    """Fusion blocks with drawn weights, BN in training mode, weight 2.5, epoch 5 of a 20-epoch warm-up."""
    m = method().train()
    randomize(m, 0)
    m.start_epoch(5, 240)
    student, teacher = draw(STUDENT, 1), draw(TEACHER, 2)
    student = {k: v.clamp(min=0) if k.startswith("stage") else v for k, v in student.items()}  # after ReLU
    expected = 2.5 * 5 / 20 * review_loss64(m, student, teacher)
    assert close(m(student, teacher, None), expected)


def test_widths():
    """Mid width min(512, the student's pooled width); outputs at the teacher's widths; no attention
    at the deepest level, which has no residual to fuse."""
    m = method()
    assert [abf.reduce[0].out_channels for abf in m.abfs] == [4, 4, 4]
    assert [abf.expand[0].out_channels for abf in m.abfs] == [5, 6, 6]
    assert [abf.attention is None for abf in m.abfs] == [False, False, True]
    capped = ReviewKD(STUDENT, TEACHER, reviewkd_weight=1.0, reviewkd_warmup=20, reviewkd_max_mid=2)
    assert [abf.reduce[0].out_channels for abf in capped.abfs] == [2, 2, 2]


# ------------------------------------------------------------------------- warm-up and weights

def test_warmup_factor():
    m = method(warmup=20)
    assert m.warmup_factor.item() == 1.0  # until start_epoch
    for epoch, factor in [(1, 0.05), (10, 0.5), (20, 1.0), (21, 1.0), (240, 1.0)]:
        m.start_epoch(epoch, 240)
        assert m.warmup_factor.item() == pytest.approx(factor)


@pytest.mark.parametrize("teacher, student, weight", [
    ("resnet32x4", "resnet8x4", 5.0), ("resnet32x4", "ShuffleV2", 8.0), ("resnet56", "resnet20", 0.6),
    ("wrn_40_2", "ShuffleV1", 5.0), ("resnet110", "resnet32", 1.0), ("vgg13", "vgg8", 1.0)])
def test_weight_by_pair(teacher, student, weight):
    assert resolved_settings("reviewkd", teacher, student)["reviewkd_weight"] == weight
    assert resolved_settings("reviewkd", teacher, student, reviewkd_weight=3.0)["reviewkd_weight"] == 3.0
    assert method(weight=weight).weight == weight


# ---------------------------------------------------------------------------------- checkpoints

def test_fusion_blocks_are_checkpointed():
    m = method().train()
    randomize(m, 3)
    state = m.state_dict()
    assert {"abfs.0.reduce.0.weight", "abfs.0.attention.0.bias", "abfs.2.expand.1.running_var"} <= set(state)
    assert "warmup_factor" not in state  # start_epoch sets it again on resume
    fresh = method().train()
    fresh.load_state_dict(state)
    student, teacher = draw(STUDENT, 4), draw(TEACHER, 5)
    assert torch.equal(fresh(student, teacher, None), m(student, teacher, None))


# ------------------------------------------------------------------------------- training steps

@pytest.mark.parametrize("teacher, student, classes", [
    ("resnet8x4", "resnet8", 10), ("resnet32x4", "ShuffleV1", 100), ("vgg13", "MobileNetV2", 100)])
def test_one_training_step(teacher, student, classes):
    torch.manual_seed(0)
    train_one_step("reviewkd", build_model(student, classes), Teacher(build_model(teacher, classes)), classes)
