"""Run a whole table: a teacher, the baseline student and a student per KD method, over seeds.

    python sweep.py --dataset cifar10 --teacher resnet110 --student resnet20 --seeds 0 1 2
    python sweep.py --data-root ../data --methods st at --seeds 0 1 -- --epochs 30 --val-split 5000
    python sweep.py --methods st rkd --teacher-cache on --teacher-checkpoint teacher.pt -- --epochs 30

Everything after `--` goes to train_base.py and train_kd.py (the recipe flags; a flag only
train_kd.py has, such as --kd-weight, to train_kd.py alone). A run whose folder
already holds all its epochs is skipped; an interrupted one is resumed (--resume auto).
The teacher trains first (its last.pt teaches, not a best.pt that may have been chosen on the test
set); the other runs then go one after another on one device, or on several GPUs at once (one run
per GPU, --gpus). The KD runs that can read the teacher cache go first, those that read the
teacher's pooled vector before those that read its logits alone, so that the cache the first one
builds (--teacher-cache) serves all the others; with several GPUs that first run goes alone.
Then: python report.py <output-root>.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import threading
from queue import Empty, Queue

import torch

import config
from kd_losses import METHODS
from models import MODELS
from utils import HelpFormatter, non_negative

HERE = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10", help="data set")
    parser.add_argument("--data-root", default="./dataset", help="passed to the scripts")
    parser.add_argument("--teacher", choices=list(MODELS), default="resnet110", help="teacher architecture")
    parser.add_argument("--teacher-seed", type=non_negative(int), default=0, help="seed of the one teacher")
    parser.add_argument("--teacher-checkpoint", help="use this teacher (a train_base.py checkpoint) instead of "
                                                     "training one (--teacher then only names --output-root)")
    parser.add_argument("--student", choices=list(MODELS), default="resnet20", help="student architecture")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="KD methods (default: all)")
    parser.add_argument("--seeds", nargs="+", type=non_negative(int), default=[0, 1, 2],
                        help="student seeds; each method and the baseline run once per seed")
    parser.add_argument("--output-root", help="default: runs/sweep-<dataset>-<teacher>-to-<student>")
    parser.add_argument("--gpus", nargs="*", type=non_negative(int),
                        help="GPU indices to spread the student runs over (default: every visible GPU; "
                             "none: one run at a time on the scripts' default device)")
    parser.add_argument("--teacher-cache", choices=["auto", "on", "off"],
                        help="train_kd.py's --teacher-cache for the methods that can read the cache (the others "
                             "get auto, which leaves it unused; off: off for all) (default: train_kd.py's auto)")
    parser.add_argument("--teacher-cache-dir", metavar="DIR", help="train_kd.py's --teacher-cache-dir")
    parser.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="after --: flags for train_base.py and train_kd.py (recipe, --val-split, ...)")
    return parser


def is_complete(out):
    """True when `out` holds a last.pt and a metrics row for every epoch its args.json asks for."""
    try:
        with open(os.path.join(out, "args.json")) as f:
            epochs = json.load(f)["epochs"]
        with open(os.path.join(out, "metrics.csv")) as f:
            rows = sum(1 for _ in csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        return False
    return rows >= epochs and os.path.exists(os.path.join(out, "last.pt"))


def base_script_args(script_args):
    """script_args without the flags that only train_kd.py has (and their values): train_base.py's."""
    base = set(config.get_args_parser("base")._option_string_actions)
    kd_only = set(config.get_args_parser("kd")._option_string_actions) - base
    kept, keep = [], True
    for token in script_args:
        if token.startswith("--"):
            keep = token.split("=")[0] not in kd_only
        if keep:
            kept.append(token)
    return kept


def cache_order(methods):
    """The methods in the order they run: those that can read the teacher cache first, the ones that
    read more of its outputs (the pooled vector) before those that read the logits alone."""
    def rank(method):
        return (1, 0) if METHODS[method].teacher_cache_refusal() else (0, -len(METHODS[method].features))
    return sorted(methods, key=rank)


