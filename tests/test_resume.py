"""Runs that survive: exact resume, atomic checkpoints, safe loading, divergence, clear errors."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import DEVICE, EXACT, OFFLINE, ROOT, assert_user_error, make_cifar10, run_script
from engine import checkpoint
from models import build_model
from utils import UserError


def metrics_without_time(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_same_run(a, b):
    """Same metrics (but wall time) and bit-identical weights, optimizer state and generators."""
    assert metrics_without_time(a) == metrics_without_time(b)
    ca, cb = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (a, b))
    for part in ("model", "method"):
        assert ca[part].keys() == cb[part].keys()
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    assert torch.equal(ca["rng"]["data"], cb["rng"]["data"]) and torch.equal(ca["rng"]["torch"], cb["rng"]["torch"])
    momentum_a = [s["momentum_buffer"] for s in ca["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in cb["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))


@pytest.fixture(scope="module")
def bigger_cifar10(tmp_path_factory):
    """1,000 training images, so that an epoch lasts long enough to be interrupted in."""
    return make_cifar10(str(tmp_path_factory.mktemp("cifar10-1k")), per_batch=200)


BASE = ("--model", "resnet8", "--batch-size", 50, "--epochs", 5, "--lr-milestones", 3, "--device", DEVICE, *EXACT)


@pytest.mark.slow
def test_sigterm_then_resume_equals_the_uninterrupted_run(bigger_cifar10, tmp_path):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run_script("train_base.py", "--data-root", bigger_cifar10, "--output-dir", straight, *BASE)

    cmd = [sys.executable, os.path.join(ROOT, "train_base.py"), "--data-root", bigger_cifar10,
           "--output-dir", interrupted, *map(str, BASE)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(interrupted, "metrics.csv")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    done = len(metrics_without_time(interrupted))
    assert 1 <= done < 5  # stopped mid-run, with its completed epochs on disk
    assert torch.load(os.path.join(interrupted, "last.pt"), weights_only=True)["epoch"] == done

    resumed = run_script("train_base.py", "--data-root", bigger_cifar10, "--output-dir", interrupted, *BASE,
                         "--resume", "auto")
    assert f"resumed from {os.path.join(interrupted, 'last.pt')} after epoch {done}" in resumed.stdout
    assert_same_run(straight, interrupted)


# ft: a stage's result; crd: memory banks, Z and the loader's contrastive indices; bss: an epoch
# schedule and an attack that draws from the global generator; reviewkd: learnable fusion blocks and a warm-up;
# simkd: a projector, the teacher's classifier and evaluation through them; mlkd: the strong view's draws.
# st in the default tier, the others (3 to 7 s each) in the slow one
@pytest.mark.parametrize("method", ["st", *(pytest.param(method, marks=pytest.mark.slow)
                                           for method in ("ft", "crd", "bss", "reviewkd", "simkd", "mlkd"))])
def test_kd_resume_equals_the_uninterrupted_run(method, teacher, cifar10_root, tmp_path):
    common = ("--teacher", teacher, "--method", method, "--data-root", cifar10_root,
              "--student", "resnet8", "--batch-size", 32, "--lr-milestones", 2, "--device", DEVICE, *EXACT,
              *{"ft": ("--ft-epochs", 2), "crd": ("--crd-negatives", 16),
                "bss": ("--bss-steps", 2, "--bss-attack-size", 8)}.get(method, ()))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script("train_kd.py", *common, "--epochs", 3, "--output-dir", straight)
    run_script("train_kd.py", *common, "--epochs", 1, "--output-dir", split)
    resumed = run_script("train_kd.py", *common, "--epochs", 3, "--output-dir", split, "--resume",
                         os.path.join(split, "last.pt"))
    assert "note: resuming with --epochs 3 (the run had 1)" in resumed.stdout
    assert "paraphraser" not in resumed.stdout  # the stage's result comes back from last.pt
    assert_same_run(straight, split)


def test_resume_refuses_what_would_change_the_run(cifar10_root, tmp_path):
    out = str(tmp_path / "run")
    common = ("--data-root", cifar10_root, "--output-dir", out, "--batch-size", 32, "--model", "resnet8")
    run_script("train_base.py", *common, "--epochs", 2)
    last = os.path.join(out, "last.pt")
    before = open(last, "rb").read()
    assert_user_error(run_script("train_base.py", *common[:-2], "--model", "resnet14", "--resume", "auto",
                                 check=False), "--model resnet14 differs from resnet8")
    assert_user_error(run_script("train_base.py", *common, "--weight-decay", 0.1, "--resume", "auto",
                                 check=False), "--weight-decay 0.1 differs")
    assert_user_error(run_script("train_base.py", *common, "--epochs", 1, "--resume", "auto", check=False),
                      "--epochs 1 is fewer than the 2 epochs")
    assert_user_error(run_script("train_base.py", *common, "--resume", os.path.join(out, "best.pt"),
                                 check=False), "not a last.pt")
    assert_user_error(run_script("train_kd.py", "--teacher", last, "--method", "st", "--resume", last,
                                 "--data-root", cifar10_root, check=False), "written by train_base.py")
    assert open(last, "rb").read() == before
    nothing_left = run_script("train_base.py", *common, "--epochs", 2, "--resume", "auto")
    assert "nothing to do" in nothing_left.stdout


def test_a_checkpoint_from_before_a_setting_existed_resumes(teacher, cifar10_root, tmp_path):
    out = tmp_path / "run"
    common = ("--teacher", teacher, "--method", "st", "--data-root", cifar10_root, "--student", "resnet8",
              "--batch-size", 40, "--device", DEVICE, "--output-dir", out)
    run_script("train_kd.py", *common, "--epochs", 1)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for key in ("stage_cache", "padding", "drop_last", "eval_every"):  # as written before these existed
        del ckpt["config"][key]
    torch.save(ckpt, out / "last.pt")
    resumed = run_script("train_kd.py", *common, "--epochs", 2, "--resume", "auto")
    assert "resumed from" in resumed.stdout and "after epoch 1" in resumed.stdout
    config = torch.load(out / "last.pt", weights_only=True)["config"]
    assert config["stage_cache"] is None and config["padding"] == "zeros"  # what runs before --padding did
    assert config["drop_last"] is False and config["eval_every"] == 1  # and before --drop-last, --eval-every
    proc = run_script("train_kd.py", *common, "--epochs", 3, "--resume", "auto", "--drop-last", check=False)
    assert_user_error(proc, "--drop-last True differs from False")
    proc = run_script("train_kd.py", *common, "--epochs", 3, "--resume", "auto", "--T", 2, check=False)
    assert_user_error(proc, "--T 2.0 differs from 4.0")
    proc = run_script("train_kd.py", *common, "--epochs", 3, "--resume", "auto", "--ft-k", 1, check=False)
    assert_user_error(proc, "--ft-k belongs to --method ft")


def test_resuming_on_another_device_takes_its_speed_defaults_and_missing_settings(teacher, cifar10_root, tmp_path):
    """A run saved on CUDA (bf16, channels_last) resumed on the CPU takes the CPU's defaults; a
    method setting the saved config lacks (added since) takes the method's default."""
    out = tmp_path / "run"
    common = ("--teacher", teacher, "--method", "st", "--data-root", cifar10_root, "--student", "resnet8",
              "--batch-size", 40, "--output-dir", out)
    run_script("train_kd.py", *common, "--epochs", 1, "--device", "cpu")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["config"].update(device="cuda", amp="bf16", channels_last=True)
    del ckpt["config"]["T"]
    torch.save(ckpt, out / "last.pt")
    run_script("train_kd.py", *common, "--epochs", 2, "--device", "cpu", "--resume", "auto")
    config = torch.load(out / "last.pt", weights_only=True)["config"]
    assert (config["device"], config["amp"], config["channels_last"], config["T"]) == ("cpu", "off", False, 4.0)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoint.save_atomic({"format": checkpoint.CHECKPOINT_FORMAT, "epoch": 1}, path)

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        checkpoint.save_atomic({"format": checkpoint.CHECKPOINT_FORMAT, "epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, cifar10_root):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": RunsCode(marker)}, crafted)
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        checkpoint.load_checkpoint(str(crafted))
    for args in (("train_kd.py", "--teacher", crafted, "--method", "st"),
                 ("train_base.py", "--resume", crafted)):
        proc = run_script(*args, "--data-root", cifar10_root, "--output-dir", tmp_path / "out", check=False)
        assert_user_error(proc, "crafted.pt", "not a loadable checkpoint")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_weights_load_strictly_and_name_the_key():
    model = build_model("resnet8", 10)
    good = build_model("resnet8", 10).state_dict()
    missing = {k: v for k, v in good.items() if k != "fc.bias"}
    with pytest.raises(UserError, match="lacks the weight 'fc.bias'"):
        checkpoint.load_weights(model, missing, "It")
    with pytest.raises(UserError, match="unexpected weight 'module.fc.bias'"):
        checkpoint.load_weights(model, {**good, "module.fc.bias": good["fc.bias"]}, "It")
    with pytest.raises(UserError, match=r"'fc.weight' of shape \(100, 64\), expected \(10, 64\)"):
        checkpoint.load_weights(model, {**good, "fc.weight": torch.zeros(100, 64)}, "It")
    checkpoint.load_weights(model, good, "It")
    assert all(torch.equal(model.state_dict()[k], good[k]) for k in good)


