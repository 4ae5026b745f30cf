"""Training throughput: the conventional pipeline against ours, on synthetic CIFAR-shaped data.

    python benchmarks/speed.py                 # every row, on CUDA when present, else the CPU
    python benchmarks/speed.py --rows kd-st --steps 5

(a) conventional: a torchvision-style data set of uint8 HWC images, per-sample PIL RandomCrop(32,
    padding=4) + RandomHorizontalFlip + ToTensor + Normalize in DataLoader workers, fp32, eager.
(b) ours: the data set on the device as uint8, batched crop/flip/normalise there (DeviceLoader),
    bf16 autocast where supported, channels_last (on CUDA and with bf16), and torch.compile.
Both train the same task (engine.Supervised / engine.Distiller, SGD) for the same number of steps.
Then, ours only, the teacher cache (--cache-rows): the baseline resnet20 at the KD batch size, each
KD row with the teacher running and with the cache, and the cache's one-off build (timed on
--cache-build-images images, extrapolated to 50,000) with the epoch from which it pays for itself.
Timed: `--repeats` runs of `--steps` steps after `--warmup` steps; the median is reported, as images
per second and seconds per 50,000-image epoch. Not a test: run it on a quiet machine.
"""
import argparse
import itertools
import os
import statistics
import sys
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DATASETS, VIEWS, DeviceLoader  # noqa: E402
from engine import Distiller, Supervised, Teacher, train_step  # noqa: E402
from engine.teacher_cache import TeacherCache, build_cache  # noqa: E402
from kd_losses import METHODS, build_method, default_hyperparameters, default_weight  # noqa: E402
from models import build_model  # noqa: E402

EPOCH_IMAGES = 50_000


def get_args():
    offered = [m for m in METHODS if m != "crd" and not METHODS[m].strong_view]
    rows = ["base-resnet20", "base-resnet110", *(f"kd-{m}" for m in offered)]
    seed_rows = rows[:2] + [f"kd-{m}" for m in ("st", "at", "fitnet", "nst", "ft", "rkd")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=rows, default=seed_rows,
                   help="what to time (CRD and MLKD are not offered: the conventional pipeline has no contrastive "
                        "indices and no strong view)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--base-batch-size", type=int, default=128, help="batch of the baseline rows (CIFAR-10 recipe)")
    p.add_argument("--kd-batch-size", type=int, default=64, help="batch of the KD rows (CRD recipe)")
    p.add_argument("--images", type=int, default=EPOCH_IMAGES, help="size of the synthetic training set")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers of the conventional pipeline")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="ours: auto = bf16 where the device supports it")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="ours: auto = on for CUDA and with bf16 (oneDNN's bf16 convolutions prefer NHWC)")
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="ours: torch.compile the steps (compiling takes about a minute per row on a CPU)")
    cacheable = [m for m in METHODS if not METHODS[m].teacher_cache_refusal()]
    p.add_argument("--cache-rows", nargs="*", choices=cacheable, default=["st", "rkd"],
                   help="KD rows also timed with the teacher cache (none: skip that table)")
    p.add_argument("--cache-build-images", type=int, default=128,
                   help="images whose 162 views the timed cache build runs through the teacher")
    return p.parse_args()


class PerSampleCifar(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per image: a PIL image through the transforms."""

    def __init__(self, images_hwc, labels, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def conventional_batches(images, labels, batch_size, workers, device):
    from torchvision import transforms
    spec = DATASETS["cifar10"]
    transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    dataset = PerSampleCifar(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    for x, y in itertools.chain.from_iterable(itertools.repeat(loader)):
        # no indices, views or strong view
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), None, None, None


def device_batches(images, labels, batch_size, device, channels_last):
    spec = DATASETS["cifar10"]
    loader = DeviceLoader(images.to(device), labels.to(device), batch_size, spec.mean, spec.std, train=True,
                          seed=0, channels_last=channels_last)
    yield from itertools.chain.from_iterable(itertools.repeat(loader))


def build_task(row, device, memory_format, labels, compile_steps=False, amp=False):
    torch.manual_seed(0)
    if row.startswith("base-"):
        task = Supervised(build_model(row[5:], 10).to(device, memory_format=memory_format))
    else:
        student = build_model("resnet20", 10).to(device, memory_format=memory_format)
        teacher = Teacher(build_model("resnet110", 10).to(device), memory_format, compile_steps, amp)
        name = row[3:]
        method = build_method(name, default_hyperparameters(name), student, teacher, labels.to(device))
        task = Distiller(student, teacher, method.to(device, memory_format=memory_format), 1.0,
                         default_weight(name, "cifar10"))
    if compile_steps:
        task.compile_steps(device)
    return task


def stepper(task, batches, amp):
    """A function that trains `task` one step on the next batch and returns the batch's size."""
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=5e-4)
    task.train()

    def step():
        batch = next(batches)
        train_step(task, optimizer, batch, amp)
        return len(batch[1])
    return step


