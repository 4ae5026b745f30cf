"""evaluate.py and engine.load_predictor: a checkpoint evaluated on a data set's test split gives what
its run recorded for that epoch (ours, a SimKD student through its predictor, an imported teacher)."""
import csv
import re

import torch

from conftest import DEVICE, run_script
from data import DATASETS, DeviceLoader, load_cifar
from engine import evaluate, load_predictor
from test_imported import write_their_checkpoint


def printed(proc):
    """(top-1, top-5, loss) from evaluate.py's result line."""
    line = next(line for line in proc.stdout.splitlines() if " test images in " in line)
    match = re.search(r"top-1 ([\d.]+) %, top-5 ([\d.]+) %, loss ([\d.]+)", line)
    return tuple(float(x) for x in match.groups())


def recorded(out, epoch):
    with open(out / "metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if int(r["epoch"]) == epoch)
    return float(row["test_top1"]), float(row["test_top5"]), float(row["test_loss"])


def test_evaluate_gives_what_the_run_recorded(teacher, cifar10_root, tmp_path):
    base, simkd = tmp_path / "base", tmp_path / "simkd"
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", base, "--model", "resnet8",
               "--epochs", 2, "--batch-size", 32, "--val-split", 20)
    run_script("train_kd.py", "--teacher", teacher, "--method", "simkd", "--data-root", cifar10_root,
               "--output-dir", simkd, "--student", "resnet8", "--epochs", 1, "--batch-size", 32)
    for out, name in ((base, "last.pt"), (base, "best.pt"), (simkd, "last.pt")):
        ckpt = torch.load(out / name, weights_only=True)
        proc = run_script("evaluate.py", out / name, "--data-root", cifar10_root)
        top1, top5, loss = recorded(out, ckpt["epoch"])
        assert printed(proc) == (round(top1, 2), round(top5, 2), round(loss, 4))
        assert f"recorded by the run after epoch {ckpt['epoch']}: top-1 {top1:.2f} %" in proc.stdout


def test_evaluate_an_imported_teacher(cifar100_root, tmp_path):
    theirs = write_their_checkpoint(tmp_path / "ckpt_epoch_240.pth")
    proc = run_script("evaluate.py", theirs, "--arch", "resnet20", "--dataset", "cifar100", "--data-root",
                      cifar100_root)
    network = load_predictor(str(tmp_path / "ckpt_epoch_240.kdzoo.pt"), DEVICE)
    _, _, images, labels = load_cifar("cifar100", str(cifar100_root), download=False)
    spec = DATASETS["cifar100"]
    expected = evaluate(network, DeviceLoader(images.to(DEVICE), labels.to(DEVICE), 500, spec.mean, spec.std,
                                              train=False))
    assert printed(proc) == (round(expected["top1"], 2), round(expected["top5"], 2), round(expected["loss"], 4))


def test_load_predictor_returns_the_model_in_eval_mode(teacher, cifar10_root):
    """Predictions from the BN running statistics, which predicting leaves as they are."""
    model = load_predictor(str(teacher), DEVICE)
    assert not any(m.training for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32, device=DEVICE))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
