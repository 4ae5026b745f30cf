"""Helpers shared by the golden-value tests of the KD losses."""
import numpy as np
import pytest
import torch


def fake_outputs(shapes, seed, batch, classes):
    """A fake network output: logits and every feature of `shapes` (name -> per-sample shape), drawn
    from a seeded normal so that signs matter."""
    g = torch.Generator().manual_seed(seed)
    out = {"logits": 3 * torch.randn(batch, classes, generator=g)}
    out.update({name: torch.randn(batch, *shape, generator=g) for name, shape in shapes.items()})
    return out


def as64(tensor):
    return tensor.detach().double().numpy()


def close(got, expected):
    """A float32 loss against its float64 recomputation."""
    return got.item() == pytest.approx(expected, rel=1e-5, abs=1e-8)


def randomize(module, seed):
    """Every parameter of `module` redrawn, so that no golden value rests on an initial 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def batchnorm_train(x, bn):
    """x (float64, N x C x H x W) through `bn` with the batch's statistics (biased variance), as in
    training mode."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    gamma, beta = as64(bn.weight).reshape(1, -1, 1, 1), as64(bn.bias).reshape(1, -1, 1, 1)
    return (x - mean) / np.sqrt(var + bn.eps) * gamma + beta
