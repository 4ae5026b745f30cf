"""One-epoch cost of every KD method relative to plain KD (st), measured with train_kd.py itself.

    python benchmarks/epoch_cost.py --teacher runs/cifar10-resnet110-seed0/last.pt --student resnet20 \
        --data-root ./dataset -- --device cpu

Each method trains its student for one epoch (`--epochs 1`, the data set's recipe otherwise, plus
anything after `--`) into a temporary folder. Reported per method: the epoch's seconds from
metrics.csv (training and evaluation) as a multiple of st's, and for a method with a stage (FT, AB,
FSP) the seconds of one stage epoch (the stage runs `--stage-epochs` epochs; no cached stage result
is reused), estimated as the run's wall time less the epoch and less st's start-up. Not a test: run
it on a quiet machine, one run at a time.
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kd_losses import METHODS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="a train_base.py checkpoint")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--data-root", default="./dataset")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--stage-epochs", type=int, default=1, help="epochs of a method's stage (its *_epochs flag)")
    p.add_argument("--output", help="also write the table to this markdown file")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="after --: more train_kd.py flags")
    return p.parse_args()


def run(method, args, folder):
    """Seconds of the epoch and of everything before it (stage, set-up) for one method."""
    out = os.path.join(folder, method)
    extra = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    stage = [x for key in METHODS[method].hyperparameters if key.endswith("_epochs")
             for x in (f"--{key.replace('_', '-')}", str(args.stage_epochs))]
    command = [sys.executable, os.path.join(ROOT, "train_kd.py"), "--teacher", args.teacher, "--method", method,
               "--student", args.student, "--data-root", args.data_root, "--output-dir", out, "--epochs", "1",
               *stage, *extra]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.csv")) as f:
        (row,) = list(csv.DictReader(f))
    return float(row["seconds"]), total


def main():
    args = get_args()
    methods = ["st"] + [m for m in args.methods if m != "st"]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        startup = None
        for method in methods:
            epoch, total = run(method, args, folder)
            if method == "st":
                startup = total - epoch  # start-up, data loading and the teacher's evaluation
            stage = (total - epoch - startup) / args.stage_epochs if METHODS[method].has_stage else None
            results[method] = (epoch, stage)
            print(f"{method:8s} epoch {epoch:7.1f} s" + (f"  stage {stage:7.1f} s/epoch" if stage is not None else ""),
                  flush=True)
    base = results["st"][0]
    lines = ["| method | epoch (s) | x st | one stage epoch (s) | x st |", "|---|---|---|---|---|"]
    for method, (epoch, stage) in results.items():
        stage_cells = f"{stage:.1f} | {stage / base:.2f}" if stage is not None else "– | –"
        lines.append(f"| {method} | {epoch:.1f} | {epoch / base:.2f} | {stage_cells} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
