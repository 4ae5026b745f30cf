import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import data
import report
import sweep
from conftest import DEVICE, ROOT, assert_user_error, load_make_docs, make_cifar10, run_script
from data import load_cifar


def fake_run(root, name, dataset, method, model, seed, test_top1, val_top1=None, teacher="resnet110", settings=(),
             seconds=30.0, **kd):
    folder = os.path.join(root, name)
    os.makedirs(folder)
    args = {"dataset": dataset, "model": model, "seed": seed, "epochs": len(test_top1), **dict(settings)}
    if method != "baseline":
        args.update(method=method, teacher_arch=teacher, **kd)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(args, f)
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as f:
        fields = ["epoch", "train_loss", "test_top1"] + (["val_top1"] if val_top1 else []) + ["seconds"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for e, acc in enumerate(test_top1):
            row = {"epoch": e + 1, "train_loss": 2.0 / (e + 1), "test_top1": acc,
                   "seconds": seconds[e] if isinstance(seconds, list) else seconds}
            if val_top1:
                row["val_top1"] = val_top1[e]
            writer.writerow(row)


BASE = {0: [50, 60, 65], 1: [52, 63, 64], 2: [49, 61, 66]}
ST = {0: [55, 70, 69], 1: [54, 66, 68], 2: [56, 71, 70.5]}
ST_VAL = {0: [1, 3, 2], 1: [1, 2, 3], 2: [3, 2, 1]}  # validation picks epochs 2, 3 and 1


@pytest.fixture
def runs(tmp_path):
    for seed in BASE:
        fake_run(tmp_path, f"base{seed}", "cifar10", "baseline", "resnet20", seed, BASE[seed])
        fake_run(tmp_path, f"st{seed}", "cifar10", "st", "resnet20", seed, ST[seed], ST_VAL[seed])
    fake_run(tmp_path, "teacher", "cifar10", "baseline", "resnet110", 0, [70, 80, 90])
    return str(tmp_path)


def test_report_means_stds_and_gains(runs):
    table = {(row["method"], row["model"]): row for row in report.summarise(report.read_runs(runs))}
    base_last = np.array([v[-1] for v in BASE.values()])
    st_last = np.array([v[-1] for v in ST.values()])
    st_best = np.array([ST[s][int(np.argmax(ST_VAL[s]))] for s in ST])  # chosen on validation
    base_best = np.array([max(v) for v in BASE.values()])                 # chosen on test
    st, base = table[("st", "resnet20")], table[("baseline", "resnet20")]
    assert st["last"] == pytest.approx((st_last.mean(), st_last.std(ddof=1)))
    assert st["best"] == pytest.approx((st_best.mean(), st_best.std(ddof=1)))
    assert base["best"] == pytest.approx((base_best.mean(), base_best.std(ddof=1)))
    assert st["gain"] == pytest.approx((st_last.mean() - base_last.mean(),
                                        np.sqrt(st_last.var(ddof=1) / 3 + base_last.var(ddof=1) / 3)))
    assert st["selected_on"] == "val" and base["selected_on"] == "test"
    assert st["published"] == 92.82 and base["published"] == 92.37
    assert table[("baseline", "resnet110")]["last"] == (90, None)
    text = report.markdown(report.summarise(report.read_runs(runs)))
    assert f"{st_last.mean():.2f} ± {st_last.std(ddof=1):.2f}" in text
    assert f"| {st_last.mean() - base_last.mean():+.2f} ± {st['gain'][1]:.2f} |" in text
    assert "Best epochs were chosen on the test images where the column says (test)" in text
    assert text.index("| baseline | resnet20") < text.index("| st | resnet20")


def test_report_never_puts_two_identities_in_one_row(runs, capsys):
    """Runs made with other settings (a recipe flag, other data) get rows of their own, labelled with
    what differs; a second run of one identity and seed is a duplicate, not a further seed; a KD row's
    gain is over the baseline of its own settings; a folder that cannot be read is left out, named."""
    fake_run(runs, "base-lr", "cifar10", "baseline", "resnet20", 0, [80, 80, 80], settings={"lr": 0.02, "batch_size": 16})
    fake_run(runs, "base1-again", "cifar10", "baseline", "resnet20", 1, [10, 10, 10])  # seed 1 again
    for seed, data_name in ((0, "a"), (1, "a"), (0, "b")):
        fake_run(runs, f"base-data-{data_name}{seed}", "cifar10", "baseline", "resnet20", seed, [40, 40, 40 + seed],
                 settings={"data_sha256": data_name * 64})
    fake_run(runs, "st-data-a", "cifar10", "st", "resnet20", 0, [50, 50, 50], settings={"data_sha256": "a" * 64})
    os.makedirs(os.path.join(runs, "broken"))
    open(os.path.join(runs, "broken", "args.json"), "w").write("{not json")
    open(os.path.join(runs, "broken", "metrics.csv"), "w").write("epoch,test_top1\n1,99\n")
    table = {row["label"]: row for row in report.summarise(report.read_runs(runs)) if row["model"] == "resnet20"}
    assert "broken is left out: its args.json or metrics.csv cannot be read (JSONDecodeError" in capsys.readouterr().err
    # (the fixture's runs were saved without their data's sha256, as runs were before it was recorded)
    assert set(table) == {"baseline (data unrecorded)", "baseline (batch size 16, lr 0.02)",
                          "baseline (data aaaaaaaaaaaa)", "baseline (data bbbbbbbbbbbb)", "st (data unrecorded)",
                          "st (data aaaaaaaaaaaa)"}
    base = table["baseline (data unrecorded)"]
    assert base["seeds"] == [0, 1, 2] and base["last"][0] == pytest.approx(np.mean([v[-1] for v in BASE.values()]))
    assert base["duplicates"] == [(os.path.join(runs, "base1-again"), os.path.join(runs, "base1"))]  # first kept
    assert table["baseline (batch size 16, lr 0.02)"]["seeds"] == [0]
    assert table["baseline (data aaaaaaaaaaaa)"]["seeds"] == [0, 1]
    assert table["st (data aaaaaaaaaaaa)"]["gain"][0] == pytest.approx(50 - 40.5)  # over the baseline on data a
    assert table["st (data aaaaaaaaaaaa)"]["gain"][1] is None  # one seed: no spread
    assert table["st (data unrecorded)"]["gain"][0] == pytest.approx(np.mean([v[-1] for v in ST.values()]) -
                                                                     base["last"][0])
    text = report.markdown(list(table.values()))
    assert "| 0,1,2 (1 duplicate left out) |" in text and "the same run as" in text


def test_report_labels_runs_off_their_methods_defaults_and_marks_short_ones(tmp_path):
    """A run with a scaled-down weight is a row of its own, labelled; a published number beside runs
    shorter than the recipe, or beside a variant, says it is not comparable."""
    for seed in (0, 1):
        fake_run(tmp_path, f"rkd{seed}", "cifar10", "rkd", "resnet20", seed, [40, 50], kd_weight=1.0, w_dist=25.0)
        fake_run(tmp_path, f"rkd-small{seed}", "cifar10", "rkd", "resnet20", seed, [45, 60], kd_weight=0.1,
                 w_dist=25.0)
        fake_run(tmp_path, f"st{seed}", "cifar10", "st", "resnet20", seed, [55] * 200, kd_weight=0.9, ce_weight=0.1,
                 T=2.0)
    table = {row["label"]: row for row in report.summarise(report.read_runs(str(tmp_path)))}
    assert set(table) == {"rkd", "rkd (kd weight 0.1)", "st (kd weight 0.9, ce weight 0.1, T 2)"}
    assert table["rkd"]["last"][0] == 50 and table["rkd (kd weight 0.1)"]["last"][0] == 60
    text = report.markdown(list(table.values()))
    assert "| rkd (kd weight 0.1) | resnet20 | resnet110 | 0,1 | 60.00 ± 0.00 |" in text
    assert "| 93.21 (not comparable) |" in text  # 2 epochs, not the recipe's 200
    assert "| 92.82 (not comparable) |" in text  # 200 epochs, but a variant of st
    assert not table["rkd"]["comparable"] and not table["st (kd weight 0.9, ce weight 0.1, T 2)"]["comparable"]


def test_a_logit_standardised_run_is_its_own_method_against_its_own_published_number(tmp_path):
    """--logit-stand with the settings it brings for the pair: 'st+ls', comparable with the published
    KD+LS number; another T on top of it: a labelled variant."""
    ls = dict(logit_stand=True, T=2.0, kd_weight=9.0, ce_weight=0.1)
    fake_run(tmp_path, "ls", "cifar100", "st", "resnet8x4", 0, [70] * 240, teacher="resnet32x4", **ls)
    fake_run(tmp_path, "ls-T3", "cifar100", "st", "resnet8x4", 0, [71] * 240, teacher="resnet32x4", **{**ls, "T": 3.0})
    table = {row["label"]: row for row in report.summarise(report.read_runs(str(tmp_path)))}
    assert set(table) == {"st+ls", "st+ls (T 3)"}
    assert table["st+ls"]["comparable"] and table["st+ls"]["published"] == (None, 76.62)
    assert not table["st+ls (T 3)"]["comparable"]


def test_published_numbers_are_per_pair():
    c100 = report.PUBLISHED["cifar100"]
    assert c100[("st", "resnet20", "resnet110")] == (70.06, 70.67)    # seed zoo / CRD benchmark
    assert c100[("dml", "resnet20", "resnet110")] == (70.29, None)    # the seed zoo only
    assert c100[("crd", "resnet8x4", "resnet32x4")] == (None, 75.51)  # the CRD benchmark only
    assert c100[("baseline", "wrn_16_2", None)] == (None, 73.26)
    assert ("st", "resnet20", "resnet56") not in report.PUBLISHED["cifar10"]
    row = {"dataset": "cifar100", "epochs": 240, "method": "crd", "label": "crd", "comparable": True,
           "model": "resnet8x4", "teacher": "resnet32x4",
           "seeds": [0], "incomplete": 0, "last": (75.0, None), "best": (75.2, None), "selected_on": "test",
           "gain": (2.5, None), "published": c100[("crd", "resnet8x4", "resnet32x4")], "seconds": 60}
    assert "| – / 75.51 |" in report.markdown([row])


def test_report_command_writes_markdown_and_plots(runs):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), runs], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(runs, "report.md")) as f:
        assert f.read().splitlines()[-1].startswith("In all: ")
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(os.path.join(runs, "test_top1.png")) > 1000
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout


