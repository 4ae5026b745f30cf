import numpy as np
import pytest
import torch

from data import DATASETS, DeviceLoader, class_balanced_split, load_cifar, random_crop_flip
from utils import UserError


@pytest.mark.parametrize("name,train,test,classes", [("cifar10", 200, 40, 10), ("cifar100", 200, 100, 100)])
def test_loads_official_layout(name, train, test, classes, cifar10_root, cifar100_root):
    root = cifar10_root if name == "cifar10" else cifar100_root
    train_x, train_y, test_x, test_y = load_cifar(name, root, download=False)
    assert train_x.shape == (train, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (test, 3, 32, 32) and test_y.dtype == torch.int64
    assert set(train_y.tolist()) == set(range(classes))
    assert DATASETS[name].num_classes == classes


def test_pixels_keep_the_official_plane_order(tmp_path):
    """Row of 3072 bytes = R plane, G plane, B plane, each 32x32 row-major."""
    import pickle
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    row = np.arange(3072) % 251
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": np.stack([row, row]).astype(np.uint8), "fine_labels": [3, 99]}, f)
    x, y, _, _ = load_cifar("cifar100", str(tmp_path), download=False)
    assert x[0, 1, 2, 5] == (1024 + 2 * 32 + 5) % 251  # G plane, row 2, column 5
    assert y.tolist() == [3, 99]


def test_missing_data_names_the_folder(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_file_that_would_run_code_is_refused(tmp_path, cifar10_root):
    import os
    import pickle
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(cifar10_root, root)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path}/pwned",))
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(UserError, match="test_batch"):
        load_cifar("cifar10", str(root), download=False)
    assert not (tmp_path / "pwned").exists()


def test_batches_written_with_pickle_protocol_2_load(tmp_path, cifar10_root):
    """Python 3 writing protocol 2 reduces each array's bytes through _codecs.encode: such files
    (which pickle.load(f, encoding="latin1") and torchvision read) load, with the same contents."""
    import pickle
    import shutil
    root = tmp_path / "protocol2"
    shutil.copytree(cifar10_root, root)
    folder = root / "cifar-10-batches-py"
    for name in DATASETS["cifar10"].train_files + DATASETS["cifar10"].test_files:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        entry["data"] = np.ascontiguousarray(entry["data"])
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    assert b"_codecs" in (folder / "test_batch").read_bytes()
    for a, b in zip(load_cifar("cifar10", str(root), download=False),
                    load_cifar("cifar10", cifar10_root, download=False)):
        assert torch.equal(a, b)


def position_images(n):
    """Channel 0 holds row + 1, channel 1 column + 1 (so zero only appears in the padding)."""
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0], images[:, 1], images[:, 2] = rows, rows.t(), 255
    return images


def offsets_and_flips(crops):
    """Recovers each crop's (row offset, column offset) in 0..8 and its flip from position_images."""
    centre_row = crops[:, 0, 16, 16].long() - 1          # = dy + 16 - 4
    cols = crops[:, 1, 16].long()
    flipped = cols[:, 17] < cols[:, 16]
    # column of crop position 16: dx + 12 unflipped; flipped, position 16 shows column dx + 31 - 16 - 4
    dx = torch.where(flipped, crops[:, 1, 16, 16].long() - 1 - 11, crops[:, 1, 16, 16].long() - 1 - 12)
    return torch.stack([centre_row - 12, dx], 1), flipped


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_offsets_and_flips_are_uniform_and_independent(mode):
    gen = torch.Generator().manual_seed(0)
    crops, _ = random_crop_flip(position_images(18_000), gen, mode=mode)
    assert crops.shape == (18_000, 3, 32, 32) and crops.dtype == torch.uint8
    offsets, flips = offsets_and_flips(crops)
    assert offsets.min() == 0 and offsets.max() == 8
    for axis in (0, 1):
        freq = torch.bincount(offsets[:, axis], minlength=9).float() / len(offsets)
        assert torch.allclose(freq, torch.full((9,), 1 / 9), atol=0.012), freq
    assert abs(flips.float().mean() - 0.5) < 0.015
    # independence: the joint of (dy, dx, flip) is close to the product of the marginals
    joint = torch.bincount(offsets[:, 0] * 18 + offsets[:, 1] * 2 + flips.long(), minlength=162).float()
    assert joint.min() > 0.5 * len(offsets) / 162 and joint.max() < 1.5 * len(offsets) / 162


