"""Does distillation help here? A strong teacher, data-scarce students, and an evaluation set large
enough to tell: the whole experiment, from the official CIFAR-10 files to the report.

    python benchmarks/kd_evidence.py --cifar10 ./dataset --work runs/evidence
    python benchmarks/kd_evidence.py --cifar10 ./dataset --work runs/evidence --jobs 2 --publish docs/evidence \\
        -- --amp bf16 --channels-last         # flags after -- go to both training scripts (here: a CPU)

1. Data. --cifar10 holds cifar-10-batches-py/ with the 50,000 official training images (downloaded
   there when missing, as the training scripts do). Written under WORK/data:
   - students/: training batches holding the students' 5,000 images, the first 100 images of
     every class inside each official data_batch_k, in official order (the images of
     cifar10-mini); test batch: 10,000 evaluation images the students never see, the first 1,000
     of every class among the other 45,000 training images, in official order (--eval-per-class).
   - validation_batch: 10,000 validation images, the first 1,000 of every class among the 35,000
     training images left (--val-per-class): they choose the students' best epochs and KD weights.
   - official-test/: the same training batches, and the official test batch.
   eval_indices.txt and val_indices.txt list those images' official training indices.
2. Teacher: train_base.py on all 50,000 images (--teacher, --teacher-epochs).
3. Students: sweep.py on students/ with --val-file validation_batch: the baseline and every
   --methods, per seed, the teacher cache on for the methods that can read it, the AB and FSP
   stages shortened in proportion (--stage-epochs: the student's budget stays near the others');
   FT's paraphraser stage, which trains no student, keeps its 30 epochs; each epoch's last batch
   (8 of the 5,000 images) left out (--drop-last: PKT and SP took steps many times a full
   batch's on it, which sank them 20 points); evaluated every --eval-every epochs and at the
   last (best epochs chosen among those). With --tune, each
   method's KD weight tuned on the validation images (sweep.py --tune: its default and the
   factors' weights on the first seed, one step further where the best is at the grid's end, up
   to --tune-widen times, and the best on every seed). --jobs runs that many at once.
4. report.py on the sweep (tables and plots: test top-1 is top-1 on the 10,000 evaluation images),
   and every reported run's last and best checkpoints evaluated on the official test images, with the
   gains there and how their ranking agrees with the report's (WORK/sweep/official_test.md).
   --publish copies the reports and the plots to a folder.
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

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import report  # noqa: E402
from data import DATASETS, DeviceLoader, load_cifar  # noqa: E402
from engine import evaluate, load_predictor  # noqa: E402
from kd_losses import METHODS  # noqa: E402
from utils import non_negative, positive, run_main  # noqa: E402

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
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--per-class", type=int, default=100,
                   help="students' images per class and official training batch (100: cifar10-mini's 5,000)")
    p.add_argument("--eval-per-class", type=int, default=1000, help="evaluation images per class")
    p.add_argument("--val-per-class", type=int, default=1000,
                   help="validation images per class (they choose best epochs and KD weights)")
    p.add_argument("--tune", type=positive(float), nargs="*", default=[0.1, 1, 10], metavar="FACTOR",
                   help="sweep.py --tune: the factors of each method's default KD weight tried (none: no tuning)")
    p.add_argument("--tune-widen", type=non_negative(int), default=2, metavar="N",
                   help="sweep.py --tune-widen: where a best weight is at an end of its grid, up to N steps beyond")
    p.add_argument("--jobs", type=positive(int), default=1, help="sweep.py --jobs: runs at once")
    p.add_argument("--eval-every", type=positive(int), default=3,
                   help="the students' epochs between evaluations on the 20,000 test and validation images, "
                        "which cost about as much as an epoch's training on a CPU (default: 3)")
    p.add_argument("--stage-epochs", type=positive(int), default=4,
                   help="epochs of the AB and FSP stages, which train the student before its --epochs (their "
                        "defaults, 50, precede 200 epochs)")
    p.add_argument("--publish", metavar="DIR", help="copy the reports and plots here (e.g. docs/evidence)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="after --: flags for both training scripts")
    args = p.parse_args(argv)
    args.script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    return args


def write_batch(path, images, labels):
    """A CIFAR-10 python batch (protocol 2, as the official files)."""
    with open(path, "wb") as f:
        pickle.dump({"data": images.reshape(len(images), -1).numpy(), "labels": labels.tolist(),
                     "batch_label": os.path.basename(path)}, f, protocol=2)


def split_indices(labels, per_class, eval_per_class, val_per_class):
    """(student batches: five index tensors, evaluation indices, validation indices), in official
    training indices."""
    batches, chosen = [], torch.zeros(len(labels), dtype=torch.bool)
    for k in range(5):
        lo = k * len(labels) // 5
        batch = labels[lo:lo + len(labels) // 5]
        first = [torch.nonzero(batch == c).flatten()[:per_class] for c in range(SPEC.num_classes)]
        batches.append(torch.cat(first).sort().values + lo)
        chosen[batches[-1]] = True
    evaluation = torch.cat([torch.nonzero((labels == c) & ~chosen).flatten()[:eval_per_class]
                            for c in range(SPEC.num_classes)]).sort().values
    chosen[evaluation] = True
    validation = torch.cat([torch.nonzero((labels == c) & ~chosen).flatten()[:val_per_class]
                            for c in range(SPEC.num_classes)]).sort().values
    return batches, evaluation, validation


def build_data(args):
    """(students' root, validation file, official test root) under WORK/data (see the module's docstring)."""
    out = os.path.join(args.work, "data")
    students, official = (os.path.join(out, name, SPEC.folder) for name in ("students", "official-test"))
    validation = os.path.join(out, "validation_batch")
    if os.path.exists(os.path.join(official, "test_batch")):
        return os.path.dirname(students), validation, os.path.dirname(official)
    train_x, train_y, test_x, test_y = load_cifar("cifar10", args.cifar10)
    batches, evaluation, held_out = split_indices(train_y, args.per_class, args.eval_per_class, args.val_per_class)
    if sum(map(len, batches)) != 50 * args.per_class or len(evaluation) != 10 * args.eval_per_class or \
            len(held_out) != 10 * args.val_per_class:
        sys.exit(f"error: the {len(train_y)} training images in {args.cifar10} hold too few of some class for "
                 f"--per-class {args.per_class}, --eval-per-class {args.eval_per_class} and --val-per-class "
                 f"{args.val_per_class} (the official 50,000 do for the defaults).")
    for folder in (students, official):
        os.makedirs(folder, exist_ok=True)
        for k, index in enumerate(batches, start=1):
            write_batch(os.path.join(folder, f"data_batch_{k}"), train_x[index], train_y[index])
    write_batch(os.path.join(students, "test_batch"), train_x[evaluation], train_y[evaluation])
    write_batch(validation, train_x[held_out], train_y[held_out])
    np.savetxt(os.path.join(out, "eval_indices.txt"), evaluation.numpy(), fmt="%d")
    np.savetxt(os.path.join(out, "val_indices.txt"), held_out.numpy(), fmt="%d")
    write_batch(os.path.join(official, "test_batch"), test_x, test_y)  # last: it marks the step done
    print(f"data: {sum(len(b) for b in batches)} student images, {len(evaluation)} evaluation images, "
          f"{len(held_out)} validation images, {len(test_y)} official test images in {out}", flush=True)
    return os.path.dirname(students), validation, os.path.dirname(official)


def run(*command):
    print("+ python " + " ".join(map(str, command)), flush=True)
    status = subprocess.call([sys.executable, *map(str, command)], cwd=ROOT)
    if status != 0:
        sys.exit(f"error: {command[0]} failed (exit {status}).")


def official_test(sweep, official_root, device):
    """Every run's last.pt and best.pt on the official test images, and how the ranking there agrees
    with the report's (on the evaluation images): WORK/sweep/official_test.md."""
    train_x, train_y, test_x, test_y = load_cifar("cifar10", official_root, download=False)
    loader = DeviceLoader(test_x.to(device), test_y.to(device), 500, SPEC.mean, SPEC.std, train=False)
    runs = report.read_runs(sweep)
    tuning = report.read_tuning(sweep)
    if tuning:
        report.apply_tuning(runs, tuning)
    rows = report.summarise(runs)  # the report's rows, labelled as it labels them

    def top1(run, which):
        return evaluate(load_predictor(os.path.join(run["folder"], f"{which}.pt"), device), loader)["top1"]
    results = {row["label"]: {which: [top1(run, which) for run in row["runs"]] for which in ("last", "best")}
               for row in rows}
    lines = [f"Test top-1 (%) on the {len(test_y):,} official CIFAR-10 test images, mean ± std over seeds "
             f"(the students' best epoch chosen on the validation images), and the last epoch's gain over "
             f"the row's baseline:", "",
             "| run | seeds | last epoch | gain | best epoch |", "|---|---|---|---|---|"]
    for row in rows:
        by, baseline = results[row["label"]], results.get(row["baseline"])
        last, best = report.mean_std(by["last"]), report.mean_std(by["best"])
        gain = "–" if baseline is None else f"{last[0] - statistics.mean(baseline['last']):+.2f}"
        lines.append(f"| {row['label']} | {len(by['last'])} | {report.fmt(*last)} | {gain} | {report.fmt(*best)} |")
    rho = report.spearman([statistics.mean(results[row["label"]]["last"]) for row in rows],
                          [row["last"][0] for row in rows])
    if rho is not None:
        lines += ["", f"Agreement with the report's ranking (last epoch, on the evaluation images): Spearman's "
                      f"rank correlation of the two means over these {len(rows)} rows: {rho:.2f}."]
    path = os.path.join(sweep, "official_test.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return path


def main(argv=None):
    args = get_args(argv)
    students_root, validation, official_root = build_data(args)
    teacher = os.path.join(args.work, f"teacher-{args.teacher}")
    if not os.path.exists(os.path.join(teacher, "metrics.csv")) or \
            sum(1 for _ in open(os.path.join(teacher, "metrics.csv"))) <= args.teacher_epochs:
        run("train_base.py", "--data-root", args.cifar10, "--model", args.teacher, "--epochs", args.teacher_epochs,
            "--output-dir", teacher, *(["--resume", "auto"] if os.path.exists(os.path.join(teacher, "last.pt"))
                                      else []), *args.script_args)
    sweep = os.path.join(args.work, "sweep")
    run("sweep.py", "--data-root", students_root, "--teacher-checkpoint", os.path.join(teacher, "last.pt"),
        "--teacher", args.teacher, "--student", args.student, "--methods", *args.methods, "--seeds", *args.seeds,
        "--output-root", sweep, "--teacher-cache", "on", "--jobs", args.jobs,
        *(["--tune", *args.tune, "--tune-widen", args.tune_widen] if args.tune else []),
        "--", "--epochs", args.epochs, "--val-file", os.path.abspath(validation), "--drop-last",
        "--eval-every", args.eval_every,
        *[x for method in ("ab", "fsp") if method in args.methods for x in (f"--{method}-epochs", args.stage_epochs)],
        *args.script_args)
    run("report.py", sweep)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    official = official_test(sweep, official_root, device)
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        for name in ("report.md", "gains.png", "test_top1.png", "train_loss.png"):
            if os.path.exists(os.path.join(sweep, name)):
                shutil.copy(os.path.join(sweep, name), args.publish)
        shutil.copy(official, args.publish)
        print(f"published to {args.publish}")


if __name__ == "__main__":
    run_main(main)
