"""Run a whole table: a teacher, the baseline student and a student per KD method, over seeds.

    python sweep.py --dataset cifar10 --teacher resnet110 --student resnet20 --seeds 0 1 2
    python sweep.py --data-root ../data --methods st at --seeds 0 1 -- --epochs 30 --val-split 5000
    python sweep.py --methods st rkd --teacher-cache on --teacher-checkpoint teacher.pt -- --epochs 30
    python sweep.py --methods rkd at --tune 0.1 1 10 --jobs 2 -- --epochs 15 --val-file val_batch

Everything after `--` goes to train_base.py and train_kd.py (the recipe flags; a flag only
train_kd.py has, such as --kd-weight, to train_kd.py alone, and a method's own flag, such as
--kdsvd-k, to that method's runs alone). Every run's settings are resolved as the scripts resolve
them before anything trains, so a mistyped flag stops the sweep at once. A
run's folder that already holds a run with the same identity (config.run_identity: every setting
that changes results, the data's and the teacher's contents included) is skipped when it holds all
its epochs and resumed when not; one made with other settings stops the sweep before it trains
anything (--rerun trains it again). The sweep locks its output root, and each run its folder, so
two processes never train one folder; SIGINT and SIGTERM are passed on to the running runs, which
stop resumable. A run that stopped because its weights or losses became non-finite (it leaves
diverged.json) is not trained again, nor counted as failed (the tuner scores it as diverged). A
method that trains with a recipe of its own (MLKD's LR) gets a baseline trained with that recipe
too (baseline-lr-0.025-...), so that its row has a baseline to gain over. The teacher trains
first (its last.pt teaches, not a best.pt that may have been chosen on the test set); the other
runs then go one after another on one device, or on several GPUs at once (one run per GPU,
--gpus). The KD runs that can read the
teacher cache go first, those that read the teacher's pooled vector before those that read its
logits alone, so that the cache the first one builds (--teacher-cache) serves all the others; when
several runs go at once, that first run goes alone (unless it resumes: its cache exists). --jobs N
runs N at once per GPU, or on the CPU, each with 1/N of its cores (on a 2-core CPU, two
single-threaded runs gave 1.11x the runs per hour of one run with both threads: docs/results.md).

--tune FACTOR... tunes each method's KD weight on validation images (--val-file or --val-split
after --, never the test images): on --tune-seed, each method also trains at its default weight
times each FACTOR (in RUN-kd-weight-W folders); once every such run is done, the weight whose run
has the best validation top-1 in its last epoch (the one nearest the default on a tie; a run that
diverged never wins) is chosen, written to OUTPUT_ROOT/tuning.json, and trained on every seed.
--tune-widen N: where that best weight is the grid's smallest or largest, the grid goes one step
further that way (the step: the ratio of the two outermost weights on that side) and the runs of
the new weight are scored too, up to N times per method, so that a best weight at the grid's edge
is not taken for the best there is.
Then: python report.py <output-root>.
"""
import argparse
import contextlib
import csv
import functools
import io
import json
import math
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
from engine import DIVERGED
from kd_losses import METHODS
from models import MODELS
from utils import (LOCK_FILE, HelpFormatter, UserError, claimed_output_dir, holds_run, non_negative, positive, run_main,
                   seed_value, write_json)

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
    parser.add_argument("--jobs", type=positive(int), default=1,
                        help="runs at once per GPU, or on the CPU (each with 1/N of the cores: OMP_NUM_THREADS)")
    parser.add_argument("--tune", type=positive(float), nargs="+", metavar="FACTOR",
                        help="tune each method's KD weight over its default times these factors (1 is always "
                             "tried), on the validation images, and train every seed at the best")
    parser.add_argument("--tune-widen", type=non_negative(int), default=0, metavar="N",
                        help="where a method's best weight is at an end of its grid, try one step beyond it, up to N "
                             "times (default: 0, the factors alone)")
    parser.add_argument("--tune-seed", type=seed_value, help="the seed of the tuning runs (default: the first of "
                                                              "--seeds)")
    parser.add_argument("--rerun", action="store_true",
                        help="train again from scratch, deleting it first, every run whose folder holds a run made "
                             "with other settings (without it such a folder stops the sweep before it trains anything)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER,
                        help="after --: flags for train_base.py and train_kd.py (recipe, --val-split, ...)")
    return parser


