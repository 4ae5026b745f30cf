"""What one training step of each network costs: forward and backward of a batch of 32x32 images,
cross-entropy, in train mode, no optimizer step (the same for every network).

    python benchmarks/network_cost.py --batch-size 64 --device cpu

Reported per network: its parameters (100 classes) and the median seconds per step over
`--repeats` rounds of `--steps` steps, after one warm-up step, with the time per step of
`resnet20` in the same run as the unit (the machine's noise cancels in that ratio). Not a test:
run it on a quiet machine.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import MODELS, build_model  # noqa: E402

REFERENCE = "resnet20"


def get_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median round counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def seconds_per_step(model, images, labels, steps, repeats):
    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    step()  # warm-up: allocations, kernel choices
    rounds = []
    for _ in range(repeats):
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / steps)
    return statistics.median(rounds)


def main():
    args = get_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    images = torch.randn(args.batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, 100, (args.batch_size,), device=device)
    names = [REFERENCE] + [name for name in args.models if name != REFERENCE]
    print(f"batch {args.batch_size}, {device}, {torch.get_num_threads()} threads, median of {args.repeats} rounds "
          f"of {args.steps} steps\n")
    print("| network | parameters | s per step (forward + backward) | x resnet20 |")
    print("|---|---|---|---|")
    unit = None
    for name in names:
        model = build_model(name, 100).to(device).train()
        seconds = seconds_per_step(model, images, labels, args.steps, args.repeats)
        unit = unit or seconds
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params:,} | {seconds:.3f} | {seconds / unit:.1f} |", flush=True)


if __name__ == "__main__":
    main()
