"""Run a whole table: a teacher, the baseline student and a student per KD method, over seeds.

    python sweep.py --dataset cifar10 --teacher resnet110 --student resnet20 --seeds 0 1 2
    python sweep.py --data-root ../data --methods st at --seeds 0 1 -- --epochs 30 --val-split 5000
    python sweep.py --methods st rkd --teacher-cache on --teacher-checkpoint teacher.pt -- --epochs 30

Everything after `--` goes to train_base.py and train_kd.py (the recipe flags; a flag only
train_kd.py has, such as --kd-weight, to train_kd.py alone). Every run's settings are resolved as
the scripts resolve them before anything trains, so a mistyped flag stops the sweep at once. A
run's folder that already holds a run with the same identity (config.run_identity: every setting
that changes results, the data's and the teacher's contents included) is skipped when it holds all
its epochs and resumed when not; one made with other settings stops the sweep before it trains
anything (--rerun trains it again). The sweep locks its output root, and each run its folder, so
two processes never train one folder; SIGINT and SIGTERM are passed on to the running runs, which
stop resumable. The teacher trains first (its last.pt teaches, not a best.pt that may have been chosen on the test
set); the other runs then go one after another on one device, or on several GPUs at once (one run
per GPU, --gpus). The KD runs that can read the teacher cache go first, those that read the
teacher's pooled vector before those that read its logits alone, so that the cache the first one
builds (--teacher-cache) serves all the others; with several GPUs that first run goes alone.
Then: python report.py <output-root>.
"""
import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from queue import Empty, Queue

import torch

import config
import data
from kd_losses import METHODS
from models import MODELS
from utils import LOCK_FILE, HelpFormatter, UserError, claimed_output_dir, holds_run, non_negative, run_main, seed_value

