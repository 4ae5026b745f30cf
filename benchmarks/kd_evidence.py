"""Does distillation help here? A strong teacher, data-scarce students, and an evaluation set large
enough to tell: the whole experiment, from the official CIFAR-10 files to the report.

    python benchmarks/kd_evidence.py --cifar10 ./dataset --work runs/evidence
    python benchmarks/kd_evidence.py --cifar10 ./dataset --work runs/evidence --publish docs/evidence \\
        -- --amp bf16 --channels-last         # flags after -- go to both training scripts (here: a CPU)

1. Data. --cifar10 holds cifar-10-batches-py/ with the 50,000 official training images (downloaded
   there when missing, as the training scripts do). Two folders are written under WORK/data:
   - students/: training batches holding the students' 5,000 images, the first 100 images of
     every class inside each official data_batch_k, in official order (the images of
     cifar10-mini); test batch: 10,000 images the students never see, the first 1,000 of every
     class among the other 45,000 training images, in official order (--eval-per-class).
   - official-test/: the same training batches, and the official test batch.
   WORK/data/eval_indices.txt lists the evaluation images' official training indices.
2. Teacher: train_base.py on all 50,000 images (--teacher, --teacher-epochs).
3. Students: sweep.py on students/ with --val-split 500 (the best epoch is chosen on held-out
   training images, never on the evaluation set), the baseline and every --methods, per seed, the
   teacher cache on for the methods that can read it. --scaled METHOD=WEIGHT adds a run of METHOD
   with --kd-weight WEIGHT per seed (or per --scaled-seeds): for a method whose default weight, set
   for 200 epochs on all the data, may dominate so short a run. report.py labels it
   "METHOD (kd weight WEIGHT)".
4. report.py on the sweep (table and curves: test top-1 is top-1 on the 10,000 evaluation images),
   and every run's last and best checkpoints evaluated on the official test images
   (WORK/sweep/official_test.md). --publish copies both reports and the plots to a folder.
Steps whose outputs exist are skipped (the sweep resumes), so rerunning finishes an interrupted
experiment.
"""
import argparse
import os
import pickle
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import report  # noqa: E402
from data import DATASETS, DeviceLoader, data_sha256, load_cifar  # noqa: E402
from engine import evaluate, load_predictor  # noqa: E402
from kd_losses import METHODS  # noqa: E402
from sweep import Runner, check_jobs  # noqa: E402
from utils import run_main  # noqa: E402