def timed_rate(step, steps, device):
    """Images per second over `steps` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    seen = sum(step() for _ in range(steps))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def time_steps(task, batches, amp, args, device):
    """Median images per second over the timed repeats."""
    step = stepper(task, batches, amp)
    for _ in range(args.warmup):
        step()
    rate = statistics.median(timed_rate(step, args.steps, device) for _ in range(args.repeats))
    batches.close()  # shuts the conventional pipeline's workers down before the next measurement
    return rate


def cache_table(args, device, images, labels, amp, channels_last, compile_steps):
    """Ours with the teacher running and with the teacher cache, against the baseline at the same
    batch. The rows are timed in turn, `--repeats` rounds of `--steps` steps each, so that the
    machine's drift reaches all of them alike; the median of each row's rounds is reported."""
    batch, fmt = args.kd_batch_size, torch.channels_last if channels_last else torch.contiguous_format
    loader = DeviceLoader(images.to(device), labels.to(device), batch, DATASETS["cifar10"].mean,
                          DATASETS["cifar10"].std, train=True, channels_last=channels_last)
    positions = torch.arange(len(images), device=device)
    rows = {"base-resnet20": build_task("base-resnet20", device, fmt, labels, compile_steps, amp)}
    teacher = None
    for method in args.cache_rows:
        rows[f"kd-{method}"] = build_task(f"kd-{method}", device, fmt, labels, compile_steps, amp)
        rows[f"kd-{method} cache"] = cached = build_task(f"kd-{method}", device, fmt, labels, compile_steps, amp)
        teacher = cached.teacher
    # the teacher's forward is the whole build: timed once, with every cached output
    build_cache(teacher, images[:64], loader.normalize, "zeros", ("logits", "pool"), False)  # warm-up (compiles)
    start = time.perf_counter()
    built = build_cache(teacher, images[:args.cache_build_images], loader.normalize, "zeros", ("logits", "pool"),
                        False)
    build_rate = args.cache_build_images * VIEWS / (time.perf_counter() - start)
    # every image's table: the built images' outputs repeated (a lookup costs the same whatever it reads)
    tables = {name: t.repeat(-(-len(images) // args.cache_build_images), 1)[:len(images) * VIEWS]
              for name, t in built.items()}
    for method in args.cache_rows:
        task = rows[f"kd-{method} cache"]
        task.teacher_cache = TeacherCache({name: tables[name] for name in ("logits", *task.method.features)},
                                          positions)
    steps = {name: stepper(task, device_batches(images, labels, batch, device, channels_last), amp)
             for name, task in rows.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    rounds = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, step in steps.items():
            rounds[name].append(timed_rate(step, args.steps, device))
    rates = {name: statistics.median(r) for name, r in rounds.items()}
    base = rates["base-resnet20"]
    print(f"\nteacher cache, ours only (resnet110 teacher, resnet20 student, batch {batch}; rows timed in turn):")
    header = f"{'row':<16}{'img/s':>8}{'s/epoch':>9}{'x base':>8}"
    print(header + "\n" + "-" * len(header))
    for name, value in rates.items():
        print(f"{name:<16}{value:>8.0f}{EPOCH_IMAGES / value:>9.1f}{base / value:>7.2f}x")
    build = EPOCH_IMAGES * VIEWS / build_rate
    paid = ", ".join(f"{build / (EPOCH_IMAGES / rates[f'kd-{m}'] - EPOCH_IMAGES / rates[f'kd-{m} cache']):.0f} "
                     f"epochs of {m}" for m in args.cache_rows)
    print(f"build: {build_rate:.0f} views/s ({args.cache_build_images} images timed), so {EPOCH_IMAGES:,} x {VIEWS} "
          f"views in {build:.0f} s; it pays for itself after {paid}", flush=True)


def main():
    args = get_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    on_cuda = device.type == "cuda"
    bf16_ok = torch.cuda.is_bf16_supported() if on_cuda else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    amp = {"auto": bf16_ok, "bf16": True, "off": False}[args.amp]
    channels_last = {"auto": on_cuda or amp, "on": True, "off": False}[args.channels_last]
    compile_steps = args.compile == "on"
    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"(a) conventional: per-sample PIL transforms, DataLoader with {args.workers} workers, fp32, eager")
    print(f"(b) ours: data on the device, amp {'bf16' if amp else 'off'}, channels_last {channels_last}, "
          f"compile {compile_steps}")
    print(f"{args.warmup} warm-up steps, then the median of {args.repeats} x {args.steps} steps; "
          f"{args.images} synthetic images; s/epoch is for {EPOCH_IMAGES:,} images")

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (args.images,), generator=gen)
    header = f"{'row':<16}{'batch':>6} | {'(a) img/s':>10}{'s/epoch':>9} | {'(b) img/s':>10}{'s/epoch':>9} | {'b/a':>6}"
    print(header + "\n" + "-" * len(header), flush=True)
    for row in args.rows:
        batch = args.base_batch_size if row.startswith("base-") else args.kd_batch_size
        task = build_task(row, device, torch.contiguous_format, labels)
        slow = time_steps(task, conventional_batches(images, labels, batch, args.workers, device), False, args, device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        task = build_task(row, device, fmt, labels, compile_steps, amp)
        fast = time_steps(task, device_batches(images, labels, batch, device, channels_last), amp, args, device)
        print(f"{row:<16}{batch:>6} | {slow:>10.0f}{EPOCH_IMAGES / slow:>9.1f} | {fast:>10.0f}"
              f"{EPOCH_IMAGES / fast:>9.1f} | {fast / slow:>5.1f}x", flush=True)
    if args.cache_rows:
        cache_table(args, device, images, labels, amp, channels_last, compile_steps)


if __name__ == "__main__":
    main()
