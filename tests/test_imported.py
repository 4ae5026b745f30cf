"""Teachers written by RepDistiller or mdistiller: their keys mapped onto our networks
(models/imported.py), checked against the logits RepDistiller's own code computes
(tests/fixtures/repdistiller_networks.json), and train_kd.py --teacher-arch end to end."""
import json
import os
import pickle

import pytest
import torch

from conftest import ROOT, assert_user_error, run_script
from imported_weights import probe_images, their_state_dict
from models import build_model
from models.imported import to_our_state_dict

with open(os.path.join(ROOT, "tests", "fixtures", "repdistiller_networks.json")) as f:
    FIXTURE = json.load(f)["networks"]


@pytest.mark.parametrize("arch", sorted(FIXTURE))
def test_their_weights_give_their_logits_in_our_network(arch):
    theirs = their_state_dict(FIXTURE[arch]["keys"])
    ours = build_model(arch, 100).double().eval()
    ours.load_state_dict(to_our_state_dict(arch, theirs, ours, "their.pth"), strict=False)
    with torch.no_grad():
        logits = ours(probe_images())
    expected = torch.tensor(FIXTURE[arch]["logits"], dtype=torch.float64)
    torch.testing.assert_close(logits, expected, rtol=1e-7, atol=1e-9)


def write_their_checkpoint(path, arch="resnet20", **extra):
    """A file as RepDistiller's train_teacher.py saves it: epoch, weights, best accuracy, optimizer."""
    model = {k: v.float() if v.is_floating_point() else v for k, v in their_state_dict(FIXTURE[arch]["keys"]).items()}
    torch.save({"epoch": 240, "model": model, "best_acc": torch.tensor(71.25),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.05, "params": [0]}]}, **extra}, path)
    return path


def kd_args(teacher, root, out, *more):
    return ("--teacher", teacher, "--data-root", root, "--output-dir", out, "--method", "st", "--student", "resnet8",
            "--epochs", 1, "--batch-size", 50, *more)


def test_train_kd_converts_their_teacher_once_and_reports_its_accuracy(cifar100_root, tmp_path):
    source = write_their_checkpoint(tmp_path / "ckpt_epoch_240.pth")
    proc = run_script("train_kd.py", *kd_args(source, cifar100_root, tmp_path / "run1", "--teacher-arch",
                                              "resnet20", "--dataset", "cifar100"))
    converted = tmp_path / "ckpt_epoch_240.kdzoo.pt"
    assert f"converted {source}" in proc.stdout and "epoch 240, best_acc 71.25" in proc.stdout
    assert f"teacher resnet20 ({converted}): test top1" in proc.stdout
    ckpt = torch.load(converted, weights_only=True)
    assert (ckpt["arch"], ckpt["dataset"], ckpt["num_classes"]) == ("resnet20", "cifar100", 100)
    # the converted teacher computes what their network computes (fixture logits, float64 -> float32)
    ours = build_model("resnet20", 100).eval()
    ours.load_state_dict(ckpt["model"])
    with torch.no_grad():
        logits = ours(probe_images().float())
    torch.testing.assert_close(logits, torch.tensor(FIXTURE["resnet20"]["logits"], dtype=torch.float32),
                               rtol=1e-4, atol=1e-5)
    assert torch.load(tmp_path / "run1" / "last.pt", weights_only=True)["config"]["teacher"] == str(converted)

    again = run_script("train_kd.py", *kd_args(source, cifar100_root, tmp_path / "run2", "--teacher-arch",
                                               "resnet20", "--dataset", "cifar100"))
    assert "reusing" in again.stdout and f"converted {source}" not in again.stdout
    write_their_checkpoint(source, best_acc=torch.tensor(70.0))  # new contents: converted again
    third = run_script("train_kd.py", *kd_args(source, cifar100_root, tmp_path / "run3", "--teacher-arch",
                                               "resnet20", "--dataset", "cifar100"))
    assert "best_acc 70" in third.stdout
    # the converted file is an ordinary teacher from then on
    run_script("train_kd.py", *kd_args(converted, cifar100_root, tmp_path / "run4"))


class NotWeights:
    pass


@pytest.mark.parametrize("case, fragments", [
    ("no dataset", ["--teacher-arch needs --dataset"]),
    ("wrong arch, fewer blocks", ["has no place in our resnet8", "is --teacher-arch right?"]),
    ("wrong arch, more blocks", ["lacks", "of our resnet32's weights"]),
    ("wrong class count", ["has shape (100, 64)", "expects (10, 64)", "class count"]),
    ("no model entry", ["no 'model' entry"]),
    ("code in the pickle", ["is not a loadable checkpoint"]),
    ("our own checkpoint", ["this project's checkpoint", "drop --teacher-arch"]),
])
def test_a_wrong_import_is_one_sentence_and_writes_nothing(case, fragments, cifar100_root, teacher, tmp_path):
    source = tmp_path / "their.pth"
    arch, dataset = "resnet20", ["--dataset", "cifar100"]
    if case == "no dataset":
        dataset = []
    if case == "wrong arch, fewer blocks":
        arch = "resnet8"
    if case == "wrong arch, more blocks":
        arch = "resnet32"
    if case == "wrong class count":
        dataset = ["--dataset", "cifar10"]
    if case == "no model entry":
        torch.save({"state_dict": {}}, source)
    elif case == "code in the pickle":
        with open(source, "wb") as f:
            pickle.dump({"model": NotWeights()}, f, protocol=2)
    elif case == "our own checkpoint":
        source = teacher
        arch, dataset = "resnet8", ["--dataset", "cifar10"]
    else:
        write_their_checkpoint(source)
    before = set(os.listdir(os.path.dirname(source)))
    proc = run_script("train_kd.py", *kd_args(source, cifar100_root, tmp_path / "run", "--teacher-arch", arch,
                                              *dataset), check=False)
    assert_user_error(proc, *fragments)
    assert set(os.listdir(os.path.dirname(source))) == before and not os.path.exists(tmp_path / "run")
