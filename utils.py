"""Small helpers shared by the scripts: errors, seeding, devices, argument types, checkpoints."""
import argparse
import csv
import json
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

CHECKPOINT_FORMAT = "kdzoo-checkpoint-v1"


class UserError(Exception):
    """A mistake in the user's input: reported as one sentence and a non-zero exit, no traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help, unless it is None (then the help text says what happens)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def run_main(main):
    """Runs a script's main(), turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
        if dist.is_initialized():
            # every process done with its collectives before any tears the group down (gloo can
            # abort at exit when a peer's group goes away while its own threads still run)
            dist.barrier()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def progress_bar(iterable, desc):
    """A tqdm bar for one pass, silent when stderr is not a terminal (logs, CI, sweeps)."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name):
    """(device, rank, world_size). Started by torchrun (WORLD_SIZE > 1), it joins the process group
    (NCCL on CUDA, gloo on the CPU) and takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this PyTorch sees no CUDA device.")
    device = torch.device(name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world_size


def is_main():
    """True in a single process, and in rank 0 under torchrun: the one that logs and writes files."""
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or a positive finite number, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def write_atomic(path, write, mode="w"):
    """write(file) into a temporary file beside `path`, fsync, then rename: a crash or a full disk
    leaves the previous file whole, and a failed write is one clear error."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"Could not write {path} ({e.strerror or e}); the previous file, if any, is intact.") from None


def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f), "wb")


def load_checkpoint(path):
    """Loads a checkpoint written by this project, refusing anything that needs code to unpickle."""
    if not os.path.isfile(path):
        raise UserError(f"Checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, arbitrary code: all refused the same way
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable checkpoint ({first_line}).") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint written by train_base.py or train_kd.py.")
    return ckpt


def unwrap(module):
    """The plain module inside torch.compile's and DistributedDataParallel's wrappers, so that
    saved keys never carry their '_orig_mod.' or 'module.' prefixes."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def load_weights(module, state_dict, what):
    """Strict load that names the first mismatching key instead of PyTorch's multi-line report."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        raise UserError(f"{what} lacks the weight '{missing[0]}' ({len(missing)} missing in all).")
    if unexpected:
        raise UserError(f"{what} has the unexpected weight '{unexpected[0]}' ({len(unexpected)} in all).")
    for k, v in own.items():
        if v.shape != state_dict[k].shape:
            raise UserError(f"{what} has '{k}' of shape {tuple(state_dict[k].shape)}, expected {tuple(v.shape)}.")
    module.load_state_dict(state_dict)


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


def parse_args(parser):
    """parse_args(), plus the set of flags the user actually typed (resume compares only those)."""
    args = parser.parse_args()
    unset = object()  # argparse fills in a default only where the namespace has no value yet
    typed = parser.parse_args(namespace=argparse.Namespace(**{key: unset for key in vars(args)}))
    return args, {key for key, value in vars(typed).items() if value is not unset}


# flags that may differ from the run being resumed: they change where or how long, not what
HARMLESS_ON_RESUME = ("epochs", "device", "data_root", "output_dir", "resume", "teacher", "amp", "channels_last",
                      "compile")


def find_resume(args, kind):
    """The (checkpoint, path) that --resume names, or None. kind: 'base' or 'kd', the script's."""
    if args.resume is None:
        return None
    path = os.path.join(args.output_dir, "last.pt") if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.exists(path):
        log(f"--resume auto: {path} does not exist yet, so this is a new run")
        return None
    ckpt = load_checkpoint(path)
    if "history" not in ckpt:
        raise UserError(f"{path} is not a last.pt (it holds no optimizer state); resume from last.pt.")
    if ("kd" in ckpt) != (kind == "kd"):
        script = "train_kd.py" if "kd" in ckpt else "train_base.py"
        raise UserError(f"{path} was written by {script}; resume it with {script}.")
    return ckpt, path


def adopt_config(args, saved, given, path, completed_epochs):
    """Makes args the configuration of the run being resumed. A flag the user gave that would
    change the run is an error; a harmless one (HARMLESS_ON_RESUME) is kept and said."""
    for key, value in saved.items():
        if key == "resume":
            continue
        mine = getattr(args, key, None)
        if key in given and mine != value:
            if key not in HARMLESS_ON_RESUME:
                raise UserError(f"--{key.replace('_', '-')} {mine} differs from {value} in the run in {path}; "
                                f"start a new run (another --output-dir) to change it.")
            log(f"note: resuming with --{key.replace('_', '-')} {mine} (the run had {value})")
        elif key not in given:
            setattr(args, key, value)
    if "output_dir" not in given:
        args.output_dir = os.path.dirname(os.path.abspath(path))
    if args.epochs < completed_epochs:
        raise UserError(f"--epochs {args.epochs} is fewer than the {completed_epochs} epochs {path} already holds.")


def prepare_output_dir(path, resuming=False):
    """Creates the run folder; refuses one that already holds a run rather than mixing two."""
    holds_run = os.path.exists(os.path.join(path, "last.pt")) or os.path.exists(os.path.join(path, "metrics.csv"))
    if holds_run and not resuming:
        raise UserError(f"{path} already holds a run; resume it with --resume auto, or choose another "
                        f"--output-dir.")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"Cannot write to the output folder {path} ({e.strerror or e}).") from None
