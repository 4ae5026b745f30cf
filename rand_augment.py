"""MLKD's strong augmentation, "RandAugment(2, 10)" plus Cutout, on uint8 batches on the training device.

A batched, seeded re-implementation of the RandAugment class in MLKD's code (Jin et al., CVPR 2023,
Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py), which works on one PIL image at a
time with Python's and numpy's global random state. Here every image of an N x 3 x H x W uint8 batch gets its
own draws from one torch.Generator on the batch's device, so the generator's state alone decides the batch.
The ops use integer arithmetic, and float32 (float64 for AutoContrast, as PIL) products and sums kept as
separate operations, with no device-specific code, so given the same draws they should give the same bits on
any device. Each op reproduces PIL's arithmetic (PIL is the oracle in tests/test_rand_augment.py) exactly,
but for Rotate: PIL derives its 16.16 fixed-point coefficients from float64 trigonometry, we from float32,
which moves the source of about 2 output pixels in a million to a neighbouring pixel.

Quirks of the original kept on purpose:
- the ops_per_image ops are drawn uniformly from the 14 OPS with replacement (the same op can come twice);
- each op's value is uniform in its (lo, hi) range: the magnitude m = 10 is ignored;
- Posterize keeps int(v) bits, so 4..7, never 8 (up to float32 rounding of lo + (hi - lo) * u);
- AutoContrast uses PIL's float64 rule, which maps a channel's maximum to 254, not 255, for some
  (min, max) pairs;
- Cutout always follows (its size v * W with v uniform in [0, 0.5)); its centre comes from numpy's
  uniform(w), i.e. uniform(low=w, high=1.0), so it lies in (1, W] rather than [0, W); the square's
  corner is int(max(0, centre - size / 2)) and ImageDraw fills the columns corner..int(min(W, corner + size))
  inclusive, so it is one pixel wider than its size and at least 1 x 1; its colour is (125, 123, 114).
"""
import math
from typing import NamedTuple

import torch

# (name, lo, hi): each op's value is drawn uniformly in [lo, hi), as the original's augment_list()
OPS = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
CUTOUT_COLOUR = (125, 123, 114)
ONE = 1 << 16  # 1.0 in PIL's 16.16 fixed-point affine sampling


def _per_image(values):
    """N values shaped to broadcast over N x C x H x W."""
    return values.view(-1, 1, 1, 1)


def _round_half_up(x):
    """floor(x + 0.5) as int64, exactly: float32 x + 0.5 can itself round up onto the next integer."""
    whole = torch.floor(x)
    return whole.long() + (x - whole >= 0.5).long()


def _floor_of_difference(a, b):
    """floor(a - b) of the exact difference of two float32 tensors, as int64: the rounded difference can land
    on an integer that the exact one lies just below."""
    difference = a - b
    # Knuth's two-sum: the rounding error of a - b, exactly representable
    back = difference - a
    error = (a - (difference - back)) - (b + back)
    whole = torch.floor(difference)
    return whole.long() - ((difference == whole) & (error < 0)).long()


def _blend(degenerate, images, factor):
    """PIL's Image.blend(degenerate, images, factor) for factor in [0, 1], the ImageEnhance classes' core:
    degenerate + factor * (image - degenerate) in float32, truncated to uint8. Kept as separate float32
    operations (no fused multiply-add), as PIL's C loop computes it."""
    base = degenerate.float()
    return (base + _per_image(factor) * (images.float() - base)).to(torch.uint8)


def _grey(images):
    """PIL's convert("L"): (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16, int32 N x H x W (its ITU-R 601-2
    weights in 16-bit fixed point, which rounds differently from (299 R + 587 G + 114 B) / 1000)."""
    red, green, blue = images.int().unbind(1)
    return (red * 19595 + green * 38470 + blue * 7471 + 0x8000) >> 16


def _autocontrast(images, _):
    """ImageOps.autocontrast(img) (cutoff 0): each channel stretched from its [min, max] to [0, 255] by PIL's
    rule, value i to int(i * scale + offset) with scale = 255 / (max - min) and offset = -min * scale, in
    float64 as PIL computes it: it sometimes lands just below the exact integer (a maximum then becomes 254,
    for about 4,900 of the 32,640 (min, max) pairs), which float32 would not reproduce."""
    n, channels = images.shape[:2]
    flat = images.reshape(n, channels, -1).double()
    low, high = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    span = high - low
    scale = torch.full_like(span, 255.0) / span  # a true division: 255.0 / span multiplies by 1 / span
    mapped = (flat * scale + (-low * scale)).trunc().clamp(0, 255)
    return torch.where(span > 0, mapped, flat).to(torch.uint8).view_as(images)  # identity where max == min


