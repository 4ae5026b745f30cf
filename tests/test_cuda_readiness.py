"""What the CUDA path needs that the CPU can check: refusals, the random generators a resume
restores, the process group's settings, no host synchronisation in the losses, compiled paths."""
import datetime
import os

import pytest
import torch

import config
from conftest import DEVICE, assert_user_error, run_script
from data import DATASETS, DeviceLoader
from engine import Distiller, Teacher, processes
from engine.checkpoint import generator_states, restore_generators
from kd_losses import METHODS, build_method, default_hyperparameters
from models import build_model
from utils import UserError


def resolve(*argv):
    return config.resolve(config.get_args_parser("kd").parse_args([str(a) for a in argv]), "kd")


@pytest.mark.parametrize("method", ["sobolev", "lwm"])
def test_sync_bn_is_refused_for_a_double_backward(method, teacher):
    with pytest.raises(UserError, match=f"--sync-bn cannot run --method {method}: .*SyncBatchNorm"):
        resolve("--teacher", teacher, "--method", method, "--sync-bn")
    assert METHODS[method].double_backward
    assert [m for m, cls in METHODS.items() if cls.double_backward] == ["sobolev", "lwm"]


def test_methods_that_run_the_teacher_themselves_do_not_read_its_outputs(monkeypatch):
    """Sobolev and LwM run the teacher with autograd in their own step: a pass under inference mode
    first would be thrown away. DML reads its peer instead."""
    assert [m for m, cls in METHODS.items() if not cls.reads_teacher] == ["sobolev", "lwm", "dml"]
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), Teacher(build_model("resnet8", 10))
    calls = []
    monkeypatch.setattr(teacher, "outputs", lambda *args: calls.append(args) or {})
    labels = torch.arange(8) % 10
    for name in ("sobolev", "lwm"):
        task = Distiller(student, teacher, build_method(name, {}, student, teacher, labels), 1.0, 1.0)
        _, terms = task(torch.randn(8, 3, 32, 32), labels, torch.arange(8), torch.zeros(8, dtype=torch.long))
        assert torch.isfinite(terms["kd"])
    assert calls == []


def loader(seed=0):
    spec = DATASETS["cifar10"]
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return DeviceLoader(images, torch.arange(64) % 10, 16, spec.mean, spec.std, train=True, seed=seed)


def test_generators_round_trip_and_only_the_training_device_is_saved():
    first = loader()
    next(iter(first))
    torch.manual_seed(5)
    states = generator_states(first)
    assert set(states) == {"torch", "data"}  # the CPU: no CUDA state of any GPU, no per-process list
    expected_batch, expected_draw = next(iter(first))[0], torch.rand(3)
    second = loader(seed=99)
    restore_generators(states, second)
    assert torch.equal(next(iter(second))[0], expected_batch) and torch.equal(torch.rand(3), expected_draw)


def test_a_run_saved_on_another_kind_of_device_continues_from_a_derived_seed(capsys):
    """A CUDA generator's state (16 bytes) cannot go into a CPU generator (5,056) or back: the data
    generator is reseeded from it instead, the same way every time, and a note says so."""
    states = generator_states(loader())
    states["data"] = torch.arange(16, dtype=torch.uint8)  # as a CUDA generator's state looks
    batches = []
    for _ in range(2):
        resumed = loader(seed=7)
        restore_generators(states, resumed)
        batches.append(next(iter(resumed))[0])
    assert torch.equal(batches[0], batches[1])
    assert not torch.equal(batches[0], next(iter(loader(seed=7)))[0])
    assert "saved on another kind of device" in capsys.readouterr().out


def test_process_group_waits_long_enough_for_a_stage_and_binds_the_device(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(processes.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(processes.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(processes.dist, "get_rank", lambda: 0)
    processes.setup_device("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"] >= datetime.timedelta(hours=1)


def test_more_processes_than_gpus_is_one_sentence(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"more processes on this node than it has GPUs \(2\).*--nproc_per_node 2"):
        processes.setup_device("cuda")


def test_rkd_normalises_distances_without_boolean_indexing():
    """The off-diagonal mean as sum / (n (n - 1)): no data-dependent shape, so no host sync."""
    from kd_losses.rkd import normalized_distances
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = torch.cdist(x, x)
    expected = d / d[~torch.eye(6, dtype=torch.bool)].mean()
    assert torch.allclose(normalized_distances(x), expected, rtol=1e-6, atol=1e-6)
    assert (normalized_distances(x).diagonal() == 0).all()


def test_zero_kd_weight_step_is_compiled_too():
    """AB and FSP train with KD weight 0 after their stage: --compile must reach that step as well."""
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), Teacher(build_model("resnet8", 10))
    method = build_method("ab", default_hyperparameters("ab"), student, teacher, torch.arange(8) % 10)
    task = Distiller(student, teacher, method, 1.0, 0.0)
    eager = task.baseline_loss
    task.compile_steps(torch.device("cpu"))
    assert task.baseline_loss is not eager and hasattr(task.baseline_loss, "_torchdynamo_orig_callable")
    images, targets = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    logits, terms = task(images, targets, torch.arange(8), torch.zeros(8, dtype=torch.long))
    assert set(terms) == {"ce"} and torch.allclose(logits, eager(images, targets)[0], atol=1e-4)


def test_deterministic_runs_and_is_switched_off_again(teacher, cifar10_root, tmp_path):
    common = ("--teacher", teacher, "--student", "resnet8", "--data-root", cifar10_root, "--epochs", 1,
              "--batch-size", 40, "--device", DEVICE)
    for method in ("st", "crd"):
        extra = ("--crd-negatives", 16) if method == "crd" else ()
        run_script("train_kd.py", *common, "--method", method, "--deterministic", *extra,
                   "--output-dir", tmp_path / method)
        assert torch.are_deterministic_algorithms_enabled()
    run_script("train_kd.py", *common, "--method", "st", "--output-dir", tmp_path / "fast")
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    saved = torch.load(tmp_path / "st" / "last.pt", weights_only=True)
    assert saved["config"]["deterministic"] is True
    proc = run_script("train_kd.py", *common, "--method", "sobolev", "--sync-bn", "--output-dir",
                      tmp_path / "sync", check=False)
    assert_user_error(proc, "--sync-bn cannot run --method sobolev")
    assert not os.path.exists(tmp_path / "sync")
