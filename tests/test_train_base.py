import csv
import json
import os

import pytest
import torch

from conftest import TINY, assert_user_error, run_script
from data import DATASETS, DeviceLoader, load_cifar
from engine import evaluate
from models import build_model


def read_metrics(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def base_run(cifar10_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "run")
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", out, "--seed", 5,
                      "--val-split", 20, *TINY)
    return out, proc


def test_outputs_and_best_checkpoint_reproduce_the_recorded_accuracy(base_run, cifar10_root):
    out, proc = base_run
    assert sorted(os.listdir(out)) == ["args.json", "best.pt", "last.pt", "metrics.csv"]
    rows = read_metrics(os.path.join(out, "metrics.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "val_top1",
            "seconds"} <= set(rows[0])
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["lr"] == 0.1 and args["nesterov"] is True and args["weight_decay"] == 1e-4
    assert args["epochs"] == 2 and args["lr_milestones"] == [1, 2]  # recipe's 100, 150 scaled to 2 epochs
    assert len(proc.stdout.strip().splitlines()) >= 3  # one plain summary line per epoch, at least

    ckpt = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert ckpt["arch"] == "resnet8" and ckpt["num_classes"] == 10 and ckpt["dataset"] == "cifar10"
    assert ckpt["selected_on"] == "val"
    best_row = rows[ckpt["epoch"] - 1]
    assert float(best_row["val_top1"]) == max(float(r["val_top1"]) for r in rows)
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["shortcut"])
    model.load_state_dict(ckpt["model"])
    _, _, test_x, test_y = load_cifar("cifar10", cifar10_root, download=False)
    spec = DATASETS["cifar10"]
    acc = evaluate(model, DeviceLoader(test_x, test_y, 100, spec.mean, spec.std, train=False))
    assert acc["top1"] == pytest.approx(float(best_row["test_top1"]), abs=1e-6) == ckpt["test_top1"]


def test_same_seed_gives_identical_results(base_run, cifar10_root, tmp_path):
    out, _ = base_run
    again = str(tmp_path / "again")
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", again, "--seed", 5,
               "--val-split", 20, *TINY)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop_time(read_metrics(os.path.join(out, "metrics.csv"))) == \
        drop_time(read_metrics(os.path.join(again, "metrics.csv")))
    a = torch.load(os.path.join(out, "last.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(again, "last.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cifar100_trains(cifar100_root, tmp_path):
    out = str(tmp_path / "run")
    run_script("train_base.py", "--dataset", "cifar100", "--data-root", cifar100_root, "--output-dir", out,
               "--epochs", 1, "--batch-size", 64, "--model", "resnet8", "--shortcut", "identity")
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["num_classes"] == 100 and ckpt["config"]["weight_decay"] == 5e-4
    assert ckpt["selected_on"] == "test"


@pytest.mark.parametrize("args,fragments", [
    (("--model", "resnet21"), ("invalid choice", "resnet21")),
    (("--epoch", "3"), ("unrecognized arguments", "--epoch")),
    (("--batch-size", "0"), ("--batch-size", "positive")),
    (("--lr", "abc"), ("--lr",)),
    (("--val-split", "200"), ("--val-split 200", "200 images")),
    (("--lr-milestones", "5", "3"), ("--lr-milestones",)),
])
def test_bad_flags_are_one_sentence_errors(args, fragments, cifar10_root, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", out, "--epochs", 1,
                      *args, check=False)
    assert_user_error(proc, *fragments)
    assert not out.exists()


def test_missing_data_without_network(tmp_path):
    out = tmp_path / "run"
    proc = run_script("train_base.py", "--data-root", tmp_path / "empty", "--output-dir", out, check=False)
    assert_user_error(proc, "CIFAR-10", os.path.join(str(tmp_path / "empty"), "cifar-10-batches-py"),
                      "data_batch_1")
    assert not out.exists()


def test_existing_run_is_not_overwritten(base_run, cifar10_root):
    out, _ = base_run
    before = os.path.getmtime(os.path.join(out, "last.pt"))
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", out, *TINY, check=False)
    assert_user_error(proc, "already holds a run")
    assert os.path.getmtime(os.path.join(out, "last.pt")) == before