def without_flags(script_args, dropped):
    """script_args without the flags named in `dropped` (option strings) and their values."""
    kept, keep = [], True
    for token in script_args:
        if token.startswith("--"):
            keep = token.split("=")[0] not in dropped
        if keep:
            kept.append(token)
    return kept


def base_script_args(script_args):
    """script_args without the flags that only train_kd.py has (and their values): train_base.py's."""
    base = set(config.get_args_parser("base")._option_string_actions)
    return without_flags(script_args, set(config.get_args_parser("kd")._option_string_actions) - base)


def flag_owners():
    """{option string: the methods it belongs to} for every method's own flag."""
    return {option: [name for name, cls in METHODS.items() if action.dest in cls.hyperparameters]
            for option, action in config.get_args_parser("kd")._option_string_actions.items()
            if config.is_method_flag(action.dest)}


def method_script_args(script_args, method):
    """script_args for `method`'s runs: without the other methods' own flags."""
    return without_flags(script_args, {option for option, owners in flag_owners().items() if method not in owners})


def refuse_unused_method_flags(script_args, methods):
    """A method's flag given to a sweep that does not run that method would reach no run."""
    for option, owners in flag_owners().items():
        if option in {token.split("=")[0] for token in script_args} and not set(owners) & set(methods):
            raise UserError(f"{option} belongs to --method {', '.join(owners)}, which this sweep does not run.")


def cache_order(methods):
    """The methods in the order they run: those that can read the teacher cache first, the ones that
    read more of its outputs (the pooled vector) before those that read the logits alone."""
    def rank(method):
        return (1, 0) if METHODS[method].teacher_cache_refusal() else (0, -len(METHODS[method].features))
    return sorted(methods, key=rank)


def kd_job(args, root, method, seed, weight=None):
    """(folder, command) of one KD run; weight: a --kd-weight other than the method's default."""
    cache = []
    if args.teacher_cache:
        on_refused = args.teacher_cache == "on" and METHODS[method].teacher_cache_refusal()
        cache += ["--teacher-cache", "auto" if on_refused else args.teacher_cache]
    if args.teacher_cache_dir:
        cache += ["--teacher-cache-dir", args.teacher_cache_dir]
    name = method if weight is None else f"{method}-kd-weight-{weight:g}"
    return (os.path.join(root, f"{name}-{args.student}-seed{seed}"),
            ["train_kd.py", "--teacher", args.teacher_checkpoint, "--student", args.student, "--method", method,
             "--seed", str(seed), "--dataset", args.dataset, "--data-root", args.data_root, *cache,
             *method_script_args(args.script_args, method),
             *(["--kd-weight", repr(weight)] if weight is not None else [])])


def jobs(args, root, with_recipe_baselines=True):
    """(folder, command) of every student run at the methods' default weights, per seed: the teacher
    cache's first reader first, then the baseline (so that a sweep stopped early has it to compare
    with) and, with_recipe_baselines (it needs the teacher), one at the recipe of each method that
    trains with its own, then the other methods."""
    for seed in args.seeds:
        runs = [kd_job(args, root, method, seed) for method in cache_order(args.methods)]
        baseline = (os.path.join(root, f"baseline-{args.student}-seed{seed}"),
                    ["train_base.py", "--model", args.student, "--seed", str(seed), "--dataset", args.dataset,
                     "--data-root", args.data_root, *base_script_args(args.script_args)])
        extra = recipe_baselines(args, root, seed, runs, baseline) if with_recipe_baselines else []
        runs[min(1, len(runs)):min(1, len(runs))] = [baseline, *extra]
        yield from runs