def jobs(args, root):
    """(folder, command) of every student run of the sweep, the teacher cache's first reader first."""
    common = ["--dataset", args.dataset, "--data-root", args.data_root]
    for seed in args.seeds:
        for method in cache_order(args.methods):
            cache = []
            if args.teacher_cache:
                on_refused = args.teacher_cache == "on" and METHODS[method].teacher_cache_refusal()
                cache += ["--teacher-cache", "auto" if on_refused else args.teacher_cache]
            if args.teacher_cache_dir:
                cache += ["--teacher-cache-dir", args.teacher_cache_dir]
            yield (os.path.join(root, f"{method}-{args.student}-seed{seed}"),
                   ["train_kd.py", "--teacher", args.teacher_checkpoint, "--student", args.student,
                    "--method", method, "--seed", str(seed), *common, *cache, *args.script_args])
        yield (os.path.join(root, f"baseline-{args.student}-seed{seed}"),
               ["train_base.py", "--model", args.student, "--seed", str(seed), *common,
                *base_script_args(args.script_args)])


def run(out, command, gpu=None):
    """Runs one job to completion (resuming it if it was interrupted); returns its exit status."""
    if is_complete(out):
        print(f"skip  {out} (complete)", flush=True)
        return 0
    os.makedirs(out, exist_ok=True)
    resume = ["--resume", "auto"] if os.path.exists(os.path.join(out, "last.pt")) else []
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    print(f"{'resume' if resume else 'run'}   {out}" + (f" on GPU {gpu}" if gpu is not None else ""), flush=True)
    with open(os.path.join(out, "log.txt"), "a") as log:
        status = subprocess.call([sys.executable, os.path.join(HERE, command[0]), *command[1:],
                                  "--output-dir", out, *resume], stdout=log, stderr=subprocess.STDOUT, env=env)
    if status != 0:
        print(f"FAILED {out} (exit {status}); see {os.path.join(out, 'log.txt')}", flush=True)
    return status


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    root = args.output_root or os.path.join("runs", f"sweep-{args.dataset}-{args.teacher}-to-{args.student}")
    gpus = args.gpus if args.gpus is not None else list(range(torch.cuda.device_count()))
    if args.teacher_checkpoint is None:
        teacher_dir = os.path.join(root, f"teacher-{args.teacher}-seed{args.teacher_seed}")
        teacher_cmd = ["train_base.py", "--model", args.teacher, "--seed", str(args.teacher_seed),
                       "--dataset", args.dataset, "--data-root", args.data_root, *base_script_args(args.script_args)]
        if run(teacher_dir, teacher_cmd, gpus[0] if gpus else None) != 0:
            sys.exit("error: the teacher's run failed, so no student can run.")
        args.teacher_checkpoint = os.path.join(teacher_dir, "last.pt")
    elif not os.path.isfile(args.teacher_checkpoint):
        sys.exit(f"error: --teacher-checkpoint {args.teacher_checkpoint} does not exist.")
    queue, failures = Queue(), []
    for job in jobs(args, root):
        queue.put(job)
    first_method = cache_order(args.methods)[0] if args.methods else None
    if len(gpus) > 1 and first_method and not METHODS[first_method].teacher_cache_refusal():
        # alone: the teacher cache it may build then serves the runs after it, instead of each building one
        out, command = queue.get_nowait()
        if run(out, command, gpus[0]) != 0:
            failures.append(out)

    def worker(gpu):
        while True:
            try:
                out, command = queue.get_nowait()
            except Empty:
                return
            if run(out, command, gpu) != 0:
                failures.append(out)
    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in (gpus or [None])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.exit(f"error: {len(failures)} run(s) failed: {', '.join(failures)}")
    print(f"all runs complete in {root}; report: python report.py {root}")


if __name__ == "__main__":
    main()