def test_padding_is_zero_in_pixel_space_and_images_differ_in_a_batch():
    gen = torch.Generator().manual_seed(1)
    crops, _ = random_crop_flip(position_images(64), gen)
    offsets, flips = offsets_and_flips(crops)
    assert len({tuple(o) for o in offsets.tolist()}) > 20 and 0 < flips.sum() < 64
    for crop, (dy, dx), flip in zip(crops, offsets.tolist(), flips.tolist()):
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[max(0, 4 - dy):min(32, 36 - dy), max(0, 4 - dx):min(32, 36 - dx)] = True
        if flip:
            inside = inside.flip(1)
        assert (crop[:, ~inside] == 0).all()      # padding: exactly zero in every channel
        assert (crop[2, inside] == 255).all()     # image: untouched


def test_reflection_padding_mirrors_the_border_without_repeating_the_edge():
    """Mode 'reflect' (the seed zoo's transforms.Pad(4, padding_mode='reflect')): padded row -k
    shows image row k, padded row 31 + k shows row 31 - k; the crop offsets and flips keep their
    meaning."""
    gen = torch.Generator().manual_seed(1)
    crops, _ = random_crop_flip(position_images(64), gen, mode="reflect")
    offsets, flips = offsets_and_flips(crops)
    assert len({tuple(o) for o in offsets.tolist()}) > 20 and 0 < flips.sum() < 64

    def reflect(i):
        return torch.where(i < 0, -i, torch.where(i > 31, 62 - i, i))
    positions = torch.arange(32)
    for crop, (dy, dx), flip in zip(crops, offsets.tolist(), flips.tolist()):
        rows, cols = reflect(positions + dy - 4) + 1, reflect(positions + dx - 4) + 1
        if flip:
            cols = cols.flip(0)
        assert torch.equal(crop[0].long(), rows[:, None].expand(32, 32))
        assert torch.equal(crop[1].long(), cols[None, :].expand(32, 32))
        assert (crop[2] == 255).all()  # no zero anywhere: every pixel comes from the image


def test_the_training_loader_pads_as_told():
    images, labels = position_images(64), torch.arange(64) % 10
    for padding, zeros_appear in (("zeros", True), ("reflect", False)):
        loader = DeviceLoader(images, labels, 64, (0.0, 0.0, 0.0), (1 / 255,) * 3, train=True, padding=padding)
        batch = next(iter(loader))[0]  # normalised to the pixel values themselves
        assert bool((batch[:, 2] == 0).any()) == zeros_appear, padding


def test_training_loader_is_seeded_and_normalises():
    images, labels = position_images(100), torch.arange(100) % 10
    mean, std = DATASETS["cifar10"].mean, DATASETS["cifar10"].std

    def epoch(seed):
        loader = DeviceLoader(images, labels, 32, mean, std, train=True, seed=seed)
        return [(x.clone(), y.clone()) for x, y, *_ in loader]
    a, b, c = epoch(0), epoch(0), epoch(1)
    assert [len(y) for _, y in a] == [32, 32, 32, 4]
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(labels.tolist())
    # padding (pixel 0) normalises to -mean/std per channel
    x = a[0][0]
    zero_level = torch.tensor([-m / s for m, s in zip(mean, std)])
    assert torch.isclose(x.amin((0, 2, 3)), zero_level, atol=1e-5).all()


