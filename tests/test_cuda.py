"""The CUDA path: skipped without a GPU. benchmarks/gpu_check.sh runs these with the whole suite
on CUDA (KDZOO_TEST_DEVICE=cuda) on a GPU machine."""
import csv
import itertools
import warnings

import pytest
import torch

from conftest import run_script, small_method_flags, train_teacher
from data import DATASETS, DeviceLoader
from engine import Distiller, Teacher, build_optimizer, train_step
from kd_losses import METHODS, build_method, default_hyperparameters
from models import build_model
from test_distributed import torchrun
from test_fast_path import assert_close_run
from test_resume import assert_same_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# BSS chooses and attacks a data-dependent number of samples per step, and MLKD's strong view groups the
# batch by augmentation (rand_augment reads how many images take each op): they synchronise by design
SYNCS_BY_DESIGN = ("bss", "mlkd")


@pytest.fixture(scope="module")
def cuda_teacher(cifar10_root, tmp_path_factory):
    return train_teacher(cifar10_root, tmp_path_factory.mktemp("cuda-teacher") / "run", "resnet8")


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_an_epoch_with_a_partial_last_batch(method, compile_, cuda_teacher, cifar10_root,
                                                                tmp_path):
    # 200 training images in batches of 64: three full batches and a last one of 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proc = run_script("train_kd.py", "--teacher", cuda_teacher, "--method", method, "--student", "resnet8",
                          "--data-root", cifar10_root, "--output-dir", tmp_path / "run", "--epochs", 2,
                          "--batch-size", 64, "--device", "cuda", *(("--compile",) if compile_ else ()),
                          *small_method_flags(method))
    assert "epoch   2/2" in proc.stdout and "done: last epoch" in proc.stdout and "nan" not in proc.stdout.lower()
    # CUDA graphs warn when a graph is replayed while a backward of an earlier replay is pending
    assert not [w for w in caught if "pending" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("method", [m for m in METHODS if m not in SYNCS_BY_DESIGN])
def test_training_steps_make_no_host_synchronisation(method):
    """Steps 2 to 49 (the first warms up; the loop looks at the loss at step 50) under
    torch.cuda.set_sync_debug_mode('error'): any copy to the host or wait on it raises."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    spec = DATASETS["cifar10"]
    labels = (torch.arange(512) % 10).to(device)
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, device=device)
    student = build_model("resnet8", 10).to(device, memory_format=torch.channels_last)
    teacher = Teacher(build_model("resnet14", 10).to(device), torch.channels_last, amp=True)
    method_ = build_method(method, default_hyperparameters(method), student, teacher, labels).to(device)
    loader = DeviceLoader(images, labels, 32, spec.mean, spec.std, train=True, channels_last=True)
    if method_.negatives_per_sample:
        loader.add_negatives(16)
    task = Distiller(student, teacher, method_, 1.0, 1.0).train()
    optimizer, _ = build_optimizer(task, type("Cfg", (), dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4,
                                                              lr_milestones=[1], lr_gamma=0.1)))
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # 16 batches an epoch, epoch after epoch
    try:
        for step in range(1, 50):
            torch.cuda.set_sync_debug_mode("error" if step >= 2 else 0)
            _, loss, _ = train_step(task, optimizer, next(batches), amp=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


def test_fast_path_matches_fp32_eager_on_cuda(cuda_teacher, cifar10_root, tmp_path):
    runs = []
    for name, speed in (("eager", ("--amp", "off", "--no-channels-last")), ("fast", ("--compile",))):
        out = tmp_path / name
        run_script("train_kd.py", "--teacher", cuda_teacher, "--method", "at", "--student", "resnet8", "--data-root",
                   cifar10_root, "--output-dir", out, "--epochs", 1, "--batch-size", 40, "--lr", 0.02,
                   "--device", "cuda", *speed)
        with open(out / "metrics.csv") as f:
            (row,) = csv.DictReader(f)
        runs.append(({k: float(v) for k, v in row.items()}, torch.load(out / "last.pt", weights_only=True)["model"]))
    assert_close_run(runs[0], runs[1], loss_rtol=5e-2, weight_rtol=5e-2)  # bf16 on the fast path


@pytest.mark.parametrize("method", ["st", "bss", "crd"])
def test_deterministic_resume_is_bit_exact_on_cuda(method, cuda_teacher, cifar10_root, tmp_path):
    common = ("--teacher", cuda_teacher, "--method", method, "--student", "resnet8", "--data-root", cifar10_root,
              "--batch-size", 32, "--lr-milestones", 2, "--device", "cuda", "--deterministic",
              *small_method_flags(method))
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_script("train_kd.py", *common, "--epochs", 3, "--output-dir", straight)
    run_script("train_kd.py", *common, "--epochs", 1, "--output-dir", split)
    run_script("train_kd.py", *common, "--epochs", 3, "--output-dir", split, "--resume", "auto")
    assert_same_run(str(straight), str(split))


def test_a_cpu_run_resumes_on_cuda(cuda_teacher, cifar10_root, tmp_path):
    common = ("--teacher", cuda_teacher, "--method", "st", "--student", "resnet8", "--data-root", cifar10_root,
              "--batch-size", 40, "--output-dir", tmp_path / "run")
    run_script("train_kd.py", *common, "--epochs", 1, "--device", "cpu")
    proc = run_script("train_kd.py", *common, "--epochs", 2, "--device", "cuda", "--resume", "auto")
    assert "saved on another kind of device" in proc.stdout and "after epoch 1" in proc.stdout
    back = run_script("train_kd.py", *common, "--epochs", 3, "--device", "cpu", "--resume", "auto")
    assert "saved on another kind of device" in back.stdout


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("method,extra", [("st", ("--compile",)), ("st", ("--sync-bn",)), ("ab", ("--sync-bn",)),
                                          ("ab", ("--compile", "--sync-bn"))])
def test_nccl_torchrun(method, extra, cuda_teacher, cifar10_root, tmp_path):
    proc = torchrun("train_kd.py", "--teacher", cuda_teacher, "--method", method, "--student", "resnet8",
                    "--data-root", cifar10_root, "--output-dir", tmp_path / "run", "--epochs", 1, "--batch-size", 40,
                    "--device", "cuda", *extra, *small_method_flags(method))
    assert "identical on all 2 processes" in proc.stdout
    assert "pending, uninvoked backwards" not in proc.stdout + proc.stderr


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_nccl_torchrun_refuses_sync_bn_with_a_double_backward(cuda_teacher, cifar10_root, tmp_path):
    proc = torchrun("train_kd.py", "--teacher", cuda_teacher, "--method", "sobolev", "--student", "resnet8",
                    "--data-root", cifar10_root, "--output-dir", tmp_path / "run", "--epochs", 1, "--device", "cuda",
                    "--sync-bn", check=False)
    assert proc.returncode != 0 and "--sync-bn cannot run --method sobolev" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_more_processes_than_gpus_is_one_sentence(cuda_teacher, cifar10_root, tmp_path):
    proc = torchrun("train_kd.py", "--teacher", cuda_teacher, "--method", "st", "--student", "resnet8",
                    "--data-root", cifar10_root, "--output-dir", tmp_path / "run", "--epochs", 1, "--device", "cuda",
                    nproc=GPUS + 1, check=False)
    assert proc.returncode != 0 and "more processes on this node than it has GPUs" in proc.stderr
    assert "invalid device ordinal" not in proc.stderr
