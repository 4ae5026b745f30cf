import csv
import json
import os

import pytest
import torch

from conftest import TINY, assert_user_error, run_script
from data import DATASETS, DeviceLoader, load_cifar
import report
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


def test_eval_every_evaluates_every_nth_and_the_last_epoch(base_run, cifar10_root, tmp_path):
    """--eval-every 2 over 3 epochs evaluates epochs 2 and 3; epoch 1's cells are empty, and its
    training is the same as with every epoch evaluated. The report reads such a run."""
    out, again = str(tmp_path / "sparse"), str(tmp_path / "dense")
    common = ("--data-root", cifar10_root, "--seed", 5, "--val-split", 20, *TINY[2:], "--epochs", 3)
    proc = run_script("train_base.py", *common, "--eval-every", 2, "--output-dir", out)
    run_script("train_base.py", *common, "--output-dir", again)
    rows, dense = read_metrics(os.path.join(out, "metrics.csv")), read_metrics(os.path.join(again, "metrics.csv"))
    assert [r["test_top1"] == "" for r in rows] == [True, False, False]
    assert rows[0]["val_top1"] == rows[0]["test_loss"] == "" and "not evaluated" in proc.stdout
    for key in ("train_loss", "test_top1", "val_top1"):  # evaluating changes no training
        assert [r[key] for r in rows[1:]] == [r[key] for r in dense[1:]]
    best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert best["epoch"] in (2, 3) and float(rows[best["epoch"] - 1]["val_top1"]) == best["best_top1"]
    (run,) = report.read_runs(out)
    assert run["last"] == float(rows[-1]["test_top1"]) and run["best"] == best["test_top1"]
    assert json.load(open(os.path.join(out, "args.json")))["eval_every"] == 2


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


def test_validation_images_from_a_file_choose_the_best_epoch(cifar10_root, cifar100_root, tmp_path):
    """--val-file: every training image trains, the file's images choose the best epoch (scored as the
    evaluation scores them), and they are part of the run's data identity (CIFAR-100 files too)."""
    import pickle

    import numpy as np

    from data import load_val_file
    train_x, train_y, _, _ = load_cifar("cifar10", cifar10_root, download=False)
    val_file = tmp_path / "val_batch"
    with open(val_file, "wb") as f:  # images that are in neither set: the training images, inverted
        pickle.dump({"data": (255 - train_x[:30]).reshape(30, -1).numpy(), "labels": train_y[:30].tolist()}, f)
    out = tmp_path / "run"
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", out, "--val-file", val_file, *TINY)
    assert f"200 training, 30 validation (from {val_file}) and 40 test images" in proc.stdout + proc.stderr
    rows = read_metrics(out / "metrics.csv")
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["selected_on"] == "val"
    assert float(rows[ckpt["epoch"] - 1]["val_top1"]) == max(float(r["val_top1"]) for r in rows)
    model = build_model("resnet8", 10)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
    val_x, val_y = load_val_file("cifar10", str(val_file))
    spec = DATASETS["cifar10"]
    acc = evaluate(model, DeviceLoader(val_x, val_y, 32, spec.mean, spec.std, train=False))
    assert acc["top1"] == pytest.approx(float(rows[-1]["val_top1"]), abs=1e-6)
    args = json.load(open(out / "args.json"))
    plain = tmp_path / "plain"
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", plain, "--epochs", 1, "--batch-size", 32,
               "--model", "resnet8")
    assert args["val_file"] == str(val_file)
    assert args["data_sha256"] != json.load(open(plain / "args.json"))["data_sha256"]  # the file is in the identity

    c100_x, c100_y, _, _ = load_cifar("cifar100", cifar100_root, download=False)
    c100_val = tmp_path / "c100_val"
    with open(c100_val, "wb") as f:  # CIFAR-100's label key
        pickle.dump({"data": (255 - c100_x[:20]).reshape(20, -1).numpy(),
                     "fine_labels": np.asarray(c100_y[:20]).tolist()}, f)
    run_script("train_base.py", "--dataset", "cifar100", "--data-root", cifar100_root, "--output-dir",
               tmp_path / "c100", "--val-file", c100_val, "--epochs", 1, "--batch-size", 64, "--model", "resnet8")
    assert "val_top1" in read_metrics(tmp_path / "c100" / "metrics.csv")[0]


def test_images_in_counts_exact_copies_only():
    from data import images_in
    a = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    b = torch.cat([a[10:20], torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8)])
    assert images_in(a, b) == 10 and images_in(b, a) == 10
    near = a.clone()
    near[:, 0, 0, 0] ^= 1  # one pixel off in every image
    assert images_in(near, a) == 0 and images_in(a[:0], a) == 0