HERE = os.path.dirname(os.path.abspath(__file__))


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10", help="data set")
    parser.add_argument("--data-root", default="./dataset", help="passed to the scripts")
    parser.add_argument("--teacher", choices=list(MODELS), default="resnet110", help="teacher architecture")
    parser.add_argument("--teacher-seed", type=seed_value, default=0, help="seed of the one teacher")
    parser.add_argument("--teacher-checkpoint", help="use this teacher (a train_base.py checkpoint) instead of "
                                                     "training one (--teacher then only names --output-root)")
    parser.add_argument("--student", choices=list(MODELS), default="resnet20", help="student architecture")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="KD methods (default: all)")
    parser.add_argument("--seeds", nargs="+", type=seed_value, default=[0, 1, 2],
                        help="student seeds; each method and the baseline run once per seed")
    parser.add_argument("--output-root", help="default: runs/sweep-<dataset>-<teacher>-to-<student>")
    parser.add_argument("--gpus", nargs="*", type=non_negative(int),
                        help="GPU indices to spread the student runs over (default: every visible GPU; "
                             "none: one run at a time on the scripts' default device)")
    parser.add_argument("--teacher-cache", choices=["auto", "on", "off"],
                        help="train_kd.py's --teacher-cache for the methods that can read the cache (the others "
                             "get auto, which leaves it unused; off: off for all) (default: train_kd.py's auto)")
    parser.add_argument("--teacher-cache-dir", metavar="DIR", help="train_kd.py's --teacher-cache-dir")
    parser.add_argument("--rerun", action="store_true",
                        help="train again from scratch, deleting it first, every run whose folder holds a run made "
                             "with other settings (without it such a folder stops the sweep before it trains anything)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="after --: flags for train_base.py and train_kd.py (recipe, --val-split, ...)")
    return parser


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


def requested_identity(command, out, data_sha256):
    """The identity (config.run_identity) of the run that `command` starts in `out`: its config resolved
    as the script resolves it, quietly (the script prints its notes itself)."""
    kind = "base" if command[0] == "train_base.py" else "kd"
    parser = config.get_args_parser(kind)
    parser.prog = command[0]  # for argparse's messages
    with contextlib.redirect_stdout(io.StringIO()):
        cfg, _ = config.resolve(parser.parse_args([*command[1:], "--output-dir", out]), kind)
    return json.loads(json.dumps(config.run_identity(vars(config.with_data(cfg, data_sha256, None)))))


def saved_state(out, requested):
    """What `out` holds against the requested identity: ('new', None) when it holds no run yet,
    ('complete' or 'resume', None) when its run has that identity (all epochs done or not), or
    ('differs', the settings that differ, in words)."""
    if not holds_run(out):
        return "new", None
    try:
        with open(os.path.join(out, "args.json")) as f:
            saved = config.run_identity(json.load(f))
        with open(os.path.join(out, "metrics.csv")) as f:
            rows = sum(1 for _ in csv.DictReader(f))
    except (OSError, ValueError) as e:
        return "differs", f"its args.json or metrics.csv cannot be read ({type(e).__name__})"
    if saved != requested:
        differing = [key for key in sorted(set(saved) | set(requested)) if saved.get(key) != requested.get(key)]
        return "differs", "; ".join(f"{key.replace('_', ' ')} {shown(saved.get(key))} there, "
                                    f"{shown(requested.get(key))} now" for key in differing)
    complete = rows >= requested["epochs"] and os.path.exists(os.path.join(out, "last.pt"))
    return ("complete" if complete else "resume"), None


def shown(value):
    """A setting's value in a message: a sha256 cut to 12 digits, a missing one as 'unset'."""
    if value is None:
        return "unset"
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


class Runner:
    """Runs the jobs of a sweep, each in a child process of its own session; SIGINT and SIGTERM are
    passed on to the running children (each stops as a run does: resumable, exit 128 + signal) and no
    further job starts."""

    def __init__(self):
        # reentrant: the signal handler runs in the main thread, which may hold it when the signal comes
        self.children, self.signum, self.lock = [], None, threading.RLock()

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _stop(self, signum, frame):
        self.signum = signum
        with self.lock:
            for child in self.children:
                child.send_signal(signum)

    def run(self, out, command, resume, gpu=None):
        """Runs one job (resuming it when asked); returns its exit status, or None when a signal came first."""
        os.makedirs(out, exist_ok=True)
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        with self.lock:
            if self.signum is not None:
                return None
            where = f" on GPU {gpu}" if gpu is not None else ""
            print(f"{'resume' if resume else 'run   '} {out}{where}", flush=True)
            with open(os.path.join(out, "log.txt"), "a") as log:
                # a session of its own: a Ctrl-C in the terminal reaches the sweep, which passes it on once
                child = subprocess.Popen([sys.executable, os.path.join(HERE, command[0]), *command[1:], "--output-dir",
                                          out, *(["--resume", "auto"] if resume else [])],
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.children.append(child)
        status = child.wait()
        with self.lock:
            self.children.remove(child)
        if status != 0 and self.signum is None:
            print(f"FAILED {out} (exit {status}); see {os.path.join(out, 'log.txt')}", flush=True)
        return status


def check_jobs(jobs, data_sha256, rerun):
    """(jobs to run as (folder, command, resume)), after comparing each folder's run with the requested
    settings: a complete run with the same identity is skipped, an unfinished one resumed; one made
    with other settings is a UserError naming them, or, with rerun, deleted to be trained again."""
    todo, differing = [], []
    for out, command in jobs:
        state, why = saved_state(out, requested_identity(command, out, data_sha256))
        if state == "complete":
            print(f"skip   {out} (complete)", flush=True)
        elif state == "differs" and rerun:
            delete_run(out, f"made with other settings: {why}")
            todo.append((out, command, False))
        elif state == "differs":
            print(f"differs {out}: {why}", flush=True)
            differing.append(out)
        else:
            todo.append((out, command, state == "resume"))
    if differing:
        raise UserError(f"{len(differing)} run folder(s) hold runs made with other settings (listed above), so "
                        f"nothing was trained; --rerun trains them again from scratch (deleting them), or another "
                        f"--output-root keeps them.")
    return todo


def delete_run(out, why):
    """Empties a run folder for --rerun (refused while another process trains it)."""
    with claimed_output_dir(out, resuming=True):
        print(f"rerun  {out} ({why})", flush=True)
        for name in os.listdir(out):
            if name != LOCK_FILE:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    root = args.output_root or os.path.join("runs", f"sweep-{args.dataset}-{args.teacher}-to-{args.student}")
    gpus = args.gpus if args.gpus is not None else list(range(torch.cuda.device_count()))
    data_sha256 = data.data_sha256(*data.load_cifar(args.dataset, args.data_root))
    with claimed_output_dir(root, resuming=True), Runner() as runner:  # one sweep at a time in a root
        if args.teacher_checkpoint is None:
            teacher_dir = os.path.join(root, f"teacher-{args.teacher}-seed{args.teacher_seed}")
            teacher_cmd = ["train_base.py", "--model", args.teacher, "--seed", str(args.teacher_seed),
                           "--dataset", args.dataset, "--data-root", args.data_root,
                           *base_script_args(args.script_args)]
            teacher_job = check_jobs([(teacher_dir, teacher_cmd)], data_sha256, args.rerun)
            args.teacher_checkpoint = os.path.join(teacher_dir, "last.pt")
            if teacher_job:  # the students' runs must then be new: a run there learnt from another teacher
                kept = [out for out, _ in jobs(args, root) if holds_run(out)]
                if kept and not args.rerun:
                    raise UserError(f"{kept[0]} holds a run distilled from a teacher that this sweep is about to "
                                    f"train (again), so nothing was trained; --rerun trains it again from scratch "
                                    f"(deleting it), or another --output-root keeps it.")
                for out in kept:
                    delete_run(out, "distilled from an earlier teacher")
                if runner.run(*teacher_job[0], gpus[0] if gpus else None) != 0:
                    stop(runner, "the teacher's run failed, so no student can run.")
        elif not os.path.isfile(args.teacher_checkpoint):
            raise UserError(f"--teacher-checkpoint {args.teacher_checkpoint} does not exist.")
        queue, failures = Queue(), []
        for job in check_jobs(list(jobs(args, root)), data_sha256, args.rerun):
            queue.put(job)
        first_method = cache_order(args.methods)[0] if args.methods else None
        if len(gpus) > 1 and first_method and not METHODS[first_method].teacher_cache_refusal() and not queue.empty():
            # alone: the teacher cache it may build then serves the runs after it, instead of each building one
            job = queue.get_nowait()
            if runner.run(*job, gpus[0]) != 0:
                failures.append(job[0])

        def worker(gpu):
            while True:
                try:
                    job = queue.get_nowait()
                except Empty:
                    return
                status = runner.run(*job, gpu)
                if status is None:  # stopped by a signal
                    return
                if status != 0:
                    failures.append(job[0])
        threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in (gpus or [None])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures and runner.signum is None:
            raise UserError(f"{len(failures)} run(s) failed: {', '.join(failures)}")
        stop(runner)
    print(f"all runs complete in {root}; report: python report.py {root}")


def stop(runner, failure=None):
    """Exits after a signal (128 + its number: rerunning the same command resumes), or on a failure."""
    if runner.signum is not None:
        name = signal.Signals(runner.signum).name
        print(f"{name}: the sweep stopped; its running runs stopped resumable; the same command resumes it",
              file=sys.stderr, flush=True)
        sys.exit(128 + runner.signum)
    if failure:
        raise UserError(failure)


if __name__ == "__main__":
    run_main(main)
