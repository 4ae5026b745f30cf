"""Train a CIFAR network with cross-entropy: a teacher, or the baseline of a KD student.

    python train_base.py --dataset cifar10 --model resnet110

Every flag and its default: python train_base.py --help. The defaults and the per-data-set
recipes are plain tables at the top of config.py: edit them there.
"""
import os

import torch

import config
from data import make_loaders
from engine import Supervised, build_optimizer, fit, setup_device
from models import build_network
from utils import barrier, claimed_output_dir, is_main, run_main, set_seed, write_json


def get_args_parser():
    return config.get_args_parser("base")


def main(argv=None):
    cfg, resume = config.resolve(get_args_parser().parse_args(argv), "base")
    device, rank, world_size = setup_device(cfg.device, cfg.deterministic)
    loaders, num_classes, data_sha256 = make_loaders(cfg, device, rank, world_size)
    cfg = config.with_data(cfg, data_sha256, resume)

    set_seed(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_network(cfg.model, num_classes, cfg.shortcut).to(device, memory_format=memory_format)
    task = Supervised(model)
    if cfg.compile:
        task.compile_steps(device)
    optimizer, scheduler = build_optimizer(task, cfg)

    with claimed_output_dir(cfg.output_dir, resuming=resume is not None):  # locked while this run writes it
        if is_main():
            write_json(vars(cfg), os.path.join(cfg.output_dir, "args.json"))
        barrier()
        info = {"arch": cfg.model, "num_classes": num_classes, "shortcut": cfg.shortcut, "dataset": cfg.dataset,
                "config": vars(cfg)}
        fit(task, optimizer, scheduler, loaders, cfg, info, resume)


if __name__ == "__main__":
    run_main(main)