def test_report_without_matplotlib_says_so(runs):
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['report.py', sys.argv[1]]; "
            "import report; report.main()")
    proc = subprocess.run([sys.executable, "-c", code, runs], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "matplotlib is not installed, so no plots were drawn (pip install matplotlib)" in proc.stdout


@pytest.mark.slow
def test_sweep_runs_everything_once_and_then_skips(cifar10_root, tmp_path):
    root = tmp_path / "sweep"
    args = ("sweep.py", "--data-root", cifar10_root, "--teacher", "resnet8", "--student", "resnet8", "--methods",
            "st", "at", "--seeds", 0, 1, "--output-root", root, "--gpus", "--teacher-cache", "on",
            "--teacher-cache-dir", tmp_path / "caches", "--", "--epochs", 1, "--batch-size", 40, "--device", DEVICE,
            "--ce-weight", 1.0)  # a flag of train_kd.py alone: the baseline and teacher runs do not get it
    first = run_script(*args)
    names = sorted(os.listdir(root))
    assert names == sorted(["teacher-resnet8-seed0", "baseline-resnet8-seed0", "baseline-resnet8-seed1",
                            "st-resnet8-seed0", "st-resnet8-seed1", "at-resnet8-seed0", "at-resnet8-seed1"])
    assert first.stdout.count("run   ") == 7 and "all runs complete" in first.stdout
    for name in names:
        assert os.path.exists(root / name / "last.pt")
    logs = {name: open(root / name / "log.txt").read() for name in names}
    # the first st run builds the teacher cache, the second reads it; at cannot, and was not asked to
    assert "teacher cache: building" in logs["st-resnet8-seed0"] and "teacher cache: using" in logs["st-resnet8-seed1"]
    assert "not used: --method at cannot use it" in logs["at-resnet8-seed0"]
    assert first.stdout.index("st-resnet8-seed0") < first.stdout.index("at-resnet8-seed0")
    os.remove(root / "at-resnet8-seed1" / "metrics.csv")  # an unfinished run is redone
    os.remove(root / "at-resnet8-seed1" / "last.pt")
    second = run_script(*args)
    assert second.stdout.count("skip  ") == 6 and second.stdout.count("run   ") == 1
    table = report.summarise(report.read_runs(str(root)))
    assert {(row["method"], tuple(row["seeds"])) for row in table} >= {("st", (0, 1)), ("at", (0, 1))}
    # other settings: nothing is trained, every differing folder is named with what differs
    times = {name: os.path.getmtime(root / name / "last.pt") for name in names}
    other_lr = run_script(*args, "--lr", 0.02, check=False)  # the teacher's first: the students' teacher would change
    assert other_lr.returncode == 2 and "1 run folder(s) hold runs made with other settings" in other_lr.stderr
    assert f"differs {root / 'teacher-resnet8-seed0'}: lr 0.1 there, 0.02 now" in other_lr.stdout
    assert "run   " not in other_lr.stdout
    other_weight = run_script(*args, "--kd-weight", 0.5, check=False)  # the KD runs only
    assert other_weight.returncode == 2 and other_weight.stdout.count("differs") == 4
    assert "kd weight 0.1 there, 0.5 now" in other_weight.stdout
    assert times == {name: os.path.getmtime(root / name / "last.pt") for name in names}
    split = args.index("--")
    rerun = run_script(*args[:split], "--rerun", *args[split:], "--kd-weight", 0.5)
    assert rerun.stdout.count("rerun ") == 4 and rerun.stdout.count("skip  ") == 3
    assert json.load(open(root / "st-resnet8-seed1" / "args.json"))["kd_weight"] == 0.5


@pytest.mark.slow
def test_sigterm_reaches_the_sweeps_runs_and_a_second_sweep_is_refused(teacher, tmp_path):
    """SIGTERM to sweep.py stops its running run as SIGTERM stops a run (resumable) instead of leaving it
    training; while a sweep works in an output root a second one is refused; rerunning resumes."""
    import signal
    import time
    data_root = make_cifar10(str(tmp_path / "data"), per_batch=200)
    root = tmp_path / "sweep"
    args = [sys.executable, os.path.join(ROOT, "sweep.py"), "--data-root", data_root, "--teacher-checkpoint", teacher,
            "--student", "resnet8", "--methods", "st", "--seeds", 0, "--output-root", root, "--gpus", "--",
            "--epochs", 4, "--batch-size", 50, "--device", DEVICE]
    args = list(map(str, args))
    sweep = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = root / "st-resnet8-seed0" / "metrics.csv"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "is being written by process" in second.stderr
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 128 + signal.SIGTERM, out + err
    assert "SIGTERM: the sweep stopped" in err
    log = (root / "st-resnet8-seed0" / "log.txt").read_text()
    assert "SIGTERM in epoch" in log and "resume with" in log  # the run stopped as a run does
    assert not (root / "st-resnet8-seed0" / ".lock").exists()  # and no process holds the folder
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resume /" in again.stdout or "resume " + str(root) in again.stdout
    with open(metrics) as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3", "4"]  # each epoch once


@pytest.mark.slow
def test_the_evidence_experiment_runs_end_to_end(cifar10_root, tmp_path):
    """benchmarks/kd_evidence.py on the tiny CIFAR-10 (2 student images per class and batch, 1
    evaluation and 1 validation image per class): data folders, teacher, sweep with KD weights tuned
    on the validation images and run at the chosen weight on every seed, report, official-test table;
    a rerun skips every step that is done."""
    work = tmp_path / "work"
    args = [sys.executable, os.path.join(ROOT, "benchmarks", "kd_evidence.py"), "--cifar10", cifar10_root,
            "--work", work, "--teacher", "resnet8", "--teacher-epochs", 1, "--student", "resnet8", "--epochs", 1,
            "--seeds", 0, 1, "--methods", "st", "at", "--per-class", 2, "--eval-per-class", 1, "--val-per-class", 1,
            "--tune", 0.5, 4, "--tune-widen", 1, "--jobs", 2, "--publish", tmp_path / "published", "--",
            "--batch-size", 20, "--device", DEVICE]
    first = subprocess.run(list(map(str, args)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    train_x, train_y, test_x, test_y = load_cifar("cifar10", str(work / "data" / "students"), download=False)
    full_x, full_y, official_x, _ = load_cifar("cifar10", cifar10_root, download=False)
    evaluation = np.loadtxt(work / "data" / "eval_indices.txt", dtype=np.int64)
    validation = np.loadtxt(work / "data" / "val_indices.txt", dtype=np.int64)
    val_x, val_y = data.load_val_file("cifar10", str(work / "data" / "validation_batch"))
    assert len(train_y) == 100 and len(test_y) == len(evaluation) == 10 and len(val_y) == len(validation) == 10
    assert (np.asarray(test_x) == np.asarray(full_x)[evaluation]).all()
    assert (np.asarray(val_x) == np.asarray(full_x)[validation]).all()
    students, evaluated, held_out = (set(map(bytes, np.asarray(x).reshape(len(x), -1)))
                                     for x in (train_x, test_x, val_x))
    assert not students & evaluated and not students & held_out and not evaluated & held_out
    tuning = json.load(open(work / "sweep" / "tuning.json"))
    assert tuning["seed"] == 0 and set(tuning["methods"]) == {"st", "at"}
    for method, entry in tuning["methods"].items():
        scores = {run["kd_weight"]: run["val_top1"] for run in entry["runs"]}
        default = entry["default"]
        grid = {weight: score for weight, score in scores.items() if weight in (default, default * 0.5, default * 4)}
        assert len(grid) == 3  # and one step beyond the end where the best of those lies
        beyond = sweep.widened_weight(grid, default)
        assert sorted(scores) == sorted([*grid, *([beyond] if beyond is not None else [])])
        for run in entry["runs"]:  # each score is that run's last validation top-1
            with open(work / "sweep" / run["folder"] / "metrics.csv") as f:
                assert float(list(csv.DictReader(f))[-1]["val_top1"]) == run["val_top1"]
        assert entry["chosen"] == sweep.chosen_weight(scores, default)
        chosen = f"-kd-weight-{entry['chosen']:g}" if entry["chosen"] != default else ""
        for seed in (0, 1):  # the chosen weight on every seed
            with open(work / "sweep" / f"{method}{chosen}-resnet8-seed{seed}" / "args.json") as f:
                assert json.load(f)["kd_weight"] == entry["chosen"]
    swept = report.read_runs(str(work / "sweep"))
    assert all(r["selected_on"] == "val" for r in swept)
    text = open(work / "sweep" / "report.md").read()
    assert "Best epochs were chosen on the validation images (val); the test images chose nothing." in text
    assert "KD weights tuned on validation images" in text and "| st | " in text and "| at | " in text
    official = open(work / "sweep" / "official_test.md").read()
    assert f"on the {len(official_x)} official CIFAR-10 test images" in official
    assert "| run | seeds | last epoch | gain | best epoch |" in official
    assert re.search(r"\| baseline \(batch size 20\) \| 2 \| [\d.]+ ± [\d.]+ \| – \|", official)
    assert re.search(r"\| st \(batch size 20\) \| 2 \| [\d.]+ ± [\d.]+ \| [+-][\d.]+ \|", official)
    assert sorted(os.listdir(tmp_path / "published")) == sorted(
        ["official_test.md", "report.md"] + [p for p in ("gains.png", "test_top1.png", "train_loss.png")
                                            if os.path.exists(work / "sweep" / p)])
    again = subprocess.run(list(map(str, args)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "skip  " in again.stdout and "run   " not in again.stdout
    assert "+ python train_base.py" not in again.stdout  # the teacher is done


def test_the_sweep_compares_a_folders_run_with_the_requested_settings(cifar10_root, tmp_path):
    """sweep.py skips a run only when its saved identity is the requested one: any setting that changes
    results (the data by their contents, not their folder) makes it differ, named."""
    import shutil

    out = str(tmp_path / "baseline")

    def command(data_root=cifar10_root, *more):
        return ["train_base.py", "--model", "resnet8", "--dataset", "cifar10", "--data-root", str(data_root),
                "--epochs", "1", "--batch-size", "40", "--device", DEVICE, *map(str, more)]
    assert sweep.saved_state(out, None) == ("new", None)
    run_script(*command(), "--output-dir", out)
    sha = data.data_sha256(*load_cifar("cifar10", cifar10_root, download=False))

    def state(*more, data_root=cifar10_root):
        return sweep.saved_state(out, sweep.requested_identity(command(data_root, *more), out))
    assert state() == ("complete", None)
    assert state("--lr", 0.02) == ("differs", "lr 0.1 there, 0.02 now")
    assert state("--epochs", 2) == ("differs", "epochs 1 there, 2 now; lr milestones [1] there, [1, 2] now")
    assert state("--seed", 1) == ("differs", "seed 0 there, 1 now")
    moved = tmp_path / "moved"
    shutil.copytree(cifar10_root, moved)
    assert state(data_root=moved) == ("complete", None)  # the same arrays elsewhere
    other = tmp_path / "other"
    make_cifar10(str(other), test=20)
    other_sha = data.data_sha256(*load_cifar("cifar10", str(other), download=False))
    assert state(data_root=other) == ("differs", f"data sha256 {sha[:12]} there, {other_sha[:12]} now")
    with open(os.path.join(out, "diverged.json"), "w") as f:
        json.dump({"epoch": 1, "message": "..."}, f)
    assert state() == ("diverged", None)  # not trained again
    first_epoch = tmp_path / "diverged-in-epoch-1"  # it saved no epoch: its args.json and diverged.json alone
    os.makedirs(first_epoch)
    for name in ("args.json", "diverged.json"):
        shutil.copy(os.path.join(out, name), first_epoch)
    assert sweep.saved_state(str(first_epoch), sweep.requested_identity(command(), str(first_epoch))) == (
        "diverged", None)
    assert sweep.saved_state(str(first_epoch), sweep.requested_identity(command(cifar10_root, "--lr", 0.02),
                                                                        str(first_epoch)))[0] == "differs"
    os.remove(os.path.join(out, "diverged.json"))
    os.remove(os.path.join(out, "last.pt"))
    assert state() == ("resume", None)
    with open(os.path.join(out, "args.json"), "w") as f:
        f.write("{")
    assert state()[0] == "differs" and "cannot be read" in state()[1]


def test_report_labels_the_recipe_a_row_used(tmp_path):
    """A MobileNetV2 baseline at the CIFAR-100 recipe's LR for it (0.01) is the plain baseline; an MLKD run
    with its official recipe says so and is comparable with MLKD's published number; one at the recipe's LR
    is labelled with it, and is not."""
    recipe = {"lr_milestones": [150, 180, 210], "batch_size": 64, "momentum": 0.9, "nesterov": False,
              "weight_decay": 5e-4, "padding": "zeros"}
    fake_run(tmp_path, "mv2", "cifar100", "baseline", "MobileNetV2", 0, [60] * 240, settings={**recipe, "lr": 0.01})
    for name, lr in (("mlkd", 0.025), ("mlkd-lr", 0.05)):
        fake_run(tmp_path, name, "cifar100", "mlkd", "resnet8x4", 0, [77] * 240, teacher="resnet32x4",
                 settings={**recipe, "lr": lr}, kd_weight=0.9, ce_weight=0.1, T=4.0, logit_stand=False)
    table = {row["label"]: row for row in report.summarise(report.read_runs(str(tmp_path)))}
    assert set(table) == {"baseline", "mlkd (official recipe: lr 0.025)", "mlkd (lr 0.05)"}
    assert table["baseline"]["comparable"] and table["baseline"]["published"] == (None, 64.6)
    official = table["mlkd (official recipe: lr 0.025)"]
    assert official["comparable"] and official["published"] == (None, 77.08)
    assert not table["mlkd (lr 0.05)"]["comparable"]


def sweep_args(*argv):
    args = sweep.get_args_parser().parse_args([str(a) for a in argv])
    args.script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    args.tune_seed = args.seeds[0]
    return args


def test_a_methods_own_flags_reach_its_runs_alone(teacher, cifar10_root, tmp_path):
    """`--methods kdsvd st -- --kdsvd-k 4`: kdsvd's runs get --kdsvd-k, st's and the baseline's do not
    (before, every KD run got every flag, and st refused it)."""
    args = sweep_args("--methods", "kdsvd", "st", "--seeds", 0, "--teacher-checkpoint", teacher, "--student",
                      "resnet8", "--data-root", cifar10_root, "--", "--kdsvd-k", 4, "--epochs", 3, "--device", DEVICE)
    commands = {os.path.basename(out): command for out, command in sweep.jobs(args, str(tmp_path))}
    # the teacher cache's reader first (it builds the cache), then the baseline, then the others
    assert list(commands) == ["st-resnet8-seed0", "baseline-resnet8-seed0", "kdsvd-resnet8-seed0"]
    assert "--kdsvd-k" in commands["kdsvd-resnet8-seed0"]
    assert "--kdsvd-k" not in commands["st-resnet8-seed0"] and "--kdsvd-k" not in commands["baseline-resnet8-seed0"]
    assert all(command[command.index("--epochs") + 1] == "3" for command in commands.values())
    settings = {name: sweep.requested_settings(command, str(tmp_path / name)) for name, command in commands.items()}
    assert settings["kdsvd-resnet8-seed0"]["kdsvd_k"] == 4 and "kdsvd_k" not in settings["st-resnet8-seed0"]
    assert sweep.method_script_args(["--T", "2", "--kdsvd-k=4", "--lr", "0.1"], "st") == ["--T", "2", "--lr", "0.1"]


def test_a_method_with_its_own_recipe_gets_a_baseline_trained_with_it(teacher, cifar10_root, tmp_path):
    """MLKD trains at its official LR (0.025): the sweep adds a baseline at that LR, whose identity is
    the MLKD run's without its KD settings, so that report.py gives MLKD's row a gain."""
    args = sweep_args("--methods", "mlkd", "st", "--seeds", 0, "--teacher-checkpoint", teacher, "--student",
                      "resnet8", "--data-root", cifar10_root, "--", "--epochs", 3, "--device", DEVICE)
    commands = {os.path.basename(out): command for out, command in sweep.jobs(args, str(tmp_path))}
    assert list(commands) == ["st-resnet8-seed0", "baseline-resnet8-seed0", "baseline-lr-0.025-resnet8-seed0",
                              "mlkd-resnet8-seed0"]
    assert commands["baseline-lr-0.025-resnet8-seed0"] == commands["baseline-resnet8-seed0"] + ["--lr", "0.025"]
    identity = {name: {k: v for k, v in sweep.requested_identity(command, str(tmp_path / name)).items()
                       if k not in report.KD_SETTINGS} for name, command in commands.items()}
    assert identity["mlkd-resnet8-seed0"] == identity["baseline-lr-0.025-resnet8-seed0"]
    assert identity["st-resnet8-seed0"] == identity["baseline-resnet8-seed0"]
    assert [out for out, _ in sweep.jobs(args, str(tmp_path), with_recipe_baselines=False)] == \
        [str(tmp_path / name) for name in commands if "lr-0.025" not in name]
    assert sweep.setting_words("lr_milestones", [150, 180]) == "lr-milestones-150-180"
    assert sweep.flag_words("nesterov", False) == ["--no-nesterov"]
    assert sweep.flag_words("lr_milestones", [150, 180]) == ["--lr-milestones", "150", "180"]


def test_sweep_refusals_come_before_anything_trains(teacher, cifar10_root, tmp_path):
    common = ("--teacher-checkpoint", teacher, "--student", "resnet8", "--data-root", cifar10_root,
              "--output-root", tmp_path / "sweep", "--seeds", 0, 1)
    cases = [(("--methods", "st", "--", "--kdsvd-k", 4), "--kdsvd-k belongs to --method kdsvd, which this sweep "
                                                         "does not run"),
             (("--methods", "st", "--tune", 0.1, 1, "--", "--epochs", 1), "--tune chooses each KD weight on "
                                                                          "validation images"),
             (("--methods", "st", "--tune", 0.1, "--", "--kd-weight", 0.5, "--val-split", 10),
              "--kd-weight after -- would set one weight for every method"),
             (("--methods", "st", "--tune", 0.1, "--tune-seed", 5, "--", "--val-split", 10),
              "--tune-seed 5 is not one of --seeds [0, 1]"),
             (("--methods", "st", "--tune-widen", 1, "--", "--val-split", 10), "--tune-widen widens the grid of KD "
                                                                               "weights that --tune tries")]
    for flags, message in cases:
        proc = run_script("sweep.py", *common, *flags, check=False)
        assert_user_error(proc, message)
        assert not any((tmp_path / "sweep").glob("*/args.json"))  # nothing trained


def test_the_tuner_chooses_on_validation_scores():
    assert sweep.grid_weights(0.9, [0.1, 1, 10]) == [0.9, 0.09, 9.0]  # the default first, rounded
    assert sweep.grid_weights(1.0, [1, 1]) == [1.0]
    assert sweep.chosen_weight({1.0: 60.0, 0.1: 65.0, 10.0: 20.0}, 1.0) == 0.1
    assert sweep.chosen_weight({1.0: 60.0, 0.1: 60.0, 10.0: 60.0}, 1.0) == 1.0  # a tie: the default
    assert sweep.chosen_weight({1.0: 50.0, 0.1: 60.0, 100.0: 60.0}, 1.0) == 0.1  # a tie: the nearer one
    assert sweep.chosen_weight({1.0: None, 0.1: 30.0}, 1.0) == 0.1  # a diverged run never wins
    assert sweep.chosen_weight({1.0: None, 0.1: None}, 1.0) is None


def test_a_best_weight_at_the_grids_end_widens_the_grid():
    """--tune-widen: one step beyond the end where the best weight lies (the step: that end's ratio)."""
    assert sweep.widened_weight({0.1: 65.0, 1.0: 60.0, 10.0: 20.0}, 1.0) == 0.01
    assert sweep.widened_weight({0.1: 20.0, 1.0: 60.0, 10.0: 65.0}, 1.0) == 100.0
    assert sweep.widened_weight({0.5: 20.0, 1.0: 60.0, 4.0: 65.0}, 1.0) == 16.0
    assert sweep.widened_weight({0.9: 61.0, 0.09: 66.0, 9.0: 50.0}, 0.9) == 0.009  # rounded as the grid is
    assert sweep.widened_weight({0.1: 60.0, 1.0: 65.0, 10.0: 20.0}, 1.0) is None  # the best inside
    assert sweep.widened_weight({0.1: 60.0, 1.0: 65.0, 10.0: None}, 1.0) is None  # beyond 1, a run diverged
    assert sweep.widened_weight({1.0: None, 0.1: None}, 1.0) is None
    assert sweep.widened_weight({0.0: 60.0}, 0.0) is None  # one weight (FSP, AB: 0): no step


def test_the_sweep_widens_the_grid_of_a_method_whose_best_weight_is_at_its_end(tmp_path):
    """widen_grid adds, per method whose tuning runs all finished, the weight beyond its best end, and
    its run's job; a method whose best lies inside, or one of whose runs failed, gets none."""
    args = sweep_args("--methods", "rkd", "st", "at", "--seeds", 0, "--tune", 0.1, 10, "--tune-widen", 2,
                      "--teacher-checkpoint", "teacher.pt", "--", "--val-split", 10)
    grid, scores = {}, {"rkd": (64.0, 60.0, 20.0), "st": (50.0, 60.0, 30.0), "at": (30.0, 40.0, 50.0)}
    for method, (low, default, high) in scores.items():
        runs = {}
        for weight, score in ((0.1, low), (1.0, default), (10.0, high)):
            out = tmp_path / f"{method}-{weight}"
            out.mkdir()
            (out / "metrics.csv").write_text(f"epoch,val_top1\n1,\n2,{score}\n")
            runs[weight] = (str(out), ["train_kd.py"])
        grid[method] = (1.0, runs)
    added = sweep.widen_grid(args, str(tmp_path), grid, failures=[str(tmp_path / "at-1.0")])
    assert [os.path.basename(out) for out, _ in added] == ["rkd-kd-weight-0.01-resnet20-seed0"]
    command = added[0][1]
    assert command[command.index("--method") + 1] == "rkd" and command[command.index("--kd-weight") + 1] == "0.01"
    assert sorted(grid["rkd"][1]) == [0.01, 0.1, 1.0, 10.0] and sorted(grid["st"][1]) == [0.1, 1.0, 10.0]


def test_jobs_share_the_cpu_or_fill_each_gpu():
    assert sweep.run_slots([], 1, 2) == [(None, None)]          # one run, every thread
    assert sweep.run_slots([], 2, 2) == [(None, 1), (None, 1)]  # two single-threaded runs
    assert sweep.run_slots([], 3, 16) == [(None, 5)] * 3
    assert sweep.run_slots([0, 1], 2, 16) == [(0, None), (0, None), (1, None), (1, None)]


def test_a_run_that_diverged_is_done_not_failed(tmp_path):
    """A run that stopped on non-finite values (exit 2, diverged.json) does not fail the sweep, nor keep
    its method from being tuned: the tuner scores it as diverged; any other non-zero exit fails."""
    class ExitingRunner(RecordingRunner):
        def run(self, out, command, resume, gpu=None, threads=None):
            super().run(out, command, resume, gpu, threads)
            return 2
    diverged, broken = tmp_path / "st-kd-weight-10-seed0", tmp_path / "st-kd-weight-0.1-seed0"
    for out in (diverged, broken):
        out.mkdir()
    (diverged / "diverged.json").write_text('{"epoch": 1, "message": "..."}')
    todo = [(str(out), ["train_kd.py", "--method", "st"], False) for out in (diverged, broken)]
    assert sweep.run_all(ExitingRunner(), todo, [(None, None)], ["st"], cache=False) == [str(broken)]
    assert sweep.last_val_top1(str(diverged)) is None


class RecordingRunner:
    signum = None

    def __init__(self):
        self.calls = []

    def run(self, out, command, resume, gpu=None, threads=None):
        self.calls.append((out, threads))
        return 0


@pytest.mark.parametrize("first, resume, alone", [("pkt", False, True), ("pkt", True, False), ("st", False, False)])
def test_only_a_fresh_first_cache_reader_runs_alone(first, resume, alone):
    """The run that may build the teacher cache runs with every thread before the others start; a
    resumed one (its cache exists) or another method's run shares the CPU from the start."""
    methods = ["st", "pkt"]  # cache order: pkt reads more of the teacher's outputs, so it builds the cache
    todo = [(f"{first}-seed0", ["train_kd.py", "--method", first], resume)] + \
        [(f"{m}-seed1", ["train_kd.py", "--method", m], False) for m in methods]
    runner = RecordingRunner()
    assert sweep.run_all(runner, todo, [(None, 1), (None, 1)], methods, cache=True) == []
    assert sorted(out for out, _ in runner.calls) == sorted(out for out, _, _ in todo)
    assert (runner.calls[0] == (f"{first}-seed0", None)) == alone
    assert all(threads == 1 for _, threads in runner.calls[alone:])
    runner = RecordingRunner()
    sweep.run_all(runner, todo, [(None, 1), (None, 1)], methods, cache=False)
    assert all(threads == 1 for _, threads in runner.calls)


def test_the_report_gives_default_and_tuned_rows_and_the_tuning_runs(tmp_path):
    """With sweep.py's tuning.json: the tuned weight's row is labelled 'tuned', a weight not chosen
    appears in the tuning table only, with its validation and test top-1, and the agreement of the
    two rankings is given."""
    for seed in (0, 1, 2):
        fake_run(tmp_path, f"base{seed}", "cifar10", "baseline", "resnet20", seed, [50, 60 + seed], [50, 61])
        fake_run(tmp_path, f"rkd{seed}", "cifar10", "rkd", "resnet20", seed, [40, 45 + seed], [40, 44 + seed],
                 kd_weight=1.0, w_dist=25.0)
        fake_run(tmp_path, f"rkd-0.1-{seed}", "cifar10", "rkd", "resnet20", seed, [40, 63 + seed], [40, 62 + seed],
                 kd_weight=0.1, w_dist=25.0)
    fake_run(tmp_path, "rkd-10-0", "cifar10", "rkd", "resnet20", 0, [10, 20], [10, 21], kd_weight=10.0, w_dist=25.0)
    identity = {k: v for k, v in report.run_identity(json.load(open(tmp_path / "rkd0" / "args.json"))).items()
                if k not in ("seed", "kd_weight")}
    tuning = {"seed": 0, "selected_on": "validation top-1, last epoch", "methods": {"rkd": {
        "default": 1.0, "chosen": 0.1, "identity": identity,
        "runs": [{"kd_weight": 1.0, "folder": "rkd0", "val_top1": 44.0},
                 {"kd_weight": 0.1, "folder": "rkd-0.1-0", "val_top1": 62.0},
                 {"kd_weight": 10.0, "folder": "rkd-10-0", "val_top1": 21.0}]}}}
    fake_run(tmp_path, "fsp0", "cifar10", "fsp", "resnet20", 0, [50, 61], [50, 60], kd_weight=0.0)
    tuning["methods"]["fsp"] = {  # a method that distils in its stage alone: weight 0, nothing to tune
        "default": 0.0, "chosen": 0.0, "runs": [{"kd_weight": 0.0, "folder": "fsp0", "val_top1": 60.0}],
        "identity": {k: v for k, v in report.run_identity(json.load(open(tmp_path / "fsp0" / "args.json"))).items()
                     if k not in ("seed", "kd_weight")}}
    for seed in (0, 1, 2):  # a method with its own recipe (MLKD's LR) and the baseline at that recipe
        fake_run(tmp_path, f"base-lr{seed}", "cifar10", "baseline", "resnet20", seed, [50, 55 + seed], [50, 55],
                 settings={"lr": 0.025})
        fake_run(tmp_path, f"mlkd{seed}", "cifar10", "mlkd", "resnet20", seed, [50, 57 + seed], [50, 56 + seed],
                 settings={"lr": 0.025}, kd_weight=0.9)
    fake_run(tmp_path, "mlkd-0.09-0", "cifar10", "mlkd", "resnet20", 0, [50, 52], [50, 51], settings={"lr": 0.025},
             kd_weight=0.09)
    tuning["methods"]["mlkd"] = {
        "default": 0.9, "chosen": 0.9, "runs": [{"kd_weight": 0.9, "folder": "mlkd0", "val_top1": 56.0},
                                                {"kd_weight": 0.09, "folder": "mlkd-0.09-0", "val_top1": 51.0}],
        "identity": {k: v for k, v in report.run_identity(json.load(open(tmp_path / "mlkd0" / "args.json"))).items()
                     if k not in ("seed", "kd_weight")}}
    json.dump(tuning, open(tmp_path / "tuning.json", "w"))
    os.makedirs(tmp_path / "bss-seed0")  # a sweep's run that could not go on
    (tmp_path / "bss-seed0" / "log.txt").write_text("recipe: ...\nerror: The teacher ... cannot teach.\n")
    os.makedirs(tmp_path / "ofd-seed0")  # diverged before an epoch was saved: it has no row to count it
    (tmp_path / "ofd-seed0" / "log.txt").write_text("error: epoch 1 ended with non-finite weights.\n")
    (tmp_path / "ofd-seed0" / "metrics.csv").write_text("epoch,train_loss,test_top1,seconds\n")
    (tmp_path / "ofd-seed0" / "diverged.json").write_text('{"epoch": 1, "message": "..."}')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), str(tmp_path), "--no-plots"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "report.md").read_text()
    rows = {line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| cifar10 |")}
    assert set(rows) == {"baseline", "rkd", "rkd (kd weight 0.1, tuned)", "fsp", "baseline (lr 0.025)",
                         "mlkd (official recipe: lr 0.025)"}  # the runs of weights not chosen: tuning table only
    assert "| 0,1,2 | 64.00 ± 1.00 |" in rows["rkd (kd weight 0.1, tuned)"] and "| +3.00 ± 0.82 |" in rows[
        "rkd (kd weight 0.1, tuned)"]
    assert "Best epochs were chosen on the validation images (val); the test images chose nothing." in text
    assert ("| rkd | 1 | 0.1: 62.00 (63.00) · 1: 44.00 (45.00) · 10: 21.00 (20.00) | 0.1 (the smallest tried) |"
            in text.replace("**", ""))  # the best may lie below the grid
    assert "**0.1**: 62.00 (63.00)" in text
    assert "| fsp | 0 | **0**: 60.00 (61.00) | 0 |" in text
    assert "also the best on the test images for 2 of 2 methods" in text  # fsp's single weight ranks nothing
    assert "averaged over 2 methods: 1.00" in text
    assert f"- {tmp_path / 'bss-seed0'}: error: The teacher ... cannot teach." in text
    assert f"- {tmp_path / 'ofd-seed0'}: error: epoch 1 ended with non-finite weights." in text
    # the summary: a line per method, default and tuned side by side, the larger gain first
    summary = text[text.index("| method | default weight | top-1 |"):].splitlines()[2:7]
    assert [line.split(" | ")[:7] for line in summary] == [
        ["| rkd", "1", "46.00 ± 1.00", "-15.00 ± 0.82", "0.1 (the smallest tried)", "64.00 ± 1.00", "+3.00 ± 0.82"],
        ["| mlkd (official recipe: lr 0.025)", "0.9", "58.00 ± 1.00", "+2.00 ± 0.82 (over baseline (lr 0.025))",
         "0.9 (the default)", "=", "="],
        ["| fsp", "0", "61.00 (1 seed)", "+0.00", "nothing to tune", "", ""],
        ["| bss", "–", "error: The teacher ... cannot teach.", "", "", "", ""],
        ["| ofd", "–", "error: epoch 1 ended with non-finite weights.", "", "", "", ""]]
    assert "over the baseline (61.00 ± 1.00)" in text
    # README's table of the published experiment comes from this summary (docs/make_docs.py)
    minutes = [line.rsplit(" | ", 1)[1].split()[0] for line in summary]
    assert load_make_docs().evidence_table(str(tmp_path / "report.md")).splitlines()[2:] == [
        f"| rkd | 1 → 0.1* | -15.00 ± 0.82 | +3.00 ± 0.82 | {minutes[0]} |",
        f"| mlkd (official recipe: lr 0.025) | 0.9 | +2.00 ± 0.82 (over baseline (lr 0.025)) | = | {minutes[1]} |",
        f"| fsp | 0 | +0.00 | nothing to tune | {minutes[2]} |",
        "| bss | – | error: The teacher ... cannot teach. | | |",
        "| ofd | – | error: epoch 1 ended with non-finite weights. | | |"]
    runs = report.read_runs(str(tmp_path))
    report.apply_tuning(runs, report.read_tuning(str(tmp_path)))
    # gains.png: a line per method, its default and tuned rows on it, the larger gain last (at the top)
    assert [(label, sorted(rows)) for label, rows in report.gain_lines(report.summarise(runs))] == [
        ("fsp", ["default"]), ("mlkd", ["default"]), ("rkd (tuned: kd weight 0.1)", ["default", "tuned"])]
    # a report made mid-sweep: a tuned run still training is marked in the summary and in README's table
    metrics = tmp_path / "rkd-0.1-2" / "metrics.csv"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:2]))  # its first epoch only
    subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), str(tmp_path), "--no-plots"], cwd=ROOT,
                   capture_output=True, check=True)
    text = (tmp_path / "report.md").read_text()
    assert "| 0.1 (the smallest tried) | 55.67 ± 13.58 (1 incomplete) | -5.33 ± " in text
    readme_row = next(line for line in load_make_docs().evidence_table(str(tmp_path / "report.md")).splitlines()
                      if line.startswith("| rkd |"))
    assert readme_row.startswith("| rkd | 1 → 0.1* | -15.00 ± 0.82 | -5.33 ± ")
    assert readme_row.endswith(" (runs incomplete) | " + minutes[0] + " |")