DEFAULT_METHODS = ["st", "at", "fitnet", "nst", "ft", "rkd", "logits", "dkd", "pkt", "sp", "crd"]
SPEC = DATASETS["cifar10"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cifar10", default="./dataset", help="folder holding (or to download) cifar-10-batches-py/")
    p.add_argument("--work", default="runs/evidence", help="where the data folders and every run go")
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student", default="resnet20")
    p.add_argument("--epochs", type=int, default=30, help="the students' epochs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--per-class", type=int, default=100,
                   help="students' images per class and official training batch (100: cifar10-mini's 5,000)")
    p.add_argument("--eval-per-class", type=int, default=1000, help="evaluation images per class")
    p.add_argument("--val-split", type=int, default=500, help="students' held-out images that choose the best epoch")
    p.add_argument("--scaled", nargs="+", default=[], metavar="METHOD=WEIGHT", type=scaled_run,
                   help="also run METHOD with --kd-weight WEIGHT (e.g. rkd=0.1)")
    p.add_argument("--scaled-seeds", type=int, nargs="+", help="the seeds of those runs (default: --seeds)")
    p.add_argument("--publish", metavar="DIR", help="copy the reports and plots here (e.g. docs/evidence)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="after --: flags for both training scripts")
    args = p.parse_args(argv)
    args.script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    return args


def scaled_run(text):
    """'rkd=0.1' -> ('rkd', 0.1), for --scaled."""
    method, _, weight = text.partition("=")
    if method not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {method!r} in {text!r}")
    try:
        if float(weight) >= 0:
            return method, float(weight)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not METHOD=WEIGHT with a weight >= 0, e.g. rkd=0.1")


def write_batch(path, images, labels):
    """A CIFAR-10 python batch (protocol 2, as the official files)."""
    with open(path, "wb") as f:
        pickle.dump({"data": images.reshape(len(images), -1).numpy(), "labels": labels.tolist(),
                     "batch_label": os.path.basename(path)}, f, protocol=2)


def split_indices(labels, per_class, eval_per_class):
    """(student batches: five index tensors, evaluation indices), in official training indices."""
    batches, chosen = [], torch.zeros(len(labels), dtype=torch.bool)
    for k in range(5):
        lo = k * len(labels) // 5
        batch = labels[lo:lo + len(labels) // 5]
        first = [torch.nonzero(batch == c).flatten()[:per_class] for c in range(SPEC.num_classes)]
        batches.append(torch.cat(first).sort().values + lo)
        chosen[batches[-1]] = True
    evaluation = [torch.nonzero((labels == c) & ~chosen).flatten()[:eval_per_class] for c in range(SPEC.num_classes)]
    return batches, torch.cat(evaluation).sort().values


def build_data(args):
    """WORK/data/students and WORK/data/official-test (see the module's docstring)."""
    out = os.path.join(args.work, "data")
    students, official = (os.path.join(out, name, SPEC.folder) for name in ("students", "official-test"))
    if os.path.exists(os.path.join(official, "test_batch")):
        return os.path.dirname(students), os.path.dirname(official)
    train_x, train_y, test_x, test_y = load_cifar("cifar10", args.cifar10)
    batches, evaluation = split_indices(train_y, args.per_class, args.eval_per_class)
    if sum(map(len, batches)) != 50 * args.per_class or len(evaluation) != 10 * args.eval_per_class:
        sys.exit(f"error: the {len(train_y)} training images in {args.cifar10} hold too few of some class for "
                 f"--per-class {args.per_class} and --eval-per-class {args.eval_per_class} (the official 50,000 do).")
    for folder in (students, official):
        os.makedirs(folder, exist_ok=True)
        for k, index in enumerate(batches, start=1):
            write_batch(os.path.join(folder, f"data_batch_{k}"), train_x[index], train_y[index])
    write_batch(os.path.join(students, "test_batch"), train_x[evaluation], train_y[evaluation])
    np.savetxt(os.path.join(out, "eval_indices.txt"), evaluation.numpy(), fmt="%d")
    write_batch(os.path.join(official, "test_batch"), test_x, test_y)  # last: it marks the step done
    print(f"data: {sum(len(b) for b in batches)} student images, {len(evaluation)} evaluation images, "
          f"{len(test_y)} official test images in {out}", flush=True)
    return os.path.dirname(students), os.path.dirname(official)


def run(*command):
    print("+ python " + " ".join(map(str, command)), flush=True)
    status = subprocess.call([sys.executable, *map(str, command)], cwd=ROOT)
    if status != 0:
        sys.exit(f"error: {command[0]} failed (exit {status}).")


def official_test(sweep, official_root, device):
    """Every run's last.pt and best.pt on the official test images: WORK/sweep/official_test.md."""
    train_x, train_y, test_x, test_y = load_cifar("cifar10", official_root, download=False)
    loader = DeviceLoader(test_x.to(device), test_y.to(device), 500, SPEC.mean, SPEC.std, train=False)
    results = defaultdict(lambda: {"last": [], "best": []})
    for run in report.read_runs(sweep):  # labelled as report.py labels them
        for which in ("last", "best"):
            model = load_predictor(os.path.join(run["folder"], f"{which}.pt"), device)
            results[run["label"]][which].append(evaluate(model, loader)["top1"])
    lines = [f"Test top-1 (%) on the {len(test_y):,} official CIFAR-10 test images, mean ± std over seeds "
             f"(the students' best epoch chosen on their held-out training images):", "",
             "| run | seeds | last epoch | best epoch |", "|---|---|---|---|"]
    for method, by in results.items():
        cells = [f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}" for v in by.values()]
        lines.append(f"| {method} | {len(by['last'])} | {cells[0]} | {cells[1]} |")
    path = os.path.join(sweep, "official_test.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return path


def main(argv=None):
    args = get_args(argv)
    students_root, official_root = build_data(args)
    teacher = os.path.join(args.work, f"teacher-{args.teacher}")
    if not os.path.exists(os.path.join(teacher, "metrics.csv")) or \
            sum(1 for _ in open(os.path.join(teacher, "metrics.csv"))) <= args.teacher_epochs:
        run("train_base.py", "--data-root", args.cifar10, "--model", args.teacher, "--epochs", args.teacher_epochs,
            "--output-dir", teacher, *(["--resume", "auto"] if os.path.exists(os.path.join(teacher, "last.pt"))
                                      else []), *args.script_args)
    sweep = os.path.join(args.work, "sweep")
    run("sweep.py", "--data-root", students_root, "--teacher-checkpoint", os.path.join(teacher, "last.pt"),
        "--teacher", args.teacher, "--student", args.student, "--methods", *args.methods, "--seeds", *args.seeds,
        "--output-root", sweep, "--teacher-cache", "on", "--", "--epochs", args.epochs, "--val-split",
        args.val_split, *args.script_args)
    # the scaled runs as the sweep's own: skipped when complete with these settings, resumed when interrupted
    scaled = [(os.path.join(sweep, f"{method}-kd-weight-{weight:g}-{args.student}-seed{seed}"),
               [str(item) for item in ["train_kd.py", "--teacher", os.path.join(teacher, "last.pt"), "--student",
                                       args.student, "--method", method, "--kd-weight", weight, "--seed", seed,
                                       "--data-root", students_root, "--teacher-cache", "auto", "--epochs",
                                       args.epochs, "--val-split", args.val_split, *args.script_args]])
              for method, weight in args.scaled for seed in args.scaled_seeds or args.seeds]
    students_sha256 = data_sha256(*load_cifar("cifar10", students_root, download=False))
    with Runner() as runner:
        for job in check_jobs(scaled, students_sha256, rerun=False):
            if runner.run(*job) != 0:
                sys.exit(f"error: the run in {job[0]} failed or was stopped.")
    run("report.py", sweep)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    official = official_test(sweep, official_root, device)
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        for name in ("report.md", "test_top1.png", "train_loss.png"):
            if os.path.exists(os.path.join(sweep, name)):
                shutil.copy(os.path.join(sweep, name), args.publish)
        shutil.copy(official, args.publish)
        print(f"published to {args.publish}")


if __name__ == "__main__":
    run_main(main)
