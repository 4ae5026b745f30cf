"""The fast path (bf16 autocast, channels_last, torch.compile) changes results only by rounding."""
import csv
import os

import pytest
import torch

import config
from conftest import DEVICE, run_script
from utils import UserError


def one_kd_epoch(teacher, cifar10_root, out, *speed):
    # 200 images in batches of 40: no partial batch, so --compile compiles each graph once
    run_script("train_kd.py", "--teacher", teacher, "--method", "at", "--student", "resnet8", "--data-root",
               cifar10_root, "--output-dir", out, "--epochs", 1, "--batch-size", 40, "--lr", 0.02,
               "--device", DEVICE, *speed)
    with open(os.path.join(out, "metrics.csv")) as f:
        (row,) = csv.DictReader(f)
    weights = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    return {k: float(v) for k, v in row.items()}, weights


def assert_close_run(a, b, loss_rtol, weight_rtol):
    (row_a, w_a), (row_b, w_b) = a, b
    for key in ("train_loss", "train_ce", "train_kd", "test_loss"):
        assert row_b[key] == pytest.approx(row_a[key], rel=loss_rtol), key
    keys = [k for k in w_a if w_a[k].is_floating_point()]
    flat_a = torch.cat([w_a[k].flatten() for k in keys])
    flat_b = torch.cat([w_b[k].flatten() for k in keys])
    assert (flat_a - flat_b).norm() / flat_a.norm() < weight_rtol


@pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA --compile means bf16 and TF32: tests/test_cuda.py compares "
                                            "it with its own tolerance")
def test_compiled_and_bf16_kd_epochs_match_fp32_eager(teacher, cifar10_root, tmp_path):
    eager = one_kd_epoch(teacher, cifar10_root, tmp_path / "eager", "--amp", "off", "--no-channels-last")
    compiled = one_kd_epoch(teacher, cifar10_root, tmp_path / "compiled", "--compile")
    bf16 = one_kd_epoch(teacher, cifar10_root, tmp_path / "bf16", "--amp", "bf16", "--channels-last")
    for row, _ in (eager, compiled, bf16):
        assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    assert_close_run(eager, compiled, loss_rtol=1e-3, weight_rtol=1e-3)
    # bf16 keeps 8 bits of mantissa: a few per cent after an epoch of training is rounding, not a bug
    assert_close_run(eager, bf16, loss_rtol=5e-2, weight_rtol=5e-2)


def test_speed_defaults_follow_the_device(monkeypatch):
    cpu = dict(device="cpu", amp=None, channels_last=None, sync_bn=False)
    assert config.speed_values(cpu) == {"amp": "off", "channels_last": False}
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(UserError, match="--amp bf16 needs bf16 support"):
        config.speed_values({**cpu, "amp": "bf16"})
    with pytest.raises(UserError, match="--sync-bn needs CUDA"):
        config.speed_values({**cpu, "sync_bn": True})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.speed_values({**cpu, "device": "auto"})["amp"] == "off"
    with pytest.raises(UserError, match="--device cuda was asked for"):
        config.speed_values({**cpu, "device": "cuda"})
