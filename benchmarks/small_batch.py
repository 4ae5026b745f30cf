"""How much larger a KD term's gradient is on a small batch than on a full one, per method: why a
data set whose last batch is small wants --drop-last.

    python benchmarks/small_batch.py --teacher runs/cifar10-resnet56-seed0/last.pt --data-root ./dataset

A freshly built student (--student, seeded) and the teacher see the first --batch-size training
images, unaugmented, and then the first --small of them; each method's KD term, at its default
weight, is differentiated with respect to the student's weights (the student in training mode, as
in a step). Printed per method: the KD term and its gradient's L2 norm on both batches, and the
ratio of the norms. A per-sample loss averaged over fewer samples grows by about the square root
of the batch ratio (4x for 128 against 8) from noise alone; a much larger ratio is the method's
normalisation (an N x N similarity matrix averaged over its entries).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DATASETS, load_cifar  # noqa: E402
from engine import Teacher  # noqa: E402
from kd_losses import METHODS, build_method, default_hyperparameters, default_weight  # noqa: E402
from models import MODELS, build_network  # noqa: E402
from utils import UserError, positive, run_main  # noqa: E402

# methods whose step needs only the batch's images, labels and the teacher's outputs
PLAIN = sorted(name for name, cls in METHODS.items() if not (
    cls.has_stage or cls.runs_teacher or not cls.reads_teacher or cls.negatives_per_sample or cls.strong_view
    or cls.replaces_classifier or cls.double_backward))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="a train_base.py checkpoint")
    p.add_argument("--data-root", required=True, help="folder holding the teacher's data set")
    p.add_argument("--student", default="resnet20", choices=list(MODELS))
    p.add_argument("--methods", nargs="+", default=PLAIN, choices=PLAIN, metavar="METHOD",
                   help="methods whose step reads only the batch and the teacher's outputs")
    p.add_argument("--batch-size", type=positive(int), default=128)
    p.add_argument("--small", type=positive(int), default=8, help="the small batch's images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.small >= args.batch_size:
        raise UserError(f"--small {args.small} must be fewer than --batch-size {args.batch_size}.")
    return args


def kd_gradient(method, weight, student, images, labels, teacher):
    """(weighted KD term, L2 norm of its gradient on the student's weights) on one batch."""
    student.zero_grad()
    teacher_out = teacher.outputs(images, method.features)
    _, loss = method.step(student, images, labels, torch.arange(len(labels)), teacher_out)
    loss = weight * (sum(loss.values()) if isinstance(loss, dict) else loss)
    loss.backward()
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in student.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def main(argv=None):
    args = get_args(argv)
    if not os.path.isfile(args.teacher):
        raise UserError(f"--teacher {args.teacher} does not exist.")
    teacher = Teacher.load(args.teacher, torch.device("cpu"))
    saved = torch.load(args.teacher, map_location="cpu", weights_only=True)
    dataset, teacher_arch = saved["dataset"], saved["arch"]
    spec = DATASETS[dataset]
    train_x, train_y, _, _ = load_cifar(dataset, args.data_root, download=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    images = (train_x[:args.batch_size].float() / 255 - mean) / std
    labels = train_y[:args.batch_size]
    print(f"| method | KD term ({args.batch_size}) | gradient norm ({args.batch_size}) | KD term ({args.small}) | "
          f"gradient norm ({args.small}) | ratio of the norms |\n|---|---|---|---|---|---|")
    for name in args.methods:
        torch.manual_seed(args.seed)
        student = build_network(args.student, spec.num_classes).train()
        method = build_method(name, default_hyperparameters(name, teacher_arch, args.student),
                              student, teacher, train_y)
        if method.negatives_per_sample:  # CRD: its memory of every training image needs their indices
            print(f"| {name} | not measured: it reads other training images' memories |  |  |  |  |", flush=True)
            continue
        weight = default_weight(name, dataset)
        full = kd_gradient(method, weight, student, images, labels, teacher)
        small = kd_gradient(method, weight, student, images[:args.small], labels[:args.small], teacher)
        print(f"| {name} | {full[0]:.4f} | {full[1]:.3f} | {small[0]:.4f} | {small[1]:.3f} | "
              f"{small[1] / full[1]:.1f} |", flush=True)


if __name__ == "__main__":
    run_main(main)