def test_divergence_stops_at_once_without_a_checkpoint(cifar10_root, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", out, "--model", "resnet8",
                      "--batch-size", 32, "--epochs", 2, "--lr", 1e30, check=False)
    assert_user_error(proc, "non-finite in epoch 1 at step", "--lr")
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_saved_keys_carry_no_wrapper_prefix():
    model = build_model("resnet8", 10)
    compiled = torch.compile(model)  # wrapping is lazy: nothing is compiled here
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert checkpoint.unwrap(compiled) is model and checkpoint.unwrap(model) is model


def test_an_epoch_that_ends_non_finite_is_not_saved(cifar10_root, tmp_path):
    """One step per epoch (batch 200 of 200 images), so that the step that breaks the model is an
    epoch's last: its loss, taken before the update, is finite, and only the end of the epoch shows it."""
    out = tmp_path / "run"
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", out, "--model", "resnet8",
                      "--batch-size", 200, "--epochs", 3, "--lr-milestones", 1, "--lr-gamma", 1e30, check=False)
    assert_user_error(proc, "Epoch 2 ended with", "without saving it", "last.pt holds epoch 1")
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 1
    assert len(metrics_without_time(out)) == 1
    assert json.loads((out / "diverged.json").read_text())["epoch"] == 2  # so that a sweep does not retrain it
    resumed = run_script("train_base.py", "--resume", out / "last.pt", check=False)  # a resume tries again
    assert_user_error(resumed, "Epoch 2 ended with")
    assert (out / "diverged.json").exists()


