"""Fixtures: tiny CIFAR-10 and CIFAR-100 folders in the official python layout, written to a
temporary directory (no network, no ../shared), and helpers to run the scripts as a user would."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_batch(path, images, labels, label_key):
    with open(path, "wb") as f:
        pickle.dump({"data": images.reshape(len(images), -1), label_key: [int(x) for x in labels],
                     "batch_label": "synthetic"}, f)


def class_images(labels, rng):
    """Images a small net can learn: a class-dependent colour plus noise, uint8 N x 3 x 32 x 32."""
    colours = np.random.default_rng(1234).integers(0, 256, size=(int(labels.max()) + 1, 3))
    noise = rng.integers(-40, 41, size=(len(labels), 3, 32, 32))
    return np.clip(colours[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)


def make_cifar10(root, per_batch=40, test=40):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        labels = np.arange(per_batch) % 10
        _write_batch(os.path.join(folder, f"data_batch_{i}"), class_images(labels, rng), labels, "labels")
    labels = rng.permutation(np.arange(test) % 10)
    _write_batch(os.path.join(folder, "test_batch"), class_images(labels, rng), labels, "labels")
    return root


def make_cifar100(root, train=200, test=100):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    rng = np.random.default_rng(1)
    for name, n in (("train", train), ("test", test)):
        labels = rng.permutation(np.arange(n) % 100)
        _write_batch(os.path.join(folder, name), class_images(labels, rng), labels, "fine_labels")
    return root


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    return make_cifar10(str(tmp_path_factory.mktemp("cifar10")))


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory):
    return make_cifar100(str(tmp_path_factory.mktemp("cifar100")))


# no network for the scripts under test: any download attempt fails at once on a closed local port
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


def run_script(script, *args, check=True):
    """Runs `python script args` from the repo root; returns the CompletedProcess."""
    env = {**os.environ, **OFFLINE}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_user_error(proc, *fragments):
    """A user's mistake: non-zero exit, one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 or lines[0].startswith("usage:"), proc.stderr
    message = lines[-1]
    assert "error:" in message, proc.stderr
    for fragment in fragments:
        assert fragment in message, message


TINY = ("--epochs", 2, "--batch-size", 32, "--model", "resnet8", "--device", "cpu")
