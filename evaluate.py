"""Evaluate a checkpoint on a data set's test split: top-1, top-5 and the mean cross-entropy, as a
run evaluates it after each epoch.

    python evaluate.py runs/cifar10-resnet20-seed0/best.pt
    python evaluate.py cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth --arch resnet32x4 --dataset cifar100

Takes a last.pt or best.pt of train_base.py or train_kd.py (a SimKD student predicts through its
method's projector and its teacher's classifier, as in training), or a RepDistiller/mdistiller
checkpoint with --arch (converted once, as train_kd.py --teacher-arch does). By default it evaluates
as the run did (its batch size and precision), so the numbers equal the ones the run recorded for
that epoch, which are printed beside them.
"""
import argparse
import os

import config
from data import DATASETS, DeviceLoader, data_sha256, load_cifar, load_val_file
from engine import evaluate, load_predictor, setup_device
from engine.checkpoint import import_teacher, load_checkpoint
from models import MODELS
from utils import UserError, positive, run_main

DEFAULT_BATCH_SIZE = 500  # for a checkpoint that records no run (an imported teacher)


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage="%(prog)s CHECKPOINT [options]",
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", help="a last.pt or best.pt, or a RepDistiller/mdistiller checkpoint with --arch")
    parser.add_argument("--arch", choices=list(MODELS), help="the architecture of a RepDistiller or mdistiller "
                        "checkpoint, which it does not record (converted once into NAME.kdzoo.pt beside it); "
                        "needs --dataset")
    parser.add_argument("--dataset", choices=list(DATASETS), help="default: the checkpoint's")
    parser.add_argument("--data-root", default="./dataset", help="folder holding cifar-10-batches-py/ or "
                        "cifar-100-python/ (default: ./dataset)")
    parser.add_argument("--batch-size", type=positive(int),
                        help=f"images per forward (default: the run's, else {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available, else the CPU (default: auto)")
    parser.add_argument("--amp", choices=["bf16", "off"], help="bf16 autocast (default: the run's, else off)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    path = args.checkpoint
    if args.arch:
        if args.dataset is None:
            raise UserError("--arch needs --dataset: a RepDistiller or mdistiller checkpoint does not record its "
                            "data set.")
        path = import_teacher(path, args.arch, args.dataset, DATASETS[args.dataset].num_classes)
    ckpt = load_checkpoint(path)
    run = ckpt.get("config", {})  # the run's settings; an imported teacher has none
    dataset = args.dataset or ckpt["dataset"]
    if ckpt["num_classes"] != DATASETS[dataset].num_classes:
        raise UserError(f"{path} has {ckpt['num_classes']} classes but {dataset} has "
                        f"{DATASETS[dataset].num_classes}.")
    amp = config.speed_values({"device": args.device, "amp": args.amp or run.get("amp", "off"),
                               "channels_last": False, "sync_bn": False})["amp"]
    device, _, _ = setup_device(args.device)
    train_x, train_y, test_x, test_y = load_cifar(dataset, args.data_root)
    spec = DATASETS[dataset]
    batch_size = args.batch_size or run.get("batch_size", DEFAULT_BATCH_SIZE)
    loader = DeviceLoader(test_x.to(device), test_y.to(device), batch_size, spec.mean, spec.std, train=False)
    result = evaluate(load_predictor(path, device), loader, amp == "bf16")
    print(f"{path} on the {len(test_y):,} {spec.title} test images in {args.data_root}: top-1 {result['top1']:.2f} %, "
          f"top-5 {result['top5']:.2f} %, loss {result['loss']:.4f}")
    if "epoch" in ckpt and ckpt["test_top1"] is None:
        print(f"the run did not evaluate epoch {ckpt['epoch']} (--eval-every)")
    elif "epoch" in ckpt:  # last.pt's history has the loss too; best.pt has no history
        row = next((r for r in ckpt.get("history", []) if r["epoch"] == ckpt["epoch"]), {})
        print(f"recorded by the run after epoch {ckpt['epoch']}: top-1 {ckpt['test_top1']:.2f} %, top-5 "
              f"{ckpt['test_top5']:.2f} %" + (f", loss {row['test_loss']:.4f}" if "test_loss" in row else ""))
    val_file = run.get("val_file")
    if val_file and not os.path.isfile(val_file):
        print(f"note: the run's --val-file {val_file} is not there, so its data cannot be compared with "
              f"{args.data_root}'s")
    elif run.get("data_sha256") not in (None, data_sha256(train_x, train_y, test_x, test_y,
                                                          *(load_val_file(dataset, val_file) if val_file else ()))):
        print(f"note: the run was trained and evaluated on other data than {args.data_root} holds")


if __name__ == "__main__":
    run_main(main)