def recipe_baselines(args, root, seed, kd_runs, baseline):
    """A baseline run at the recipe of each KD run whose method trains with recipe settings of its own
    (KDMethod.official_recipe: MLKD's LR), so that its row has a baseline to gain over: the same
    training with cross-entropy alone."""
    base = requested_settings(*reversed(baseline))
    extra = {}
    for out, command in kd_runs:
        settings = requested_settings(command, out)
        changed = {key: settings[key] for key in config.RECIPES[args.dataset] if settings[key] != base[key]}
        if changed:
            name = "-".join(setting_words(key, value) for key, value in changed.items())
            folder = os.path.join(root, f"baseline-{name}-{args.student}-seed{seed}")
            extra[folder] = baseline[1] + [word for key, value in changed.items() for word in flag_words(key, value)]
    return list(extra.items())


def setting_words(key, value):
    """'lr-0.025', 'lr-milestones-150-180-210': a setting in a folder's name."""
    values = value if isinstance(value, list) else [value]
    return "-".join([key.replace("_", "-"), *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)])


def flag_words(key, value):
    """The command-line words that set a recipe setting: ['--lr', '0.025'], ['--no-nesterov']."""
    flag = key.replace("_", "-")
    if isinstance(value, bool):
        return [f"--{flag}" if value else f"--no-{flag}"]
    return [f"--{flag}", *map(str, value if isinstance(value, list) else [value])]


def grid_weights(default, factors):
    """The KD weights a method is tuned over: its default times each factor, the default first."""
    weights = [default] + [float(f"{default * factor:.6g}") for factor in factors if factor != 1]
    return list(dict.fromkeys(weights))


def tuning_grid(args, root):
    """{method: (default weight, {weight: (folder, command)})}: the tuning runs, on --tune-seed."""
    grid = {}
    for method in cache_order(args.methods):
        default_job = kd_job(args, root, method, args.tune_seed)
        default = requested_settings(*reversed(default_job))["kd_weight"]
        grid[method] = (default, {weight: default_job if weight == default else
                                  kd_job(args, root, method, args.tune_seed, weight)
                                  for weight in grid_weights(default, args.tune)})
    return grid


def chosen_weight(scores, default):
    """The weight with the best validation top-1 (scores: {weight: top-1, or None for a run that
    diverged}); on a tie the one nearest the default (by ratio); None when every run diverged."""
    finite = {weight: score for weight, score in scores.items() if score is not None}
    if not finite:
        return None
    return max(finite, key=lambda w: (finite[w], -abs(math.log(w / default)) if w and default else 0))


def widened_weight(scores, default):
    """The weight one grid step beyond the end of the grid where its best weight lies (scores: {weight:
    validation top-1, or None for a run that diverged}; the step is the ratio of the two outermost
    weights on that side), rounded as grid_weights rounds; None when the best lies inside the grid,
    none can be chosen, or the grid has a single weight."""
    best, weights = chosen_weight(scores, default), sorted(scores)
    if best is None or len(weights) < 2 or best not in (weights[0], weights[-1]):
        return None
    step = weights[1] / weights[0] if best == weights[0] else weights[-2] / weights[-1]
    return float(f"{best / step:.6g}")


def widen_grid(args, root, grid, failures):
    """Adds to `grid` a weight beyond its end for each method whose best weight lies there (widened_weight)
    and whose tuning runs all finished; returns the jobs of those weights."""
    added = []
    for method, (default, runs) in grid.items():
        if any(out in failures for out, _ in runs.values()):
            continue
        weight = widened_weight({w: last_val_top1(out) for w, (out, _) in runs.items()}, default)
        if weight is not None:  # beyond the grid's end, so a weight not tried yet
            runs[weight] = kd_job(args, root, method, args.tune_seed, weight)
            print(f"widen  {method}: its best weight is at the end of its grid; trying kd weight {weight:g}",
                  flush=True)
            added.append(runs[weight])
    return added


