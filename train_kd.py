"""Distil a teacher checkpoint (written by train_base.py) into a student with one KD method.

    python train_kd.py --teacher runs/cifar10-resnet110-seed0/last.pt --student resnet20 --method st

Takes every flag of train_base.py (--model is called --student here) plus the ones below; the
teacher's architecture, class count and data set come from its checkpoint. Every flag and its
default: python train_kd.py --help; the methods and their defaults: docs/methods.md.
"""
import os

import torch

import config
from data import make_loaders
from engine import Distiller, Teacher, build_optimizer, evaluate, fit, prepare_teacher_cache, run_stage, setup_device
from kd_losses import build_method
from models import build_network
from utils import (UserError, barrier, claimed_output_dir, is_main, log, make_writable_folder, run_main, set_seed,
                   write_json)


def get_args_parser():
    return config.get_args_parser("kd")


def main(argv=None):
    cfg, resume = config.resolve(get_args_parser().parse_args(argv), "kd")
    hparams = config.method_hyperparameters(cfg)
    device, rank, world_size = setup_device(cfg.device, cfg.deterministic)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    loaders, num_classes, data_sha256 = make_loaders(cfg, device, rank, world_size)
    cfg = config.with_data(cfg, data_sha256, resume)
    teacher = Teacher.load(cfg.teacher, device, memory_format, cfg.compile, cfg.amp == "bf16")

    set_seed(cfg.seed)  # the student first after seeding, as in train_base.py: it starts from the baseline's weights
    student = build_network(cfg.model, num_classes, cfg.shortcut).to(device, memory_format=memory_format)
    try:
        method = build_method(cfg.method, hparams, student, teacher, loaders["train"].labels)
    except ValueError as e:
        raise UserError(f"--method {cfg.method} with a {cfg.teacher_arch} teacher and a {cfg.model} student: "
                        f"{e}.") from None
    method.to(device, memory_format=memory_format)
    if method.negatives_per_sample:
        loaders["train"].add_negatives(method.negatives_per_sample)
    # at KD weight 0 the step is the baseline's, on the baseline's batches
    loaders["train"].strong_view = method.strong_view and cfg.kd_weight != 0
    last_batch = len(loaders["train"].labels) % cfg.batch_size
    if method.small_batch_steps and not cfg.drop_last and 0 < last_batch < cfg.batch_size / 4:
        log(f"note: each epoch's last batch holds {last_batch} images; --method {cfg.method} takes a step many times "
            f"larger on so small a batch, and --drop-last leaves it out")

    with claimed_output_dir(cfg.output_dir, resuming=resume is not None):  # locked while this run writes it
        if is_main() and method.has_stage and cfg.stage_cache:
            make_writable_folder(cfg.stage_cache, "stage cache")
        teacher_test = evaluate(teacher.folded, loaders["test"], cfg.amp == "bf16")
        log(f"teacher {cfg.teacher_arch} ({cfg.teacher}): test top1 {teacher_test['top1']:.2f} "
            f"top5 {teacher_test['top5']:.2f}")
        log(f"method {cfg.method}: kd weight {cfg.kd_weight}, ce weight {cfg.ce_weight}, {hparams}")
        epochs_left = cfg.epochs - (resume[0]["epoch"] if resume else 0)
        teacher_cache = prepare_teacher_cache(cfg, method, teacher, loaders["train"], epochs_left)
        if is_main():  # written once every folder the run writes to has been checked
            write_json(vars(cfg), os.path.join(cfg.output_dir, "args.json"))
        barrier()
        task = Distiller(student, teacher, method, cfg.ce_weight, cfg.kd_weight, teacher_cache)
        if cfg.compile:
            task.compile_steps(device)
        if method.has_stage and not resume:  # a resumed run gets the stage's result from last.pt
            key = {k: getattr(cfg, k) for k in ("method", "model", "shortcut", "seed", "dataset", "data_sha256",
                                                 "val_split", "batch_size", "padding", "amp", "teacher_sha256",
                                                 *hparams)}
            key["format"] = 4  # 4: the data by its sha256, not its folder
            run_stage(task, loaders["train"], key, cfg.output_dir, cfg.stage_cache)

        optimizer, scheduler = build_optimizer(task, cfg)
        info = {"arch": cfg.model, "num_classes": num_classes, "shortcut": cfg.shortcut, "dataset": cfg.dataset,
                "config": vars(cfg), "kd": {"method": cfg.method, "kd_weight": cfg.kd_weight,
                                            "ce_weight": cfg.ce_weight, **hparams},
                "teacher": {"path": cfg.teacher, "arch": cfg.teacher_arch, "test_top1": teacher_test["top1"]},
                # what evaluation ran and engine.load_predictor rebuilds: the student, or the student through
                # the method's saved parts (a method that replaces its classifier)
                "predictor": "method" if method.replaces_classifier else "student"}
        fit(task, optimizer, scheduler, loaders, cfg, info, resume)


if __name__ == "__main__":
    run_main(main)