def test_a_collapsed_runs_gain_does_not_squeeze_the_others():
    """gains.png's axis ends at twice the best gain (at least 10 points) below zero, in steps of 5, when
    a gain lies beyond: that gain is drawn at the end, with its value."""
    assert report.gain_axis_left([7.6, 0.4, -18.6, -55.7]) == -20
    assert report.gain_axis_left([2.0, -9.0, -12.0]) == -10
    assert report.gain_axis_left([12.0, -30.0]) == -25
    assert report.gain_axis_left([7.6, -12.0]) is None  # every gain fits
    assert report.gain_axis_left([-1.0, -3.0]) is None


def test_wall_time_leaves_a_paused_epoch_out(tmp_path):
    """A run's wall time is its median epoch's time times its epochs (evaluated and other epochs
    apart): an epoch that a pause stretched (kill -STOP, a suspended laptop) does not count."""
    fake_run(tmp_path, "paused", "cifar10", "baseline", "resnet20", 0, [50, 55, 60], seconds=[31.0, 3000.0, 30.0])
    assert report.read_runs(str(tmp_path))[0]["seconds"] == 93.0
    # --eval-every: evaluated epochs (here 3 and 5) and the others each by their own median
    fake_run(tmp_path, "sparse", "cifar10", "baseline", "resnet20", 1, ["", "", 50, "", 60],
             seconds=[10.0, 11.0, 20.0, 900.0, 22.0])
    assert {run["folder"][-6:]: run["seconds"] for run in report.read_runs(str(tmp_path))}["sparse"] == 75.0
    # the report's last line: every run read, and their wall times summed
    assert report.training_time_line([{"seconds": 5400.0}, {"seconds": 1800.0}, {"seconds": 180.0}]) == \
        "In all: 3 runs, 2.0 hours of training (the sum of their wall times, measured as in the table).\n"


def test_spearman_rank_correlation():
    assert report.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert report.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert report.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert report.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1])
    assert report.spearman([1], [2]) is None and report.spearman([1, 1], [1, 2]) is None


def test_small_batch_benchmark_shows_pkt_and_sp_grow_on_a_small_batch(teacher, cifar10_root, capsys):
    """benchmarks/small_batch.py: PKT's and SP's gradients on 8 images are many times their norm on
    128, as their N x N averages make them; a per-sample loss's grows by about sqrt(128 / 8) = 4."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import small_batch
    small_batch.main(["--teacher", str(teacher), "--data-root", cifar10_root, "--student", "resnet8",
                      "--methods", "pkt", "sp", "st"])
    ratios = {line.split(" | ")[0][2:]: float(line.split(" | ")[-1].rstrip(" |"))
              for line in capsys.readouterr().out.splitlines()[2:]}
    assert ratios["pkt"] > 10 and ratios["sp"] > 8 and ratios["st"] < 6, ratios  # here 22, 16 and 0.9