def last_val_top1(out):
    """The validation top-1 of the last epoch of the run in `out`, None when it diverged."""
    if os.path.exists(os.path.join(out, DIVERGED)):
        return None
    with open(os.path.join(out, "metrics.csv")) as f:
        return float(list(csv.DictReader(f))[-1]["val_top1"])  # a complete run's last epoch is evaluated


def choose_weights(grid, root, tune_seed, failures):
    """{method: chosen weight, None where none can be} from the finished tuning runs (a method one of
    whose runs failed gets none); writes ROOT/tuning.json."""
    record, chosen = {"seed": tune_seed, "selected_on": "validation top-1, last epoch", "methods": {}}, {}
    for method, (default, runs) in grid.items():
        failed = [out for out, _ in runs.values() if out in failures]
        if failed:
            print(f"tuned  {method}: no weight chosen, as {', '.join(failed)} failed", flush=True)
            chosen[method] = None
            continue
        scores = {weight: last_val_top1(out) for weight, (out, _) in runs.items()}
        chosen[method] = chosen_weight(scores, default)
        identity = requested_settings(*reversed(runs[default]))
        record["methods"][method] = {
            "default": default, "chosen": chosen[method],
            "identity": {k: v for k, v in config.run_identity(identity).items() if k not in ("seed", "kd_weight")},
            "runs": [{"kd_weight": weight, "folder": os.path.relpath(out, root), "val_top1": scores[weight]}
                     for weight, (out, _) in runs.items()]}
        tried = ", ".join(f"{w:g}: {'diverged' if s is None else f'{s:.2f}'}" for w, s in scores.items())
        weight = "none (every run diverged)" if chosen[method] is None else f"{chosen[method]:g}"
        print(f"tuned  {method}: kd weight {weight} (validation top-1 {tried})", flush=True)
    path = os.path.join(root, "tuning.json")
    if os.path.exists(path):  # the methods an earlier sweep in this root tuned, and this one did not, stay
        with open(path) as f:
            earlier = json.load(f)
        record["methods"] = {**earlier["methods"], **record["methods"]}
    write_json(record, path)
    return chosen


@functools.lru_cache(maxsize=None)
def loaded_data_sha256(dataset, root, val_file):
    """data.data_sha256 of what a run loads, read once per sweep."""
    validation = data.load_val_file(dataset, val_file) if val_file else ()
    return data.data_sha256(*data.load_cifar(dataset, root), *validation)


_settings = {}  # folder -> (command, its settings): each run's settings resolved once per sweep


def requested_settings(command, out):
    """The settings (with the data's sha256) of the run that `command` starts in `out`: its config
    resolved as the script resolves it, quietly (the script prints its notes itself)."""
    if out not in _settings or _settings[out][0] != command:
        kind = "base" if command[0] == "train_base.py" else "kd"
        parser = config.get_args_parser(kind)
        parser.prog = command[0]  # for argparse's messages
        with contextlib.redirect_stdout(io.StringIO()):
            cfg, _ = config.resolve(parser.parse_args([*command[1:], "--output-dir", out]), kind)
        sha256 = loaded_data_sha256(cfg.dataset, cfg.data_root, cfg.val_file)
        _settings[out] = command, json.loads(json.dumps(vars(config.with_data(cfg, sha256, None))))
    return _settings[out][1]


def requested_identity(command, out):
    """The identity (config.run_identity) of the run that `command` starts in `out`."""
    return config.run_identity(requested_settings(command, out))


