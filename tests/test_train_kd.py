import csv
import os

import pytest
import torch

from conftest import DEVICE, EXACT, assert_user_error, run_script, small_method_flags, train_teacher
from data import DATASETS, DeviceLoader
from engine import Distiller, Teacher, build_optimizer, train_one_epoch
from kd_losses import METHODS, build_method, default_hyperparameters, default_weight
from models import build_model

KD_TINY = ("--epochs", 1, "--batch-size", 32, "--student", "resnet8", "--device", DEVICE, *EXACT)


def kd_args(method):
    """KD_TINY, with a one-epoch stage for the methods that have one and a few CRD negatives."""
    return KD_TINY + small_method_flags(method)


@pytest.fixture(scope="module")
def teacher(cifar10_root, tmp_path_factory):
    """A resnet14 teacher: another architecture than the resnet8 students, so that the checks see
    the teacher's architecture come from its checkpoint."""
    return train_teacher(cifar10_root, tmp_path_factory.mktemp("teacher14") / "run", "resnet14")


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


def test_stage_result_is_kept_only_where_asked_and_reused(teacher, cifar10_root, tmp_path):
    """Without --stage-cache nothing is written outside the run folder; with it, the second run with
    the same key loads the first one's stage result instead of training it again."""
    plain, first, second = str(tmp_path / "plain"), str(tmp_path / "first"), str(tmp_path / "second")
    cache = tmp_path / "stages"
    teacher_folder = sorted(os.listdir(os.path.dirname(teacher)))
    run_script("train_kd.py", "--teacher", teacher, "--method", "ft", "--data-root", cifar10_root,
               "--output-dir", plain, *kd_args("ft"))
    assert sorted(os.listdir(os.path.dirname(teacher))) == teacher_folder and "stage.pt" in os.listdir(plain)
    p1 = run_script("train_kd.py", "--teacher", teacher, "--method", "ft", "--data-root", cifar10_root,
                    "--output-dir", first, "--stage-cache", cache, *kd_args("ft"))
    p2 = run_script("train_kd.py", "--teacher", teacher, "--method", "ft", "--data-root", cifar10_root,
                    "--output-dir", second, "--stage-cache", cache, *kd_args("ft"))
    assert "ft stage epoch 1/1" in p1.stdout and "paraphraser" not in p2.stdout
    assert "loaded its result" in p2.stdout
    assert [f for f in os.listdir(cache) if f.startswith("stage-ft-")]
    a, b, c = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (first, second, plain))
    for other in (b, c):
        assert all(torch.equal(a["method"][k], other["method"][k]) for k in a["method"])
        assert all(torch.equal(a["model"][k], other["model"][k]) for k in a["model"])
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    proc = run_script("train_kd.py", "--teacher", teacher, "--method", "ft", "--data-root", cifar10_root,
                      "--output-dir", tmp_path / "blocked", "--stage-cache", blocked / "stages", *kd_args("ft"),
                      check=False)
    assert_user_error(proc, "Cannot write to the stage cache")
    assert not (tmp_path / "blocked").exists()


def test_a_small_last_batch_is_noted_for_pkt_and_left_out_with_drop_last(teacher, cifar10_root, tmp_path):
    """200 images in batches of 64 leave a last batch of 8, on which PKT's step is many times a full
    batch's: the run says so, and --drop-last leaves it out (and is part of the run's identity)."""
    common = ("--teacher", teacher, "--method", "pkt", "--data-root", cifar10_root, "--student", "resnet8",
              "--epochs", 1, "--batch-size", 64, "--device", DEVICE)
    kept = run_script("train_kd.py", *common, "--output-dir", tmp_path / "kept")
    assert "note: each epoch's last batch holds 8 images; --method pkt takes a step many times larger" in kept.stdout
    dropped = run_script("train_kd.py", *common, "--output-dir", tmp_path / "dropped", "--drop-last")
    assert "last batch" not in dropped.stdout
    saved = [torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("kept", "dropped")]
    assert [ckpt["config"]["drop_last"] for ckpt in saved] == [False, True]
    st = run_script("train_kd.py", *common[:3], "st", *common[4:], "--output-dir", tmp_path / "st")
    assert "last batch" not in st.stdout  # a per-sample loss: nothing to note


