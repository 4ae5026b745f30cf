"""Distil a CIFAR teacher checkpoint (written by train_base.py) into a student with one KD method.

    python train_kd.py --teacher runs/cifar10-resnet110-seed0/last.pt --student resnet20 --method st

Takes every flag of train_base.py (--model is called --student here) plus the ones below. The
teacher's architecture, class count and data set come from its checkpoint.
"""
import argparse
import hashlib
import json
import os

from data import DATASETS, make_loaders
from engine import Distiller, build_optimizer, evaluate, fit
from kd_losses import METHODS, add_method_args, build_method, default_weight, resolve_method_args
from models import build_model
from train_base import get_args_parser as get_base_parser
from train_base import build_network, resolve_recipe, resolve_speed
from utils import (CHECKPOINT_FORMAT, HelpFormatter, UserError, adopt_config, barrier, find_resume, is_main,
                   load_checkpoint, load_weights, log, non_negative_float, parse_args, prepare_output_dir,
                   resolve_device, run_main, save_atomic, set_seed, write_json)


def get_args_parser():
    base = get_base_parser(add_help=False, model_flag="--student")
    parser = argparse.ArgumentParser(description="Train a student with a KD loss from a teacher checkpoint.",
                                     parents=[base], allow_abbrev=False,
                                     formatter_class=HelpFormatter)
    parser.set_defaults(dataset=None)  # None: the teacher's data set
    parser.add_argument("--teacher", required=True, help="checkpoint written by train_base.py")
    parser.add_argument("--method", choices=list(METHODS), required=True, help="KD method (see README)")
    parser.add_argument("--kd-weight", type=non_negative_float,
                        help="weight of the KD loss (default: the method's own, see README)")
    parser.add_argument("--ce-weight", type=non_negative_float, default=1.0,
                        help="weight of the cross-entropy loss")
    add_method_args(parser)
    return parser


def load_teacher(args, ckpt, device):
    """Builds the teacher from its checkpoint after checking it against --dataset."""
    if ckpt["dataset"] != args.dataset:
        raise UserError(f"The teacher {args.teacher} was trained on {ckpt['dataset']}, not on {args.dataset}.")
    if ckpt["num_classes"] != DATASETS[args.dataset].num_classes:
        raise UserError(f"The teacher {args.teacher} has {ckpt['num_classes']} classes but "
                        f"{args.dataset} has {DATASETS[args.dataset].num_classes}.")
    teacher = build_model(ckpt["arch"], ckpt["num_classes"], ckpt.get("shortcut", "projection"))
    load_weights(teacher, ckpt["model"], f"The teacher checkpoint {args.teacher}")
    return teacher.to(device)


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_stage(task, loader, args):
    """Runs the method's stage before training (FT's paraphraser, AB's and FSP's student
    initialisation), or loads its result when the
    same teacher, student, seed, data and settings already produced it; saves it in the output folder
    and, where that folder is writable, beside the teacher for the next run."""
    key = {k: getattr(args, k) for k in ("method", "model", "seed", "dataset", "val_split", "batch_size",
                                          "teacher_sha256", *METHODS[args.method].hyperparameters)}
    key["data_root"] = os.path.abspath(args.data_root)
    key["format"] = 2  # stage results before this hold only the method's state
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache = os.path.join(os.path.dirname(os.path.abspath(args.teacher)), f"stage-{args.method}-{digest}.pt")
    if os.path.exists(cache):
        load_weights(task, load_checkpoint(cache)["task"], f"The stage result {cache}")
        print(f"{args.method} stage: loaded its result from {cache}")
    else:  # on a copy of the loader, so that the student then sees the batches it would without a stage
        task.method.train_stage(task.student, task.teacher_outputs, loader.unsharded_copy())
    # the whole task: a stage may train the student (AB, FSP) as well as the method's parts (FT)
    result = {"format": CHECKPOINT_FORMAT, "key": key, "task": task.state_dict()}
    save_atomic(result, os.path.join(args.output_dir, "stage.pt"))
    if not os.path.exists(cache):
        try:
            save_atomic(result, cache)
            print(f"{args.method} stage: result saved to {cache} for later runs")
        except UserError:
            print(f"{args.method} stage: the teacher's folder is not writable, so the result is kept "
                  f"only in {args.output_dir}")