def saved_state(out, requested):
    """What `out` holds against the requested identity: ('new', None) when it holds no run yet,
    ('complete', 'resume' or 'diverged', None) when its run has that identity (all epochs done, not, or
    stopped on non-finite values), or ('differs', the settings that differ, in words)."""
    diverged = os.path.exists(os.path.join(out, DIVERGED))
    if not holds_run(out) and not diverged:  # one that diverged in its first epoch saved no epoch
        return "new", None
    try:
        with open(os.path.join(out, "args.json")) as f:
            saved = config.run_identity(json.load(f))
        rows = 0
        if not diverged:
            with open(os.path.join(out, "metrics.csv")) as f:
                rows = sum(1 for _ in csv.DictReader(f))
    except (OSError, ValueError) as e:
        return "differs", f"its args.json or metrics.csv cannot be read ({type(e).__name__})"
    if saved != requested:
        differing = [key for key in sorted(set(saved) | set(requested)) if saved.get(key) != requested.get(key)]
        return "differs", "; ".join(f"{key.replace('_', ' ')} {shown(saved.get(key))} there, "
                                    f"{shown(requested.get(key))} now" for key in differing)
    if diverged:
        return "diverged", None
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

    def run(self, out, command, resume, gpu=None, threads=None):
        """Runs one job (resuming it when asked) on `gpu`, or with `threads` CPU threads when given;
        returns its exit status, or None when a signal came first."""
        os.makedirs(out, exist_ok=True)
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
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
            outcome = "FAILED" if failed(out, status) else "DIVERGED"
            print(f"{outcome} {out} (exit {status}); see {os.path.join(out, 'log.txt')}", flush=True)
        return status


def check_jobs(jobs, rerun):
    """(jobs to run as (folder, command, resume)), after comparing each folder's run with the requested
    settings: a complete run with the same identity is skipped (as is one that diverged), an unfinished
    one resumed; one made with other settings is a UserError naming them, or, with rerun, deleted to be
    trained again."""
    todo, differing = [], []
    for out, command in jobs:
        state, why = saved_state(out, requested_identity(command, out))
        if state in ("complete", "diverged"):
            print(f"skip   {out} ({state})", flush=True)
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
    refuse_unused_method_flags(args.script_args, args.methods)
    args.tune_seed = args.seeds[0] if args.tune_seed is None else args.tune_seed
    if args.tune and "--kd-weight" in {token.split("=")[0] for token in args.script_args}:
        raise UserError("--tune tries each method's default KD weight times its factors; --kd-weight after -- "
                        "would set one weight for every method: give one or the other.")
    if args.tune_widen and not args.tune:
        raise UserError("--tune-widen widens the grid of KD weights that --tune tries: give --tune too.")
    if args.tune and args.tune_seed not in args.seeds:
        raise UserError(f"--tune-seed {args.tune_seed} is not one of --seeds {args.seeds}: the tuning runs at the "
                        f"default weight are that seed's runs.")
    root = args.output_root or os.path.join("runs", f"sweep-{args.dataset}-{args.teacher}-to-{args.student}")
    gpus = args.gpus if args.gpus is not None else list(range(torch.cuda.device_count()))
    slots = run_slots(gpus, args.jobs, len(os.sched_getaffinity(0)))
    with claimed_output_dir(root, resuming=True), Runner() as runner:  # one sweep at a time in a root
        if args.teacher_checkpoint is None:
            teacher_dir = os.path.join(root, f"teacher-{args.teacher}-seed{args.teacher_seed}")
            teacher_cmd = ["train_base.py", "--model", args.teacher, "--seed", str(args.teacher_seed),
                           "--dataset", args.dataset, "--data-root", args.data_root,
                           *base_script_args(args.script_args)]
            teacher_job = check_jobs([(teacher_dir, teacher_cmd)], args.rerun)
            args.teacher_checkpoint = os.path.join(teacher_dir, "last.pt")
            if teacher_job:  # the students' runs must then be new: a run there learnt from another teacher
                kept = [out for out, _ in jobs(args, root, with_recipe_baselines=False) if holds_run(out)]
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
        default_jobs = list(jobs(args, root))
        grid = tuning_grid(args, root) if args.tune and args.methods else {}
        if grid:
            default, runs = next(iter(grid.values()))
            settings = requested_settings(*reversed(runs[default]))
            if not settings["val_split"] and not settings["val_file"]:
                raise UserError("--tune chooses each KD weight on validation images: give --val-file or --val-split "
                                "after --, so that it never chooses on the test images.")
        tuning = [job for _, runs in grid.values() for job in runs.values() if job not in default_jobs]
        # the tuning seed's runs at the default weights, then the other weights, then the other seeds
        first = [job for job in default_jobs if job[0].endswith(f"-seed{args.tune_seed}")]
        failures = run_all(runner, check_jobs(first + tuning + [j for j in default_jobs if j not in first],
                                              args.rerun), slots, args.methods, args.teacher_cache != "off")
        for _ in range(args.tune_widen if grid else 0):
            wider = widen_grid(args, root, grid, failures) if runner.signum is None else []
            if not wider:
                break
            failures += run_all(runner, check_jobs(wider, args.rerun), slots, args.methods, cache=False)
        if grid and runner.signum is None:
            chosen = choose_weights(grid, root, args.tune_seed, failures)
            tuned = [kd_job(args, root, method, seed, weight) for seed in args.seeds
                     for method, weight in chosen.items() if weight not in (None, grid[method][0])]
            # every seed's cache was built in the first phase
            failures += run_all(runner, check_jobs(tuned, args.rerun), slots, args.methods, cache=False)
        if failures and runner.signum is None:
            raise UserError(f"{len(failures)} run(s) failed: {', '.join(failures)}")
        stop(runner)
    print(f"all runs complete in {root}; report: python report.py {root}")


