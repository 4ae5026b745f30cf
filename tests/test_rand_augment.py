"""rand_augment.py against its oracle, PIL applied image by image as MLKD's RandAugment does, and the batch
function's draws (seeded, uniform over the ops, nothing modified in place). No training, no data; with
KDZOO_TEST_DEVICE=cuda the batched ops run on the GPU and are still compared with PIL on the CPU."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from conftest import DEVICE
from rand_augment import OPS, apply_op, cutout, draw_rand_augment, rand_augment

RANGES = {name: (lo, hi) for name, lo, hi in OPS}


def to_pil(image):
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def original_op(name, image, v):
    """The original's op `name` on one PIL image (mdistiller/dataset/cifar100.py)."""
    size = image.size
    return {
        "AutoContrast": lambda: ImageOps.autocontrast(image),
        "Brightness": lambda: ImageEnhance.Brightness(image).enhance(v),
        "Color": lambda: ImageEnhance.Color(image).enhance(v),
        "Contrast": lambda: ImageEnhance.Contrast(image).enhance(v),
        "Equalize": lambda: ImageOps.equalize(image),
        "Identity": lambda: image,
        "Posterize": lambda: ImageOps.posterize(image, max(1, int(v))),
        "Rotate": lambda: image.rotate(v),
        "Sharpness": lambda: ImageEnhance.Sharpness(image).enhance(v),
        "ShearX": lambda: image.transform(size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "ShearY": lambda: image.transform(size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "Solarize": lambda: ImageOps.solarize(image, v),
        "TranslateX": lambda: image.transform(size, Image.AFFINE, (1, 0, v * size[0], 0, 1, 0)),
        "TranslateY": lambda: image.transform(size, Image.AFFINE, (1, 0, 0, 0, 1, v * size[1])),
    }[name]()


def original_cutout(image, size, centre_x, centre_y):
    """The original's CutoutAbs with its numpy draws replaced by the given centre."""
    if size <= 0:
        return image
    w, h = image.size
    x0 = int(max(0, centre_x - size / 2.))
    y0 = int(max(0, centre_y - size / 2.))
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, min(w, x0 + size), min(h, y0 + size)), (125, 123, 114))
    return image


def pil_batch(images, transform):
    """transform(PIL image, i) applied to each image of a uint8 batch, back as a uint8 batch."""
    return torch.stack([from_pil(transform(to_pil(image), i)) for i, image in enumerate(images.cpu())])