def main(args, given):
    teacher_ckpt = load_checkpoint(args.teacher)
    if args.dataset is None:
        args.dataset = teacher_ckpt["dataset"]
    args.teacher_arch = teacher_ckpt["arch"]
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.dataset}-{args.method}-{args.teacher_arch}-to-"
                                               f"{args.model}-seed{args.seed}")
    resume = find_resume(args, "kd")
    if resume:
        adopt_config(args, resume[0]["config"], given, resume[1], resume[0]["epoch"])
    else:
        resolve_recipe(args)
    hparams = resolve_method_args(args)
    if args.kd_weight is None:
        args.kd_weight = default_weight(args.method, args.dataset)
    digest = file_sha256(args.teacher)
    if resume and digest != args.teacher_sha256:
        raise UserError(f"{args.teacher} is not the teacher of the run in {resume[1]} (its contents differ).")
    args.teacher_sha256 = digest
    device, rank, world_size = resolve_device(args.device)
    memory_format = resolve_speed(args, device)
    teacher = load_teacher(args, teacher_ckpt, device)
    loaders, _ = make_loaders(args, device, rank, world_size)
    set_seed(args.seed)
    num_classes = DATASETS[args.dataset].num_classes
    # built first after seeding, exactly as in train_base.py, so it starts from the baseline's weights
    student = build_network(args.model, num_classes, args.shortcut).to(device, memory_format=memory_format)
    try:
        method = build_method(args.method, hparams, student, teacher, loaders["train"].labels)
    except ValueError as e:
        raise UserError(f"--method {args.method} with a {args.teacher_arch} teacher and a {args.model} student: "
                        f"{e}.") from None
    method.to(device, memory_format=memory_format)
    if method.negatives_per_sample:
        loaders["train"].add_negatives(method.negatives_per_sample)
    task = Distiller(student, teacher, method, args.ce_weight, args.kd_weight)
    teacher.to(memory_format=memory_format)  # after the Distiller folded its BN into new convolution weights
    if args.compile:
        task.compile_steps(device)
    if is_main():
        prepare_output_dir(args.output_dir, resuming=resume is not None)
        write_json(vars(args), os.path.join(args.output_dir, "args.json"))
    barrier()

    teacher_test = evaluate(task.teacher, loaders["test"], args.amp == "bf16")
    log(f"teacher {args.teacher_arch} ({args.teacher}): test top1 {teacher_test['top1']:.2f} "
        f"top5 {teacher_test['top5']:.2f}")
    log(f"method {args.method}: kd weight {args.kd_weight}, ce weight {args.ce_weight}, {hparams}")
    if method.has_stage and not resume:  # a resumed run gets the stage's result from last.pt
        if is_main():
            run_stage(task, loaders["train"], args)
        barrier()
        if not is_main():  # the other processes take rank 0's result rather than training their own
            load_weights(task, load_checkpoint(os.path.join(args.output_dir, "stage.pt"))["task"], "The stage result")

    if args.kd_weight == 0:  # the method takes no part in training (see Distiller)
        task.method.requires_grad_(False)
    optimizer, scheduler = build_optimizer(task, args)
    info = {"arch": args.model, "num_classes": num_classes, "shortcut": args.shortcut, "dataset": args.dataset,
            "config": vars(args), "kd": {"method": args.method, "kd_weight": args.kd_weight,
                                         "ce_weight": args.ce_weight, **hparams},
            "teacher": {"path": args.teacher, "arch": args.teacher_arch, "test_top1": teacher_test["top1"]}}
    fit(task, optimizer, scheduler, loaders, args, info, resume)


if __name__ == "__main__":
    run_main(lambda: main(*parse_args(get_args_parser())))
