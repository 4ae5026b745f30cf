import csv
import os

import pytest
import torch

from conftest import assert_user_error, run_script
from data import DATASETS, DeviceLoader
from engine import Distiller, build_optimizer, freeze_teacher, train_one_epoch
from kd_losses import METHODS, build_method, default_hyperparameters, default_weight
from models import build_model

KD_TINY = ("--epochs", 1, "--batch-size", 32, "--student", "resnet8", "--device", "cpu")


def kd_args(method):
    """KD_TINY, with a one-epoch stage for the methods that have one and a few CRD negatives."""
    stage = [(f"--{key.replace('_', '-')}", 1) for key in METHODS[method].hyperparameters if key.endswith("_epochs")]
    small = [("--crd-negatives", 16)] if method == "crd" else []
    return KD_TINY + tuple(x for flag in stage + small for x in flag)


@pytest.fixture(scope="module")
def teacher(cifar10_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", out, "--model", "resnet14",
               "--epochs", 1, "--batch-size", 32)
    return str(out / "best.pt")


def rows(out):
    with open(os.path.join(out, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_end_to_end(method, teacher, cifar10_root, tmp_path):
    out = str(tmp_path / "run")
    teacher_bytes = open(teacher, "rb").read()
    proc = run_script("train_kd.py", "--teacher", teacher, "--method", method, "--data-root", cifar10_root,
                      "--output-dir", out, *kd_args(method))
    assert "teacher resnet14" in proc.stdout and proc.stdout.count("test top1") >= 2
    has_stage = METHODS[method].has_stage
    expected_files = {"args.json", "best.pt", "last.pt", "metrics.csv"} | ({"stage.pt"} if has_stage else set())
    assert set(os.listdir(out)) == expected_files
    if has_stage:
        assert "stage epoch 1/1" in proc.stdout
    (row,) = rows(out)
    kd_columns = [k for k in row if k.startswith("train_kd")]
    weight = default_weight(method, "cifar10")
    # weight 0 (AB, FSP: their loss acts in the stage only) leaves the KD term out of training
    assert "train_ce" in row and bool(kd_columns) == (weight > 0)
    total = float(row["train_ce"]) + sum(float(row[k]) for k in kd_columns)
    assert total == pytest.approx(float(row["train_loss"]), rel=1e-5)
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["kd"]["method"] == method and ckpt["kd"]["kd_weight"] == weight
    assert set(METHODS[method].hyperparameters) <= set(ckpt["kd"]) and ckpt["teacher"]["arch"] == "resnet14"
    assert open(teacher, "rb").read() == teacher_bytes


def test_ft_stage_runs_once_and_is_reused(teacher, cifar10_root, tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    # a teacher of its own, so that no other test's stage cache is found
    own_teacher = tmp_path / "teacher.pt"
    own_teacher.write_bytes(open(teacher, "rb").read())
    p1 = run_script("train_kd.py", "--teacher", own_teacher, "--method", "ft", "--data-root", cifar10_root,
                    "--output-dir", first, *kd_args("ft"))
    p2 = run_script("train_kd.py", "--teacher", own_teacher, "--method", "ft", "--data-root", cifar10_root,
                    "--output-dir", second, *kd_args("ft"))
    assert "ft stage epoch 1/1" in p1.stdout and "paraphraser" not in p2.stdout
    assert "loaded its result" in p2.stdout
    assert [f for f in os.listdir(tmp_path) if f.startswith("stage-ft-")]
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (first, second))
    assert all(torch.equal(a["method"][k], b["method"][k]) for k in a["method"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_zero_kd_weight_equals_the_baseline_with_the_same_seed(teacher, cifar10_root, tmp_path):
    """The student starts from the baseline's weights and sees the baseline's batches, so with the
    KD term switched off the two runs are the same run."""
    base, kd = str(tmp_path / "base"), str(tmp_path / "kd")
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", base, "--model", "resnet8",
               "--epochs", 2, "--batch-size", 32, "--seed", 7)
    run_script("train_kd.py", "--teacher", teacher, "--method", "ft", "--kd-weight", 0, "--data-root",
               cifar10_root, "--output-dir", kd, "--student", "resnet8", "--epochs", 2, "--batch-size", 32,
               "--seed", 7, "--ft-epochs", 1)
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True)["model"] for d in (base, kd))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["test_top1"] for r in rows(base)] == [r["test_top1"] for r in rows(kd)]