def edge_case_images():
    """32 uint8 32 x 32 images: 16 random, 16 made for the ops' edge cases."""
    gen = torch.Generator().manual_seed(0)

    def uniform(low, high, shape=(3, 32, 32)):
        return torch.randint(low, high + 1, shape, generator=gen).to(torch.uint8)

    images = [uniform(0, 255) for _ in range(16)]
    images += [uniform(100, 110), uniform(0, 3), uniform(250, 255)]  # low contrast
    flat_channel = uniform(0, 255)
    flat_channel[1] = 77
    images.append(flat_channel)
    images += [torch.full((3, 32, 32), 255, dtype=torch.uint8), torch.zeros(3, 32, 32, dtype=torch.uint8),
               torch.full((3, 32, 32), 123, dtype=torch.uint8)]
    two_values = uniform(0, 1) * 200 + 20
    images.append(two_values)
    # channel ranges for which PIL's autocontrast maps the maximum to 254: 0..25, 0..105, 3..38
    quirky = uniform(0, 255)
    for channel, (low, high) in enumerate([(0, 25), (0, 105), (3, 38)]):
        quirky[channel] = uniform(low, high, (32, 32))
        quirky[channel, 0, :2] = torch.tensor([low, high])
    images.append(quirky)
    # Equalize: step 4 with PIL's lookup table reaching 256 (clipped to 255) at the top values
    clipped = torch.arange(1024).remainder(200).view(1, 32, 32).repeat(3, 1, 1)
    clipped[:, -1, -3:] = torch.tensor([253, 254, 255])
    images.append(clipped.to(torch.uint8))
    gradient = (torch.arange(32)[:, None] * 8 + torch.arange(32)[None, :]).clamp(max=255)
    images.append(torch.stack([gradient, gradient.flip(0), gradient.t()]).to(torch.uint8))
    images += [uniform(0, 255, (3, 32, 1)).expand(3, 32, 32).clone(), uniform(60, 200)]  # stripes
    images += [uniform(0, 255) // 64 * 64, uniform(0, 255) | 1]
    outlier = uniform(40, 60)
    outlier[:, 5, 7] = 255  # one bright pixel: a top histogram bin of one
    images.append(outlier)
    assert len(images) == 32
    return torch.stack(images)


# values at which a rounding rule shows: integer thresholds, whole bit counts, translations of exactly half a
# pixel and just either side of it (W = 32), a shear of 0 (PIL's scaling path), a rotation of 0 (its copy)
HALF = 0.5 / 32
EDGE_VALUES = {
    "Posterize": [4.999, 5.0, 7.0, 7.999],
    "Rotate": [0.0],
    "ShearX": [0.0], "ShearY": [0.0],
    "Solarize": [1.0, 77.0, 128.0, 255.0],
    "TranslateX": [HALF, HALF - 2.0 ** -30, -HALF, -HALF - 2.0 ** -29, 3 * HALF],
    "TranslateY": [HALF, HALF - 2.0 ** -30, -HALF, -HALF - 2.0 ** -29, 3 * HALF],
}


def op_values(name, n, seed=1):
    """n float32 values for op `name`: its range's ends, its EDGE_VALUES, then one in each part of the range."""
    lo, hi = RANGES[name]
    edges = torch.tensor([lo, hi] + EDGE_VALUES.get(name, []))
    gen = torch.Generator().manual_seed(seed)
    parts = n - len(edges)
    fractions = (torch.arange(parts) + torch.rand(parts, generator=gen)) / parts
    return torch.cat([edges, lo + (hi - lo) * fractions[torch.randperm(parts, generator=gen)]])


EXACT_OPS = [name for name, _, _ in OPS if name != "Rotate"]


@pytest.mark.parametrize("name", EXACT_OPS)
def test_op_equals_pil_exactly(name):
    images = edge_case_images()
    values = op_values(name, len(images))
    ours = apply_op(name, images.to(DEVICE), values.to(DEVICE))
    assert ours.dtype == torch.uint8 and ours.shape == images.shape and ours.device.type == DEVICE
    expected = pil_batch(images, lambda image, i: original_op(name, image, values[i].item()))
    assert torch.equal(ours.cpu(), expected)


def test_autocontrast_keeps_pils_254_maximum():
    """PIL's float64 rule sends the maximum of a channel spanning 0..25 to 254, not 255; so must we."""
    image = torch.arange(26, dtype=torch.uint8).repeat(3, 40)[:, :1024].view(1, 3, 32, 32)
    ours = apply_op("AutoContrast", image.to(DEVICE), torch.zeros(1, device=DEVICE)).cpu()
    assert ours.max() == 254 and torch.equal(ours[0], from_pil(ImageOps.autocontrast(to_pil(image[0]))))


def test_rotate_equals_pil_but_for_rare_neighbouring_pixels():
    """PIL's Rotate computes its fixed-point map in float64, ours in float32: over these 2,000 angles the
    source differs at 6 of 2,048,000 output pixels (0.0003 %; bound 0.002 %), by one pixel at most. An image
    whose pixels encode their own coordinates shows where each output pixel was read from; on the edge-case
    batch the two agree."""
    angles = op_values("Rotate", 2000)
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    coordinates = torch.stack([4 + 8 * x, 4 + 8 * y, torch.full_like(x, 255)]).to(torch.uint8)  # 0 is the fill
    images = coordinates.expand(len(angles), -1, -1, -1)
    ours = apply_op("Rotate", images.to(DEVICE), angles.to(DEVICE)).cpu()
    expected = pil_batch(images, lambda image, i: original_op("Rotate", image, angles[i].item()))
    differs = (ours != expected).any(1)
    assert differs.float().mean() < 2e-5
    for a, b in zip(ours.permute(0, 2, 3, 1)[differs], expected.permute(0, 2, 3, 1)[differs]):
        if a[2] and b[2]:  # both read inside the image
            assert (a[:2].long() - b[:2].long()).abs().max() <= 8
        else:  # one of them fell outside: the other read a border pixel
            inside = a if a[2] else b
            assert {4, 252} & {inside[0].item(), inside[1].item()}
    batch = edge_case_images()
    ours = apply_op("Rotate", batch.to(DEVICE), angles[:len(batch)].to(DEVICE)).cpu()
    expected = pil_batch(batch, lambda image, i: original_op("Rotate", image, angles[i].item()))
    assert (ours != expected).float().mean() < 1e-3


def test_cutout_equals_imagedraw():
    """Sizes in pixels and centres as the original draws them ((1, W]), with squares clipped at every border,
    none (size 0), a single pixel, the largest, and a centre - size / 2 that float32 rounds onto an integer."""
    sizes = [0.0, 0.3, 16.0, 15.99, 1.0, 7.5, 2.0 ** -22, 16.0, 10.25, 3.7, 12.0, 0.01]
    centres_x = [5.5, 1.0001, 32.0, 31.9, 1.5, 16.0, 5.0, 1.2, 29.3, 8.0, 30.0, 32.0]
    centres_y = [7.0, 32.0, 1.0001, 16.2, 31.9, 16.0, 5.0, 9.9, 2.0, 4.6, 30.0, 32.0]
    draw = draw_rand_augment(100, 32, 32, torch.Generator().manual_seed(2), "cpu")
    sizes = torch.cat([torch.tensor(sizes), draw.sizes])
    centres_x = torch.cat([torch.tensor(centres_x), draw.centres_x])
    centres_y = torch.cat([torch.tensor(centres_y), draw.centres_y])
    images = torch.randint(0, 256, (len(sizes), 3, 32, 32), generator=torch.Generator().manual_seed(3),
                           dtype=torch.uint8)
    ours = cutout(images.to(DEVICE), sizes.to(DEVICE), centres_x.to(DEVICE), centres_y.to(DEVICE)).cpu()
    expected = pil_batch(images, lambda image, i: original_cutout(
        image, sizes[i].item(), centres_x[i].item(), centres_y[i].item()))
    assert torch.equal(ours, expected)
    covered = (ours != images).any(1).flatten(1).sum(1)
    assert covered[0] == 0 and covered[1] == 1  # size 0: no square; size 0.3: one pixel


def test_rand_augment_equals_the_original_pipeline_with_the_same_draws():
    """The batch function against the original's __call__, image by image, fed the same draws (ops in order,
    then the cutout); up to Rotate's rare neighbouring pixels (none on this seed)."""
    images = edge_case_images()
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    state = gen.get_state()
    ours = rand_augment(images.to(DEVICE), gen).cpu()
    gen.set_state(state)
    draw = draw_rand_augment(len(images), 32, 32, gen, DEVICE)
    ops, values, sizes, centres_x, centres_y = (t.cpu() for t in draw)

    def original(image, i):
        for op, v in zip(ops[i].tolist(), values[i].tolist()):
            image = original_op(OPS[op][0], image, v)
        return original_cutout(image, sizes[i].item(), centres_x[i].item(), centres_y[i].item())
    assert (ours != pil_batch(images, original)).float().mean() < 1e-3


def test_rand_augment_is_seeded_and_leaves_its_input_alone():
    images = edge_case_images().to(DEVICE)
    before = images.clone()
    first = rand_augment(images, torch.Generator(device=DEVICE).manual_seed(5))
    again = rand_augment(images, torch.Generator(device=DEVICE).manual_seed(5))
    other = rand_augment(images, torch.Generator(device=DEVICE).manual_seed(6))
    assert first.dtype == torch.uint8 and first.shape == images.shape and first.device == images.device
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(images, before)
    three = rand_augment(images, torch.Generator(device=DEVICE).manual_seed(5), ops_per_image=3)
    assert three.shape == images.shape and not torch.equal(three, first)


def test_draws_are_uniform_over_ops_and_ranges():
    """140,000 op choices: each op 10,000 +- 500 times (5 standard deviations; fixed seed); values, cutout
    sizes and centres within their ranges."""
    draw = draw_rand_augment(70000, 32, 32, torch.Generator(device=DEVICE).manual_seed(7), DEVICE)
    assert draw.ops.shape == draw.values.shape == (70000, 2)
    counts = torch.bincount(draw.ops.flatten().cpu(), minlength=len(OPS))
    assert len(counts) == len(OPS) and ((counts - 10000).abs() < 500).all(), counts
    for index, (name, lo, hi) in enumerate(OPS):
        chosen = draw.values[draw.ops == index]
        assert lo <= chosen.min() and chosen.max() <= hi, name
        assert abs(chosen.mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo), name
    assert 0 <= draw.sizes.min() and draw.sizes.max() < 16 and abs(draw.sizes.mean().item() - 8) < 0.2
    for centres in (draw.centres_x, draw.centres_y):
        assert 1 < centres.min() and centres.max() <= 32 and abs(centres.mean().item() - 16.5) < 0.2