def _brightness(images, factor):
    """ImageEnhance.Brightness: a blend with black."""
    return _blend(torch.zeros_like(images), images, factor)


def _color(images, factor):
    """ImageEnhance.Color: a blend with the greyscale image."""
    return _blend(_grey(images)[:, None], images, factor)


def _contrast(images, factor):
    """ImageEnhance.Contrast: a blend with a flat image at the greyscale mean, which PIL rounds as
    int(mean + 0.5); (2 sum + count) // (2 count) is that rule in exact integers."""
    grey = _grey(images)
    count = grey[0].numel()
    mean = (2 * grey.sum((1, 2), dtype=torch.int64) + count) // (2 * count)
    return _blend(_per_image(mean), images, factor)


def _equalize(images, _):
    """ImageOps.equalize: per channel, step = (pixels - pixels in the top occupied bin) // 255, and value i
    becomes (step // 2 + pixels below i) // step, at most 255 (PIL clips its lookup table); channels whose
    step is 0 (one occupied bin, or too few pixels) are left as they are."""
    n, channels = images.shape[:2]
    flat = images.reshape(n * channels, -1).long()
    # one histogram per channel from a single bincount (deterministic on CUDA too, having no weights)
    bins = flat + 256 * torch.arange(len(flat), device=images.device)[:, None]
    histogram = torch.bincount(bins.flatten(), minlength=256 * len(flat)).view(-1, 256)
    below = histogram.cumsum(1) - histogram  # pixels darker than each value
    step = (flat.shape[1] - histogram.gather(1, flat.amax(1, keepdim=True))) // 255
    lookup = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    return torch.where(step > 0, lookup.gather(1, flat), flat).to(torch.uint8).view_as(images)


def _identity(images, _):
    """The image unchanged."""
    return images.clone()


def _posterize(images, value):
    """ImageOps.posterize(img, max(1, int(v))): keeps each channel's top bits."""
    bits = value.long().clamp(min=1)
    mask = 256 - (1 << (8 - bits))  # the top `bits` bits set
    return images & _per_image(mask).to(torch.uint8)


def _sample_fixed_point(images, coefficients):
    """PIL's NEAREST affine sampling in 16.16 fixed point (its affine_fixed): output pixel (x, y) reads source
    pixel ((A x + B y + C) >> 16, (D x + E y + F) >> 16), black where that is outside the image.
    coefficients: int64 N x 6, (A, B, C, D, E, F) per image."""
    n, channels, height, width = images.shape
    a, b, c, d, e, f = (k.view(-1, 1, 1) for k in coefficients.unbind(1))
    x = torch.arange(width, device=images.device)
    y = torch.arange(height, device=images.device)[:, None]
    source_x = (a * x + b * y + c) >> 16
    source_y = (d * x + e * y + f) >> 16
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    index = torch.where(inside, source_y * width + source_x, 0).view(n, 1, -1).expand(-1, channels, -1)
    sampled = images.reshape(n, channels, -1).gather(2, index).view_as(images)
    return torch.where(inside[:, None], sampled, 0)


def _fixed(x):
    """PIL's FIX(v) = floor(v * 65536 + 0.5) for float32 v, exactly."""
    return _round_half_up(x * ONE)


def _sin_cos(radians):
    """sin and cos for |radians| <= pi / 6 by their Taylor series to the x^13 / x^12 terms (the rest is below
    float32's resolution), in float32 multiplies and adds only, which give the same bits on every device;
    torch.sin and torch.cos are implemented differently on each."""
    square = radians * radians
    sin = cos = torch.ones_like(radians)
    for k in range(6, 0, -1):  # Horner's rule from the highest term down
        sin = 1 - square * (1 / ((2 * k) * (2 * k + 1))) * sin
        cos = 1 - square * (1 / ((2 * k - 1) * (2 * k))) * cos
    return radians * sin, cos