def test_drop_last_leaves_out_the_smaller_last_batch():
    """--drop-last: 100 images in batches of 32 give 3 full batches, a different 4 left out each
    epoch; the full batches are those the loader draws without it."""
    images, labels = position_images(100), torch.arange(100) % 10
    mean, std = DATASETS["cifar10"].mean, DATASETS["cifar10"].std
    kept = DeviceLoader(images, labels, 32, mean, std, train=True, seed=0)
    dropped = DeviceLoader(images, labels, 32, mean, std, train=True, seed=0, drop_last=True)
    assert (len(kept), len(dropped)) == (4, 3)
    first, second = list(dropped), list(dropped)
    assert [len(batch[1]) for batch in first + second] == [32] * 6
    assert all(torch.equal(a[2], b[2]) for a, b in zip(first, list(kept)))  # the same samples, in the same order
    left_out = [set(range(100)) - set(torch.cat([batch[2] for batch in epoch]).tolist()) for epoch in (first, second)]
    assert [len(out) for out in left_out] == [4, 4] and left_out[0] != left_out[1]


def test_evaluation_loader_is_not_augmented():
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(70) % 10
    mean, std = DATASETS["cifar100"].mean, DATASETS["cifar100"].std
    loader = DeviceLoader(images, labels, 32, mean, std, train=False)
    x = torch.cat([b for b, _ in loader])
    y = torch.cat([t for _, t in loader])
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(y, labels)
    assert torch.allclose(x, expected, atol=1e-5)


def test_val_split_is_class_balanced_disjoint_and_seeded():
    labels = torch.arange(1000) % 10
    keep, held = class_balanced_split(labels, 95, seed=3, num_classes=10)
    assert len(keep) == 905 and len(held) == 95
    assert not set(keep.tolist()) & set(held.tolist())
    counts = torch.bincount(labels[held], minlength=10)
    assert counts.max() - counts.min() <= 1
    again, _ = class_balanced_split(labels, 95, seed=3, num_classes=10)
    other, _ = class_balanced_split(labels, 95, seed=4, num_classes=10)
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    with pytest.raises(UserError, match="--val-split"):
        class_balanced_split(labels, 1000, seed=0, num_classes=10)


def test_training_batches_carry_indices_and_other_class_negatives():
    images, labels = position_images(100), torch.arange(100) % 7  # uneven classes: 15 or 14 images each
    mean, std = DATASETS["cifar10"].mean, DATASETS["cifar10"].std
    loader = DeviceLoader(images, labels, 32, mean, std, train=True, seed=0)
    plain = [(y.clone(), i.clone()) for _, y, i, _, _ in loader]
    seen = torch.cat([i for _, i in plain])
    assert sorted(seen.tolist()) == list(range(100))  # every sample once per epoch, by its index
    assert all(torch.equal(labels[i], y) for y, i in plain)

    loader.add_negatives(50)
    drawn = []
    for _, y, i, _, _ in loader:
        assert i.shape == (len(y), 51) and torch.equal(labels[i[:, 0]], y)
        assert (labels[i[:, 1:]] != y[:, None]).all()  # never the sample's own class
        drawn.append(i[:, 1:])
    counts = torch.bincount(torch.cat(drawn).flatten(), minlength=100)
    assert (counts > 0).all()  # uniform over the other classes: all 100 samples get drawn in 5,000 draws

    def negatives(seed):
        again = DeviceLoader(images, labels, 32, mean, std, train=True, seed=seed)
        again.add_negatives(50)
        return torch.cat([i for _, _, i, _, _ in again])
    assert torch.equal(negatives(3), negatives(3)) and not torch.equal(negatives(3), negatives(4))


def test_normalisation_is_the_recipes_sources():
    """CIFAR-100 as RepDistiller normalises it (dataset/cifar100.py L57, L61; mdistiller's L123, L134), the
    constants the community's CIFAR-100 teachers were trained with; CIFAR-10 as the seed zoo's train_base.py."""
    assert (DATASETS["cifar100"].mean, DATASETS["cifar100"].std) == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    assert (DATASETS["cifar10"].mean, DATASETS["cifar10"].std) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
