"""Small helpers shared by everything: the user-error exit, logging, seeding, flag types, file writes."""
import argparse
import contextlib
import csv
import fcntl
import gc
import json
import os
import random
import re
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


class UserError(Exception):
    """A mistake in the user's input: reported as one sentence and a non-zero exit, no traceback."""


def run_main(main, argv=None):
    """Runs a script's main(argv), turning a UserError into one line on stderr and exit status 2."""
    try:
        main(argv)
        if dist.is_initialized():
            # release the run's objects (DDP's reducer and the work it holds) while the interpreter
            # is whole, and let every process finish its collectives before any tears the group
            # down: gloo can abort at exit ("terminate called without an active exception") otherwise
            gc.collect()
            dist.barrier()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def is_main():
    """True in a single process, and in rank 0 under torchrun: the one that logs and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def progress_bar(iterable, desc):
    """A tqdm bar for one pass, silent when stderr is not a terminal (logs, CI, sweeps)."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help, unless it is None (then the help text says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# flag types: each refuses a value that makes no sense with one clear argparse error
_KIND = {int: "integer", float: "finite number"}


def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive {_KIND[kind]}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def non_negative(kind):
    def parse(text):
        value = kind(text)
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be zero or a positive {_KIND[kind]}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def seed_value(text):
    """A seed: an integer in 0 .. 2^64 - 1, the range torch.manual_seed takes."""
    value = int(text)
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2^64 - 1, got {text}")
    return value


seed_value.__name__ = "int"  # argparse names the type in its error message


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def write_atomic(path, write, mode="w"):
    """write(file) into a temporary file beside `path`, fsync, then rename: a crash, a full disk or
    Ctrl-C leaves the previous file whole and no temporary file, and a failed write is one clear error."""
    tmp = f"{path}.tmp{os.getpid()}"  # one per process: torchrun's processes may write the same file
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"Could not write {path} ({e.strerror or e}); the previous file, if any, is "
                            f"intact.") from None
        raise


def write_json(obj, path):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def write_csv(rows, path):
    """Writes all rows at once (resume rewrites metrics.csv from the checkpoint's history)."""
    def write(f):
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    write_atomic(path, write)


def append_csv_row(row, path):
    """Appends one row (writing the header first for a new file) and syncs it to disk."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def make_writable_folder(path, what="output folder"):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"Cannot write to the {what} {path} ({e.strerror or e}).") from None


LOCK_FILE = ".lock"  # in a run folder: locked while a process writes the run
TEMPORARY = re.compile(r".+\.tmp(\d+)")  # write_atomic's temporary files: NAME.tmp<pid>


@contextlib.contextmanager
def claimed_output_dir(path, resuming=False):
    """The run folder, created if needed and locked for this process while the block runs, so that
    two processes (a sweep started twice, a second terminal) never train one folder: the second is
    refused in one sentence. The lock is the operating system's (flock, POSIX) on the file .lock, so
    one left by a process that died is free again; the file goes when the block ends. A folder that
    already holds a run is refused unless resuming; the temporary files of writes that a dead process
    left are removed. Where the block fails and leaves a folder it created empty, the folder is removed
    again: a refused run leaves nothing behind. Under torchrun, rank 0 alone claims the folder."""
    if not is_main():
        yield
        return
    created = not os.path.isdir(path)
    make_writable_folder(path)
    lock = lock_folder(path)
    try:
        if holds_run(path) and not resuming:
            raise UserError(f"{path} already holds a run; resume it with --resume auto, or choose another "
                            f"--output-dir.")
        remove_stale_temporaries(path)
        yield
    finally:
        os.remove(os.path.join(path, LOCK_FILE))  # before the lock goes, so that no one locks a removed file
        lock.close()
        if created and not os.listdir(path):
            os.rmdir(path)


def holds_run(path):
    """True when the folder holds a run (an epoch was saved), not just its args.json."""
    return any(os.path.exists(os.path.join(path, name)) for name in ("last.pt", "metrics.csv"))


def lock_folder(path):
    """The open, exclusively locked file path/.lock, naming this process; a UserError naming the
    process that holds it."""
    lock_path = os.path.join(path, LOCK_FILE)
    while True:
        lock = open(lock_path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise UserError(f"{path} is being written by {holder}; wait for it to finish, or stop it and resume "
                            f"with --resume auto.") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()  # its holder removed it between our open and our lock: lock the file there now
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def remove_stale_temporaries(folder):
    """Deletes the temporary files (NAME.tmp<pid>) that a write killed mid-way left in `folder`, those of
    processes that no longer run."""
    for name in os.listdir(folder):
        match = TEMPORARY.fullmatch(name)
        if match and not process_alive(int(match.group(1))):
            os.remove(os.path.join(folder, name))
            log(f"note: removed {os.path.join(folder, name)}, left by a write that process {match.group(1)} "
                f"did not finish")


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
