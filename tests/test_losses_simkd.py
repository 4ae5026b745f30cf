"""SimKD: its loss and the student's logits through the projector and the teacher's classifier,
recomputed in float64 with plain loops; a run's checkpoint that predicts through them, and
evaluation that uses them."""
import csv
import os

import numpy as np
import pytest
import torch

from conftest import DEVICE, run_script
from data import DATASETS, DeviceLoader, load_cifar
from engine import evaluate, load_predictor
from golden import as64, batchnorm_train, close, randomize
from kd_losses.simkd import SimKD

BATCH = 3
STUDENT = {"pre_pool": (6, 4, 4), "logits": (10,)}
TEACHER = {"pre_pool": (8, 2, 2), "logits": (10,)}


def conv(x, weight):
    """A bias-free convolution with stride 1 and 'same' zero padding, by loops."""
    out_c, _, k, _ = weight.shape
    pad = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, _, h, w = x.shape
    out = np.zeros((n, out_c, h, w))
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = np.einsum("ncij,ocij->no", padded[:, :, i:i + k, j:j + k], weight)
    return out


def test_simkd_golden():
    method = SimKD(STUDENT, TEACHER, simkd_factor=2).train()
    randomize(method, 5)
    g = torch.Generator().manual_seed(0)
    s_map, t_map = torch.randn(BATCH, 6, 4, 4, generator=g), torch.randn(BATCH, 8, 2, 2, generator=g)
    projected = method.project(s_map)
    loss = method({"projected": projected}, {"pre_pool": t_map}, None)
    logits = method.predict(projected)

    x = as64(s_map).reshape(BATCH, 6, 2, 2, 2, 2).mean(axis=(3, 5))  # 4x4 pooled to the teacher's 2x2
    p = method.projector
    for c, bn in ((p[0], p[1]), (p[3], p[4]), (p[6], p[7])):
        x = np.maximum(batchnorm_train(conv(x, as64(c.weight)), bn), 0)
    assert x.shape == (BATCH, 8, 2, 2)  # C_t / 2 = 4 in the middle, C_t at the end
    assert close(loss, ((x - as64(t_map)) ** 2).mean())
    expected = x.mean(axis=(2, 3)) @ as64(method.teacher_fc.weight).T + as64(method.teacher_fc.bias)
    np.testing.assert_allclose(as64(logits), expected, rtol=1e-5, atol=1e-6)


def test_simkd_defaults():
    assert SimKD.hyperparameters["simkd_factor"][0] == 2
    assert (SimKD.default_weight, SimKD.default_ce_weight, SimKD.replaces_classifier) == (1.0, 0.0, True)


def test_a_simkd_run_predicts_through_the_teacher_classifier_and_evaluates_so(teacher, cifar10_root, tmp_path):
    out = tmp_path / "run"
    run_script("train_kd.py", "--teacher", teacher, "--method", "simkd", "--data-root", cifar10_root,
               "--output-dir", out, "--student", "resnet8", "--epochs", 1, "--batch-size", 32)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["predictor"] == "method" and ckpt["config"]["ce_weight"] == 0.0
    teacher_fc = torch.load(teacher, weights_only=True)["model"]["fc.weight"]
    assert torch.equal(ckpt["method"]["method.teacher_fc.weight"], teacher_fc)  # the teacher's own, frozen
    _, _, images, labels = load_cifar("cifar10", str(cifar10_root), download=False)
    spec = DATASETS["cifar10"]
    loader = DeviceLoader(images.to(DEVICE), labels.to(DEVICE), 50, spec.mean, spec.std, train=False)
    with open(out / "metrics.csv") as f:
        recorded = next(csv.DictReader(f))
    # the loss pins the logits: those of the student's own (unused) classifier would give another
    measured = evaluate(load_predictor(os.path.join(out, "last.pt"), DEVICE), loader)
    assert measured["top1"] == pytest.approx(float(recorded["test_top1"]))
    assert measured["loss"] == pytest.approx(float(recorded["test_loss"]), rel=1e-5)
