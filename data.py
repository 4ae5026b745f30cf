"""CIFAR-10/100 kept on the training device as uint8, augmented and normalised on batches there.

Reading the official python pickles ourselves (instead of torchvision's dataset class) means any
folder in the official layout loads, and the whole set becomes one tensor we can move to the GPU.
"""
import hashlib
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rand_augment import rand_augment
from utils import UserError, log


@dataclass(frozen=True)
class CifarSpec:
    title: str
    folder: str
    train_files: tuple
    test_files: tuple
    label_key: str
    num_classes: int
    mean: tuple
    std: tuple


# Normalisation (mean, std per channel) as the recipe's source normalises: CIFAR-10 the seed zoo's
# (AberHu/Knowledge-Distillation-Zoo, train_base.py's transforms); CIFAR-100 RepDistiller's
# (HobbitLong/RepDistiller, dataset/cifar100.py L57 and L61, the same digits as mdistiller's
# mdistiller/dataset/cifar100.py L123 and L134), with which the community's CIFAR-100 teachers were trained
DATASETS = {
    "cifar10": CifarSpec(
        "CIFAR-10", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels", 10,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": CifarSpec(
        "CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100,
        (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and dicts only, so a tampered data file cannot run code.
    _codecs.encode only builds bytes: Python 3's pickle protocol 2 reduces an array's raw data
    through it (as PyTorch's weights_only loader also allows)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _read_batch(path, label_key, num_classes):
    """(images, labels) of one official CIFAR python batch: its 'data', uint8 N x 3072 (each row an
    image's 1024 red, 1024 green and 1024 blue pixels), and N integer labels in 0..num_classes - 1.
    Anything else is refused, naming the file: a reshape or a cast would train on wrong images silently."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
        data, labels = entry["data"], np.asarray(entry[label_key])
    except Exception as e:  # any failure here means the file is not a CIFAR batch
        raise UserError(f"{path} is not a readable CIFAR python batch ({type(e).__name__}: {e}).") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = f"{data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path} holds its images as {found}, not as uint8 pixels of shape (N, 3072), the "
                        f"official CIFAR layout.")
    if len(data) == 0:
        raise UserError(f"{path} holds no images.")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{path} holds its '{label_key}' as {labels.dtype} of shape {labels.shape}, not as a "
                        f"list of integer labels.")
    if len(labels) != len(data):
        raise UserError(f"{path} holds {len(data)} images but {len(labels)} labels.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{path} holds labels outside 0..{num_classes - 1} (from {labels.min()} to {labels.max()}).")
    return torch.from_numpy(data).reshape(-1, 3, 32, 32), torch.from_numpy(labels.astype(np.int64))


def _download(name, root):
    import torchvision  # only needed here; imported late to keep start-up fast

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    cls(root, train=True, download=True)


def load_cifar(name, root, download=True):
    """Returns (train_images, train_labels, test_images, test_labels): uint8 N x 3 x 32 x 32 and int64."""
    spec = DATASETS[name]
    folder = os.path.join(root, spec.folder)
    names = spec.train_files + spec.test_files
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing and download:
        try:
            _download(name, root)
        except Exception:  # no network, a proxy, a full disk: all end in the same advice
            pass
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing and os.path.isfile(os.path.join(root, names[0])):
        raise UserError(f"{root} holds the {spec.title} files themselves: pass the folder above it as --data-root.")
    if missing:
        raise UserError(
            f"{spec.title} is not in {folder} and could not be downloaded: put the official python "
            f"version there ({', '.join(names)}).")
    train = [_read_batch(os.path.join(folder, n), spec.label_key, spec.num_classes) for n in spec.train_files]
    test = [_read_batch(os.path.join(folder, n), spec.label_key, spec.num_classes) for n in spec.test_files]
    train_x, train_y = torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])
    test_x, test_y = torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])
    return train_x, train_y, test_x, test_y


def data_sha256(*arrays):
    """sha256 over the arrays as loaded: the training and test images and labels (load_cifar), then the
    validation file's (load_val_file) when a run has one. The data's identity, whatever folder or
    pickle protocol holds it. A run records it, and a resume on other data is refused (config.with_data)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(array.contiguous().numpy())
    return digest.hexdigest()


def load_val_file(name, path):
    """(images, labels) of a --val-file: one batch file in the data set's official python format."""
    spec = DATASETS[name]
    return _read_batch(path, spec.label_key, spec.num_classes)


def images_in(images, others):
    """How many of `images` (uint8 N x 3 x 32 x 32) also appear, pixel for pixel, among `others`."""
    weights = torch.randint(1, 2 ** 62, (3 * 32 * 32,), generator=torch.Generator().manual_seed(0))

    def hashes(x):  # int64 arithmetic wraps: a 64-bit hash of each image's bytes, in chunks to bound memory
        return torch.cat([(chunk.reshape(len(chunk), -1).long() * weights).sum(1) for chunk in x.split(4096)])
    if len(images) == 0 or len(others) == 0:
        return 0
    image_hashes, other_hashes = hashes(images), hashes(others)
    candidates = torch.isin(image_hashes, other_hashes).nonzero().flatten()
    if len(candidates) == 0:
        return 0
    matching_others = others[torch.isin(other_hashes, image_hashes[candidates])]
    flat_others = {bytes(row.numpy()) for row in matching_others.reshape(len(matching_others), -1)}
    return sum(bytes(images[i].reshape(-1).numpy()) in flat_others for i in candidates.tolist())


def training_files_sha256(name, root):
    """sha256 over the bytes of the data set's training files in `root` (load_cifar has read them):
    what decides its training images, whatever folder they are in."""
    spec = DATASETS[name]
    digest = hashlib.sha256()
    for file in spec.train_files:
        with open(os.path.join(root, spec.folder, file), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def class_balanced_split(labels, size, seed, num_classes):
    """Indices (kept, held_out): `size` images held out, spread over classes round-robin, fixed by seed."""
    if not 0 < size < len(labels):
        raise UserError(f"--val-split {size} must be between 1 and {len(labels) - 1} "
                        f"(the training set has {len(labels)} images).")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    # rank of each image among the shuffled images of its class, so that taking the lowest ranks
    # first takes one image of every class before a second of any
    rank = torch.empty(len(labels), dtype=torch.int64)
    for c in range(num_classes):
        members = order[labels[order] == c]
        rank[members] = torch.arange(len(members))
    key = rank * num_classes + labels
    chosen = torch.argsort(key, stable=True)
    return chosen[size:].sort().values, chosen[:size].sort().values


PADDINGS = ("zeros", "reflect")
PAD = 4                          # pixels added on each side before the random 32 x 32 crop
OFFSETS = 2 * PAD + 1            # crop offsets per axis
VIEWS = OFFSETS * OFFSETS * 2    # every augmented view of an image: (row offset, column offset, flip)


def view_code(dy, dx, flip):
    """The number 0..VIEWS-1 of the view cropped at row offset dy, column offset dx (0..2 PAD), then
    flipped or not: the order of every_view()'s views."""
    return (dy * OFFSETS + dx) * 2 + flip


def pad_images(images, mode):
    """uint8 N x 3 x 32 x 32 padded by PAD pixels: zeros, or 'reflect': the border mirrored without
    repeating the edge, as transforms.Pad(padding_mode='reflect')."""
    return F.pad(images, (PAD,) * 4, mode="constant" if mode == "zeros" else "reflect")


def random_crop_flip(images, generator, mode="zeros"):
    """Per-image random crop of a padded batch (pad_images) and horizontal flip with p = 0.5, uint8 in,
    uint8 out. Returns (crops, views): views[i] is crops[i]'s view_code."""
    n, _, h, w = images.shape
    device = images.device
    padded = pad_images(images, mode)
    offsets = torch.randint(0, OFFSETS, (n, 2), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < 0.5
    rows = offsets[:, :1] + torch.arange(h, device=device)
    cols = offsets[:, 1:] + torch.arange(w, device=device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    crops = padded[torch.arange(n, device=device)[:, None, None, None],
                   torch.arange(3, device=device)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    return crops, view_code(offsets[:, 0], offsets[:, 1], flips.long())


def every_view(images, mode="zeros"):
    """All VIEWS augmented views of each image, N x VIEWS x 3 x 32 x 32 uint8, in view_code order:
    what random_crop_flip can return for it."""
    n, c, h, w = images.shape
    windows = pad_images(images, mode).unfold(2, h, 1).unfold(3, w, 1)  # N x 3 x dy x dx x 32 x 32
    windows = windows.permute(0, 2, 3, 1, 4, 5)
    return torch.stack([windows, windows.flip(-1)], dim=3).reshape(n, VIEWS, c, h, w)


class DeviceLoader:
    """Batches of a uint8 image tensor that lives on the training device.

    Training loaders shuffle and augment every epoch (random_crop_flip, with `padding` 'zeros' or
    'reflect') with their own seeded generator (its state is all a resumed run needs to replay the
    same batches); evaluation loaders do neither.

    Training batches are (images, labels, indices, views, strong): indices are the samples' positions
    in the set (with `negatives` = K > 0, N x (1 + K): column 0 the sample, then K samples of other
    classes drawn uniformly, a contrastive method's negatives); views are the augmentations drawn
    (data.view_code); strong is None, or, when `strong_view` is set, a second view of the same images,
    cropped and flipped anew and then strongly augmented (rand_augment.rand_augment).
    `positions` maps a sample to its position in the data set's training files (they differ when
    --val-split holds images out). Evaluation batches are (images, labels).

    Under torchrun (world_size > 1) batch_size is the global batch: every process draws the same
    permutation and augmentation for the whole global batch and keeps its own contiguous slice, so
    the processes together see exactly the batches of a single-process run. A last batch smaller
    than the number of processes is skipped. Evaluation loaders give each process a contiguous
    shard of the set.
    """

    def __init__(self, images, labels, batch_size, mean, std, train, seed=0, channels_last=False,
                 rank=0, world_size=1, padding="zeros", positions=None, drop_last=False):
        self.images, self.labels, self.padding, self.drop_last = images, labels, padding, drop_last
        self.positions = torch.arange(len(labels), device=labels.device) if positions is None else positions
        self.negatives = 0  # other-class indices per sample: see add_negatives
        self.strong_view = False  # True: batches carry a strongly augmented second view (see _strong_view)
        self.batch_size, self.train = batch_size, train
        self.rank, self.world_size = rank, world_size
        device = images.device
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_t
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _slice(self, n):
        """This process's [lo, hi) of n items."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def __len__(self):
        if not self.train:
            lo, hi = self._slice(len(self.labels))
            return (hi - lo + self.batch_size - 1) // self.batch_size
        full, last = divmod(len(self.labels), self.batch_size)
        return full + (last >= self.world_size and not self.drop_last)

    def unsharded_copy(self):
        """The same loader for one process, with its own generator in this one's state (so using
        it leaves this loader's batches untouched)."""
        copy = DeviceLoader.__new__(DeviceLoader)
        copy.__dict__.update(self.__dict__, rank=0, world_size=1)
        copy.generator = torch.Generator(device=self.images.device)
        copy.generator.set_state(self.generator.get_state())
        return copy

    def normalize(self, images):
        out = images.float() * self.scale + self.shift
        return out.contiguous(memory_format=self.memory_format)

    def __iter__(self):
        n = len(self.labels)
        if not self.train:
            lo, hi = self._slice(n)
            for start in range(lo, hi, self.batch_size):
                end = min(start + self.batch_size, hi)
                yield self.normalize(self.images[start:end]), self.labels[start:end]
            return
        order = torch.randperm(n, generator=self.generator, device=self.images.device)
        for start in range(0, n, self.batch_size):
            index = order[start:start + self.batch_size]
            if len(index) < (self.batch_size if self.drop_last else self.world_size):
                break
            originals = self.images[index]
            batch, views = random_crop_flip(originals, self.generator, self.padding)
            labels = self.labels[index]
            strong = self._strong_view(originals)
            if self.negatives:
                index = torch.cat([index[:, None], self._other_class_samples(index)], dim=1)
            lo, hi = self._slice(len(index))
            yield (self.normalize(batch[lo:hi]), labels[lo:hi], index[lo:hi], views[lo:hi],
                   None if strong is None else self.normalize(strong[lo:hi]))

    def _strong_view(self, originals):
        """The batch's uint8 images cropped and flipped anew (their own draw, as a second torchvision
        pipeline would) and then strongly augmented; None unless `strong_view` is set (and then
        nothing is drawn, so that runs without it keep their batches)."""
        if not self.strong_view:
            return None
        crops, _ = random_crop_flip(originals, self.generator, self.padding)
        return rand_augment(crops, self.generator)

    def add_negatives(self, k):
        """From now on, batches carry k other-class indices per sample (see the class docstring)."""
        self.negatives = k
        self._by_class = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels)
        self._class_start, self._class_count = torch.cumsum(counts, 0) - counts, counts

    def _other_class_samples(self, index):
        """`negatives` random indices per sample, each of a class other than the sample's: a
        position drawn among the n - n_c samples outside class c, stepped over class c's block of
        the class-sorted order."""
        c = self.labels[index]
        start, count = self._class_start[c][:, None], self._class_count[c][:, None]
        outside = len(self.labels) - count
        u = torch.rand(len(index), self.negatives, generator=self.generator, device=index.device)
        position = torch.minimum((u * outside).long(), outside - 1)
        position = position + (position >= start) * count
        return self._by_class[position]


def make_loaders(cfg, device, rank=0, world_size=1):
    """Loads cfg.dataset onto `device` and returns ({'train', 'test'[, 'val']} loaders, num_classes,
    the data's sha256 (data_sha256))."""
    spec = DATASETS[cfg.dataset]
    train_x, train_y, test_x, test_y = load_cifar(cfg.dataset, cfg.data_root)
    sha256 = data_sha256(train_x, train_y, test_x, test_y)
    keep = torch.arange(len(train_y))
    if cfg.val_file:
        val_x, val_y = load_val_file(cfg.dataset, cfg.val_file)
        for images, which in ((train_x, "training"), (test_x, "test")):
            shared = images_in(val_x, images)
            if shared:  # a best epoch chosen on them would be chosen on the images trained on or reported
                raise UserError(f"{shared} of the {len(val_x)} images in --val-file {cfg.val_file} are also "
                                f"{which} images in {cfg.data_root}; validation images must be neither.")
        sha256 = data_sha256(train_x, train_y, test_x, test_y, val_x, val_y)
    elif cfg.val_split:
        keep, held_out = class_balanced_split(train_y, cfg.val_split, cfg.seed, spec.num_classes)
        val_x, val_y = train_x[held_out], train_y[held_out]
        train_x, train_y = train_x[keep], train_y[keep]
    if cfg.drop_last and len(train_y) < cfg.batch_size:
        raise UserError(f"--drop-last leaves no batch: {len(train_y)} training images are fewer than --batch-size "
                        f"{cfg.batch_size}.")
    common = dict(batch_size=cfg.batch_size, mean=spec.mean, std=spec.std, channels_last=cfg.channels_last,
                  rank=rank, world_size=world_size)
    loaders = {"train": DeviceLoader(train_x.to(device), train_y.to(device), train=True, seed=cfg.seed,
                                     padding=cfg.padding, positions=keep.to(device), drop_last=cfg.drop_last,
                                     **common),
               "test": DeviceLoader(test_x.to(device), test_y.to(device), train=False, **common)}
    if cfg.val_file or cfg.val_split:
        loaders["val"] = DeviceLoader(val_x.to(device), val_y.to(device), train=False, **common)
    validation = f"{len(val_y)} validation (from {cfg.val_file})" if cfg.val_file else \
        f"{cfg.val_split} validation"
    log(f"{spec.title} from {cfg.data_root}: {len(train_y)} training, {validation} and {len(test_y)} test "
        f"images on {device}")
    return loaders, spec.num_classes, sha256