def test_a_kd_run_whose_first_epoch_ends_non_finite_saves_nothing(teacher, cifar10_root, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_kd.py", "--teacher", teacher, "--method", "st", "--data-root", cifar10_root,
                      "--output-dir", out, "--student", "resnet8", "--batch-size", 200, "--epochs", 1,
                      "--kd-weight", 1e30, check=False)
    assert_user_error(proc, "Epoch 1 ended with", "no epoch was saved")
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists() and not (out / "metrics.csv").exists()
    assert json.loads((out / "diverged.json").read_text())["epoch"] == 1


def test_a_non_finite_buffer_is_named():
    from engine.loop import first_non_finite
    from engine.tasks import Supervised
    task = Supervised(build_model("resnet8", 10))
    assert first_non_finite(task, {"test": {"loss": 1.0}, "validation": None}) is None
    assert first_non_finite(task, {"test": {"loss": float("nan")}}) == "a test loss of nan"
    task.student.bn1.running_var[3] = float("inf")
    assert first_non_finite(task, {"test": {"loss": 1.0}}) == "the non-finite weight or buffer 'student.bn1.running_var'"


def test_a_resume_names_the_milestones_it_keeps_and_late_ones(cifar10_root, tmp_path):
    out = tmp_path / "run"
    common = ("--data-root", cifar10_root, "--output-dir", out, "--model", "resnet8", "--batch-size", 40)
    first = run_script("train_base.py", *common, "--epochs", 1, "--lr-milestones", 2, 3)
    assert "the LR milestone(s) [2, 3] are at or past the last epoch (1)" in first.stdout
    resumed = run_script("train_base.py", *common, "--epochs", 2, "--resume", "auto")
    assert "resuming with --epochs 2 (the run had 1); its LR milestones [2, 3] are kept" in resumed.stdout
    assert "the LR milestone(s) [2, 3] are at or past the last epoch (2)" in resumed.stdout


