"""KD methods, one file each. METHODS (name -> class) is the one list of methods: train_kd.py's
--method choices and flags come from it. To add a method, write a file with a @register'ed
KDMethod subclass and import it below."""
import argparse

import torch

from utils import UserError

# importing registers them; this order (the seed zoo's list, then DKD) is the order of --help and the README
from . import logits, st, at, fitnet, nst, pkt, fsp, ft, rkd, ab, sp, sobolev, bss, cc, lwm, irg, vid  # noqa: F401, I001
from . import ofd, afd, crd, dml, dkd  # noqa: F401, I001
from .base import METHODS, KDMethod, register  # noqa: F401


def add_method_args(parser):
    """Every method's hyper-parameters as --flags, in one group per method. Their parser default
    is None (meaning "the method's own default"), so a flag given for another method can be refused."""
    users = {}  # flag -> the methods that read it (a temperature is shared)
    for name, cls in METHODS.items():
        for key in cls.hyperparameters:
            users.setdefault(key, []).append(name)
    added = set()
    for name, cls in METHODS.items():
        fresh = {k: v for k, v in cls.hyperparameters.items() if k not in added}
        if not fresh:
            continue
        group = parser.add_argument_group(f"--method {name}")
        for key, spec in fresh.items():
            default, help_text = spec[:2]
            kind = spec[2] if len(spec) > 2 else type(default)  # a default of None names its type
            if len(users[key]) > 1:
                shown = " (default: " + ", ".join(f"{m} {METHODS[m].hyperparameters[key][0]}" for m in users[key]) + ")"
            else:
                shown = "" if default is None else f" (default: {default})"
            group.add_argument(f"--{key.replace('_', '-')}", dest=key, type=_positive(kind), help=help_text + shown)
            added.add(key)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def resolve_method_args(args):
    """Puts the chosen method's hyper-parameters (given or default) in args, removes the other
    methods' flags, and returns the chosen ones. A flag that only another method reads is an error."""
    own = METHODS[args.method].hyperparameters
    for name, cls in METHODS.items():
        for key in cls.hyperparameters:
            if key in own or not hasattr(args, key):
                continue
            if getattr(args, key) is not None:
                raise UserError(f"--{key.replace('_', '-')} belongs to --method {name}, "
                                f"not to --method {args.method}.")
            delattr(args, key)
    chosen = {key: default if getattr(args, key) is None else getattr(args, key)
              for key, default in default_hyperparameters(args.method).items()}
    vars(args).update(chosen)
    return chosen


def feature_shapes(model, image_size=32):
    """Per-sample shape of every named feature, from one forward pass of a zero batch in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        _, feats = model(torch.zeros(2, 3, image_size, image_size, device=device), features=True)
    model.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}


def default_hyperparameters(name):
    return {key: spec[0] for key, spec in METHODS[name].hyperparameters.items()}


def default_weight(name, dataset):
    """The method's KD weight unless --kd-weight is given; a few depend on the data set."""
    weight = METHODS[name].default_weight
    return weight[dataset] if isinstance(weight, dict) else weight


def build_method(name, hparams, student, teacher, train_labels):
    """The method for this pair, attached to both networks (the teacher not yet BN-folded)."""
    method = METHODS[name](feature_shapes(student), feature_shapes(teacher), **hparams)
    method.attach(student, teacher, train_labels)
    return method
