"""Helpers shared by the golden-value tests of the KD losses."""
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
