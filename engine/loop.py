"""The one training loop, shared by train_base.py and train_kd.py: fit() trains, steps the LR,
evaluates, records and saves, epoch after epoch."""
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import UserError, append_csv_row, is_main, log, progress_bar, write_csv, write_json

from .checkpoint import epoch_checkpoint, generator_states, restore, save_epoch, unwrap
from .processes import (Interrupted, StopOnSignal, check_replicas, exit_on_signal, over_processes, share_buffers,
                        wrap_for_processes)

CHECK_EVERY = 50  # steps between looks at the loss on an accelerator


class Diverged(Exception):
    def __init__(self, step):
        super().__init__(step)
        self.step = step


def autocast(device, amp):
    """bf16 autocast when amp is on; the losses themselves are computed in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def build_optimizer(task, cfg):
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.lr_milestones, gamma=cfg.lr_gamma)
    return optimizer, scheduler


def train_step(task, optimizer, batch, amp=False):
    """One optimisation step on one training batch (a training DeviceLoader's (images, labels, indices,
    views, strong)): (logits, loss, terms), all still on the device."""
    with autocast(batch[0].device, amp):
        logits, terms = task(*batch)
    loss = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss, terms


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
    for step, batch in enumerate(bar, start=1):
        logits, loss, terms = train_step(task, optimizer, batch, amp)
        targets = batch[1]
        n = len(targets)
        for name, value in (("loss", loss), *terms.items()):
            sums[name] = sums.get(name, 0.0) + value.detach() * n
        correct = correct + (logits.argmax(1) == targets).sum()
        seen += n
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss.detach()), step, first_bad_step)
        if step % check_every == 0 or step == len(loader):
            signalled = stop is not None and stop.signum is not None
            flags = torch.stack([first_bad_step, torch.tensor(int(signalled), device=device)])
            flags = over_processes(flags, "max").tolist()
            if flags[0] >= 0:
                raise Diverged(flags[0])
            if flags[1]:
                raise Interrupted
            if isinstance(bar, tqdm) and not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    names = list(sums)
    seen = torch.tensor(float(seen), device=device)
    totals = over_processes(torch.stack([sums[k] for k in names] + [correct * 1.0, seen])).tolist()
    stats = {name: value / totals[-1] for name, value in zip(names, totals)}
    stats["top1"] = 100.0 * totals[-2] / totals[-1]
    return stats


@torch.inference_mode()
def evaluate(model, loader, amp=False):
    """Mean cross-entropy, top-1 and top-5 (%) over the whole loader."""
    model.eval()
    totals, seen = torch.zeros(3, dtype=torch.float64, device=loader.labels.device), 0  # loss sum, top-1, top-5 hits
    for images, targets in loader:
        with autocast(images.device, amp):
            logits = model(images).float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        totals += torch.stack([F.cross_entropy(logits, targets, reduction="sum"), hits[:, 0].sum(),
                               hits.any(1).sum()]).double()
        seen += len(targets)  # counted on the host: a tensor made per batch would be a copy per batch
    loss_sum, top1, top5, seen = over_processes(torch.cat([totals, totals.new_tensor([seen])])).tolist()
    return {"loss": loss_sum / seen, "top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen}


DIVERGED = "diverged.json"


def fit(task, optimizer, scheduler, loaders, cfg, checkpoint_info, resume=None):
    """The epoch loop: train, step the LR, evaluate (every cfg.eval_every epochs and at the last),
    record a row of metrics.csv, save last.pt and best.pt. loaders: 'train', 'test' and maybe 'val';
    the best epoch is chosen among the evaluated ones on 'val' when it is there, else on the test set
    (and the checkpoint says which). checkpoint_info: plain-typed fields stored in every checkpoint.
    resume: (checkpoint, path) of a last.pt, or None. Under torchrun the task trains in
    DistributedDataParallel; rank 0 alone logs and writes."""
    train_loader, amp = loaders["train"], cfg.amp == "bf16"
    trainer = wrap_for_processes(task, train_loader.labels.device, cfg.sync_bn)
    selected_on = "val" if "val" in loaders else "test"
    metrics_path, last_path = (os.path.join(cfg.output_dir, name) for name in ("metrics.csv", "last.pt"))
    history, best, first_epoch = [], {"top1": -1.0, "epoch": 0}, 1
    if is_main() and os.path.exists(os.path.join(cfg.output_dir, DIVERGED)):  # a resume tries that epoch again
        os.remove(os.path.join(cfg.output_dir, DIVERGED))
    if resume is not None:
        ckpt, path = resume
        restore(task, optimizer, scheduler, train_loader, ckpt, path)
        history, first_epoch = ckpt["history"], ckpt["epoch"] + 1
        best = {"top1": ckpt["best_top1"], "epoch": ckpt["best_epoch"]}
        if is_main():
            write_csv(history, metrics_path)  # drops any row written after that checkpoint
        log(f"resumed from {path} after epoch {ckpt['epoch']}")
    test = None  # the last evaluated epoch's
    with StopOnSignal() as stop:
        for epoch in range(first_epoch, cfg.epochs + 1):
            start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
            task.start_epoch(epoch, cfg.epochs)
            try:
                train = train_one_epoch(trainer, train_loader, optimizer, f"epoch {epoch}/{cfg.epochs}", stop, amp)
            except Diverged as e:
                diverged(cfg.output_dir, epoch, f"The training loss became non-finite in epoch {epoch} at step "
                                                f"{e.step}, so the run stopped ({kept(epoch, last_path)}); check --lr "
                                                f"and the KD weights.")
            except Interrupted:
                exit_on_signal(stop.signum, epoch, last_path)
            share_buffers(task)
            scheduler.step()
            epoch_test, val = None, None
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                test = epoch_test = evaluate(task.predictor(), loaders["test"], amp)
                val = evaluate(task.predictor(), loaders["val"], amp) if "val" in loaders else None
            bad = first_non_finite(task, {"test": epoch_test, "validation": val})
            if bad:  # a diverged model is never saved, as last.pt nor as best.pt
                diverged(cfg.output_dir, epoch, f"Epoch {epoch} ended with {bad}, so the run stopped without saving "
                                                f"it ({kept(epoch, last_path)}); check --lr and the KD weights.")
            row = metrics_row(epoch, lr, train, epoch_test, val, "val" in loaders, time.perf_counter() - start)
            history.append(row)
            improved = epoch_test is not None and (val or epoch_test)["top1"] > best["top1"]
            if improved:
                best = {"top1": (val or epoch_test)["top1"], "epoch": epoch}
            log(epoch_line(row, cfg.epochs) + (" *" if improved else ""))
            generators = generator_states(train_loader)  # every process's: a collective under torchrun
            if is_main():
                fields = {"epoch": epoch, "test_top1": row["test_top1"], "test_top5": row["test_top5"],
                          "val_top1": row.get("val_top1"), "best_top1": best["top1"],
                          "best_epoch": best["epoch"], "selected_on": selected_on, "history": history}
                save_epoch(epoch_checkpoint(task, optimizer, scheduler, generators, checkpoint_info, fields),
                           cfg.output_dir, improved)
                append_csv_row(row, metrics_path)
    if first_epoch > cfg.epochs:
        log(f"nothing to do: {last_path} already holds epoch {first_epoch - 1} of {cfg.epochs}")
        return None, best
    check_replicas(task)
    log(f"done: last epoch test top1 {test['top1']:.2f}; best epoch {best['epoch']} "
        f"({selected_on} top1 {best['top1']:.2f}) saved to {os.path.join(cfg.output_dir, 'best.pt')}")
    return test, best


def first_non_finite(task, evaluations):
    """What in an epoch's result is not finite, in words (the first weight or buffer of the task, or an
    evaluation loss), or None when everything is. One host synchronisation for all the tensors."""
    state = {name: t for name, t in unwrap(task).state_dict().items() if t.is_floating_point()}
    finite = torch.stack([torch.isfinite(t).all() for t in state.values()]).tolist()
    for name, ok in zip(state, finite):
        if not ok:
            return f"the non-finite weight or buffer '{name}'"
    for split, result in evaluations.items():
        if result is not None and not math.isfinite(result["loss"]):
            return f"a {split} loss of {result['loss']}"
    return None


def diverged(folder, epoch, message):
    """Stops a run whose weights or losses became non-finite, leaving diverged.json (the epoch and the
    message) in its folder: sweep.py does not train it again, and report.py says so."""
    if is_main():
        write_json({"epoch": epoch, "message": message}, os.path.join(folder, DIVERGED))
    raise UserError(message)


def kept(epoch, last_path):
    """What a run that stops in `epoch` keeps, for messages."""
    return "no epoch was saved" if epoch == 1 else f"{last_path} holds epoch {epoch - 1}"


def metrics_row(epoch, lr, train, test, val, validating, seconds):
    """One row of metrics.csv: every training term as it enters the total, then the evaluations (None,
    an empty cell, in an epoch that was not evaluated)."""
    row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"]}
    row.update({f"train_{name}": train[name] for name in train if name not in ("loss", "top1")})
    row["train_top1"] = train["top1"]
    row.update({f"test_{key}": None if test is None else test[key] for key in ("loss", "top1", "top5")})
    if validating:
        row["val_top1"] = None if val is None else val["top1"]
    row["seconds"] = round(seconds, 3)
    return row


def epoch_line(row, epochs):
    terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in row.items()
                     if k.startswith("train_") and k not in ("train_loss", "train_top1"))
    evaluation = "not evaluated" if row["test_top1"] is None else \
        (f"test loss {row['test_loss']:.4f} top1 {row['test_top1']:.2f} top5 {row['test_top5']:.2f}" +
         (f" | val top1 {row['val_top1']:.2f}" if "val_top1" in row else ""))
    return (f"epoch {row['epoch']:3d}/{epochs} lr {row['lr']:.4g} | train loss {row['train_loss']:.4f} ({terms}) "
            f"top1 {row['train_top1']:.2f} | {evaluation} | {row['seconds']:.1f}s")
