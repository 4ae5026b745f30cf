"""The one training loop shared by train_base.py and train_kd.py.

A *task* is an nn.Module whose forward(images, targets, indices) returns (student_logits, terms),
where terms maps a name ('ce', 'kd', ...) to a weighted scalar loss; the optimised loss is their
sum, and indices are the batch's positions in the training set. start_epoch(epoch, epochs) is
called before each epoch. Supervised is plain cross-entropy; Distiller adds a teacher and a KD
method. Everything the task owns (student, connectors, translators, a peer) is trained and
checkpointed; the teacher is not.
"""
import inspect
import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models import fold_batchnorm
from utils import (CHECKPOINT_FORMAT, UserError, append_csv_row, is_main, load_weights, log, progress_bar,
                   save_atomic, unwrap, write_csv)

CHECK_EVERY = 50  # steps between looks at the loss on an accelerator
RESUME_ONLY = ("optimizer", "scheduler", "rng", "history")  # in last.pt, not in best.pt


def compile_mode(device):
    # CUDA graphs remove the launch overhead that dominates these small nets on a GPU
    return "reduce-overhead" if device.type == "cuda" else "default"


class Supervised(nn.Module):
    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, images, targets, indices):
        return self.student_loss(images, targets)

    def student_loss(self, images, targets):
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits.float(), targets)}

    def start_epoch(self, epoch, epochs):
        pass

    def compile_steps(self, device):
        """torch.compile the training step's forward (and so its backward)."""
        self.student_loss = torch.compile(self.student_loss, mode=compile_mode(device))


def freeze_teacher(teacher):
    """The only place a teacher is prepared: eval mode, no gradients, and its BN folded into the
    convolutions (measured: 1.09x faster forward in fp32, 1.44x in bf16 channels_last on a CPU)."""
    teacher.eval()
    teacher.requires_grad_(False)
    return fold_batchnorm(teacher)


class Distiller(nn.Module):
    """Student + KD method. The teacher is kept out of the module tree (so it is never in the
    optimizer, the checkpoint or a DDP wrapper) and runs under inference mode. A KD weight of 0
    leaves out the method and the teacher altogether: the step is then the baseline's."""

    def __init__(self, student, teacher, method, ce_weight, kd_weight):
        super().__init__()
        self.student, self.method = student, method
        # deliberately not submodules: the teacher and its (maybe compiled) forward
        object.__setattr__(self, "teacher", freeze_teacher(teacher))
        object.__setattr__(self, "teacher_forward", teacher)
        self.ce_weight, self.kd_weight = ce_weight, kd_weight

    def compile_steps(self, device):
        """torch.compile the student's step (forward, loss and so backward) and the teacher's forward,
        unless the method's step cannot be compiled (it says so), which then runs eagerly."""
        object.__setattr__(self, "teacher_forward", torch.compile(self.teacher, mode=compile_mode(device)))
        if self.method.compilable:
            self.student_loss = torch.compile(self.student_loss, mode=compile_mode(device))
        else:
            log(f"--compile: the {self.method.name} step stays eager (it cannot be compiled); "
                f"the teacher's forward is compiled")

    def start_epoch(self, epoch, epochs):
        self.method.start_epoch(epoch, epochs)

    def teacher_outputs(self, images):
        with torch.inference_mode():
            logits, feats = self.teacher_forward(images, features=True)
        # inference tensors cannot be saved for backward, so the few the method reads are cloned
        return {"logits": logits.clone(), **{k: feats[k].clone() for k in self.method.features}}

    def forward(self, images, targets, indices):
        if self.kd_weight == 0:
            logits = self.student(images)
            return logits, {"ce": self.ce_weight * F.cross_entropy(logits.float(), targets)}
        teacher = self.teacher_outputs(images) if self.method.reads_teacher else {}
        return self.student_loss(images, targets, indices, teacher)

    def student_loss(self, images, targets, indices, teacher):
        logits, kd = self.method.step(self.student, images, targets, indices, teacher)
        terms = {"ce": self.ce_weight * F.cross_entropy(logits.float(), targets)}
        if isinstance(kd, dict):
            terms.update({f"kd_{name}": self.kd_weight * value for name, value in kd.items()})
        else:
            terms["kd"] = self.kd_weight * kd
        return logits, terms


def build_optimizer(task, args):
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                                nesterov=args.nesterov, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_milestones, gamma=args.lr_gamma)
    return optimizer, scheduler


class Interrupted(Exception):
    """Raised between two steps after SIGINT or SIGTERM."""