def test_zero_kd_weight_equals_the_baseline_with_the_same_seed(teacher, cifar10_root, tmp_path):
    """The student starts from the baseline's weights and sees the baseline's batches, so with the
    KD term switched off the two runs are the same run."""
    base, kd = str(tmp_path / "base"), str(tmp_path / "kd")
    run_script("train_base.py", "--data-root", cifar10_root, "--output-dir", base, "--model", "resnet8",
               "--epochs", 2, "--batch-size", 32, "--seed", 7, *EXACT)
    run_script("train_kd.py", "--teacher", teacher, "--method", "ft", "--kd-weight", 0, "--data-root",
               cifar10_root, "--output-dir", kd, "--student", "resnet8", "--epochs", 2, "--batch-size", 32,
               "--seed", 7, "--ft-epochs", 1, *EXACT)
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True)["model"] for d in (base, kd))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["test_top1"] for r in rows(base)] == [r["test_top1"] for r in rows(kd)]


def test_teacher_is_never_updated():
    torch.manual_seed(0)
    network = build_model("resnet14", 10)
    spec = DATASETS["cifar10"]
    labels = torch.arange(64) % 10
    loader = DeviceLoader(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), labels, 32, spec.mean,
                          spec.std, train=True)
    teacher = Teacher(network)
    before = {part: {k: v.clone() for k, v in getattr(teacher, part).state_dict().items()}
              for part in ("network", "folded")}
    for name in METHODS:
        student = build_model("resnet8", 10)  # each method's own: one that diverged would not hand on NaN weights
        method = build_method(name, default_hyperparameters(name), student, teacher, labels)
        loader.add_negatives(method.negatives_per_sample)
        loader.strong_view = method.strong_view
        # weight 1 rather than the default, which is 0 for the methods that only act in their stage
        task = Distiller(student, teacher, method, 1.0, 1.0)
        optimizer, _ = build_optimizer(task, type("Args", (), dict(lr=0.1, momentum=0.9, nesterov=True,
                                                                   weight_decay=1e-4, lr_milestones=[1],
                                                                   lr_gamma=0.1)))
        train_one_epoch(task, loader, optimizer)
        for part in ("network", "folded"):
            net = getattr(teacher, part)
            assert not net.training and not any(p.requires_grad for p in net.parameters())
            after = net.state_dict()
            assert before[part].keys() == after.keys(), name
            assert all(torch.equal(before[part][k], after[k]) for k in after), (name, part)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.folded.modules())
        assert all(not k.startswith("teacher") and ".teacher." not in k for k in task.state_dict()), name
        assert not any(m is teacher.network or m is teacher.folded for m in task.modules()), name


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
                      "not a checkpoint written by train_base.py or train_kd.py.")
    torch.save({"epoch": 240, "model": {}}, foreign)  # RepDistiller's layout
    assert_user_error(run_script("train_kd.py", "--teacher", foreign, *common, check=False),
                      "a RepDistiller or mdistiller teacher needs --teacher-arch")
    assert_user_error(run_script("train_kd.py", "--teacher", teacher, *common[:-4], "--method", "at", "--student",
                                 "vgg8", check=False),
                      "--method at with a resnet14 teacher and a vgg8 student: at compares the two networks stage "
                      "by stage, and the student has 4 stages where the teacher has 3.")
    assert_user_error(run_script("train_kd.py", "--teacher", teacher, *common, "--dataset", "cifar100",
                                 check=False), "trained on cifar10, not on cifar100")
    assert_user_error(run_script("train_kd.py", "--teacher", teacher, *common[:-4], "--method", "xyz",
                                 check=False), "invalid choice", "xyz")
    assert_user_error(run_script("train_kd.py", "--teacher", teacher, *common, "--ft-k", 0.25, check=False),
                      "--ft-k belongs to --method ft")
    assert not out.exists()


def test_folded_teacher_gives_the_same_outputs_and_features():
    torch.manual_seed(0)
    network = build_model("resnet14", 10)
    x = torch.randn(6, 3, 32, 32)
    network.train()(x)  # moves the BN running statistics away from their initial values
    network.eval()
    with torch.no_grad():
        logits, feats = network(x, features=True)
    teacher = Teacher(network)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.network.modules())  # kept for attach()
    outputs = teacher.outputs(x, tuple(feats))
    logits2, feats2 = outputs["logits"], outputs
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
