"""Runs per hour on a CPU: the same sweep with one run at a time on every core (--jobs 1) and with
several single-threaded runs at once (--jobs N), one after the other in one process.

    python benchmarks/cpu_jobs.py --teacher runs/teacher/last.pt --data-root ./dataset \
        -- --epochs 2 --amp bf16 --channels-last

Each variant runs sweep.py (--methods, --seeds, the baseline, the teacher cache off) into a fresh
temporary folder, so every variant trains the same runs from scratch; its wall time includes each
run's start-up, as a sweep's does. Not a test: run it on a quiet machine (nothing else busy).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kd_losses import METHODS  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="a train_base.py checkpoint")
    p.add_argument("--student", default="resnet20")
    p.add_argument("--data-root", default="./dataset")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=["st"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--jobs", nargs="+", type=int, default=[1, 2], help="the variants: sweep.py --jobs N")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="after --: flags for the runs")
    args = p.parse_args()
    args.script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    return args


def main():
    args = get_args()
    cores = len(os.sched_getaffinity(0))
    runs = len(args.seeds) * (len(args.methods) + 1)
    lines = [f"{runs} runs ({', '.join(args.methods)} and the baseline, seeds {args.seeds}) per variant, on "
             f"{cores} cores", "", "| sweep.py | threads per run | wall time | runs per hour | vs --jobs "
             f"{args.jobs[0]} |", "|---|---|---|---|---|"]
    first = None
    for jobs in args.jobs:
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, os.path.join(ROOT, "sweep.py"), "--teacher-checkpoint", args.teacher,
                       "--student", args.student, "--data-root", args.data_root, "--methods", *args.methods,
                       "--seeds", *map(str, args.seeds), "--teacher-cache", "off", "--jobs", str(jobs),
                       "--output-root", folder, "--", *args.script_args]
            start = time.perf_counter()
            subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
        per_hour = runs * 3600 / wall
        first = first or per_hour
        threads = cores if jobs == 1 else max(1, cores // jobs)
        lines.append(f"| --jobs {jobs} | {threads} | {wall:.0f} s | {per_hour:.1f} | {per_hour / first:.2f}x |")
        print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