def _rotate(images, degrees):
    """img.rotate(v): counter-clockwise about (W / 2, H / 2). PIL's inverse map is (cos, -sin, c; sin, cos, f)
    of the angle, with its fixed-point offsets FIX(c + (cos - sin) / 2) and FIX(f + (sin + cos) / 2). Those
    come from float64 trigonometry there and from float32 here: for about 7 angles in 100 one of the six is
    1 / 65536 pixel off, which moves the source of about 2 output pixels in a million by one pixel."""
    height, width = images.shape[-2:]
    centre_x, centre_y = width / 2, height / 2
    radians = degrees * (math.pi / 180)
    sin, cos = _sin_cos(radians)
    offset_x = centre_x + cos * (0.5 - centre_x) - sin * (0.5 - centre_y)
    offset_y = centre_y + sin * (0.5 - centre_x) + cos * (0.5 - centre_y)
    coefficients = torch.stack([_fixed(cos), _fixed(-sin), _fixed(offset_x),
                                _fixed(sin), _fixed(cos), _fixed(offset_y)], 1)
    return _sample_fixed_point(images, coefficients)


def _shear_coefficients(shear):
    """Fixed-point (slope, offset) of a shear row: FIX(v) and FIX(0.5 + v / 2) = 32768 + FIX(v / 2), the
    latter written so that no float32 sum rounds."""
    return _fixed(shear), ONE // 2 + _fixed(shear / 2)


