"""torchrun on the CPU (gloo): the same runs, batches, gradients and accuracy as one process."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE, ROOT, run_script

pytestmark = pytest.mark.slow  # torchrun starts real processes


def torchrun(*args, nproc=2, check=True):
    """`torchrun --standalone --nproc_per_node N ...`, through the interpreter so PATH does not matter."""
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert not check or proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_both_scripts_run_under_torchrun(cifar10_root, tmp_path):
    teacher = tmp_path / "teacher"
    # gloo on the CPU, on any machine (NCCL on GPUs: tests/test_cuda.py)
    proc = torchrun("train_base.py", "--device", "cpu", "--data-root", cifar10_root, "--output-dir", teacher,
                    "--model", "resnet8", "--epochs", 1, "--batch-size", 40)
    assert "identical on all 2 processes" in proc.stdout and proc.stdout.count("epoch   1/1") == 1
    for method in ("st", "ft"):
        out = tmp_path / method
        proc = torchrun("train_kd.py", "--device", "cpu", "--teacher", teacher / "last.pt", "--method", method,
                        "--student", "resnet8", "--data-root", cifar10_root, "--output-dir", out, "--epochs", 1,
                        "--batch-size", 40, *(("--ft-epochs", 1) if method == "ft" else ()))
        assert "identical on all 2 processes" in proc.stdout
        ckpt = torch.load(out / "last.pt", weights_only=True)
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
        assert len(open(out / "metrics.csv").readlines()) == 2  # header + one epoch, written once
    # the teacher cache: process 0 builds it, both read it, and the run ends where the uncached one did
    out = tmp_path / "st-cached"
    proc = torchrun("train_kd.py", "--device", "cpu", "--teacher", teacher / "last.pt", "--method", "st",
                    "--student", "resnet8", "--data-root", cifar10_root, "--output-dir", out, "--epochs", 1,
                    "--batch-size", 40, "--teacher-cache", "on", "--teacher-cache-dir", tmp_path / "caches")
    assert proc.stdout.count("teacher cache: building") == 1 and "identical on all 2 processes" in proc.stdout
    cached, plain = (torch.load(tmp_path / run / "last.pt", weights_only=True)["model"] for run in ("st-cached", "st"))
    for name, weight in plain.items():
        assert torch.allclose(cached[name].double(), weight.double(), rtol=1e-5, atol=1e-7), name
    # a checkpoint written under torchrun is an ordinary teacher for a single process
    run_script("train_kd.py", "--teacher", tmp_path / "st" / "last.pt", "--method", "st", "--student",
               "resnet8", "--data-root", cifar10_root, "--output-dir", tmp_path / "single", "--epochs", 1)


def worker(what, out, nproc):
    return torchrun(os.path.join(ROOT, "tests", "ddp_worker.py"), what, out, nproc=nproc) and torch.load(
        out, weights_only=True)


def test_first_step_gradient_matches_one_process(tmp_path):
    """With the model in eval mode, BN uses its running statistics, so every image's loss is
    independent of the others in its batch; the mean over the global batch is then the average of
    the two processes' means (equal halves), and DDP's averaged gradient must equal the gradient of
    one process on the whole batch. In training mode BN would normalise each half with its own
    statistics and the gradients would differ (use --sync-bn on CUDA for that); that is expected."""
    one = worker("first_step", tmp_path / "one.pt", 1)
    two = worker("first_step", tmp_path / "two.pt", 2)
    assert torch.equal(one["labels"], two["labels"])  # the processes' halves make up the global batch
    assert torch.equal(one["images"][:8], two["images"])  # rank 0's half, augmented identically
    for name, grad in one["grads"].items():
        other = two["grads"]["module." + name]
        assert torch.allclose(grad, other, rtol=1e-4, atol=1e-6), name


def test_evaluation_over_uneven_shards_is_exact(tmp_path):
    one = worker("evaluation", tmp_path / "one.pt", 1)
    two = worker("evaluation", tmp_path / "two.pt", 2)
    assert two["top1"] == one["top1"] and two["top5"] == one["top5"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_crd_under_torchrun_equals_one_process(tmp_path):
    """CRD's processes gather each other's indices and embeddings and update their memory banks, and
    estimate Z, from the whole global batch; the loader gives each process the negatives a single
    process draws for its samples. So two processes on equal slices (BN in eval mode, as above) train
    as one process does: the same losses, weights, banks and Z. A global batch split unevenly (3 + 4)
    still gives the same banks, Z and size-weighted loss."""
    one = worker("crd", tmp_path / "one.pt", 1)
    two = worker("crd", tmp_path / "two.pt", 2)
    assert torch.allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(two["fresh_loss"], one["fresh_loss"], rtol=1e-5, atol=1e-6)
    for part in ("trained", "fresh"):
        assert one[part].keys() == two[part].keys()
        for name, value in one[part].items():
            other = two[part][name]
            same = (torch.allclose(other, value, rtol=1e-5, atol=1e-6) if value.is_floating_point()
                    else torch.equal(other, value))
            assert same, (part, name)
    assert one["trained"]["method.z_estimated"] and one["fresh"]["z_estimated"]


def test_every_process_resumes_its_own_random_generators(tmp_path):
    """Only rank 0 writes last.pt, so it holds every process's generator states, gathered; each
    process then restores its own (BSS's attack draws differ per process)."""
    result = worker("generators", tmp_path / "two.pt", 2)
    assert result["saved"] == 2 and result["same_on_every_process"]
    assert not torch.equal(result["drawn"][0], result["drawn"][1])