class Diverged(Exception):
    def __init__(self, step):
        super().__init__(step)
        self.step = step


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set `signum`; the loop stops at the next step. A
    second signal gets the previous handler (Ctrl-C twice still kills at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def autocast(device, amp):
    """bf16 autocast when amp is on; the losses themselves are computed in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _over_processes(tensor, op="sum"):
    """The tensor reduced ('sum' or 'max') over the torchrun processes; itself in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def train_one_epoch(task, loader, optimizer, desc="train", stop=None, amp=False):
    """One pass over the loader. Sums stay on the device and are read once, at the end; the first
    non-finite loss is recorded on the device too and looked at every step on the CPU, every
    `CHECK_EVERY` steps elsewhere (a look is a host synchronisation). Under torchrun the processes
    take that look together, so that they all stop at the same step."""
    task.train()
    sums, correct, seen = {}, 0, 0
    device = loader.labels.device
    first_bad_step = torch.tensor(-1, device=device)
    check_every = 1 if device.type == "cpu" else CHECK_EVERY
    bar = progress_bar(loader, desc) if is_main() else loader
    for step, (images, targets, indices) in enumerate(bar, start=1):
        with autocast(images.device, amp):
            logits, terms = task(images, targets, indices)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(targets)
        for name, value in (("loss", loss), *terms.items()):
            sums[name] = sums.get(name, 0.0) + value.detach() * n
        correct = correct + (logits.argmax(1) == targets).sum()
        seen += n
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step, first_bad_step)
        if step % check_every == 0 or step == len(loader):
            signalled = stop is not None and stop.signum is not None
            flags = torch.stack([first_bad_step, torch.tensor(int(signalled), device=device)])
            flags = _over_processes(flags, "max").tolist()
            if flags[0] >= 0:
                raise Diverged(flags[0])
            if flags[1]:
                raise Interrupted
            if isinstance(bar, tqdm) and not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    names = list(sums)
    seen = torch.tensor(float(seen), device=device)
    totals = _over_processes(torch.stack([sums[k] for k in names] + [correct * 1.0, seen])).tolist()
    stats = {name: value / totals[-1] for name, value in zip(names, totals)}
    stats["top1"] = 100.0 * totals[-2] / totals[-1]
    return stats


