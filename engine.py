"""The one training loop shared by train_base.py and train_kd.py.

A *task* is an nn.Module whose forward(images, targets) returns (student_logits, terms), where
terms maps a name ('ce', 'kd', ...) to a weighted scalar loss; the optimised loss is their sum.
Supervised is plain cross-entropy; Distiller adds a teacher and a KD method. Everything the task
owns (student, connectors, translators) is trained and checkpointed; the teacher is not.
"""
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import CHECKPOINT_FORMAT, UserError, append_csv_row, progress_bar, save_atomic


class Supervised(nn.Module):
    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, images, targets):
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, targets)}


def freeze_teacher(teacher):
    """The only place a teacher is prepared: eval mode (frozen BN statistics) and no gradients."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Distiller(nn.Module):
    """Student + KD method. The teacher is kept out of the module tree (so it is never in the
    optimizer, the checkpoint or a DDP wrapper) and runs under inference mode."""

    def __init__(self, student, teacher, method, ce_weight, kd_weight):
        super().__init__()
        self.student, self.method = student, method
        object.__setattr__(self, "teacher", freeze_teacher(teacher))  # deliberately not a submodule
        self.ce_weight, self.kd_weight = ce_weight, kd_weight

    def teacher_outputs(self, images):
        with torch.inference_mode():
            logits, feats = self.teacher(images, features=True)
        # inference tensors cannot be saved for backward, so the few the method reads are cloned
        return {"logits": logits.clone(), **{k: feats[k].clone() for k in self.method.features}}

    def forward(self, images, targets):
        teacher = self.teacher_outputs(images)
        if self.method.features:
            logits, feats = self.student(images, features=True)
            student = {"logits": logits, **{k: feats[k] for k in self.method.features}}
        else:
            logits = self.student(images)
            student = {"logits": logits}
        kd = self.method(student, teacher, targets)
        terms = {"ce": self.ce_weight * F.cross_entropy(logits, targets)}
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


def train_one_epoch(task, loader, optimizer, desc="train"):
    """One pass over the loader. Sums stay on the device and are read once, at the end."""
    task.train()
    sums, correct, seen = {}, 0, 0
    bar = progress_bar(loader, desc)
    for step, (images, targets) in enumerate(bar):
        logits, terms = task(images, targets)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(targets)
        for name, value in (("loss", loss), *terms.items()):
            sums[name] = sums.get(name, 0.0) + value.detach() * n
        correct = correct + (logits.argmax(1) == targets).sum()
        seen += n
        if not bar.disable and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    stats = {name: (value / seen).item() for name, value in sums.items()}
    stats["top1"] = 100.0 * int(correct) / seen
    return stats


@torch.inference_mode()
def evaluate(model, loader):
    """Mean cross-entropy, top-1 and top-5 (%) over the whole loader."""
    model.eval()
    loss_sum, top1, top5, seen = 0.0, 0, 0, 0
    for images, targets in loader:
        logits = model(images)
        loss_sum = loss_sum + F.cross_entropy(logits, targets, reduction="sum")
        best5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = best5 == targets[:, None]
        top1 = top1 + hits[:, 0].sum()
        top5 = top5 + hits.any(1).sum()
        seen += len(targets)
    return {"loss": float(loss_sum) / seen, "top1": 100.0 * int(top1) / seen, "top5": 100.0 * int(top5) / seen}


def _extra_state(task):
    """What the task owns beyond the student (a KD method's learnable parts), by state-dict key."""
    return {k: v for k, v in task.state_dict().items() if not k.startswith("student.")}


def fit(task, optimizer, scheduler, loaders, args, checkpoint_info):
    """The epoch loop: train, step the LR, evaluate, log a row of metrics.csv, keep last.pt and best.pt.

    loaders: dict with 'train', 'test' and optionally 'val'. The best epoch is chosen on the
    validation split when one is held out, else on the test set (and the checkpoint says which).
    checkpoint_info: plain-typed fields stored in every checkpoint (architecture, classes, ...).
    """
    student = task.student
    selected_on = "val" if "val" in loaders else "test"
    metrics_path = os.path.join(args.output_dir, "metrics.csv")
    best = {"top1": -1.0, "epoch": 0}
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(task, loaders["train"], optimizer, desc=f"epoch {epoch}/{args.epochs}")
        if not all(math.isfinite(v) for v in train.values()):
            raise UserError(f"The training loss became non-finite in epoch {epoch}; the last checkpoint "
                            f"is kept. Try a lower --lr or a lower KD weight.")
        scheduler.step()
        test = evaluate(student, loaders["test"])
        val = evaluate(student, loaders["val"]) if "val" in loaders else None
        seconds = time.perf_counter() - start

        row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"]}
        row.update({f"train_{name}": train[name] for name in train if name not in ("loss", "top1")})
        row.update({"train_top1": train["top1"], "test_loss": test["loss"], "test_top1": test["top1"],
                    "test_top5": test["top5"]})
        if val is not None:
            row["val_top1"] = val["top1"]
        row["seconds"] = round(seconds, 3)
        append_csv_row(row, metrics_path)

        score = (val or test)["top1"]
        improved = score > best["top1"]
        if improved:
            best = {"top1": score, "epoch": epoch}
        terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in row.items()
                         if k.startswith("train_") and k not in ("train_loss", "train_top1"))
        print(f"epoch {epoch:3d}/{args.epochs} lr {lr:.4g} | train loss {train['loss']:.4f} ({terms}) "
              f"top1 {train['top1']:.2f} | test loss {test['loss']:.4f} top1 {test['top1']:.2f} "
              f"top5 {test['top5']:.2f}" + (f" | val top1 {val['top1']:.2f}" if val else "")
              + f" | {seconds:.1f}s" + (" *" if improved else ""), flush=True)

        checkpoint = {
            "format": CHECKPOINT_FORMAT, **checkpoint_info, "epoch": epoch,
            "model": student.state_dict(), "method": _extra_state(task),
            "test_top1": test["top1"], "test_top5": test["top5"],
            "val_top1": None if val is None else val["top1"],
            "best_top1": best["top1"], "best_epoch": best["epoch"], "selected_on": selected_on,
        }
        if improved:
            save_atomic(checkpoint, os.path.join(args.output_dir, "best.pt"))
        save_atomic(checkpoint, os.path.join(args.output_dir, "last.pt"))
    print(f"done: last epoch test top1 {test['top1']:.2f}; best epoch {best['epoch']} "
          f"({selected_on} top1 {best['top1']:.2f}) saved to {os.path.join(args.output_dir, 'best.pt')}")
    return test, best
