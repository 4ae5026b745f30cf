"""Small helpers shared by the scripts: errors, seeding, devices, argument types, checkpoints."""
import argparse
import csv
import json
import os
import random
import sys

import numpy as np
import torch
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
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def progress_bar(iterable, desc):
    """A tqdm bar for one pass, silent when stderr is not a terminal (logs, CI, sweeps)."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this PyTorch sees no CUDA device.")
    return torch.device(name)


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


def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, fsync, then rename: a crash leaves the old file whole."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"Could not write {path} ({e.strerror or e}); the previous file, if any, is intact.") from None


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
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def append_csv_row(row, path):
    """Appends one row (writing the header first for a new file) and syncs it to disk."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def prepare_output_dir(path):
    """Creates the run folder; refuses one that already holds a run rather than mixing two."""
    if os.path.exists(os.path.join(path, "last.pt")) or os.path.exists(os.path.join(path, "metrics.csv")):
        raise UserError(f"{path} already holds a run; choose another --output-dir or remove it.")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"Cannot write to the output folder {path} ({e.strerror or e}).") from None
