"""Weights for a RepDistiller/mdistiller network, made from nothing but its state dict's key names
and shapes, so that tests/fixtures/make_repdistiller_fixture.py (with their code) and the tests
(without it) fill the same network with the same numbers."""
import math
import zlib

import torch


def weight_for(key, shape):
    """A float64 tensor drawn from a generator seeded by the key's name; BN statistics plausible
    (variances positive), conv and linear weights scaled by 1/sqrt(fan-in) so activations stay sane."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    if key.endswith("num_batches_tracked"):
        return torch.tensor(0)
    if key.endswith("running_var"):
        return 0.5 + noise.abs()
    if len(shape) > 1:
        return noise / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):  # a BN's scale
        return 1 + 0.1 * noise
    return 0.1 * noise  # biases and running means


def their_state_dict(keys):
    """{key: tensor} for the fixture's [key, shape] list."""
    return {key: weight_for(key, tuple(shape)) for key, shape in keys}


def probe_images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