def test_teacher_is_never_updated():
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet14", 10)
    unfolded = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {k: v.clone() for k, v in freeze_teacher(teacher).state_dict().items()}
    spec = DATASETS["cifar10"]
    labels = torch.arange(64) % 10
    loader = DeviceLoader(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), labels, 32, spec.mean,
                          spec.std, train=True)
    for name in METHODS:
        teacher = build_model("resnet14", 10)  # a fresh copy: methods read the teacher before it is folded
        teacher.load_state_dict(unfolded)
        method = build_method(name, default_hyperparameters(name), student, teacher, labels)
        loader.add_negatives(method.negatives_per_sample)
        # weight 1 rather than the default, which is 0 for the methods that only act in their stage
        task = Distiller(student, teacher, method, 1.0, 1.0)
        optimizer, _ = build_optimizer(task, type("Args", (), dict(lr=0.1, momentum=0.9, nesterov=True,
                                                                   weight_decay=1e-4, lr_milestones=[1],
                                                                   lr_gamma=0.1)))
        train_one_epoch(task, loader, optimizer)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert "teacher" not in dict(task.named_children())
        assert all(not k.startswith("teacher") for k in task.state_dict())
        after = teacher.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name


def test_bad_teacher_inputs(teacher, cifar10_root, cifar100_root, tmp_path):
    out = tmp_path / "run"
    common = ("--data-root", cifar10_root, "--output-dir", out, "--method", "st", "--epochs", 1)
    assert_user_error(run_script("train_kd.py", "--teacher", tmp_path / "nope.pt", *common, check=False),
                      "nope.pt", "does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(teacher, "rb").read()[:5000])
    assert_user_error(run_script("train_kd.py", "--teacher", corrupt, *common, check=False),
                      "corrupt.pt", "not a loadable checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    assert_user_error(run_script("train_kd.py", "--teacher", foreign, *common, check=False),
                      "not a checkpoint written by train_base.py")
    assert_user_error(run_script("train_kd.py", "--teacher", teacher, *common, "--dataset", "cifar100",
                                 check=False), "trained on cifar10, not on cifar100")
    assert_user_error(run_script("train_kd.py", "--teacher", teacher, *common[:-4], "--method", "xyz",
                                 check=False), "invalid choice", "xyz")
    assert_user_error(run_script("train_kd.py", "--teacher", teacher, *common, "--ft-k", 0.25, check=False),
                      "--ft-k belongs to --method ft")
    assert not out.exists()


def test_folded_teacher_gives_the_same_outputs_and_features():
    torch.manual_seed(0)
    teacher = build_model("resnet14", 10)
    x = torch.randn(6, 3, 32, 32)
    teacher.train()(x)  # moves the BN running statistics away from their initial values
    teacher.eval()
    with torch.no_grad():
        logits, feats = teacher(x, features=True)
        folded = freeze_teacher(teacher)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        logits2, feats2 = folded(x, features=True)
    assert torch.allclose(logits, logits2, rtol=1e-4, atol=1e-5)
    for k in feats:
        assert torch.allclose(feats[k], feats2[k], rtol=1e-4, atol=1e-5), k


def test_a_wide_resnet_teaches_a_narrower_resnet(cifar10_root, tmp_path):
    """The connector rule end to end: a wrn_16_2 teacher (stage widths 32/64/128) and a resnet8
    student (16/32/64). Fitnet gets a connector; FSP, which has none, refuses the pair."""
    teacher = tmp_path / "teacher"
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", teacher, "--model", "wrn_16_2",
               "--epochs", 1, "--batch-size", 40)
    out = tmp_path / "fitnet"
    run_script("train_kd.py", "--teacher", teacher / "last.pt", "--method", "fitnet", "--data-root", cifar10_root,
               "--output-dir", out, *KD_TINY)
    method_state = torch.load(out / "last.pt", weights_only=True)["method"]
    assert method_state["method.connector.0.weight"].shape == (128, 64, 1, 1)
    proc = run_script("train_kd.py", "--teacher", teacher / "last.pt", "--method", "fsp", "--data-root",
                      cifar10_root, "--output-dir", tmp_path / "fsp", *kd_args("fsp"), check=False)
    assert_user_error(proc, "--method fsp with a wrn_16_2 teacher and a resnet8 student")
    assert not (tmp_path / "fsp").exists()
    proc = run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", tmp_path / "identity",
                      "--model", "wrn_16_2", "--shortcut", "identity", "--epochs", 1, check=False)
    assert_user_error(proc, "wrn_16_2 has only the projection shortcut")