def test_a_setting_resolved_per_pair_is_saved_and_resumes_with_its_value(cifar10_root, tmp_path):
    """dkd's beta for a pair without its own (8): saved resolved, so a resume that types it is the same run;
    a run saved before (None) resumes with the value it trained with too."""
    teacher = tmp_path / "teacher"
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", teacher, "--model", "resnet8",
               "--epochs", 1, "--batch-size", 40)
    out = tmp_path / "dkd"
    common = ("--teacher", teacher / "last.pt", "--method", "dkd", "--data-root", cifar10_root, "--student",
              "resnet8", "--batch-size", 40, "--output-dir", out)
    first = run_script("train_kd.py", *common, "--epochs", 1)
    assert "'dkd_beta': 8.0" in first.stdout
    assert json.load(open(out / "args.json"))["dkd_beta"] == 8.0
    assert torch.load(out / "last.pt", weights_only=True)["config"]["dkd_beta"] == 8.0
    run_script("train_kd.py", *common, "--epochs", 2, "--resume", "auto", "--dkd-beta", 8)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    ckpt["config"]["dkd_beta"] = ckpt["kd"]["dkd_beta"] = None  # as saved before settings were resolved
    torch.save(ckpt, out / "last.pt")
    run_script("train_kd.py", *common, "--epochs", 3, "--resume", "auto", "--dkd-beta", 8)
    assert torch.load(out / "last.pt", weights_only=True)["config"]["dkd_beta"] == 8.0


def test_resume_on_the_same_data_in_another_folder(cifar10_root, tmp_path):
    import shutil
    out, moved = tmp_path / "run", tmp_path / "moved-data"
    shutil.copytree(cifar10_root, moved)
    common = ("--output-dir", out, "--model", "resnet8", "--batch-size", 40)
    run_script("train_base.py", "--data-root", cifar10_root, *common, "--epochs", 1)
    run_script("train_base.py", "--data-root", moved, *common, "--epochs", 2, "--resume", "auto")
    assert len(metrics_without_time(out)) == 2


def test_a_second_process_is_refused_and_a_dead_ones_lock_and_temporaries_are_taken_over(cifar10_root, tmp_path):
    from utils import claimed_output_dir
    out = tmp_path / "run"
    common = ("--data-root", cifar10_root, "--output-dir", out, "--model", "resnet8", "--batch-size", 40)
    run_script("train_base.py", *common, "--epochs", 1)
    before = open(out / "last.pt", "rb").read()
    with claimed_output_dir(str(out), resuming=True):  # another writer holds the folder
        proc = run_script("train_base.py", *common, "--epochs", 2, "--resume", "auto", check=False)
        assert_user_error(proc, "is being written by process", "wait for it to finish")
    assert open(out / "last.pt", "rb").read() == before and not (out / ".lock").exists()
    dead = 2 ** 22 + 1  # above the kernel's largest process id: no process has it
    (out / ".lock").write_text(f"process {dead} on a-host\n")  # the lock file of a process that died
    (out / f"last.pt.tmp{dead}").write_bytes(b"half a checkpoint")
    (out / f"metrics.csv.tmp{os.getppid()}").write_bytes(b"a live process's")  # pytest's parent's: kept
    resumed = run_script("train_base.py", *common, "--epochs", 2, "--resume", "auto")
    assert f"removed {out / f'last.pt.tmp{dead}'}" in resumed.stdout
    assert sorted(os.listdir(out)) == sorted(["args.json", "best.pt", "last.pt", "metrics.csv",
                                              f"metrics.csv.tmp{os.getppid()}"])