def run_slots(gpus, jobs, cores):
    """Where the runs go, as (GPU, CPU threads) per run at once: `jobs` per GPU, or on the CPU `jobs`
    runs with an equal share of its cores (None: the default, every core)."""
    if gpus:
        return [(gpu, None) for gpu in gpus for _ in range(jobs)]
    return [(None, max(1, cores // jobs) if jobs > 1 else None)] * jobs


def builds_cache(job, first_method):
    """Whether `job` may build the teacher cache (one serves every seed): a fresh run of the cache's
    first reader (a resumed one built it before its first epoch)."""
    _, command, resume = job
    return not resume and "--method" in command and command[command.index("--method") + 1] == first_method


def run_all(runner, todo, slots, methods, cache):
    """Runs the jobs, one per slot (gpu, threads) at a time; returns the folders of those that failed.
    When several slots run at once and the first job may build the teacher cache (`cache`: the
    sweep's --teacher-cache is not off; the job starts afresh and is the cache's first reader), it runs
    alone first, so that the cache it builds serves the others instead of each building one."""
    queue, failures = Queue(), []
    for job in todo:
        queue.put(job)
    first_method = cache_order(methods)[0] if methods else None
    if len(slots) > 1 and cache and first_method and not METHODS[first_method].teacher_cache_refusal() and \
            todo and builds_cache(todo[0], first_method):
        job = queue.get_nowait()
        if failed(job[0], runner.run(*job, slots[0][0])):  # with every thread: it runs alone
            failures.append(job[0])

    def worker(slot):
        while runner.signum is None:
            try:
                job = queue.get_nowait()
            except Empty:
                return
            if failed(job[0], runner.run(*job, *slot)):
                failures.append(job[0])
    threads = [threading.Thread(target=worker, args=(slot,)) for slot in slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def failed(out, status):
    """Whether the run in `out` that ended with exit `status` failed: a run that stopped on non-finite
    values (diverged.json) did not; it is done, as a rerun of the sweep would find it, and the tuner
    scores it as diverged."""
    return status not in (0, None) and not os.path.exists(os.path.join(out, DIVERGED))


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