@torch.inference_mode()
def evaluate(model, loader, amp=False):
    """Mean cross-entropy, top-1 and top-5 (%) over the whole loader."""
    model.eval()
    device = loader.labels.device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    for images, targets in loader:
        with autocast(images.device, amp):
            logits = model(images).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), hits[:, 0].sum(),
                               hits.any(1).sum(), torch.tensor(len(targets), device=device)]).double()
    loss_sum, top1, top5, seen = _over_processes(totals).tolist()
    return {"loss": loss_sum / seen, "top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen}


def _extra_state(task):
    """What the task owns beyond the student (a KD method's learnable parts), by state-dict key."""
    return {k: v for k, v in unwrap(task).state_dict().items() if not k.startswith("student.")}


def _rng_state(loader):
    state = {"torch": torch.get_rng_state(), "data": loader.generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(task, optimizer, scheduler, loader, ckpt, path):
    """Puts a last.pt back: weights (strictly), optimizer, LR schedule and every random generator."""
    load_weights(task, {**{f"student.{k}": v for k, v in ckpt["model"].items()}, **ckpt["method"]},
                 f"The checkpoint {path}")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        loader.generator.set_state(ckpt["rng"]["data"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"The checkpoint {path} cannot be resumed ({type(e).__name__}: {e}).") from None


def _share_buffers(task):
    """Under torchrun, gives every process rank 0's buffers (BN running statistics, which each
    process updated from its own part of the batch), so that evaluation and checkpoints agree."""
    if dist.is_initialized():
        for buffer in task.buffers():
            dist.broadcast(buffer, src=0)


def _check_replicas(task):
    """Under torchrun, makes sure every process ends with the same weights and buffers."""
    flat = torch.cat([t.detach().double().flatten() for t in task.state_dict().values() if t.is_floating_point()])
    summary = torch.stack([flat.sum(), flat.square().sum(), (flat * torch.linspace(0, 1, len(flat),
                                                                                   device=flat.device)).sum()])
    low, high = summary.clone(), summary.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError("the processes ended with different weights; please report this as a bug")
    log(f"weights and buffers identical on all {dist.get_world_size()} processes")


def resume_command(path):
    """The command line that resumes this run from `path`, for messages."""
    argv, skip = [], False
    for arg in sys.argv:
        if skip or arg == "--resume":
            skip = not skip
            continue
        if not arg.startswith("--resume="):
            argv.append(arg)
    return " ".join(shlex.quote(a) for a in ["python", *argv, "--resume", path])


def fit(task, optimizer, scheduler, loaders, args, checkpoint_info, resume=None):
    """The epoch loop: train, step the LR, evaluate, log a row of metrics.csv, keep last.pt and best.pt.

    loaders: dict with 'train', 'test' and optionally 'val'. The best epoch is chosen on the
    validation split when one is held out, else on the test set (and the checkpoint says which).
    checkpoint_info: plain-typed fields stored in every checkpoint (architecture, classes, ...).
    resume: (checkpoint, path) of a last.pt to continue from, or None.
    Under torchrun the task trains wrapped in DistributedDataParallel; rank 0 alone logs and writes.
    """
    student = task.student
    amp = args.amp == "bf16"
    trainer = task
    if dist.is_initialized():
        device = loaders["train"].labels.device
        if args.sync_bn:  # same Parameter objects, so the optimizer built before still holds them
            nn.SyncBatchNorm.convert_sync_batchnorm(task)
        # buffers (BN statistics) are shared once per epoch below, not at every step
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        trainer = DistributedDataParallel(task, device_ids=[device] if device.type == "cuda" else None,
                                          **no_buffer_sync)
    selected_on = "val" if "val" in loaders else "test"
    metrics_path = os.path.join(args.output_dir, "metrics.csv")
    last_path = os.path.join(args.output_dir, "last.pt")
    history, best, first_epoch = [], {"top1": -1.0, "epoch": 0}, 1
    if resume is not None:
        ckpt, path = resume
        _restore(task, optimizer, scheduler, loaders["train"], ckpt, path)
        history, first_epoch = ckpt["history"], ckpt["epoch"] + 1
        best = {"top1": ckpt["best_top1"], "epoch": ckpt["best_epoch"]}
        if is_main():
            write_csv(history, metrics_path)  # drops any row written after that checkpoint
        log(f"resumed from {path} after epoch {ckpt['epoch']}")
    test = None
    with StopOnSignal() as stop:
        for epoch in range(first_epoch, args.epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            task.start_epoch(epoch, args.epochs)
            try:
                train = train_one_epoch(trainer, loaders["train"], optimizer, f"epoch {epoch}/{args.epochs}",
                                        stop, amp)
            except Diverged as e:
                raise UserError(
                    f"The training loss became non-finite in epoch {epoch} at step {e.step}, so the run "
                    f"stopped and {last_path} still holds the last good epoch; check --lr and the KD "
                    f"weights.") from None
            except Interrupted:
                signum = stop.signum or signal.SIGTERM  # another process may have been the one signalled
                name = signal.Signals(signum).name
                if epoch == 1:
                    log(f"{name} in epoch 1: no epoch completed, nothing to resume.", file=sys.stderr)
                else:
                    log(f"{name} in epoch {epoch}: {last_path} holds epoch {epoch - 1}; resume with:\n"
                        f"  {resume_command(last_path)}", file=sys.stderr)
                sys.exit(128 + signum)
            _share_buffers(task)
            scheduler.step()
            test = evaluate(student, loaders["test"], amp)
            val = evaluate(student, loaders["val"], amp) if "val" in loaders else None
            seconds = time.perf_counter() - start

            row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"]}
            row.update({f"train_{name}": train[name] for name in train if name not in ("loss", "top1")})
            row.update({"train_top1": train["top1"], "test_loss": test["loss"], "test_top1": test["top1"],
                        "test_top5": test["top5"]})
            if val is not None:
                row["val_top1"] = val["top1"]
            row["seconds"] = round(seconds, 3)
            history.append(row)

            score = (val or test)["top1"]
            improved = score > best["top1"]
            if improved:
                best = {"top1": score, "epoch": epoch}
            terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in row.items()
                             if k.startswith("train_") and k not in ("train_loss", "train_top1"))
            log(f"epoch {epoch:3d}/{args.epochs} lr {lr:.4g} | train loss {train['loss']:.4f} ({terms}) "
                f"top1 {train['top1']:.2f} | test loss {test['loss']:.4f} top1 {test['top1']:.2f} "
                f"top5 {test['top5']:.2f}" + (f" | val top1 {val['top1']:.2f}" if val else "")
                + f" | {seconds:.1f}s" + (" *" if improved else ""))
            if not is_main():
                continue

            checkpoint = {
                "format": CHECKPOINT_FORMAT, **checkpoint_info, "epoch": epoch,
                "model": unwrap(student).state_dict(), "method": _extra_state(task),
                "test_top1": test["top1"], "test_top5": test["top5"],
                "val_top1": None if val is None else val["top1"],
                "best_top1": best["top1"], "best_epoch": best["epoch"], "selected_on": selected_on,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(loaders["train"]), "history": history,
            }
            if improved:
                save_atomic({k: v for k, v in checkpoint.items() if k not in RESUME_ONLY},
                            os.path.join(args.output_dir, "best.pt"))
            save_atomic(checkpoint, last_path)
            append_csv_row(row, metrics_path)
    if test is None:
        log(f"nothing to do: {last_path} already holds epoch {first_epoch - 1} of {args.epochs}")
        return None, best
    if dist.is_initialized():
        _check_replicas(task)
    log(f"done: last epoch test top1 {test['top1']:.2f}; best epoch {best['epoch']} "
          f"({selected_on} top1 {best['top1']:.2f}) saved to {os.path.join(args.output_dir, 'best.pt')}")
    return test, best
