"""Fixtures: tiny CIFAR-10 and CIFAR-100 folders in the official python layout, written to a
temporary directory (no network, no ../shared), and helpers to run the scripts as a user would."""
import contextlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kd_losses import METHODS  # noqa: E402
from utils import run_main  # noqa: E402

# the device the scripts run on in the tests: KDZOO_TEST_DEVICE=cuda python -m pytest -q tests runs the
# suite on a GPU (a run that names no --device gets this one)
DEVICE = os.environ.get("KDZOO_TEST_DEVICE", "cpu")
SCRIPTS_WITH_DEVICE = ("train_base.py", "train_kd.py", "evaluate.py")
# runs that must be bit for bit equal: on CUDA that needs deterministic algorithms (cuDNN's fastest
# are not), on the CPU it holds as is
EXACT = ("--deterministic",) if DEVICE == "cuda" else ()
# older PyTorch reads this once, at the first cuBLAS call, which an earlier in-process run may make
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


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


@contextlib.contextmanager
def offline_environment():
    saved = dict(os.environ)
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_script(script, *args, check=True, subprocess_=False):
    """Runs `python script args` as a user would and returns a CompletedProcess (exit code, stdout,
    stderr). By default in this process, through the script's main(argv) and utils.run_main (the
    same code path, without the start-up cost of a new interpreter); subprocess_=True starts a real
    one, for what only a process shows."""
    argv = [str(a) for a in args]
    if script in SCRIPTS_WITH_DEVICE and "--device" not in argv:
        argv += ["--device", DEVICE]
    if subprocess_:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT,
                              env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    else:
        module = importlib.import_module(script[:-len(".py")])
        out, err, code = io.StringIO(), io.StringIO(), 0
        with offline_environment(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_main(module.main, argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        proc = subprocess.CompletedProcess([script, *argv], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_teacher(root, out, model):
    """A teacher checkpoint: one epoch on the tiny CIFAR-10; returns its last.pt."""
    run_script("train_base.py", "--data-root", root, "--output-dir", out, "--model", model, "--epochs", 1,
               "--batch-size", 40, "--device", DEVICE)
    return out / "last.pt"


@pytest.fixture(scope="session")
def teacher(cifar10_root, tmp_path_factory):
    """One resnet8 teacher for every KD test that needs no other."""
    return train_teacher(cifar10_root, tmp_path_factory.mktemp("teacher") / "run", "resnet8")


def small_method_flags(method):
    """A one-epoch stage for the methods that have one, and a few CRD negatives: a method's tiny run."""
    stage = [x for key in METHODS[method].hyperparameters if key.endswith("_epochs")
             for x in (f"--{key.replace('_', '-')}", 1)]
    return (*stage, *(("--crd-negatives", 16) if method == "crd" else ()))


def resolved_settings(method, teacher, student, **typed):
    """A method's settings as config.resolve gives them to a new run on the pair: typed, else its
    defaults for the pair; its hyper-parameters, KD and CE weights."""
    import config
    values = {"method": method, "teacher_arch": teacher, "model": student, "dataset": "cifar100", "kd_weight": None}
    return config.method_values(values, typed, new_run=True)


def load_make_docs():
    """docs/make_docs.py as a module (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_docs", os.path.join(ROOT, "docs", "make_docs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


TINY = ("--epochs", 2, "--batch-size", 32, "--model", "resnet8", "--device", DEVICE)
