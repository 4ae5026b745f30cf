"""Train a CIFAR ResNet with cross-entropy (a teacher, or the baseline for a KD student).

    python train_base.py --dataset cifar10 --model resnet110

Recipe flags left out take the data set's recipe below; edit RECIPES to change the defaults.
"""
import argparse
import os

import torch

from data import DATASETS, make_loaders
from engine import Supervised, build_optimizer, fit
from models import MODELS, SHORTCUTS, build_model
from utils import (HelpFormatter, UserError, adopt_config, barrier, find_resume, fraction, is_main, log,
                   non_negative_float, non_negative_int, parse_args, positive_float, positive_int,
                   prepare_output_dir, resolve_device, run_main, set_seed, write_json)

# Per data set: CIFAR-10 as in He et al. 2016 (the seed zoo), CIFAR-100 as in the CRD benchmark.
RECIPES = {
    "cifar10": dict(epochs=200, lr_milestones=[100, 150], batch_size=128, lr=0.1,
                    momentum=0.9, nesterov=True, weight_decay=1e-4),
    "cifar100": dict(epochs=240, lr_milestones=[150, 180, 210], batch_size=64, lr=0.05,
                     momentum=0.9, nesterov=False, weight_decay=5e-4),
}


def get_args_parser(add_help=True, model_flag="--model"):
    parser = argparse.ArgumentParser(description="Train a CIFAR ResNet with cross-entropy.",
                                     add_help=add_help, allow_abbrev=False,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), default="cifar10", help="data set")
    parser.add_argument(model_flag, dest="model", choices=list(MODELS), default="resnet20",
                        help="architecture to train")
    parser.add_argument("--shortcut", choices=SHORTCUTS, default="projection",
                        help="shortcut where a block changes shape: 1x1 conv + BN, or the paper's zero padding")
    recipe = parser.add_argument_group("recipe (a flag left out takes the data set's entry in RECIPES)")

    def recipe_flag(flag, help_text, **kwargs):
        key = flag[2:].replace("-", "_")
        defaults = ", ".join(f"{name}: {recipe[key]}" for name, recipe in RECIPES.items())
        recipe.add_argument(flag, help=f"{help_text} (default: {defaults})", **kwargs)
    recipe_flag("--epochs", "epochs to train", type=positive_int)
    recipe_flag("--batch-size", "images per step", type=positive_int)
    recipe_flag("--lr", "initial learning rate", type=positive_float)
    recipe_flag("--lr-milestones", "epochs after which the LR is multiplied by --lr-gamma; with --epochs "
                "alone, the recipe's scaled to it", type=positive_int, nargs="+")
    recipe.add_argument("--lr-gamma", type=positive_float, default=0.1, help="LR decay factor at each milestone")
    recipe_flag("--momentum", "SGD momentum", type=fraction)
    recipe_flag("--weight-decay", "L2 weight decay", type=non_negative_float)
    recipe_flag("--nesterov", "Nesterov momentum", action=argparse.BooleanOptionalAction)
    parser.add_argument("--seed", type=non_negative_int, default=0, help="fixes every random source")
    parser.add_argument("--val-split", type=non_negative_int, default=0,
                        help="training images held out (class-balanced) to choose the best epoch; "
                             "0 chooses it on the test set")
    parser.add_argument("--data-root", default="./dataset",
                        help="folder holding cifar-10-batches-py/ or cifar-100-python/")
    parser.add_argument("--output-dir", help="where the run's files go (default: a folder under runs/ "
                                             "named after the data set, model(s) and seed)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else the CPU")
    speed = parser.add_argument_group("speed (results change only by floating-point rounding)")
    speed.add_argument("--amp", choices=["bf16", "off"],
                       help="bf16 autocast, losses in fp32 (default: bf16 on CUDA, off on the CPU)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                       help="NHWC memory layout (default: on for CUDA)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the training step and the teacher's forward (CUDA graphs on CUDA)")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=False,
                        help="under torchrun on CUDA: BN statistics over the global batch (SyncBatchNorm)")
    parser.add_argument("--resume", metavar="PATH|auto",
                        help="continue the run in this last.pt; auto: the one in --output-dir, if any")
    return parser


def resolve_recipe(args):
    """Fills the recipe flags the user left out from RECIPES[args.dataset], in place."""
    recipe = RECIPES[args.dataset]
    if args.lr_milestones is None and args.epochs is not None and args.epochs != recipe["epochs"]:
        scale = args.epochs / recipe["epochs"]
        args.lr_milestones = sorted({max(1, round(m * scale)) for m in recipe["lr_milestones"]})
        log(f"note: --epochs {args.epochs} without --lr-milestones: the recipe's milestones "
            f"{recipe['lr_milestones']} scaled to {args.lr_milestones}")
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if sorted(set(args.lr_milestones)) != args.lr_milestones:
        raise UserError(f"--lr-milestones must increase strictly, got {args.lr_milestones}.")
    return args


def resolve_speed(args, device):
    """Fills --amp and --channels-last for the device, in place; refuses bf16 where it cannot run."""
    if args.amp is None:
        args.amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    if args.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only.")
    if args.amp == "bf16":
        supported = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                     else torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if not supported:
            raise UserError(f"--amp bf16 needs bf16 support, which this {device.type.upper()} lacks; use --amp off.")
    return torch.channels_last if args.channels_last else torch.contiguous_format


def build_network(name, num_classes, shortcut):
    """build_model, with a combination the architecture lacks (a WRN with --shortcut identity) as a UserError."""
    try:
        return build_model(name, num_classes, shortcut)
    except ValueError as e:
        raise UserError(f"--model {name}: {e}.") from None


def main(args, given):
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.dataset}-{args.model}-seed{args.seed}")
    resume = find_resume(args, "base")
    if resume:
        adopt_config(args, resume[0]["config"], given, resume[1], resume[0]["epoch"])
    else:
        resolve_recipe(args)
    device, rank, world_size = resolve_device(args.device)
    memory_format = resolve_speed(args, device)
    set_seed(args.seed)
    model = build_network(args.model, DATASETS[args.dataset].num_classes, args.shortcut)
    model = model.to(device, memory_format=memory_format)
    loaders, num_classes = make_loaders(args, device, rank, world_size)
    if is_main():
        prepare_output_dir(args.output_dir, resuming=resume is not None)
        write_json(vars(args), os.path.join(args.output_dir, "args.json"))
    barrier()

    task = Supervised(model)
    if args.compile:
        task.compile_steps(device)
    optimizer, scheduler = build_optimizer(task, args)
    info = {"arch": args.model, "num_classes": num_classes, "shortcut": args.shortcut,
            "dataset": args.dataset, "config": vars(args)}
    fit(task, optimizer, scheduler, loaders, args, info, resume)


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(get_args_parser())))