def _shear(images, shear, along_x):
    """img.transform(size, AFFINE, (1, v, 0, 0, 1, 0)) along x (source x = x + v * y), or
    (1, 0, 0, v, 1, 0) along y (source y = v * x + y)."""
    slope, offset = _shear_coefficients(shear)
    one, half, zero = torch.full_like(slope, ONE), torch.full_like(slope, ONE // 2), torch.zeros_like(slope)
    rows = (one, slope, offset, zero, one, half) if along_x else (one, zero, half, slope, one, offset)
    return _sample_fixed_point(images, torch.stack(rows, 1))


def _shear_x(images, shear):
    """ShearX: source x = x + v * y."""
    return _shear(images, shear, along_x=True)


def _shear_y(images, shear):
    """ShearY: source y = v * x + y."""
    return _shear(images, shear, along_x=False)


def _translation(images, shift_x, shift_y):
    """img.transform(size, AFFINE, (1, 0, tx, 0, 1, ty)): PIL's scaling path reads source column
    floor(x + 0.5 + tx), i.e. the whole shift floor(tx + 0.5); exact when tx = v * W is exact in float32
    (W a power of two, as CIFAR's 32)."""
    columns, rows = _round_half_up(shift_x), _round_half_up(shift_y)
    identity = torch.full_like(columns, ONE)
    zero = torch.zeros_like(columns)
    # whole pixels, plus PIL's half pixel (any fraction in [0, 1) gives the same >> 16)
    coefficients = torch.stack([identity, zero, columns * ONE + ONE // 2,
                                zero, identity, rows * ONE + ONE // 2], 1)
    return _sample_fixed_point(images, coefficients)


def _translate_x(images, fraction):
    """TranslateX: a shift of v * W columns (source = x + v W)."""
    return _translation(images, fraction * images.shape[-1], torch.zeros_like(fraction))


def _translate_y(images, fraction):
    """TranslateY: a shift of v * H rows."""
    return _translation(images, torch.zeros_like(fraction), fraction * images.shape[-2])


def _sharpness(images, factor):
    """ImageEnhance.Sharpness: a blend with ImageFilter.SMOOTH, the 3 x 3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]]
    / 13 with border pixels copied. PIL sums the weighted neighbourhood S / 13 in float32 and truncates
    S / 13 + 0.5; that is never within float32's error of an integer (it is an odd multiple of 1 / 26), so
    the result is exactly (S + 6) // 13 in integers."""
    pixels = images.int()
    across = pixels[..., :-2] + pixels[..., 1:-1] + pixels[..., 2:]  # each pixel's row of three
    weighted = across[:, :, :-2] + across[:, :, 1:-1] + across[:, :, 2:] + 4 * pixels[:, :, 1:-1, 1:-1]
    degenerate = images.clone()
    degenerate[:, :, 1:-1, 1:-1] = ((weighted + 6) // 13).to(torch.uint8)
    return _blend(degenerate, images, factor)


def _solarize(images, threshold):
    """ImageOps.solarize(img, v): channel values >= v are inverted."""
    return torch.where(images >= _per_image(threshold), 255 - images, images)


_OP_FUNCTIONS = {
    "AutoContrast": _autocontrast, "Brightness": _brightness, "Color": _color, "Contrast": _contrast,
    "Equalize": _equalize, "Identity": _identity, "Posterize": _posterize, "Rotate": _rotate,
    "Sharpness": _sharpness, "ShearX": _shear_x, "ShearY": _shear_y, "Solarize": _solarize,
    "TranslateX": _translate_x, "TranslateY": _translate_y,
}


def apply_op(name, images, values):
    """One of the OPS, by name, on a uint8 N x 3 x H x W batch on any device, with per-image values (a
    float tensor of N, in the op's range; AutoContrast, Equalize and Identity ignore theirs). Returns a new
    uint8 batch: what the original's op gives each PIL image."""
    return _OP_FUNCTIONS[name](images, values.to(images.device, torch.float32))


def cutout(images, sizes, centres_x, centres_y):
    """The original's Cutout on each image: a square of (125, 123, 114) whose side is sizes[i] pixels
    (sizes <= 0: none) around the drawn centre (centres_x[i], centres_y[i]), with the original's arithmetic:
    corner = int(max(0, centre - size / 2)), far edge = min(W, corner + size), and ImageDraw.rectangle filling
    corner..int(far edge) inclusive, clipped to the image. Float32 tensors of N; returns a new uint8 batch."""
    height, width = images.shape[-2:]
    device = images.device

    def covered(centres, length):
        """N x length: the positions along one axis that the square covers."""
        first = _floor_of_difference(centres, sizes / 2).clamp(min=0)
        last = first + torch.floor(sizes).long()  # int(min(L, first + size)), first being whole
        positions = torch.arange(length, device=device)
        return (positions >= first[:, None]) & (positions <= last[:, None]) & (sizes > 0)[:, None]

    square = covered(centres_y, height)[:, :, None] & covered(centres_x, width)[:, None, :]
    colour = torch.tensor(CUTOUT_COLOUR, dtype=torch.uint8, device=device).view(1, -1, 1, 1)
    return torch.where(square[:, None], colour, images)


class RandAugmentDraw(NamedTuple):
    """Everything rand_augment draws for a batch of N (tensors on the batch's device)."""
    ops: torch.Tensor        # int64 N x ops_per_image: indices into OPS
    values: torch.Tensor     # float32 N x ops_per_image: each op's value
    sizes: torch.Tensor      # float32 N: the Cutout square's side in pixels, v * W with v uniform in [0, 0.5)
    centres_x: torch.Tensor  # float32 N: the Cutout centre, uniform in (1, W] (numpy's uniform(w))
    centres_y: torch.Tensor  # float32 N: likewise in (1, H]


def draw_rand_augment(n, height, width, generator, device, ops_per_image=2):
    """The random choices of rand_augment for n images of height x width, from `generator` (on `device`)."""
    ops = torch.randint(len(OPS), (n, ops_per_image), generator=generator, device=device)
    low = torch.tensor([lo for _, lo, _ in OPS], device=device)[ops]
    high = torch.tensor([hi for _, _, hi in OPS], device=device)[ops]
    values = low + (high - low) * torch.rand(n, ops_per_image, generator=generator, device=device)
    sizes = torch.rand(n, generator=generator, device=device) * 0.5 * width
    # numpy.random.uniform(w) is uniform(low=w, high=1.0): w + (1 - w) * u, in (1, w]
    extent = torch.tensor([width, height], dtype=torch.float32, device=device)
    centres = extent + (1 - extent) * torch.rand(n, 2, generator=generator, device=device)
    return RandAugmentDraw(ops, values, sizes, centres[:, 0], centres[:, 1])


def rand_augment(images, generator, ops_per_image=2):
    """MLKD's RandAugment(2, 10) + Cutout on a uint8 N x 3 x H x W batch: each image gets ops_per_image ops
    drawn from OPS with replacement, each with its own value, then the Cutout. All draws come from
    `generator` (on the batch's device), so the same generator state gives the same batch. The input is not
    modified; returns a new uint8 batch. The batch is split by op on the device, which needs one transfer of
    the per-op counts to the host per call."""
    n, _, height, width = images.shape
    draw = draw_rand_augment(n, height, width, generator, images.device, ops_per_image)
    # how many images take each op at each step, fetched at once
    slots = draw.ops + len(OPS) * torch.arange(ops_per_image, device=images.device)
    counts = torch.bincount(slots.flatten(), minlength=ops_per_image * len(OPS)).view(ops_per_image, -1).tolist()
    for step, step_counts in enumerate(counts):
        order = torch.argsort(draw.ops[:, step], stable=True)
        augmented = torch.empty_like(images)
        for (name, _, _), members, count in zip(OPS, order.split(step_counts), step_counts):
            if count:
                chosen = apply_op(name, images.index_select(0, members), draw.values[members, step])
                augmented.index_copy_(0, members, chosen)
        images = augmented
    return cutout(images, draw.sizes, draw.centres_x, draw.centres_y)
